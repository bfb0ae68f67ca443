//! A configuration applied as one diff (start, reload, a container's set of ports): all or
//! nothing, rolled back to a snapshot of the table and the maps when any write fails.

use std::{collections::HashSet, sync::Arc};

use portmap_common::PortKey;

use super::{
    Batch, Entry, GroupPlacement, Key, Maps, Origin, Plan, Table, TableError, key_of, plan, snapshot, undo,
    writes::{clear_backends, group_contents, mapping_entries, mapping_keys},
};
use crate::{
    host::sockets::Sockets,
    model::mapping::{Mapping, Protocol},
};

impl Table {
    /// Makes the config's applied mappings equal `desired` (runtime ones stay), all or nothing: on any failure the table is
    /// restored to a snapshot and the maps to its contents. The new mappings' entries are
    /// written together (one [`Batch`]). Returns the plan that was applied.
    ///
    /// Counters of a removed mapping whose stats slot a failed diff gave to a new mapping are
    /// zeroed even though the rollback restores the mapping (slots are reused oldest-freed
    /// first, so only when few slots are free).
    pub fn apply<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        desired: &[Mapping],
        sockets: &dyn Sockets,
    ) -> Result<Plan, TableError> {
        self.apply_as(maps, &Origin::Config, desired, sockets)
    }

    /// A configuration as one change: the host's allow-list `policy` (`set_policy`), then its
    /// mappings (`apply`); all or nothing. Returns the plan and how many mappings the new
    /// policy gave another list.
    pub fn apply_config<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        policy: &[ipnet::IpNet],
        desired: &[Mapping],
        sockets: &dyn Sockets,
    ) -> Result<(Plan, usize), TableError> {
        let before = self.clone();
        let relisted = self.set_policy(maps, policy)?;
        match self.apply(maps, desired, sockets) {
            Ok(plan) => Ok((plan, relisted)),
            Err(e) => {
                self.roll_back(maps, before);
                Err(e)
            }
        }
    }

    /// Makes the applied mappings of `origin` equal `desired`, the others untouched, all or
    /// nothing (as [`Table::apply`] for the config).
    pub fn apply_as<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        origin: &Origin,
        desired: &[Mapping],
        sockets: &dyn Sockets,
    ) -> Result<Plan, TableError> {
        let before = self.clone();
        self.adopt(origin, desired);
        let plan = plan(&self.requested_by(origin), desired);
        let mut touched: Vec<Key> = Vec::new();
        let result = (|| {
            // Every add takes a stats slot and nothing here frees one (a removed mapping's
            // drains first): a plan that cannot fit fails before it writes anything, and a
            // reload that releases the drained slots and tries again has nothing to undo.
            if plan.add.len() > self.slots.available() as usize {
                return Err(self.mappings_full());
            }
            // The removals in one batch, written before the updates (which may take their
            // Maglev tables and backend slots again).
            let mut removals = Batch::new(&mut *maps);
            for m in &plan.remove {
                let key = self.find(m)?;
                touched.push(key);
                let applied = self.entries[&key].mapping.clone();
                self.remove(&mut removals, &applied)?;
            }
            removals.commit().map_err(TableError::Datapath)?;
            for (old, new) in &plan.update {
                let key = self.find(old)?;
                touched.push(key);
                if new.host_ports.is_some() {
                    self.update(maps, new)?;
                } else {
                    // A dynamic mapping with a new allow-list keeps its allocated ports.
                    let applied = self.entries[&key].mapping.with_allow(new.allow.clone());
                    self.replace(maps, key, applied, new.clone())?;
                }
            }
            let mut batch = Batch::new(maps);
            for m in &plan.add {
                let applied = self.add_as(&mut batch, m, sockets, origin.clone())?;
                touched.extend(key_of(&applied));
            }
            batch.commit().map_err(TableError::Datapath)
        })();
        if let Err(e) = result {
            self.restore(maps, before, &touched);
            return Err(e);
        }
        Ok(plan)
    }

    /// A mapping of `desired` that another entry already publishes, as requested or as applied,
    /// takes that entry over instead of conflicting with it, with no change to the maps: for the
    /// config, one added at run time (a `list --json` saved as the config); for any owner, one
    /// rebuilt from the pinned maps (`Origin::Unknown`) whose reservation flag is the owner's.
    fn adopt(&mut self, origin: &Origin, desired: &[Mapping]) {
        let adoptable: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, entry)| match &entry.origin {
                Origin::Runtime => *origin == Origin::Config,
                Origin::Unknown { .. } => entry.origin.runtime_reserves() == origin.runtime_reserves(),
                _ => false,
            })
            .map(|(key, _)| *key)
            .collect();
        if adoptable.is_empty() {
            // The usual case (a reload with no runtime mappings): no set of `desired` to build.
            return;
        }
        // By all but the allow-list: a recovered mapping's list is whatever the maps held.
        let wanted: HashSet<Mapping> = desired.iter().map(|m| m.with_allow(Vec::new())).collect();
        let wants = |m: &Mapping| wanted.contains(&m.with_allow(Vec::new()));
        let candidates: Vec<Key> = adoptable
            .into_iter()
            .filter(|key| wants(&self.entries[key].mapping) || wants(&self.entries[key].requested))
            .collect();
        for key in candidates {
            let Some(entry) = self.entries.get_mut(&key).map(Arc::make_mut) else {
                continue;
            };
            if wants(&entry.mapping) {
                entry.requested = entry.mapping.clone();
            }
            if wants(&entry.requested) {
                entry.origin = origin.clone();
                self.changes.push(snapshot::Change::Put(key));
            }
        }
    }

    /// Rolls back a failed `apply`: the table becomes `before` again, and the maps get back what
    /// `before` had for the mappings the diff touched (what only the failed state used is
    /// removed or zeroed, what `before` used is written again).
    /// Undoes every change since `before` (a clone taken then), in the table and the maps: for a
    /// change that was applied but cannot be saved for the next daemon.
    pub fn roll_back<M: Maps + ?Sized>(&mut self, maps: &mut M, before: Table) {
        // The persistent maps share what did not change: the diff visits only what did.
        let touched: Vec<Key> = self
            .entries
            .diff(&before.entries)
            .map(|item| match item {
                imbl::ordmap::DiffItem::Add(key, _)
                | imbl::ordmap::DiffItem::Update { new: (key, _), .. }
                | imbl::ordmap::DiffItem::Remove(key, _) => *key,
            })
            .collect();
        self.restore(maps, before, &touched);
    }

    fn restore<M: Maps + ?Sized>(&mut self, maps: &mut M, before: Table, touched: &[Key]) {
        let now = std::mem::replace(self, before);
        self.allow.write_back(&now.allow, maps);
        let keys: HashSet<&Key> = touched.iter().collect();
        let now_entries: Vec<&Entry> = keys
            .iter()
            .filter_map(|k| now.entries.get(*k).map(|e| &**e))
            .collect();
        let old_entries: Vec<&Entry> = keys
            .iter()
            .filter_map(|k| self.entries.get(*k).map(|e| &**e))
            .collect();
        let old_keys: HashSet<_> = old_entries
            .iter()
            .flat_map(|e| mapping_keys(&e.mapping))
            .collect();
        let gone: Vec<_> = now_entries
            .iter()
            .flat_map(|e| mapping_keys(&e.mapping))
            .filter(|k| !old_keys.contains(k))
            .collect();
        undo("a config diff", maps.remove_mappings(&gone));
        let old_groups: Vec<&GroupPlacement> = old_entries
            .iter()
            .filter_map(|e| e.place.group.as_ref())
            .collect();
        let old_tables: HashSet<u32> = old_groups.iter().map(|g| g.group).collect();
        let old_slots: HashSet<u32> = old_groups
            .iter()
            .flat_map(|g| g.backend_slots.iter().copied())
            .collect();
        for group in now_entries.iter().filter_map(|e| e.place.group.as_ref()) {
            let slots: Vec<u32> = group
                .backend_slots
                .iter()
                .copied()
                .filter(|s| !old_slots.contains(s))
                .collect();
            undo("a config diff", clear_backends(maps, &slots));
            if !old_tables.contains(&group.group) {
                undo(
                    "a config diff",
                    maps.set_maglev(group.group, &portmap_common::MaglevTable::ZERO),
                );
            }
        }
        let mut entries = Vec::new();
        for e in &old_entries {
            if let Some(group) = &e.place.group
                && let Some((backends, table)) = group_contents(&e.mapping, group)
            {
                undo("a config diff", maps.set_backends(&backends));
                undo("a config diff", maps.set_maglev(group.group, &table));
            }
            entries.extend(mapping_entries(&e.mapping, &e.place, e.origin.runtime_reserves()));
        }
        undo("a config diff", maps.set_mappings(&entries));
        // Only the ports of the touched entries can have changed their published state.
        let affected: HashSet<(Protocol, u16)> = now_entries
            .iter()
            .chain(&old_entries)
            .flat_map(|e| e.mapping.bindings().map(|b| (b.protocol, b.host_port)))
            .collect();
        let published = |t: &Table, key: &(Protocol, u16)| t.port_users.contains_key(key);
        let gone: Vec<PortKey> = affected
            .iter()
            .filter(|k| published(&now, k) && !published(self, k))
            .map(|&(proto, port)| super::place::port_key(proto, port))
            .collect();
        let back: Vec<PortKey> = affected
            .iter()
            .filter(|k| published(self, k) && !published(&now, k))
            .map(|&(proto, port)| super::place::port_key(proto, port))
            .collect();
        undo("a config diff", maps.unpublish_ports(&gone));
        undo("a config diff", maps.publish_ports(&back));
        self.allow.clear_extra(&now.allow, maps);
    }
}
