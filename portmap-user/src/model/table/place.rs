//! Where the table puts a mapping: its stats slot, Maglev table, backend slots and allow-list
//! taken from the pools (and given back exactly on failure), freed slots zeroed and drained, and
//! the published (protocol, port) accounting behind `PM_PUBLISHED_PORTS`.

use std::collections::BTreeSet;

use portmap_common::PortKey;

use super::{
    Entry, GroupPlacement, Maps, Placement, Table, TableError,
    allow_lists::{AllowPlacement, ListTaken},
    undo,
    writes::{clear_backends, clear_group},
};
use crate::model::mapping::{Mapping, Protocol};

/// What `place` took from the pools (id, and whether it was used before), so that a failure
/// gives exactly that back.
#[derive(Default)]
pub(super) struct Taken {
    pub(super) stats: Option<(u32, bool)>,
    pub(super) group: Option<(u32, bool)>,
    pub(super) backends: Vec<(u32, bool)>,
    pub(super) list: Option<(AllowPlacement, ListTaken)>,
}

impl Taken {
    /// The stats slot is a reused one: its counters must be zeroed before use.
    pub(super) fn reset_stats(&self) -> bool {
        self.stats.is_some_and(|(_, reused)| reused)
    }

    /// The allow-list made for this mapping, whose prefixes are still to be written.
    fn new_list(&self) -> Option<&AllowPlacement> {
        self.list
            .as_ref()
            .filter(|(_, taken)| taken.created.is_some())
            .map(|(list, _)| list)
    }
}

/// Writes the prefixes of the allow-list `place` made for the mapping, if it made one.
pub(super) fn write_new_list<M: Maps + ?Sized>(maps: &mut M, taken: &Taken) -> anyhow::Result<()> {
    taken.new_list().map_or(Ok(()), |list| maps.set_allow(list))
}

/// Removes them again (a failed change).
pub(super) fn clear_new_list<M: Maps + ?Sized>(maps: &mut M, taken: &Taken) -> anyhow::Result<()> {
    taken.new_list().map_or(Ok(()), |list| maps.clear_allow(list))
}

pub(super) fn port_key(protocol: Protocol, port: u16) -> PortKey {
    PortKey {
        port_be: port.to_be(),
        proto: protocol.number(),
        _pad: 0,
    }
}

impl Table {
    /// The error of a change that needs more stats slots or host ports than `max_mappings`
    /// leaves free.
    pub(super) fn mappings_full(&self) -> TableError {
        TableError::Full {
            what: "the mapping table",
            max: self.max_ports,
            limit: "max_mappings",
        }
    }

    /// Takes stats slot, Maglev table, backend slots and allow-list for `mapping` (reusing
    /// `reuse`'s stats slot and table where an update keeps them). Nothing is taken when this
    /// fails.
    pub(super) fn place(
        &mut self,
        mapping: &Mapping,
        reuse: Option<&Entry>,
    ) -> Result<(Placement, Taken), TableError> {
        let (mut place, mut taken) = self.place_slots(mapping, reuse)?;
        if let Some(prefixes) = self.effective_list(mapping) {
            match self.allow.take(mapping.family(), prefixes) {
                Ok((list, list_taken)) => {
                    place.allow = Some(list.clone());
                    taken.list = Some((list, list_taken));
                }
                Err(e) => {
                    self.untake(taken);
                    return Err(e);
                }
            }
        }
        Ok((place, taken))
    }

    fn place_slots(
        &mut self,
        mapping: &Mapping,
        reuse: Option<&Entry>,
    ) -> Result<(Placement, Taken), TableError> {
        let mut taken = Taken::default();
        let stats_slot = match reuse {
            Some(e) => e.place.stats_slot,
            None => {
                let (slot, reused) = self.slots.take_reused().ok_or_else(|| self.mappings_full())?;
                taken.stats = Some((slot, reused));
                slot
            }
        };
        if mapping.backends.len() == 1 {
            let place = Placement {
                stats_slot,
                group: None,
                allow: None,
            };
            return Ok((place, taken));
        }
        let old_group = reuse.and_then(|e| e.place.group.as_ref());
        let needed_backends = mapping.backends.len() as u32;
        let group_needed = u32::from(old_group.is_none());
        if self.groups.available() < group_needed || self.backends.available() < needed_backends {
            let (what, max, limit) = if self.groups.available() < group_needed {
                ("the Maglev table map", self.groups.max, "max_backend_groups")
            } else {
                ("the backend map", self.backends.max, "max_backends")
            };
            self.untake(taken);
            return Err(TableError::Full { what, max, limit });
        }
        let group = match old_group {
            Some(g) => g.group,
            None => {
                let (id, reused) = self.groups.take_reused().expect("checked available");
                taken.group = Some((id, reused));
                id
            }
        };
        // Fresh backend slots: the old ones stay valid for readers of the old table until the new
        // table is written, and are freed afterwards.
        for _ in 0..needed_backends {
            let (id, reused) = self.backends.take_reused().expect("checked available");
            taken.backends.push((id, reused));
        }
        let backend_slots = taken.backends.iter().map(|(id, _)| *id).collect();
        let place = Placement {
            stats_slot,
            group: Some(GroupPlacement { group, backend_slots }),
            allow: None,
        };
        Ok((place, taken))
    }

    /// Gives back exactly what `place` took (in reverse order).
    pub(super) fn untake(&mut self, taken: Taken) {
        if let Some((list, list_taken)) = &taken.list {
            self.allow.untake(list, *list_taken);
        }
        for (id, reused) in taken.backends.into_iter().rev() {
            self.backends.untake(id, reused);
        }
        if let Some((id, reused)) = taken.group {
            self.groups.untake(id, reused);
        }
        if let Some((id, reused)) = taken.stats {
            self.slots.untake(id, reused);
        }
    }

    /// Frees what `place` used, except what `keep` still uses: zeroes those map slots (the maps
    /// keep only what applied mappings use) and returns their ids to the pools.
    pub(super) fn free<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        place: &Placement,
        keep: Option<&Placement>,
    ) {
        if keep.is_none_or(|k| k.stats_slot != place.stats_slot) {
            self.draining.push(place.stats_slot);
        }
        // `keep` took its list (the same one, or another) before: this use of it goes.
        if let Some(list) = &place.allow
            && self.allow.give(list)
        {
            undo("a freed allow-list", maps.clear_allow(list));
        }
        let Some(g) = &place.group else { return };
        let kept = keep.and_then(|k| k.group.as_ref());
        let slots: Vec<u32> = g
            .backend_slots
            .iter()
            .copied()
            .filter(|b| kept.is_none_or(|k| !k.backend_slots.contains(b)))
            .collect();
        if kept.is_none_or(|k| k.group != g.group) {
            undo("a freed Maglev table", clear_group(maps, g));
            self.groups.give(g.group);
        } else {
            undo("freed backend slots", clear_backends(maps, &slots));
        }
        for b in slots {
            self.backends.give(b);
        }
    }

    /// The (protocol, port) pairs of `mapping` that no applied mapping publishes yet (`add`), or
    /// that only it publishes (`!add`): what `PM_PUBLISHED_PORTS` gains or loses with it.
    pub(super) fn port_changes(&self, mapping: &Mapping, add: bool) -> Vec<PortKey> {
        let Some(ports) = mapping.host_ports else {
            return Vec::new();
        };
        let users = |port| {
            self.port_users
                .get(&(mapping.protocol, port))
                .copied()
                .unwrap_or(0)
        };
        ports
            .ports()
            .filter(|&p| if add { users(p) == 0 } else { users(p) == 1 })
            .map(|p| port_key(mapping.protocol, p))
            .collect()
    }

    /// Every (protocol, port) some applied mapping publishes.
    #[must_use]
    pub fn published_ports(&self) -> BTreeSet<PortKey> {
        self.port_users
            .keys()
            .map(|&(proto, port)| port_key(proto, port))
            .collect()
    }

    pub(super) fn count_ports(&mut self, mapping: &Mapping, add: bool) {
        let Some(ports) = mapping.host_ports else { return };
        for port in ports.ports() {
            let key = (mapping.protocol, port);
            if add {
                *self.port_users.entry(key).or_default() += 1;
            } else if let Some(n) = self.port_users.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.port_users.remove(&key);
                }
            }
        }
        let n = u64::from(ports.count());
        if add {
            self.ports_used += n;
        } else {
            self.ports_used -= n;
        }
    }
}
