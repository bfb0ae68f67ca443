//! The table as the daemon saves it, for the next daemon to restore when it adopts the pinned
//! datapath: a snapshot (every mapping with its slots, origin and order, the draining stats
//! slots) plus the [`Record`]s of the changes made since, so that one `add` costs one record, not
//! a rewrite of every mapping. What follows from the mappings (pools of free slots, port
//! accounting) is recomputed, and checked, on restore.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use anyhow::{bail, ensure};
use portmap_common::MappingKey;
use serde::{Deserialize, Serialize};

use super::{
    Batch, Capacity, Entry, Key, Maps, Origin, Placement, Table, allow_lists::SavedList, key_of, pool::Pool,
    write_mapping, writes::mapping_keys,
};
use crate::model::{
    mapping::{Mapping, PortRange},
    prefixes::Prefixes,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// In the order they were added.
    entries: Vec<SavedEntry>,
    /// The allow-lists the entries use, each once (an entry names its list by id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allow_lists: Vec<SavedList>,
    next_seq: u64,
    next_dynamic: u16,
    draining: Vec<u32>,
    /// The `[limits]` the maps were created with.
    max_mappings: u32,
    max_backend_groups: u32,
    max_backends: u32,
}

/// An [`Entry`] as saved: what is usual is left out (the requested form when it is the applied
/// one, the config origin), which halves the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEntry {
    mapping: Mapping,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    requested: Option<Mapping>,
    place: Placement,
    #[serde(default, skip_serializing_if = "is_config")]
    origin: Origin,
    seq: u64,
}

impl SavedEntry {
    /// An entry rebuilt from the pinned maps (`recover`): requested as applied.
    pub(super) fn recovered(mapping: Mapping, place: Placement, origin: Origin, seq: u64) -> Self {
        Self {
            mapping,
            requested: None,
            place,
            origin,
            seq,
        }
    }
}

impl Snapshot {
    /// A snapshot of `entries` (in order) using `allow_lists` for maps of `capacity`, nothing
    /// draining.
    pub(super) fn of_entries(
        entries: Vec<SavedEntry>,
        allow_lists: Vec<SavedList>,
        capacity: Capacity,
    ) -> Self {
        Self {
            allow_lists,
            next_seq: entries.len() as u64,
            next_dynamic: 0,
            draining: Vec::new(),
            max_mappings: capacity.ports,
            max_backend_groups: capacity.groups,
            max_backends: capacity.backends,
            entries,
        }
    }
}

fn is_config(origin: &Origin) -> bool {
    *origin == Origin::Config
}

impl From<&Entry> for SavedEntry {
    fn from(e: &Entry) -> Self {
        Self {
            mapping: e.mapping.clone(),
            requested: (e.requested != e.mapping).then(|| e.requested.clone()),
            place: e.place.clone(),
            origin: e.origin.clone(),
            seq: e.seq,
        }
    }
}

impl From<SavedEntry> for Entry {
    fn from(e: SavedEntry) -> Self {
        Self {
            requested: e.requested.unwrap_or_else(|| e.mapping.clone()),
            mapping: e.mapping,
            place: e.place,
            origin: e.origin,
            seq: e.seq,
        }
    }
}

/// What the table noted about a change, resolved into a [`Record`] when the daemon saves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// The entry now at this key was added or updated.
    Put(Key),
    /// The entry with this sequence number went; its stats slot drains.
    Removed { seq: u64, stats_slot: u32 },
    /// This allow-list was made (for the entries that will name it).
    List(u16),
}

/// One change as saved after the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Record {
    /// An entry added or updated (the whole entry, as it is now).
    Put(Box<SavedEntry>),
    /// The entry with this sequence number was removed; its stats slot drains.
    Remove { seq: u64, stats_slot: u32 },
    /// An allow-list made (its id may have held another list before): entries saved after it
    /// that name its id use it.
    List(SavedList),
}

/// The pool of `max` ids of which `used` are in use: the others are free (reused first).
pub(super) fn derived_pool(max: u32, used: &HashSet<u32>) -> Pool {
    let next = used.iter().max().map_or(0, |m| m + 1);
    let mut pool = Pool::new(max);
    for _ in 0..next {
        pool.take_reused();
    }
    for id in (0..next).filter(|id| !used.contains(id)) {
        pool.give(id);
    }
    pool
}

impl Table {
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            entries: self.entries().into_iter().map(SavedEntry::from).collect(),
            allow_lists: self.allow.all().map(SavedList::from).collect(),
            next_seq: self.next_seq,
            next_dynamic: self.next_dynamic,
            draining: self.draining.clone(),
            max_mappings: self.slots.max,
            max_backend_groups: self.groups.max,
            max_backends: self.backends.max,
        }
    }

    /// The changes since the last call, as records to save after the snapshot (the entries as
    /// they are now).
    pub fn take_changes(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.changes)
            .into_iter()
            .filter_map(|change| match change {
                Change::Put(key) => self
                    .entries
                    .get(&key)
                    .map(|e| Record::Put(Box::new((&**e).into()))),
                Change::Removed { seq, stats_slot } => Some(Record::Remove { seq, stats_slot }),
                Change::List(list) => self.allow.content(list).map(|p| Record::List(p.into())),
            })
            .collect()
    }

    /// The table `snapshot` and the `records` saved after it describe, for maps of `capacity`
    /// (which must be the capacity it was saved with), with the configured dynamic range.
    /// Refuses what is not consistent (overlapping mappings, slots used twice or outside the
    /// maps).
    pub fn from_snapshot(
        capacity: Capacity,
        dynamic: PortRange,
        snapshot: Snapshot,
        records: Vec<Record>,
    ) -> anyhow::Result<Self> {
        let limits = [
            ("max_mappings", snapshot.max_mappings, capacity.ports),
            ("max_backend_groups", snapshot.max_backend_groups, capacity.groups),
            ("max_backends", snapshot.max_backends, capacity.backends),
        ];
        for (limit, saved, max) in limits {
            ensure!(
                saved == max,
                "saved with limits.{limit} = {saved}, configured {max}"
            );
        }
        let (next_seq, next_dynamic) = (snapshot.next_seq, snapshot.next_dynamic);
        let Replayed {
            by_seq,
            mut draining,
            lists,
        } = replay(snapshot, records);
        let mut table = Self::new(capacity, dynamic);
        table.next_seq = by_seq.keys().next_back().copied().unwrap_or(0).max(next_seq);
        table.next_dynamic = if dynamic.contains(next_dynamic) {
            next_dynamic
        } else {
            dynamic.start
        };
        let mut used = UsedSlots::default();
        for mut entry in by_seq.into_values().map(Entry::from) {
            lists.fill(&mut entry)?;
            let Some(key) = key_of(&entry.mapping) else {
                bail!("saved mapping {} has no host ports", entry.mapping);
            };
            if let Some(other) = table.overlapping(&entry.mapping) {
                bail!("saved mappings {} and {} overlap", entry.mapping, other.mapping);
            }
            used.claim(&entry, capacity)?;
            table.count_ports(&entry.mapping, true);
            table.entries.insert(key, Arc::new(entry));
        }
        ensure!(
            table.ports_used <= u64::from(capacity.ports),
            "saved mappings publish {} ports, more than limits.max_mappings",
            table.ports_used
        );
        // A drained slot may have been released and handed to a mapping since.
        draining.retain(|slot| *slot < capacity.ports && !used.stats.contains(slot));
        draining.sort_unstable();
        draining.dedup();
        used.stats.extend(draining.iter().copied());
        table.draining = draining;
        table.allow = super::allow_lists::AllowLists::restored(
            table.entries.values().filter_map(|e| e.place.allow.as_ref()),
        )?;
        table.slots = derived_pool(capacity.ports, &used.stats);
        table.groups = derived_pool(capacity.groups, &used.groups);
        table.backends = derived_pool(capacity.backends, &used.backends);
        Ok(table)
    }

    /// Writes the map contents of every mapping again (counters untouched): after a restore the
    /// maps hold exactly what the table says even if the previous daemon died between a map
    /// write and saving its state. Writing an entry with the value it has is invisible to
    /// traffic. Entries the table does not know are left to [`Table::mapping_keys`]' caller.
    pub fn rewrite<M: Maps + ?Sized>(&self, maps: &mut M) -> anyhow::Result<()> {
        for list in self.allow.all() {
            maps.set_allow(&list)?;
        }
        let mut batch = Batch::new(maps);
        for entry in self.entries.values() {
            write_mapping(&mut batch, &entry.mapping, &entry.place, &entry.origin, false)?;
        }
        let ports: Vec<_> = self.published_ports().into_iter().collect();
        batch.publish_ports(&ports)?;
        batch.commit()
    }

    /// Every `PM_ALLOW` entry the applied mappings' lists have.
    #[must_use]
    pub fn allow_entries(&self) -> std::collections::BTreeSet<(u16, ipnet::IpNet)> {
        let mut entries = std::collections::BTreeSet::new();
        for list in self.allow.all() {
            entries.extend(list.prefixes.iter().map(|net| (list.list, *net)));
        }
        entries
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

/// What `records` replayed over a snapshot leave.
struct Replayed {
    /// The saved entries by sequence number.
    by_seq: BTreeMap<u64, SavedEntry>,
    /// The stats slots still draining (those of removed mappings).
    draining: Vec<u32>,
    /// The allow-lists by id, each as it was last made.
    lists: ListsById,
}

fn replay(snapshot: Snapshot, records: Vec<Record>) -> Replayed {
    let mut by_seq: BTreeMap<u64, SavedEntry> = snapshot.entries.into_iter().map(|e| (e.seq, e)).collect();
    let mut draining = snapshot.draining;
    let mut lists = ListsById::default();
    for list in snapshot.allow_lists {
        lists.insert(list);
    }
    for record in records {
        match record {
            Record::Put(entry) => {
                by_seq.insert(entry.seq, *entry);
            }
            Record::Remove { seq, stats_slot } => {
                if by_seq.remove(&seq).is_some() {
                    draining.push(stats_slot);
                }
            }
            Record::List(list) => lists.insert(list),
        }
    }
    Replayed {
        by_seq,
        draining,
        lists,
    }
}

/// Saved allow-lists by id, each one shared [`Prefixes`] for every entry that names it.
#[derive(Default)]
struct ListsById(std::collections::HashMap<u16, (u8, Prefixes)>);

impl ListsById {
    fn insert(&mut self, list: SavedList) {
        self.0.insert(list.list, (list.family, list.prefixes.into()));
    }

    /// Gives `entry`'s allow placement the prefixes of the list it names.
    fn fill(&self, entry: &mut Entry) -> anyhow::Result<()> {
        let Some(place) = entry.place.allow.as_mut() else {
            return Ok(());
        };
        let Some((family, prefixes)) = self.0.get(&place.list) else {
            bail!(
                "saved mapping {} names allow list {}, which is not saved",
                entry.mapping,
                place.list
            );
        };
        ensure!(
            *family == place.family,
            "saved mapping {} names allow list {} of the other address family",
            entry.mapping,
            place.list
        );
        place.prefixes = prefixes.clone();
        Ok(())
    }
}

/// The slots the restored entries use, each claimed once.
#[derive(Default)]
struct UsedSlots {
    stats: HashSet<u32>,
    groups: HashSet<u32>,
    backends: HashSet<u32>,
}

impl UsedSlots {
    /// Claims `entry`'s slots; fails on one out of range or already claimed.
    fn claim(&mut self, entry: &Entry, capacity: Capacity) -> anyhow::Result<()> {
        let place = &entry.place;
        ensure!(
            place.stats_slot < capacity.ports && self.stats.insert(place.stats_slot),
            "saved mapping {}: stats slot {} used twice or out of range",
            entry.mapping,
            place.stats_slot
        );
        if let Some(group) = &place.group {
            ensure!(
                group.group < capacity.groups && self.groups.insert(group.group),
                "saved mapping {}: backend group {} used twice or out of range",
                entry.mapping,
                group.group
            );
            for slot in &group.backend_slots {
                ensure!(
                    *slot < capacity.backends && self.backends.insert(*slot),
                    "saved mapping {}: backend slot {slot} used twice or out of range",
                    entry.mapping
                );
            }
        }
        Ok(())
    }
}
