//! What the table writes into the kernel's maps, as a trait (the daemon's `Datapath`, a fake in
//! unit tests), and the pure translation of an applied mapping into map contents.
//!
//! The table keeps one invariant: the maps hold exactly what its applied mappings need.
//! `PM_MAPPINGS` has exactly their host ports, `PM_PUBLISHED_PORTS` exactly their (protocol,
//! port) pairs; `PM_BACKENDS` and `PM_MAGLEV` slots that no mapping uses are zero. So the maps are a function of the table's state, and a failed change
//! is undone by writing the previous state's contents back.

use std::collections::{BTreeSet, HashMap};

use portmap_common::{
    BackendValue, MAGLEV_SIZE, MAPPING_F_RUNTIME_RESERVES, MaglevTable, MappingKey, MappingValue,
    NO_ALLOW_LIST, NO_GROUP, PortKey, addr_words,
};

pub use super::allow_lists::AllowPlacement;
use crate::{model::maglev, model::mapping::Mapping};

/// Where the table placed a mapping in the maps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Its `PM_MAPPING_STATS` slot (shared by all its host ports).
    pub stats_slot: u32,
    /// For a mapping with several backends: its Maglev table and backend slots.
    pub group: Option<GroupPlacement>,
    /// For a mapping with an allow-list (its own or the host's): its `PM_ALLOW` list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<AllowPlacement>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupPlacement {
    /// Its `PM_MAGLEV` slot.
    pub group: u32,
    /// The `PM_BACKENDS` slot of each of its backends, in the mapping's order.
    pub backend_slots: Vec<u32>,
}

/// The map writes the table makes. Each call is one kernel operation (or one batched one); when
/// a call fails, any part of it may have been written: the table then writes the previous
/// contents back.
pub trait Maps {
    /// Creates or replaces `PM_MAPPINGS` entries, in as few system calls as the kernel allows.
    fn set_mappings(&mut self, entries: &[(MappingKey, MappingValue)]) -> anyhow::Result<()>;
    /// Removes `PM_MAPPINGS` entries; a key that is not there counts as removed.
    fn remove_mappings(&mut self, keys: &[MappingKey]) -> anyhow::Result<()>;
    /// Writes `PM_BACKENDS` slots.
    fn set_backends(&mut self, slots: &[(u32, BackendValue)]) -> anyhow::Result<()>;
    /// Writes the `PM_MAGLEV` table of `group`.
    fn set_maglev(&mut self, group: u32, table: &MaglevTable) -> anyhow::Result<()>;
    /// Zeroes the `PM_MAPPING_STATS` and `PM_MAPPING_DENIED` slots on every CPU.
    fn reset_counters(&mut self, slots: &[u32]) -> anyhow::Result<()>;
    /// Adds `PM_PUBLISHED_PORTS` entries (bind() of them is refused on the host).
    fn publish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()>;
    /// Removes `PM_PUBLISHED_PORTS` entries; a port that is not there counts as removed.
    fn unpublish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()>;
    /// Writes the `PM_ALLOW` entries of a list.
    fn set_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()>;
    /// Removes the `PM_ALLOW` entries of a list; one that is not there counts as removed.
    fn clear_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()>;
}

/// Collects `PM_MAPPINGS` and `PM_PUBLISHED_PORTS` writes and removals and counter resets and
/// sends them to the kernel together, so that a config of many mappings takes few system calls
/// and becomes visible at once. Removals are written before any other write passes through (an
/// entry is unreachable before the Maglev table or allow-list it pointed at is zeroed or taken
/// again) and at [`Batch::commit`], first; the additions at the commit, last (counters are zero
/// and ports published before an entry makes them reachable). The batch lives only as long as
/// this guard: dropping it uncommitted writes none of the collected additions, and it can never
/// stay open by mistake. A failed removal fails the commit, also when the write that sent it
/// was a best-effort one whose caller goes on (zeroing a freed Maglev table).
pub struct Batch<'a, M: Maps + ?Sized> {
    maps: &'a mut M,
    pending: Vec<(MappingKey, MappingValue)>,
    ports: Vec<PortKey>,
    resets: Vec<u32>,
    removed: Vec<MappingKey>,
    unpublished: Vec<PortKey>,
    /// The failure of a removal written before a pass-through write, for the commit.
    failed: Option<anyhow::Error>,
}

impl<'a, M: Maps + ?Sized> Batch<'a, M> {
    pub fn new(maps: &'a mut M) -> Self {
        Self {
            maps,
            pending: Vec::new(),
            ports: Vec::new(),
            resets: Vec::new(),
            removed: Vec::new(),
            unpublished: Vec::new(),
            failed: None,
        }
    }

    /// Writes the collected removals, before the write that follows (which must not happen
    /// when they failed: an entry would still point at what it changes).
    fn write_removals(&mut self) -> anyhow::Result<()> {
        if self.failed.is_none() {
            self.failed = self.send_removals().err();
        }
        self.failed
            .as_ref()
            .map_or(Ok(()), |e| Err(anyhow::anyhow!("{e:#}")))
    }

    fn send_removals(&mut self) -> anyhow::Result<()> {
        let removed = std::mem::take(&mut self.removed);
        if !removed.is_empty() {
            self.maps.remove_mappings(&removed)?;
        }
        let unpublished = std::mem::take(&mut self.unpublished);
        if !unpublished.is_empty() {
            self.maps.unpublish_ports(&unpublished)?;
        }
        Ok(())
    }

    /// Writes what was collected: the removals, the counter resets and the published ports,
    /// then the mappings.
    pub fn commit(mut self) -> anyhow::Result<()> {
        self.write_removals()?;
        if !self.resets.is_empty() {
            self.maps.reset_counters(&self.resets)?;
        }
        if !self.ports.is_empty() {
            self.maps.publish_ports(&self.ports)?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        self.maps.set_mappings(&self.pending)
    }
}

impl<M: Maps + ?Sized> Maps for Batch<'_, M> {
    fn set_mappings(&mut self, entries: &[(MappingKey, MappingValue)]) -> anyhow::Result<()> {
        self.pending.extend_from_slice(entries);
        Ok(())
    }

    fn remove_mappings(&mut self, keys: &[MappingKey]) -> anyhow::Result<()> {
        self.pending.retain(|(k, _)| !keys.contains(k));
        self.removed.extend_from_slice(keys);
        Ok(())
    }

    fn set_backends(&mut self, slots: &[(u32, BackendValue)]) -> anyhow::Result<()> {
        self.write_removals()?;
        self.maps.set_backends(slots)
    }

    fn set_maglev(&mut self, group: u32, table: &MaglevTable) -> anyhow::Result<()> {
        self.write_removals()?;
        self.maps.set_maglev(group, table)
    }

    fn reset_counters(&mut self, slots: &[u32]) -> anyhow::Result<()> {
        self.resets.extend_from_slice(slots);
        Ok(())
    }

    fn publish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.ports.extend_from_slice(ports);
        Ok(())
    }

    fn unpublish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.ports.retain(|p| !ports.contains(p));
        self.unpublished.extend_from_slice(ports);
        Ok(())
    }

    fn set_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        self.write_removals()?;
        self.maps.set_allow(list)
    }

    fn clear_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        self.write_removals()?;
        self.maps.clear_allow(list)
    }
}

/// The `PM_MAPPINGS` keys of a mapping (one per host port; none while unallocated).
#[must_use]
pub fn mapping_keys(mapping: &Mapping) -> Vec<MappingKey> {
    mapping
        .host_ports
        .into_iter()
        .flat_map(|ports| ports.ports())
        .map(|port| mapping.map_key(port))
        .collect()
}

/// The `PM_MAPPINGS` entries of a mapping placed at `place`: the first backend inline (the only
/// one, or unused beside a Maglev group), the port offset of each host port in a range; a
/// container's ports are marked as reserved by its runtime (`runtime_reserves`: see
/// `Origin::runtime_reserves`).
#[must_use]
pub fn mapping_entries(
    mapping: &Mapping,
    place: &Placement,
    runtime_reserves: bool,
) -> Vec<(MappingKey, MappingValue)> {
    let flags = if runtime_reserves {
        MAPPING_F_RUNTIME_RESERVES
    } else {
        0
    };
    let Some(ports) = mapping.host_ports else {
        return Vec::new();
    };
    let group = place.group.as_ref().map_or(NO_GROUP, |g| g.group);
    let first = &mapping.backends[0];
    ports
        .ports()
        .enumerate()
        .map(|(offset, port)| {
            let offset = offset as u16;
            let value = MappingValue {
                backend_addr: addr_words(first.ip),
                backend_port_be: first.port_at(offset).to_be(),
                port_offset: if first.ports.is_single() { 0 } else { offset },
                group,
                stats_slot: place.stats_slot,
                family: mapping.family(),
                flags,
                allow_list: place.allow.as_ref().map_or(NO_ALLOW_LIST, |a| a.list),
            };
            (mapping.map_key(port), value)
        })
        .collect()
}

/// The `PM_BACKENDS` slots and the Maglev table of a mapping with several backends; `None` when
/// every weight is 0 (which `spec::check` refuses).
#[must_use]
pub fn group_contents(
    mapping: &Mapping,
    group: &GroupPlacement,
) -> Option<(Vec<(u32, BackendValue)>, MaglevTable)> {
    let backends = mapping
        .backends
        .iter()
        .zip(&group.backend_slots)
        .map(|(b, &slot)| {
            let value = BackendValue {
                addr: addr_words(b.ip),
                port_be: b.ports.start.to_be(),
                family: mapping.family(),
                _pad: 0,
            };
            (slot, value)
        })
        .collect();
    let members: Vec<maglev::Member> = mapping
        .backends
        .iter()
        .map(|b| maglev::Member {
            ip: b.ip,
            port: b.ports.start,
            weight: b.weight,
        })
        .collect();
    let slots = maglev::table(&members)?;
    let mut table = MaglevTable::ZERO;
    for (dst, member) in table.backends.iter_mut().zip(slots) {
        *dst = group.backend_slots[member as usize];
    }
    table.backends[MAGLEV_SIZE] = table.backends[0];
    Some((backends, table))
}

/// Zeroes a group's Maglev table and backend slots (no mapping uses them any more).
pub fn clear_group<M: Maps + ?Sized>(maps: &mut M, group: &GroupPlacement) -> anyhow::Result<()> {
    maps.set_maglev(group.group, &MaglevTable::ZERO)?;
    clear_backends(maps, &group.backend_slots)
}

pub fn clear_backends<M: Maps + ?Sized>(maps: &mut M, slots: &[u32]) -> anyhow::Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let zero: Vec<(u32, BackendValue)> = slots.iter().map(|&s| (s, BackendValue::default())).collect();
    maps.set_backends(&zero)
}

/// A model of the maps' contents under the table's invariant: the fake `Maps` of unit tests,
/// compared whole before and after a change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub mappings: HashMap<MappingKey, MappingValue>,
    /// Non-zero `PM_BACKENDS` slots.
    pub backends: HashMap<u32, BackendValue>,
    /// Non-zero `PM_MAGLEV` tables.
    pub maglev: HashMap<u32, Vec<u32>>,
    pub published_ports: BTreeSet<PortKey>,
    /// `PM_ALLOW`: (list, prefix) pairs.
    pub allow: BTreeSet<(u16, ipnet::IpNet)>,
}

impl MapContents {
    /// The prefixes of `PM_ALLOW` list `list`.
    #[must_use]
    pub fn allow_list(&self, list: u16) -> Vec<ipnet::IpNet> {
        self.allow
            .range((list, ipnet::IpNet::V4(ipnet::Ipv4Net::default()))..)
            .take_while(|(l, _)| *l == list)
            .map(|(_, net)| *net)
            .collect()
    }
}

impl Maps for MapContents {
    fn set_mappings(&mut self, entries: &[(MappingKey, MappingValue)]) -> anyhow::Result<()> {
        self.mappings.extend(entries.iter().copied());
        Ok(())
    }

    fn remove_mappings(&mut self, keys: &[MappingKey]) -> anyhow::Result<()> {
        for k in keys {
            self.mappings.remove(k);
        }
        Ok(())
    }

    fn set_backends(&mut self, slots: &[(u32, BackendValue)]) -> anyhow::Result<()> {
        for (slot, value) in slots {
            if *value == BackendValue::default() {
                self.backends.remove(slot);
            } else {
                self.backends.insert(*slot, *value);
            }
        }
        Ok(())
    }

    fn set_maglev(&mut self, group: u32, table: &MaglevTable) -> anyhow::Result<()> {
        if *table == MaglevTable::ZERO {
            self.maglev.remove(&group);
        } else {
            self.maglev.insert(group, table.backends.to_vec());
        }
        Ok(())
    }

    /// Counters move with traffic and are not part of the compared contents.
    fn reset_counters(&mut self, _slots: &[u32]) -> anyhow::Result<()> {
        Ok(())
    }

    fn publish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.published_ports.extend(ports.iter().copied());
        Ok(())
    }

    fn unpublish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        for p in ports {
            self.published_ports.remove(p);
        }
        Ok(())
    }

    fn set_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        self.allow
            .extend(list.prefixes.iter().map(|net| (list.list, *net)));
        Ok(())
    }

    fn clear_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        for net in &list.prefixes {
            self.allow.remove(&(list.list, *net));
        }
        Ok(())
    }
}
