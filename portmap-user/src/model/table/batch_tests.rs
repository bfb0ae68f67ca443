//! How the table's writes reach the maps in bulk: the order a [`Batch`] keeps, and a config
//! diff's removals and refusals, seen as the list of writes a recording model receives.

use std::collections::HashSet;

use portmap_common::{BackendValue, MaglevTable, MappingKey, MappingValue, PortKey};

use super::*;
use crate::{host::sockets::NoSockets, model::spec::parse};

/// The maps model, recording each write as (what, how many entries); `remove_mappings` fails
/// when `fail_removals` is set.
#[derive(Default)]
struct Recorder {
    contents: MapContents,
    log: Vec<(&'static str, usize)>,
    fail_removals: bool,
}

impl Maps for Recorder {
    fn set_mappings(&mut self, entries: &[(MappingKey, MappingValue)]) -> anyhow::Result<()> {
        self.log.push(("set_mappings", entries.len()));
        self.contents.set_mappings(entries)
    }
    fn remove_mappings(&mut self, keys: &[MappingKey]) -> anyhow::Result<()> {
        self.log.push(("remove_mappings", keys.len()));
        anyhow::ensure!(!self.fail_removals, "injected failure");
        self.contents.remove_mappings(keys)
    }
    fn set_backends(&mut self, slots: &[(u32, BackendValue)]) -> anyhow::Result<()> {
        self.log.push(("set_backends", slots.len()));
        self.contents.set_backends(slots)
    }
    fn set_maglev(&mut self, group: u32, table: &MaglevTable) -> anyhow::Result<()> {
        self.log.push(("set_maglev", 1));
        self.contents.set_maglev(group, table)
    }
    fn reset_counters(&mut self, slots: &[u32]) -> anyhow::Result<()> {
        self.log.push(("reset_counters", slots.len()));
        self.contents.reset_counters(slots)
    }
    fn publish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.log.push(("publish_ports", ports.len()));
        self.contents.publish_ports(ports)
    }
    fn unpublish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.log.push(("unpublish_ports", ports.len()));
        self.contents.unpublish_ports(ports)
    }
    fn set_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        self.log.push(("set_allow", list.prefixes.len()));
        self.contents.set_allow(list)
    }
    fn clear_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        self.log.push(("clear_allow", list.prefixes.len()));
        self.contents.clear_allow(list)
    }
}

fn m(spec: &str) -> Mapping {
    parse(spec).unwrap()
}

fn key(port: u16) -> MappingKey {
    m(&format!("{port}:198.18.2.2:80")).map_key(port)
}

fn value() -> MappingValue {
    let place = Placement {
        stats_slot: 0,
        group: None,
        allow: None,
    };
    mapping_entries(&m("1:198.18.2.2:80"), &place, false)[0].1
}

fn port(port: u16) -> PortKey {
    PortKey {
        port_be: port.to_be(),
        proto: 6,
        _pad: 0,
    }
}

const CAPACITY: Capacity = Capacity {
    ports: 8,
    groups: 2,
    backends: 8,
};

fn table() -> Table {
    Table::new(
        CAPACITY,
        PortRange {
            start: 40000,
            end: 40009,
        },
    )
}

fn specs(ports: std::ops::Range<u16>) -> Vec<Mapping> {
    ports.map(|p| m(&format!("{p}:198.18.2.2:80"))).collect()
}

#[test]
fn a_batch_writes_removals_first_and_before_any_write_that_passes_through() {
    let mut maps = Recorder::default();
    let mut batch = Batch::new(&mut maps);
    batch.set_mappings(&[(key(1), value())]).unwrap();
    batch.remove_mappings(&[key(2)]).unwrap();
    batch.remove_mappings(&[key(3)]).unwrap();
    batch.unpublish_ports(&[port(2), port(3)]).unwrap();
    batch.reset_counters(&[1]).unwrap();
    // A freed Maglev table is zeroed only once no entry points at it any more.
    batch.set_maglev(0, &MaglevTable::ZERO).unwrap();
    batch.remove_mappings(&[key(4)]).unwrap();
    batch.publish_ports(&[port(1)]).unwrap();
    batch.reset_counters(&[2]).unwrap();
    batch.commit().unwrap();
    assert_eq!(
        maps.log,
        [
            ("remove_mappings", 2),
            ("unpublish_ports", 2),
            ("set_maglev", 1),
            ("remove_mappings", 1),
            ("reset_counters", 2),
            ("publish_ports", 1),
            ("set_mappings", 1),
        ]
    );
}

#[test]
fn a_failed_removal_fails_the_commit_and_stops_the_writes_after_it() {
    let mut maps = Recorder {
        fail_removals: true,
        ..Recorder::default()
    };
    let mut batch = Batch::new(&mut maps);
    batch.remove_mappings(&[key(2)]).unwrap();
    // The table zeroes a freed Maglev table on a best-effort basis and goes on.
    assert!(batch.set_maglev(0, &MaglevTable::ZERO).is_err());
    batch.set_mappings(&[(key(1), value())]).unwrap();
    assert!(batch.commit().is_err());
    assert_eq!(maps.log, [("remove_mappings", 1)]);
}

#[test]
fn a_config_diff_removes_its_mappings_in_one_write_per_map() {
    let mut table = table();
    let mut maps = Recorder::default();
    table
        .apply_config(&mut maps, &[], &specs(8080..8084), &NoSockets)
        .unwrap();
    maps.log.clear();
    table.apply_config(&mut maps, &[], &[], &NoSockets).unwrap();
    assert_eq!(maps.log, [("remove_mappings", 4), ("unpublish_ports", 4)]);
    assert_eq!(maps.contents, MapContents::default());
}

#[test]
fn a_config_diff_that_needs_more_stats_slots_than_are_free_fails_before_writing() {
    let mut table = table();
    let mut maps = Recorder::default();
    for desired in [specs(8080..8084), vec![], specs(8090..8094)] {
        table.apply_config(&mut maps, &[], &desired, &NoSockets).unwrap();
    }
    // Slots 0-3 drain until an expiry pass finds no flow counting into them; 4-7 are in use,
    // and replacing their mappings needs four more.
    maps.log.clear();
    let before = table.clone();
    let err = table
        .apply_config(&mut maps, &[], &specs(9090..9094), &NoSockets)
        .unwrap_err();
    assert!(
        matches!(
            err,
            TableError::Full {
                limit: "max_mappings",
                ..
            }
        ),
        "{err}"
    );
    // (The rollback passes empty lists, which write nothing.)
    assert!(
        maps.log.iter().all(|&(_, entries)| entries == 0),
        "nothing written, nothing to undo: {:?}",
        maps.log
    );
    assert_eq!(table, before);
    maps.log.clear();
    assert_eq!(table.release_drained(&HashSet::new()), 4);
    table
        .apply_config(&mut maps, &[], &specs(9090..9094), &NoSockets)
        .unwrap();
    assert_eq!(
        maps.log,
        [
            ("remove_mappings", 4),
            ("unpublish_ports", 4),
            ("reset_counters", 4),
            ("publish_ports", 4),
            ("set_mappings", 4)
        ]
    );
}
