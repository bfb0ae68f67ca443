//! The table's all-or-nothing logic, without privileges: the maps are a [`MapContents`] model
//! whose n-th write fails. Every write of an add, an update and a config diff is failed in turn
//! (the last one included), and the table and the maps must then be exactly as before; after
//! every success the maps must hold exactly what the table's mappings need.

use anyhow::bail;
use portmap_common::{BackendValue, MaglevTable, MappingKey, MappingValue, PortKey};

use std::collections::HashSet;

use super::*;
use crate::{host::sockets::NoSockets, model::spec::parse};

/// The maps model, failing its `fail_at`-th write (counting every call from 0). A failing
/// `set_mappings` writes the first half of its entries first, as a batch the kernel cut short.
#[derive(Clone, Debug, Default)]
struct FlakyMaps {
    contents: MapContents,
    writes: usize,
    fail_at: Option<usize>,
}

impl FlakyMaps {
    fn write(&mut self) -> anyhow::Result<()> {
        let n = self.writes;
        self.writes += 1;
        if self.fail_at == Some(n) {
            bail!("injected failure of write {n}");
        }
        Ok(())
    }
}

impl Maps for FlakyMaps {
    fn set_mappings(&mut self, entries: &[(MappingKey, MappingValue)]) -> anyhow::Result<()> {
        if let Err(e) = self.write() {
            self.contents.set_mappings(&entries[..entries.len() / 2])?;
            return Err(e);
        }
        self.contents.set_mappings(entries)
    }
    fn remove_mappings(&mut self, keys: &[MappingKey]) -> anyhow::Result<()> {
        self.write()?;
        self.contents.remove_mappings(keys)
    }
    fn set_backends(&mut self, slots: &[(u32, BackendValue)]) -> anyhow::Result<()> {
        self.write()?;
        self.contents.set_backends(slots)
    }
    fn set_maglev(&mut self, group: u32, table: &MaglevTable) -> anyhow::Result<()> {
        self.write()?;
        self.contents.set_maglev(group, table)
    }
    fn reset_counters(&mut self, slots: &[u32]) -> anyhow::Result<()> {
        self.write()?;
        self.contents.reset_counters(slots)
    }
    fn publish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.write()?;
        self.contents.publish_ports(ports)
    }
    fn unpublish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.write()?;
        self.contents.unpublish_ports(ports)
    }
    fn set_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        if let Err(e) = self.write() {
            let half = AllowPlacement {
                prefixes: list.prefixes[..list.prefixes.len() / 2].to_vec().into(),
                ..list.clone()
            };
            self.contents.set_allow(&half)?;
            return Err(e);
        }
        self.contents.set_allow(list)
    }
    fn clear_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        self.write()?;
        self.contents.clear_allow(list)
    }
}

/// What the maps must hold for `table`'s mappings, and nothing else.
fn expected_contents(table: &Table) -> MapContents {
    let mut want = MapContents::default();
    for e in table.entries() {
        if let Some(group) = &e.place.group {
            let (backends, maglev) = group_contents(&e.mapping, group).unwrap();
            want.set_backends(&backends).unwrap();
            want.set_maglev(group.group, &maglev).unwrap();
        }
        want.set_mappings(&mapping_entries(
            &e.mapping,
            &e.place,
            e.origin.runtime_reserves(),
        ))
        .unwrap();
    }
    want.published_ports = table.published_ports();
    want.allow = table.allow_entries();
    want
}

fn m(spec: &str) -> Mapping {
    parse(spec).unwrap()
}

/// `spec` with its own allow-list.
fn ma(spec: &str, allow: &[&str]) -> Mapping {
    m(spec).with_allow(nets(allow))
}

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A table with single-backend, Maglev and range mappings, and freed slots waiting for reuse.
fn populated() -> (Table, FlakyMaps) {
    let capacity = Capacity {
        ports: 64,
        groups: 4,
        backends: 16,
    };
    let mut table = Table::new(
        capacity,
        PortRange {
            start: 40000,
            end: 40009,
        },
    );
    let mut maps = FlakyMaps::default();
    for spec in [
        "8080:198.18.2.2:80",
        "8081:198.18.2.2:81,198.18.2.3:81",
        "9000-9003:198.18.2.2:7000-7003/udp",
        "8082:198.18.2.4:80,198.18.2.5:80@3",
        "8083:198.18.2.6:80",
    ] {
        table.add(&mut maps, &m(spec), &NoSockets).unwrap();
    }
    // Two mappings that share one allow-list, and one with a list of its own.
    for (spec, allow) in [
        ("8084:198.18.2.6:80", &["198.18.1.0/24", "198.18.3.0/24"][..]),
        ("8085:198.18.2.6:81", &["198.18.3.0/24", "198.18.1.0/24"][..]),
        ("8086:198.18.2.6:82", &["198.18.4.4/32"][..]),
    ] {
        table.add(&mut maps, &ma(spec, allow), &NoSockets).unwrap();
    }
    table
        .remove(&mut maps, &m("8082:198.18.2.4:80,198.18.2.5:80@3"))
        .unwrap();
    table.remove(&mut maps, &m("8083:198.18.2.6:80")).unwrap();
    assert_eq!(maps.contents, expected_contents(&table));
    (table, maps)
}

/// How an operation met the failure of each of its writes.
struct Outcomes {
    writes: usize,
    /// The operation failed (and was rolled back).
    refused: usize,
    /// The failed write was a clean-up after the change took effect (zeroing freed slots).
    after_commit: usize,
    /// A failure of the very last write refused the change.
    last_refused: bool,
}

/// Runs `op` once to count its writes, then once failing each of them (the last one included).
/// A failure that makes `op` fail must leave table and maps exactly as before. One after the
/// change took effect (the best-effort zeroing of freed slots) must leave the changed table and
/// the maps with every entry and live group the change needs; only freed slots may keep content.
fn fails_cleanly_at_every_write(
    what: &str,
    op: impl Fn(&mut Table, &mut FlakyMaps) -> Result<(), TableError>,
) -> Outcomes {
    let (table, maps) = populated();
    let (mut ok_table, mut ok_maps) = (table.clone(), maps.clone());
    op(&mut ok_table, &mut ok_maps).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        ok_maps.contents,
        expected_contents(&ok_table),
        "{what}: after success"
    );
    let writes = ok_maps.writes - maps.writes;
    assert!(writes > 0, "{what} wrote nothing");
    let mut outcomes = Outcomes {
        writes,
        refused: 0,
        after_commit: 0,
        last_refused: false,
    };
    for n in 0..writes {
        let (mut t, mut fm) = (table.clone(), maps.clone());
        fm.fail_at = Some(maps.writes + n);
        let context = format!("{what}: after a failure of write {n} of {writes}");
        match op(&mut t, &mut fm) {
            Err(err) => {
                assert!(matches!(err, TableError::Datapath(_)), "{context}: {err}");
                assert_eq!(t, table, "{context}: table");
                assert_eq!(fm.contents, maps.contents, "{context}: maps");
                outcomes.refused += 1;
                outcomes.last_refused = n + 1 == writes;
            }
            Ok(()) => {
                assert_eq!(t, ok_table, "{context}: table");
                let want = expected_contents(&ok_table);
                assert_eq!(fm.contents.mappings, want.mappings, "{context}: entries");
                assert_eq!(
                    fm.contents.published_ports, want.published_ports,
                    "{context}: ports"
                );
                for (group, table) in &want.maglev {
                    assert_eq!(fm.contents.maglev.get(group), Some(table), "{context}");
                }
                for (slot, backend) in &want.backends {
                    assert_eq!(fm.contents.backends.get(slot), Some(backend), "{context}");
                }
                assert!(want.allow.is_subset(&fm.contents.allow), "{context}: allow-lists");
                outcomes.after_commit += 1;
            }
        }
    }
    assert!(
        outcomes.refused > 0,
        "{what}: no write failure refused the change"
    );
    outcomes
}

#[test]
fn rollback_of_add_failing_on_any_write_leaves_table_and_maps_as_before() {
    for spec in [
        "7070:198.18.2.9:80",
        "7071:198.18.2.9:80,198.18.2.10:80,198.18.2.11:80@2",
        "7100-7110:198.18.2.9:80/udp",
        ":198.18.2.9:80",
        "198.18.2.9:7000-7001",
    ] {
        let o = fails_cleanly_at_every_write(spec, |t, maps| t.add(maps, &m(spec), &NoSockets).map(drop));
        // The last write publishes the entries: nothing comes after it, so every failure
        // refuses the add.
        assert_eq!(o.refused, o.writes, "{spec}");
    }
}

#[test]
fn rollback_of_update_failing_on_any_write_leaves_table_and_maps_as_before() {
    for spec in [
        // one backend -> another one
        "8080:198.18.2.7:80",
        // one backend -> several
        "8080:198.18.2.2:80,198.18.2.7:80",
        // several -> several (new backend slots, same Maglev table)
        "8081:198.18.2.2:81,198.18.2.8:81@2",
        // several -> one
        "8081:198.18.2.3:81",
        // a range onto other backend ports
        "9000-9003:198.18.2.2:7100-7103/udp",
    ] {
        let o = fails_cleanly_at_every_write(spec, |t, maps| t.update(maps, &m(spec)).map(drop));
        // Only the zeroing of the slots the old version alone used comes after the new entries.
        assert!(
            o.after_commit <= 2,
            "{spec}: {} writes after the commit",
            o.after_commit
        );
        assert!(o.last_refused || o.after_commit > 0, "{spec}");
    }
}

#[test]
fn rollback_of_allow_list_changes_failing_on_any_write_leaves_table_and_maps_as_before() {
    let o = fails_cleanly_at_every_write("add with a new list", |t, maps| {
        t.add(
            maps,
            &ma("7070:198.18.2.9:80", &["198.18.5.0/24", "198.18.6.0/24"]),
            &NoSockets,
        )
        .map(drop)
    });
    assert_eq!(o.refused, o.writes);
    fails_cleanly_at_every_write("add with a shared list", |t, maps| {
        t.add(
            maps,
            &ma("7070:198.18.2.9:80", &["198.18.3.0/24", "198.18.1.0/24"]),
            &NoSockets,
        )
        .map(drop)
    });
    for allow in [&["198.18.1.0/24"][..], &[][..], &["198.18.4.4/32"][..]] {
        fails_cleanly_at_every_write("update of a list", |t, maps| {
            t.update(maps, &ma("8084:198.18.2.6:80", allow)).map(drop)
        });
    }
    fails_cleanly_at_every_write("a new host list", |t, maps| {
        t.set_policy(maps, &nets(&["198.18.9.0/24", "fd00:9::/64"]))
            .map(drop)
    });
    let desired = vec![
        m("8080:198.18.2.2:80"),
        ma("8081:198.18.2.2:81,198.18.2.3:81", &["198.18.7.0/24"]),
    ];
    fails_cleanly_at_every_write("a config with a host list", |t, maps| {
        t.apply_config(maps, &nets(&["198.18.8.0/24"]), &desired, &NoSockets)
            .map(drop)
    });
}

#[test]
fn mappings_with_the_same_list_share_it_and_the_host_list_applies_to_the_others() {
    let (mut table, mut maps) = populated();
    let lists = |t: &Table| {
        t.entries()
            .iter()
            .map(|e| {
                (
                    e.mapping.host_ports.unwrap().start,
                    e.place.allow.as_ref().map(|a| a.list),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = lists(&table);
    assert_eq!(before[&8084], before[&8085]);
    assert_ne!(before[&8084], before[&8086]);
    assert_eq!(before[&8080], None);
    // One list of 2 prefixes and one of 1.
    assert_eq!(maps.contents.allow.len(), 3);
    // The host's list: every mapping without its own takes it (IPv4 part only), one list.
    table.take_flushes();
    let changed = table
        .set_policy(&mut maps, &nets(&["198.18.9.0/24", "fd00:9::/64"]))
        .unwrap();
    assert_eq!(changed, 3, "8080, 8081 and the range");
    let after = lists(&table);
    assert!(after[&8080].is_some() && after[&8080] == after[&9000] && after[&8081] == after[&8080]);
    assert_eq!(after[&8084], before[&8084]);
    assert_eq!(maps.contents, expected_contents(&table));
    assert!(
        maps.contents
            .allow
            .iter()
            .any(|(_, n)| *n == nets(&["198.18.9.0/24"])[0])
    );
    assert!(!maps.contents.allow.iter().any(|(_, n)| n.addr().is_ipv6()));
    // Their flows from outside the new list go.
    let flushes = table.take_flushes();
    assert_eq!(flushes.len(), 3, "{flushes:?}");
    assert!(
        flushes
            .iter()
            .all(|f| f.outside == Some(nets(&["198.18.9.0/24"]).into()))
    );
    // The host list goes: so do its list and its entries; own lists stay.
    table.set_policy(&mut maps, &[]).unwrap();
    assert_eq!(lists(&table), before);
    assert_eq!(maps.contents, expected_contents(&table));
    // The last user of a list takes its entries with it.
    table.remove(&mut maps, &m("8086:198.18.2.6:82")).unwrap();
    assert_eq!(maps.contents.allow.len(), 2);
    table.remove(&mut maps, &m("8084:198.18.2.6:80")).unwrap();
    assert_eq!(maps.contents.allow.len(), 2, "8085 still uses it");
    table.remove(&mut maps, &m("8085:198.18.2.6:81")).unwrap();
    assert!(maps.contents.allow.is_empty());
}

#[test]
fn a_dynamic_mapping_keeps_its_port_when_its_list_changes() {
    let (mut table, mut maps) = populated();
    table
        .apply(&mut maps, &[m(":198.18.2.9:80")], &NoSockets)
        .unwrap();
    let port = |t: &Table| {
        t.mappings()
            .iter()
            .find(|x| x.backends[0].ip.to_string() == "198.18.2.9")
            .unwrap()
            .host_ports
    };
    let before = port(&table);
    let plan = table
        .apply(&mut maps, &[ma(":198.18.2.9:80", &["198.18.1.0/24"])], &NoSockets)
        .unwrap();
    assert_eq!((plan.add.len(), plan.update.len(), plan.remove.len()), (0, 1, 0));
    assert_eq!(port(&table), before);
    assert_eq!(maps.contents, expected_contents(&table));
}

#[test]
fn del_names_a_mapping_without_its_list() {
    let (mut table, mut maps) = populated();
    let removed = table.remove(&mut maps, &m("8084:198.18.2.6:80")).unwrap();
    assert_eq!(removed.allow, nets(&["198.18.1.0/24", "198.18.3.0/24"]));
}

#[test]
fn rollback_of_remove_failing_leaves_table_and_maps_as_before() {
    fails_cleanly_at_every_write("del", |t, maps| {
        t.remove(maps, &m("8081:198.18.2.2:81,198.18.2.3:81")).map(drop)
    });
}

#[test]
fn rollback_of_config_diff_failing_on_any_write_leaves_table_and_maps_as_before() {
    // Removes the range, updates both Maglev mappings, keeps 8080, adds three (one dynamic,
    // one with several backends that can take the freed Maglev slots).
    let desired: Vec<Mapping> = [
        "8080:198.18.2.2:80",
        "8081:198.18.2.2:81,198.18.2.3:81,198.18.2.4:81",
        "8090:198.18.2.5:80,198.18.2.6:80",
        "9100-9101:198.18.2.2:80/udp",
        ":198.18.2.9:80",
    ]
    .iter()
    .map(|s| m(s))
    .collect();
    let o = fails_cleanly_at_every_write("config diff", |t, maps| {
        t.apply(maps, &desired, &NoSockets).map(drop)
    });
    // The diff's last write is the batch of new entries: a failure there undoes the whole diff.
    assert!(o.last_refused && o.writes >= 6, "{} writes", o.writes);
}

#[test]
fn a_refused_diff_writes_nothing() {
    let (mut table, mut maps) = populated();
    let before = (table.clone(), maps.contents.clone(), maps.writes);
    // 7000 twice: the second add is refused by the table before its entries are written.
    let desired = [
        m("8080:198.18.2.2:80"),
        m("7000:198.18.2.9:80"),
        m("7000:198.18.2.8:80"),
    ];
    let err = table.apply(&mut maps, &desired, &NoSockets).unwrap_err();
    assert!(matches!(err, TableError::Allocated { .. }), "{err}");
    assert_eq!((table, maps.contents), (before.0, before.1));
}

#[test]
fn freed_slots_are_zeroed_and_reused() {
    let (mut table, mut maps) = populated();
    // The Maglev table and backend slots of the removed 8082 are zero and taken again.
    table
        .add(&mut maps, &m("8094:198.18.2.6:80,198.18.2.7:80"), &NoSockets)
        .unwrap();
    table.update(&mut maps, &m("8081:198.18.2.2:81")).unwrap();
    assert_eq!(maps.contents, expected_contents(&table));
    assert_eq!(maps.contents.maglev.len(), 1, "only 8094 keeps a Maglev table");
    assert_eq!(maps.contents.backends.len(), 2);
}

#[test]
fn an_uncommitted_batch_writes_no_entry() {
    let mut maps = MapContents::default();
    let key = m("8080:198.18.2.2:80").map_key(8080);
    let value = mapping_entries(
        &m("8080:198.18.2.2:80"),
        &Placement {
            stats_slot: 0,
            group: None,
            allow: None,
        },
        false,
    )[0]
    .1;
    {
        let mut batch = Batch::new(&mut maps);
        batch.set_mappings(&[(key, value)]).unwrap();
    }
    assert!(maps.mappings.is_empty());
    let mut batch = Batch::new(&mut maps);
    batch.set_mappings(&[(key, value)]).unwrap();
    batch.commit().unwrap();
    assert_eq!(maps.mappings.len(), 1);
}

#[test]
fn a_removed_mappings_stats_slot_is_not_reused_while_its_flows_live() {
    let (mut table, mut maps) = populated();
    table.take_flushes();
    let slot_of = |t: &Table, port: u16| {
        t.entries()
            .into_iter()
            .find(|e| e.mapping.host_ports.is_some_and(|p| p.contains(port)))
            .map(|e| e.place.stats_slot)
            .unwrap()
    };
    let old = slot_of(&table, 8080);
    table.remove(&mut maps, &m("8080:198.18.2.2:80")).unwrap();
    // Until an expiry pass finds no flow counting into it, the slot stays out of the pool (the
    // slots of 8082 and 8083, removed earlier without flows, go back).
    assert_eq!(table.release_drained(&HashSet::from([old])), 2);
    for port in 7000..7004 {
        table
            .add(&mut maps, &m(&format!("{port}:198.18.2.9:80")), &NoSockets)
            .unwrap();
        assert_ne!(slot_of(&table, port), old);
    }
    assert_eq!(table.release_drained(&HashSet::new()), 1);
    let mut reused = false;
    for port in 7004..7008 {
        table
            .add(&mut maps, &m(&format!("{port}:198.18.2.9:80")), &NoSockets)
            .unwrap();
        reused |= slot_of(&table, port) == old;
    }
    assert!(reused, "a released slot is handed out again");
}

#[test]
fn updates_flush_the_udp_flows_of_removed_backends_only() {
    let (mut table, mut maps) = populated();
    table
        .add(&mut maps, &m("8081:198.18.2.2:81,198.18.2.3:81/udp"), &NoSockets)
        .unwrap();
    table.take_flushes();
    table
        .update(&mut maps, &m("8081:198.18.2.2:81,198.18.2.7:81/udp"))
        .unwrap();
    let flushes = table.take_flushes();
    assert_eq!(flushes.len(), 1, "{flushes:?}");
    assert_eq!(
        flushes[0].backend,
        Some(("198.18.2.3".parse().unwrap(), PortRange::single(81)))
    );
    // The TCP mapping of the same port: its flows finish where they are, nothing to flush.
    table
        .update(&mut maps, &m("8081:198.18.2.2:81,198.18.2.7:81"))
        .unwrap();
    assert_eq!(table.take_flushes(), vec![]);
}

/// Removing a UDP mapping flushes its flows (by its stats slot); removing a TCP one records
/// nothing, so the daemon does not scan the flow tables for flows `plan_flush` would keep.
#[test]
fn removals_flush_udp_flows_only() {
    let (mut table, mut maps) = populated();
    table.take_flushes();
    let udp = table
        .entries()
        .into_iter()
        .find(|e| e.mapping.protocol == Protocol::Udp)
        .map(|e| e.place.stats_slot)
        .unwrap();
    table.remove(&mut maps, &m("8080:198.18.2.2:80")).unwrap();
    assert_eq!(table.take_flushes(), vec![]);
    table
        .remove(&mut maps, &m("9000-9003:198.18.2.2:7000-7003/udp"))
        .unwrap();
    assert_eq!(
        table.take_flushes(),
        vec![FlowFlush {
            stats_slot: udp,
            backend: None,
            outside: None,
        }]
    );
}

const SMALL: Capacity = Capacity {
    ports: 64,
    groups: 4,
    backends: 16,
};

/// The table as the next daemon sees it: its mappings (with slots, origins, order), its draining
/// slots, and the maps it writes.
fn assert_same_table(restored: &Table, table: &Table) {
    let entries = |t: &Table| t.entries().into_iter().cloned().collect::<Vec<_>>();
    assert_eq!(entries(restored), entries(table));
    let sorted = |t: &Table| {
        let mut d = t.draining.clone();
        d.sort_unstable();
        d
    };
    assert_eq!(sorted(restored), sorted(table));
    assert_eq!(restored.published_ports(), table.published_ports());
    let mut fresh = FlakyMaps::default();
    restored.rewrite(&mut fresh).unwrap();
    assert_eq!(fresh.contents.mappings, expected_contents(table).mappings);
    assert_eq!(restored.mapping_keys().len(), fresh.contents.mappings.len());
}

/// What the daemon saves and the next one restores is the same table, through JSON as in the
/// state file: a snapshot alone, and a snapshot followed by the records of later adds, updates
/// and removals (the journal). Slots the restored table hands out are free in the original.
#[test]
fn a_snapshot_and_its_journal_restore_the_same_table() {
    let (mut table, mut maps) = populated();
    table
        .add_as(&mut maps, &m("198.18.2.9:90"), &NoSockets, Origin::Runtime)
        .unwrap();
    table.take_changes();
    let json = serde_json::to_string(&table.snapshot()).unwrap();
    let dynamic = table.dynamic;
    let restore = |records: Vec<Record>| {
        Table::from_snapshot(SMALL, dynamic, serde_json::from_str(&json).unwrap(), records).unwrap()
    };
    assert_same_table(&restore(Vec::new()), &table);

    table.remove(&mut maps, &m("8080:198.18.2.2:80")).unwrap();
    table
        .update(&mut maps, &m("8081:198.18.2.2:81,198.18.2.7:81"))
        .unwrap();
    table
        .add(&mut maps, &m("8090:198.18.2.8:80,198.18.2.9:80"), &NoSockets)
        .unwrap();
    let records = table.take_changes();
    assert_eq!(records.len(), 3);
    let lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let mut restored = restore(lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect());
    assert_same_table(&restored, &table);
    // What the restored table allocates next is what the original has free.
    let next = restored
        .add(
            &mut FlakyMaps::default(),
            &m("8095:198.18.2.10:80,198.18.2.11:80"),
            &NoSockets,
        )
        .unwrap();
    let place = &restored.entries().last().unwrap().place;
    assert!(
        table
            .entries()
            .iter()
            .all(|e| e.place.stats_slot != place.stats_slot),
        "{next}"
    );
    assert!(!table.draining.contains(&place.stats_slot));

    // Saved with other limits: refused, naming the limit.
    let smaller = Capacity { ports: 32, ..SMALL };
    let err = Table::from_snapshot(
        smaller,
        table.dynamic,
        serde_json::from_str(&json).unwrap(),
        Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("limits.max_mappings"), "{err}");
}

/// The host's list on many mappings is saved once, not once per mapping, in the snapshot and in
/// the journal (a new list is a record of its own before the entries that name it), and the
/// restored mappings share one copy of it.
#[test]
fn a_shared_list_is_saved_once_and_restored_shared() {
    let (mut table, mut maps) = populated();
    let host: Vec<ipnet::IpNet> = (0..200)
        .map(|i| format!("198.19.{i}.0/24").parse().unwrap())
        .collect();
    table.set_policy(&mut maps, &host).unwrap();
    table.take_changes();
    let json = serde_json::to_string(&table.snapshot()).unwrap();
    assert_eq!(
        json.matches("198.19.199.0/24").count(),
        1,
        "the list once in {json}"
    );
    let dynamic = table.dynamic;
    let restore = |records: Vec<Record>| {
        Table::from_snapshot(SMALL, dynamic, serde_json::from_str(&json).unwrap(), records).unwrap()
    };
    let shared = |t: &Table| {
        let on_host: Vec<*const ipnet::IpNet> = t
            .entries()
            .iter()
            .filter(|e| e.mapping.allow.is_empty())
            .map(|e| e.place.allow.as_ref().unwrap().prefixes.as_ptr())
            .collect();
        assert_eq!(on_host.len(), 3, "8080, 8081 and the range");
        on_host.windows(2).all(|w| w[0] == w[1])
    };
    let restored = restore(Vec::new());
    assert_same_table(&restored, &table);
    assert!(shared(&restored));

    // Another host list, then a mapping with a list of its own: the journal holds each new
    // list once and the entries that name them.
    table.set_policy(&mut maps, &host[..100]).unwrap();
    table
        .add(
            &mut maps,
            &ma("8091:198.18.2.9:80", &["198.18.5.0/24"]),
            &NoSockets,
        )
        .unwrap();
    let lines: Vec<String> = table
        .take_changes()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("{\"list\"")).count(),
        2,
        "{lines:?}"
    );
    assert_eq!(lines.iter().filter(|l| l.contains("198.19.99.0/24")).count(), 1);
    let restored = restore(lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect());
    assert_same_table(&restored, &table);
    assert!(shared(&restored));
    assert_eq!(restored.allow_entries(), table.allow_entries());

    // An entry that names a list no record holds is refused, naming it.
    let mut value = serde_json::to_value(table.snapshot()).unwrap();
    value["allow_lists"] = serde_json::json!([]);
    let err =
        Table::from_snapshot(SMALL, dynamic, serde_json::from_value(value).unwrap(), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("which is not saved"), "{err}");
}

/// A snapshot whose mappings share a stats slot is refused rather than restored.
#[test]
fn an_inconsistent_snapshot_is_refused() {
    let (table, _) = populated();
    let mut value = serde_json::to_value(table.snapshot()).unwrap();
    let slot = value["entries"][0]["place"]["stats_slot"].clone();
    value["entries"][1]["place"]["stats_slot"] = slot;
    let err = Table::from_snapshot(
        SMALL,
        table.dynamic,
        serde_json::from_value(value).unwrap(),
        Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("used twice"), "{err}");
}

/// A config diff leaves mappings added at run time alone, and a config mapping identical to one
/// of them (a saved `list --json`) takes it over instead of conflicting.
#[test]
fn config_diffs_leave_runtime_mappings_alone() {
    let (mut table, mut maps) = populated();
    let runtime = table
        .add_as(&mut maps, &m("198.18.2.9:90"), &NoSockets, Origin::Runtime)
        .unwrap();
    let config = table.requested();
    table.apply(&mut maps, &[], &NoSockets).unwrap();
    assert_eq!(
        table.mappings(),
        vec![runtime.clone()],
        "the config's mappings went, the runtime one stayed"
    );
    table.apply(&mut maps, &config, &NoSockets).unwrap();
    // Now the config names the runtime mapping as applied (its allocated port).
    let mut with_runtime = config.clone();
    with_runtime.push(runtime.clone());
    let plan = table.apply(&mut maps, &with_runtime, &NoSockets).unwrap();
    assert!(plan.is_empty(), "taken over without a change: {plan:?}");
    table.apply(&mut maps, &config, &NoSockets).unwrap();
    assert!(
        !table.mappings().contains(&runtime),
        "the config's now, so the config removes it"
    );
    assert_eq!(maps.contents, expected_contents(&table));
}

/// A container's mappings are its own: publishing them again changes nothing, another owner's
/// port is refused, an empty set removes exactly that container's, and config diffs leave them.
#[test]
fn containers_own_their_mappings() {
    let (mut table, mut maps) = populated();
    let c1 = Origin::Container("net/c1/eth0".into());
    let c2 = Origin::Container("net/c2/eth0".into());
    let web = [m("8090:198.18.2.20:80"), m("8091:198.18.2.20:81/udp")];
    let plan = table.apply_as(&mut maps, &c1, &web, &NoSockets).unwrap();
    assert_eq!(plan.add.len(), 2);
    assert!(
        table
            .apply_as(&mut maps, &c1, &web, &NoSockets)
            .unwrap()
            .is_empty()
    );
    let before = table.clone();
    let err = table
        .apply_as(&mut maps, &c2, &[m("8090:198.18.2.21:80")], &NoSockets)
        .unwrap_err();
    assert!(err.to_string().contains("8090"), "{err}");
    assert_eq!(table, before, "the refused owner changed nothing");
    let config = table.requested();
    table.apply(&mut maps, &config, &NoSockets).unwrap();
    assert_eq!(table.containers()["net/c1/eth0"], web.to_vec());
    table.apply_as(&mut maps, &c1, &[], &NoSockets).unwrap();
    assert!(table.containers().is_empty());
    assert_eq!(table.mappings(), before.requested(), "only the container's went");
    assert_eq!(maps.contents, expected_contents(&table));
}

/// A Docker container's mappings: the config's diff leaves them, the first owner of a port keeps
/// it (named), a rename keeps the mappings (journalled), and they survive the state file.
#[test]
fn docker_containers_own_their_mappings_by_id() {
    let (mut table, mut maps) = populated();
    let web = DockerContainer {
        id: "0123456789abcdef".into(),
        name: "web".into(),
    };
    let published = [m("9000:198.18.60.2:8000"), m("[::]:9000:[fd00:60::2]:8000")];
    table
        .apply_as(&mut maps, &Origin::Docker(web.clone()), &published, &NoSockets)
        .unwrap();
    let config = table.requested();
    table.apply(&mut maps, &config[1..], &NoSockets).unwrap();
    assert_eq!(table.docker_containers(), BTreeSet::from([web.clone()]));
    let (existing, owner) = table.owner_overlapping(&m("9000:198.18.60.9:80")).unwrap();
    assert_eq!(
        (existing.to_string(), owner),
        (published[0].to_string(), web.owner())
    );
    let taken = config[1].clone();
    let other = Origin::Docker(DockerContainer {
        id: "fedcba".into(),
        name: "other".into(),
    });
    assert!(matches!(
        table.apply_as(&mut maps, &other, &[taken], &NoSockets),
        Err(TableError::Allocated { .. })
    ));
    table.take_changes();
    let renamed = DockerContainer {
        name: "web2".into(),
        ..web.clone()
    };
    table.rename_docker(&renamed);
    assert_eq!(table.take_changes().len(), 2, "both mappings journalled");
    let json = serde_json::to_string(&table.snapshot()).unwrap();
    let restored = Table::from_snapshot(
        SMALL,
        table.dynamic,
        serde_json::from_str(&json).unwrap(),
        Vec::new(),
    )
    .unwrap();
    assert_same_table(&restored, &table);
    assert_eq!(restored.docker_containers(), BTreeSet::from([renamed.clone()]));
    assert!(Origin::Docker(renamed).runtime_reserves());
    assert_eq!(maps.contents, expected_contents(&table));
}

/// The pinned maps alone give the mappings back (the state file lost): each with its slots, the
/// weights as their Maglev shares, owned by `unknown` (a container's reservation kept), and the
/// config or the container asking for one again takes it over without a change to the maps.
#[test]
fn the_pinned_maps_alone_give_the_mappings_back() {
    let (mut table, mut maps) = populated();
    table
        .add(&mut maps, &m("8094:198.18.2.7:80,198.18.2.8:80@3"), &NoSockets)
        .unwrap();
    let container = Origin::Container("net/c1/eth0".into());
    let published = [m("8090:198.18.2.20:80")];
    table
        .apply_as(&mut maps, &container, &published, &NoSockets)
        .unwrap();
    let capacity = Capacity {
        ports: 64,
        groups: 4,
        backends: 16,
    };
    let (mut recovered, skipped) = Table::recover(capacity, table.dynamic, &maps.contents).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    let sorted = |t: &Table| {
        let mut all: Vec<(Mapping, Placement)> = t
            .entries()
            .into_iter()
            .map(|e| (e.mapping.clone(), e.place.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    assert_eq!(sorted(&recovered), sorted(&table));
    let owners: BTreeSet<String> = recovered
        .entries()
        .iter()
        .map(|e| e.origin.owner().into_owned())
        .collect();
    assert_eq!(
        owners,
        BTreeSet::from(["unknown".into(), "unknown-container".into()])
    );
    let mut fresh = FlakyMaps::default();
    recovered.rewrite(&mut fresh).unwrap();
    assert_eq!(
        fresh.contents, maps.contents,
        "the same maps, Maglev tables included"
    );

    let writes = maps.writes;
    let config = table.requested();
    assert!(
        recovered
            .apply(&mut maps, &config, &NoSockets)
            .unwrap()
            .is_empty()
    );
    assert!(
        recovered
            .apply_as(&mut maps, &container, &published, &NoSockets)
            .unwrap()
            .is_empty()
    );
    assert_eq!(maps.writes, writes, "taken over without a map write");
    assert_eq!(recovered.requested(), config);
    assert_eq!(recovered.containers()["net/c1/eth0"], published.to_vec());
}

/// Docker's `-p 8000-8002:80`: each such mapping gets one free port of the range (published or
/// reserved ones skipped), and a full range is an error that names it.
#[test]
fn a_host_range_with_one_backend_port_publishes_one_free_port_of_it() {
    let (mut table, mut maps) = populated();
    table.reserved = vec![PortRange::single(8001)];
    let range = m("8000-8003:198.18.2.30:80");
    assert!(range.picks_one());
    let a = table.add(&mut maps, &range, &NoSockets).unwrap();
    let b = table
        .add(&mut maps, &m("8000-8003:198.18.2.31:80"), &NoSockets)
        .unwrap();
    let c = table
        .add(&mut maps, &m("8000-8003:198.18.2.32:80"), &NoSockets)
        .unwrap();
    let ports: Vec<_> = [a, b, c].iter().map(|m| m.host_ports.unwrap()).collect();
    assert_eq!(
        ports,
        [
            PortRange::single(8000),
            PortRange::single(8002),
            PortRange::single(8003)
        ]
    );
    let err = table
        .add(&mut maps, &m("8000-8003:198.18.2.33:80"), &NoSockets)
        .unwrap_err();
    assert!(err.to_string().contains("8000-8003"), "{err}");
    // Deleted by the form it was added with.
    table.remove(&mut maps, &range).unwrap();
    assert_eq!(maps.contents, expected_contents(&table));
    // Dynamic allocation skips reserved ports too.
    table.reserved = vec![PortRange {
        start: 40000,
        end: 40004,
    }];
    let dynamic = table.add(&mut maps, &m("198.18.2.40:80"), &NoSockets).unwrap();
    assert_eq!(dynamic.host_ports, Some(PortRange::single(40005)));
}

/// A container's ports are marked as reserved by its runtime in `PM_MAPPINGS` (the bind hook
/// lets its reservation socket through), through every write path; other owners' are not.
#[test]
fn container_ports_are_marked_as_reserved_by_their_runtime() {
    let (mut table, mut maps) = populated();
    let container = Origin::Container("n/c1/eth0".into());
    table
        .apply_as(
            &mut maps,
            &container,
            &[m("9999:198.18.2.9:80"), m("9998:198.18.2.9:81,198.18.2.8:81")],
            &NoSockets,
        )
        .unwrap();
    table
        .update(&mut maps, &m("9998:198.18.2.9:81,198.18.2.7:81"))
        .unwrap();
    let flags = |maps: &FlakyMaps, port: u16| -> Vec<u8> {
        maps.contents
            .mappings
            .iter()
            .filter(|(k, _)| u16::from_be(k.port_be) == port)
            .map(|(_, v)| v.flags)
            .collect()
    };
    assert_eq!(flags(&maps, 9999), [portmap_common::MAPPING_F_RUNTIME_RESERVES]);
    assert_eq!(flags(&maps, 9998), [portmap_common::MAPPING_F_RUNTIME_RESERVES]);
    assert_eq!(flags(&maps, 8080), [0]);
    // The maps are what the table says (rewritten from it, as at a restart).
    assert_eq!(maps.contents, expected_contents(&table));
}
