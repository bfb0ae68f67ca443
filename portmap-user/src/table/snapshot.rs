//! The table as the daemon saves it after every change, for the next daemon to restore when it
//! adopts the pinned datapath: every mapping with its slots, origin and order, the pools (so
//! slots are handed out as they would have been) and the draining stats slots. What follows from
//! these (port accounting) is recomputed, and checked, on restore.

use std::collections::HashSet;

use anyhow::{bail, ensure};
use portmap_common::MappingKey;
use serde::{Deserialize, Serialize};

use super::{Batch, Capacity, Entry, Maps, Table, key_of, pool::Pool, write_mapping, writes::mapping_keys};
use crate::mapping::PortRange;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// In the order they were added.
    entries: Vec<Entry>,
    next_seq: u64,
    slots: Pool,
    groups: Pool,
    backends: Pool,
    next_dynamic: u16,
    draining: Vec<u32>,
}

impl Table {
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            entries: self.entries().into_iter().cloned().collect(),
            next_seq: self.next_seq,
            slots: self.slots.clone(),
            groups: self.groups.clone(),
            backends: self.backends.clone(),
            next_dynamic: self.next_dynamic,
            draining: self.draining.clone(),
        }
    }

    /// The table `snapshot` was taken of, for maps of `capacity` (which must be the capacity it
    /// was saved with), with the configured dynamic range. Refuses a snapshot that is not
    /// consistent (overlapping mappings, slots used twice or outside the pools).
    pub fn from_snapshot(capacity: Capacity, dynamic: PortRange, snapshot: Snapshot) -> anyhow::Result<Self> {
        let pools = [
            ("max_mappings", &snapshot.slots, capacity.ports),
            ("max_backend_groups", &snapshot.groups, capacity.groups),
            ("max_backends", &snapshot.backends, capacity.backends),
        ];
        for (limit, pool, max) in pools {
            ensure!(
                pool.max == max,
                "saved with limits.{limit} = {}, configured {max}",
                pool.max
            );
        }
        let mut table = Self::new(capacity, dynamic);
        table.next_seq = snapshot.next_seq;
        table.next_dynamic = if dynamic.contains(snapshot.next_dynamic) {
            snapshot.next_dynamic
        } else {
            dynamic.start
        };
        let mut stats_slots: HashSet<u32> = snapshot.draining.iter().copied().collect();
        let mut groups = HashSet::new();
        let mut backends = HashSet::new();
        for entry in snapshot.entries {
            let Some(key) = key_of(&entry.mapping) else {
                bail!("saved mapping {} has no host ports", entry.mapping);
            };
            if let Some(other) = table.overlapping(&entry.mapping) {
                bail!("saved mappings {} and {} overlap", entry.mapping, other.mapping);
            }
            let place = &entry.place;
            ensure!(
                place.stats_slot < snapshot.slots.max && stats_slots.insert(place.stats_slot),
                "saved mapping {}: stats slot {} used twice or out of range",
                entry.mapping,
                place.stats_slot
            );
            if let Some(group) = &place.group {
                ensure!(
                    group.group < snapshot.groups.max && groups.insert(group.group),
                    "saved mapping {}: backend group {} used twice or out of range",
                    entry.mapping,
                    group.group
                );
                for slot in &group.backend_slots {
                    ensure!(
                        *slot < snapshot.backends.max && backends.insert(*slot),
                        "saved mapping {}: backend slot {slot} used twice or out of range",
                        entry.mapping
                    );
                }
            }
            table.count_ports(&entry.mapping, true);
            table.entries.insert(key, entry);
        }
        ensure!(
            table.ports_used <= u64::from(capacity.ports),
            "saved mappings publish {} ports, more than limits.max_mappings",
            table.ports_used
        );
        table.slots = snapshot.slots;
        table.groups = snapshot.groups;
        table.backends = snapshot.backends;
        table.draining = snapshot.draining;
        Ok(table)
    }

    /// Writes the map contents of every mapping again (counters untouched): after a restore the
    /// maps hold exactly what the table says even if the previous daemon died between a map
    /// write and saving its state. Writing an entry with the value it has is invisible to
    /// traffic. Entries the table does not know are left to [`Table::mapping_keys`]' caller.
    pub fn rewrite<M: Maps + ?Sized>(&self, maps: &mut M) -> anyhow::Result<()> {
        let mut batch = Batch::new(maps);
        for entry in self.entries.values() {
            write_mapping(&mut batch, &entry.mapping, &entry.place, false)?;
        }
        let ports: Vec<_> = self.published_ports().into_iter().collect();
        batch.publish_ports(&ports)?;
        batch.commit()
    }

    /// Every `PM_MAPPINGS` key the applied mappings have.
    #[must_use]
    pub fn mapping_keys(&self) -> HashSet<MappingKey> {
        self.entries
            .values()
            .flat_map(|e| mapping_keys(&e.mapping))
            .collect()
    }
}
