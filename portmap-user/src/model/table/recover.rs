//! The table rebuilt from the pinned maps alone, for a daemon that adopts a datapath whose state
//! file is gone (deleted, or another datapath's): every mapping the maps hold comes back with the
//! slots it has there, so that it keeps forwarding and counting, owned by `Origin::Unknown` (who
//! added it cannot be known; whether a container runtime reserved its ports can). The config, a
//! CNI container or a Docker container that asks for the same mapping takes it over.
//!
//! What the maps say: `PM_MAPPINGS` entries of one mapping share its stats slot (a range's ports
//! too), their values hold the backend (one backend) or the Maglev table (several); a Maglev
//! table lists each backend's `PM_BACKENDS` slot in proportion to its weight. Weights come back
//! as those proportions (exact for equal weights and small ratios); a backend of weight 0 holds
//! no slot of the table and does not come back.

use std::collections::BTreeMap;

use portmap_common::{MappingKey, MappingValue, NO_GROUP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{
    Capacity, GroupPlacement, Origin, Placement, Table,
    allow_lists::SavedList,
    snapshot::{SavedEntry, Snapshot},
    writes::MapContents,
};
use crate::model::mapping::{Backend, MAX_WEIGHT, Mapping, PortRange, Protocol};

impl Table {
    /// The table the maps `pinned` describe, and a line for each group of entries it could not
    /// make a mapping of (left out: the daemon removes them from the maps, as it does with
    /// entries no saved state has).
    pub fn recover(
        capacity: Capacity,
        dynamic: PortRange,
        pinned: &MapContents,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        let mut by_slot: BTreeMap<u32, Vec<(MappingKey, MappingValue)>> = BTreeMap::new();
        for (key, value) in &pinned.mappings {
            by_slot.entry(value.stats_slot).or_default().push((*key, *value));
        }
        let mut entries = Vec::new();
        let mut skipped = Vec::new();
        let mut lists = BTreeMap::new();
        for (slot, mut ports) in by_slot {
            ports.sort_by_key(|(key, _)| u16::from_be(key.port_be));
            match recover_one(slot, &ports, pinned, &mut lists) {
                Ok((mapping, place, reserved)) => entries.push(SavedEntry::recovered(
                    mapping,
                    place,
                    Origin::Unknown { reserved },
                    entries.len() as u64 + 1,
                )),
                Err(why) => skipped.push(format!("stats slot {slot}: {why}")),
            }
        }
        let snapshot = Snapshot::of_entries(entries, lists.into_values().collect(), capacity);
        Ok((
            Self::from_snapshot(capacity, dynamic, snapshot, Vec::new())?,
            skipped,
        ))
    }
}

/// One mapping from its `PM_MAPPINGS` entries (sorted by port), with where it is placed and
/// whether its ports are a runtime's reservation; the list it names joins `lists` (each list
/// read from the maps once).
fn recover_one(
    stats_slot: u32,
    ports: &[(MappingKey, MappingValue)],
    pinned: &MapContents,
    lists: &mut BTreeMap<u16, SavedList>,
) -> Result<(Mapping, Placement, bool), String> {
    let (first_key, first) = ports.first().ok_or("no entries")?;
    let protocol = match first_key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        PROTO_SCTP => Protocol::Sctp,
        other => return Err(format!("protocol {other}")),
    };
    let ip = |words: portmap_common::Addr| portmap_common::words_addr(first_key.family, words);
    let start = u16::from_be(first_key.port_be);
    let same_mapping = ports.iter().enumerate().all(|(i, (k, v))| {
        k.proto == first_key.proto
            && k.family == first_key.family
            && k.addr == first_key.addr
            && usize::from(u16::from_be(k.port_be)) == usize::from(start) + i
            && v.group == first.group
            && v.flags == first.flags
            && v.allow_list == first.allow_list
    });
    if !same_mapping {
        return Err("its entries are not one run of ports on one address".into());
    }
    let count = u16::try_from(ports.len()).map_err(|_| "more entries than ports")?;
    let host_ports = run(start, count)?;
    let (backends, group) = backends_of(first, count, pinned, ip)?;
    let mapping = Mapping {
        protocol,
        host_ip: ip(first_key.addr),
        host_ports: Some(host_ports),
        backends,
        allow: Vec::new(),
    };
    crate::model::spec::check(&mapping, &mapping.to_string()).map_err(|e| e.to_string())?;
    let reserved = first.flags & portmap_common::MAPPING_F_RUNTIME_RESERVES != 0;
    // Its list comes back as its own (whether it was the host's cannot be known): the owner
    // that takes the mapping over sets it again. The mapping holds a copy of it (as a mapping
    // with its own list does); the placement's prefixes are filled in, shared, on restore.
    let mut allow = None;
    let mut own = Vec::new();
    if first.allow_list != portmap_common::NO_ALLOW_LIST {
        let list = first.allow_list;
        let saved = lists.entry(list).or_insert_with(|| SavedList {
            list,
            family: first_key.family,
            prefixes: pinned.allow_list(list),
        });
        if saved.family != first_key.family {
            return Err(format!("allow list {list} is used by both address families"));
        }
        own.clone_from(&saved.prefixes);
        allow = Some(super::AllowPlacement {
            list,
            family: saved.family,
            prefixes: Default::default(),
        });
    }
    let mapping = Mapping {
        allow: own,
        ..mapping
    };
    Ok((
        mapping,
        Placement {
            stats_slot,
            group,
            allow,
        },
        reserved,
    ))
}

/// The backends of a mapping of `count` ports whose first entry is `first`: its own backend, or
/// those of its Maglev group (weights from their shares of the table), with the group's
/// placement.
fn backends_of(
    first: &MappingValue,
    count: u16,
    pinned: &MapContents,
    ip: impl Fn(portmap_common::Addr) -> std::net::IpAddr,
) -> Result<(Vec<Backend>, Option<GroupPlacement>), String> {
    Ok(if first.group == NO_GROUP {
        let ports = run(u16::from_be(first.backend_port_be), count)?;
        let backend = Backend {
            ip: ip(first.backend_addr),
            ports,
            weight: 1,
        };
        (vec![backend], None)
    } else {
        let table = pinned
            .maglev
            .get(&first.group)
            .ok_or_else(|| format!("Maglev table {} is empty", first.group))?;
        // Each backend slot with how many table slots it has, in slot order.
        let mut shares: BTreeMap<u32, u32> = BTreeMap::new();
        for slot in table.iter().take(portmap_common::MAGLEV_SIZE) {
            *shares.entry(*slot).or_default() += 1;
        }
        let least = shares.values().copied().min().ok_or("an empty Maglev table")?;
        let mut backends = Vec::new();
        for (slot, share) in &shares {
            let value = pinned
                .backends
                .get(slot)
                .ok_or_else(|| format!("backend slot {slot} is empty"))?;
            backends.push(Backend {
                ip: ip(value.addr),
                ports: run(u16::from_be(value.port_be), count)?,
                weight: u16::try_from(((share + least / 2) / least).min(u32::from(MAX_WEIGHT)))
                    .unwrap_or(MAX_WEIGHT),
            });
        }
        let group = GroupPlacement {
            group: first.group,
            backend_slots: shares.keys().copied().collect(),
        };
        (backends, Some(group))
    })
}

/// `count` ports from `start` (at least one).
fn run(start: u16, count: u16) -> Result<PortRange, String> {
    let end = count
        .checked_sub(1)
        .and_then(|more| start.checked_add(more))
        .ok_or_else(|| format!("{count} ports from {start} are no port range"))?;
    Ok(PortRange { start, end })
}
