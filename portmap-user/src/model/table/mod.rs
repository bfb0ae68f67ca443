//! The daemon's mapping state: which mappings are applied, where they live in the maps, which
//! host ports were allocated, and how a new configuration is applied as one diff.
//!
//! All or nothing: every operation checks everything before it touches a map, and when a map
//! write fails it writes the previous contents back and restores its own state, so a refused
//! request or a bad config leaves the table and the maps exactly as they were (unit tests in
//! `tests.rs` fail each write of each operation against a fake). The maps are reached only
//! through the [`Maps`] trait; the decisions (diff, port allocation, conflicts) are pure.

mod allow_lists;
mod apply;
#[cfg(test)]
mod batch_tests;
mod error;
mod place;
mod plan;
mod pool;
mod recover;
mod snapshot;
#[cfg(test)]
mod tests;
pub mod writes;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    sync::Arc,
};

use log::warn;
use serde::{Deserialize, Serialize};

pub use self::{
    error::TableError,
    plan::{Plan, find_free_run, plan},
    snapshot::{Record, Snapshot},
    writes::{AllowPlacement, Batch, GroupPlacement, MapContents, Maps, Placement},
};
use self::{
    place::{clear_new_list, write_new_list},
    plan::same_ports,
    pool::Pool,
    writes::{clear_backends, clear_group, group_contents, mapping_entries, mapping_keys},
};
use crate::{
    host::sockets::Sockets,
    model::{
        mapping::{Mapping, PortRange, Protocol},
        prefixes::Prefixes,
    },
};

/// Who asked for a mapping, and so who may take it away: a config diff (start, reload) adds,
/// updates and removes only the config's own mappings; those added at run time stay until they
/// are deleted; a container's (the CNI plugin's, by container, or the Docker follower's) are
/// replaced and removed as a whole by its owner.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    #[default]
    Config,
    /// `portmap add`.
    Runtime,
    /// A container, as the CNI plugin names it (container ID and interface).
    Container(String),
    /// A Docker container, followed by the daemon (`docker`): its full ID and its name.
    Docker(DockerContainer),
    /// Rebuilt from the pinned maps after the state file was lost: who added it is unknown;
    /// `reserved`: a container runtime reserved its ports (it was a container's).
    Unknown { reserved: bool },
}

/// A Docker container that owns mappings: identified by its ID (its name can change).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DockerContainer {
    pub id: String,
    pub name: String,
}

impl DockerContainer {
    /// The owner as `list` shows it: `docker/NAME/ID`.
    #[must_use]
    pub fn owner(&self) -> String {
        format!("docker/{}/{}", self.name, self.id)
    }
}

impl Origin {
    /// Who owns the mapping, as `list` names it: `config`, `cli` (`portmap add`), the container
    /// (the CNI plugin's `NETWORK/CONTAINER_ID/IFNAME`, Docker's `docker/NAME/ID`), or
    /// `unknown` / `unknown-container` (rebuilt from the pinned maps).
    #[must_use]
    pub fn owner(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Config => "config".into(),
            Self::Runtime => "cli".into(),
            Self::Container(owner) => owner.into(),
            Self::Docker(container) => container.owner().into(),
            Self::Unknown { reserved: false } => "unknown".into(),
            Self::Unknown { reserved: true } => "unknown-container".into(),
        }
    }

    /// Whether the owner's runtime holds a socket on each published port as its reservation
    /// (container runtimes do: conmon after CNI ADD, dockerd before the container starts), so
    /// the bind hook lets binds of them through.
    #[must_use]
    pub fn runtime_reserves(&self) -> bool {
        matches!(
            self,
            Self::Container(_) | Self::Docker(_) | Self::Unknown { reserved: true }
        )
    }
}

/// One applied mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// As requested by `add` or the config (a dynamic one without host ports).
    pub requested: Mapping,
    /// As applied, host ports allocated.
    pub mapping: Mapping,
    pub place: Placement,
    pub origin: Origin,
    /// Order of addition (`list` shows mappings in this order).
    seq: u64,
}

/// Flows of a mapping (its stats slot, unique while any of its flows live) to delete: its UDP
/// flows, all of them or only those to one backend; or, after its allow-list narrowed, its
/// flows of any protocol from clients outside the list (a firewall change drops them too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowFlush {
    pub stats_slot: u32,
    /// Only flows to this backend address and port range.
    pub backend: Option<(IpAddr, PortRange)>,
    /// Flows of every protocol whose client is outside these prefixes (`backend` aside).
    pub outside: Option<Prefixes>,
}

/// Capacities of the maps, from the config's `[limits]`.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub ports: u32,
    pub groups: u32,
    pub backends: u32,
}

/// Where an applied mapping sits in the index: its protocol, host address and first host port.
/// Applied mappings never overlap, so within one (protocol, address) their ranges are ordered.
type Key = (Protocol, IpAddr, u16);

fn key_of(mapping: &Mapping) -> Option<Key> {
    Some((mapping.protocol, mapping.host_ip, mapping.host_ports?.start))
}

/// The applied mappings, indexed so that every operation costs O(log n) in the number of
/// mappings (plus the mapping's own ports): 50,000 mappings are applied in one pass. It derives
/// `Clone` and `PartialEq` so that a config diff can be rolled back to a snapshot, and tests can
/// check that a failed change left it exactly as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Persistent (imbl): a clone shares the structure, so that every change can keep the table
    /// it is undone to (`Table::roll_back`) in O(1), and a diff visits only what differs. The
    /// entries are shared pointers: the B-tree moves and copies its leaves' values as it
    /// inserts, splits and unshares them, 8 bytes each instead of a ~250-byte `Entry` (a
    /// 50,000-mapping install in the table alone: 48.5 → 38.7 ms).
    entries: imbl::OrdMap<Key, Arc<Entry>>,
    /// How many mappings publish each (protocol, port) on any address: dynamic allocation skips
    /// ports in use anywhere.
    port_users: imbl::HashMap<(Protocol, u16), u32>,
    next_seq: u64,
    slots: Pool,
    groups: Pool,
    backends: Pool,
    ports_used: u64,
    max_ports: u32,
    pub dynamic: PortRange,
    /// Ports never allocated (the kernel's `ip_local_reserved_ports`).
    pub reserved: Vec<PortRange>,
    next_dynamic: u16,
    /// Stats slots of removed mappings, not handed out again while flows still count into them
    /// (`release_drained`): every packet is counted under the mapping that forwarded it.
    draining: Vec<u32>,
    /// Flows that changes made stale, for the daemon to delete (`take_flushes`).
    flushes: Vec<FlowFlush>,
    /// Entries added, updated and removed since the daemon last saved (`take_changes`).
    changes: Vec<snapshot::Change>,
    /// The lists of `PM_ALLOW`, shared by the mappings that enforce the same one.
    allow: allow_lists::AllowLists,
    /// The host's allow-list (the config's `allow`): every mapping without its own enforces it.
    policy: Vec<ipnet::IpNet>,
    /// `policy`'s IPv4 and IPv6 prefixes, normalized: the one list every mapping of the family
    /// without its own shares.
    policy_lists: [Prefixes; 2],
}

/// Writes a placed mapping's map contents: counters zeroed (`reset_stats`), backends and Maglev
/// table, then the `PM_MAPPINGS` entries that make it reachable.
fn write_mapping<M: Maps + ?Sized>(
    maps: &mut M,
    mapping: &Mapping,
    place: &Placement,
    origin: &Origin,
    reset_stats: bool,
) -> anyhow::Result<()> {
    if reset_stats {
        maps.reset_counters(&[place.stats_slot])?;
    }
    if let Some(group) = &place.group {
        let (backends, table) = group_contents(mapping, group)
            .ok_or_else(|| anyhow::anyhow!("mapping {mapping}: every weight is 0"))?;
        maps.set_backends(&backends)?;
        maps.set_maglev(group.group, &table)?;
    }
    maps.set_mappings(&mapping_entries(mapping, place, origin.runtime_reserves()))
}

/// Whether a removal or a backend change of `mapping` leaves flows to flush: only UDP ones go
/// then (`FlowFlush`), so a TCP or SCTP mapping's scan of the flow tables would find nothing
/// (~1 ms of a `portmap del` with a 1M-entry table).
fn flushes_udp(mapping: &Mapping) -> bool {
    mapping.protocol == Protocol::Udp
}

/// Best effort, after a failed write: a warning for what could not be undone either.
fn undo(what: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        warn!("rolling back {what}: {e:#}");
    }
}

impl Table {
    #[must_use]
    pub fn new(capacity: Capacity, dynamic: PortRange) -> Self {
        Self {
            entries: imbl::OrdMap::new(),
            port_users: imbl::HashMap::new(),
            next_seq: 0,
            slots: Pool::new(capacity.ports),
            groups: Pool::new(capacity.groups),
            backends: Pool::new(capacity.backends),
            ports_used: 0,
            max_ports: capacity.ports,
            dynamic,
            reserved: Vec::new(),
            next_dynamic: dynamic.start,
            draining: Vec::new(),
            flushes: Vec::new(),
            changes: Vec::new(),
            allow: allow_lists::AllowLists::default(),
            policy: Vec::new(),
            policy_lists: [Prefixes::default(), Prefixes::default()],
        }
    }

    /// The list `mapping` enforces (`allow::source`): the host's is the one shared copy.
    pub(super) fn effective_list(&self, mapping: &Mapping) -> Option<Prefixes> {
        use crate::model::allow::{Source, of_family, source};
        let family = mapping.family();
        Some(match source(&mapping.allow, &self.policy)? {
            Source::Own => of_family(&mapping.allow, family).into(),
            Source::Host => self.policy_lists[usize::from(family == portmap_common::FAMILY_V6)].clone(),
        })
    }

    /// The host's allow-list as the table enforces it.
    #[must_use]
    pub fn policy(&self) -> &[ipnet::IpNet] {
        &self.policy
    }

    /// The allow-list `entry` enforces (`None`: everyone).
    #[must_use]
    pub fn enforced(entry: &Entry) -> Option<&[ipnet::IpNet]> {
        entry.place.allow.as_ref().map(|a| &*a.prefixes)
    }

    /// Hands back to the pool the drained stats slots that no flow counts into any more (the
    /// expiry pass's `slots_in_use`); returns how many.
    pub fn release_drained(&mut self, in_use: &HashSet<u32>) -> usize {
        let (busy, free): (Vec<u32>, Vec<u32>) = self.draining.iter().partition(|s| in_use.contains(s));
        for slot in &free {
            self.slots.give(*slot);
        }
        self.draining = busy;
        free.len()
    }

    /// Whether stats slots of removed mappings wait for their flows to go (`release_drained`).
    #[must_use]
    pub fn is_draining(&self) -> bool {
        !self.draining.is_empty()
    }

    /// The flows that successful changes made stale since the last call: UDP flows of removed
    /// mappings and of removed backends (the daemon deletes them at once).
    pub fn take_flushes(&mut self) -> Vec<FlowFlush> {
        std::mem::take(&mut self.flushes)
    }

    /// How many mappings are applied (without listing them, as `entries` does).
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The applied mappings, in the order they were added.
    #[must_use]
    pub fn entries(&self) -> Vec<&Entry> {
        let mut all: Vec<&Entry> = self.entries.values().map(|e| &**e).collect();
        all.sort_unstable_by_key(|e| e.seq);
        all
    }

    /// The applied mappings, in the order they were added.
    #[must_use]
    pub fn mappings(&self) -> Vec<Mapping> {
        self.entries().into_iter().map(|e| e.mapping.clone()).collect()
    }

    /// The requested mappings of the config, in the order they were added (what a config diff
    /// starts from).
    #[must_use]
    pub fn requested(&self) -> Vec<Mapping> {
        self.requested_by(&Origin::Config)
    }

    /// The requested mappings of `origin`, in the order they were added.
    #[must_use]
    pub fn requested_by(&self, origin: &Origin) -> Vec<Mapping> {
        self.entries()
            .into_iter()
            .filter(|e| e.origin == *origin)
            .map(|e| e.requested.clone())
            .collect()
    }

    /// The applied mappings of every container, by owner.
    #[must_use]
    pub fn containers(&self) -> BTreeMap<String, Vec<Mapping>> {
        let mut owned: BTreeMap<String, Vec<Mapping>> = BTreeMap::new();
        for e in self.entries() {
            if let Origin::Container(owner) = &e.origin {
                owned.entry(owner.clone()).or_default().push(e.mapping.clone());
            }
        }
        owned
    }

    /// Every Docker container that owns mappings.
    #[must_use]
    pub fn docker_containers(&self) -> BTreeSet<DockerContainer> {
        self.entries
            .values()
            .filter_map(|e| match &e.origin {
                Origin::Docker(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// Gives the mappings of the Docker container `container.id` its current name (after `docker
    /// rename`); nothing in the maps changes.
    pub fn rename_docker(&mut self, container: &DockerContainer) {
        let renamed: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(&e.origin, Origin::Docker(c) if c.id == container.id && c.name != container.name))
            .map(|(key, _)| *key)
            .collect();
        for key in renamed {
            if let Some(entry) = self.entries.get_mut(&key).map(Arc::make_mut) {
                entry.origin = Origin::Docker(container.clone());
                self.changes.push(snapshot::Change::Put(key));
            }
        }
    }

    /// The owner of the applied mapping that shares a published port with `mapping`, if any.
    #[must_use]
    pub fn owner_overlapping(&self, mapping: &Mapping) -> Option<(Mapping, String)> {
        self.overlapping(mapping)
            .map(|e| (e.mapping.clone(), e.origin.owner().into_owned()))
    }

    /// The applied mapping that shares a published port with `mapping`, if any.
    fn overlapping(&self, mapping: &Mapping) -> Option<&Entry> {
        let ports = mapping.host_ports?;
        let (_, entry) = self
            .entries
            .range(..=(mapping.protocol, mapping.host_ip, ports.end))
            .next_back()?;
        entry.mapping.overlaps(mapping).then_some(entry)
    }

    /// Chooses the host ports of `requested` (its own, or free dynamic ones) and checks them
    /// against the applied mappings and the host's sockets. Returns the mapping and, for a
    /// dynamic one, where the next dynamic search starts.
    fn resolve(
        &self,
        requested: &Mapping,
        sockets: &dyn Sockets,
    ) -> Result<(Mapping, Option<u16>), TableError> {
        let taken = |port: u16| {
            let probe = requested.with_host_ports(PortRange::single(port));
            self.port_users.contains_key(&(probe.protocol, port))
                || self.reserved.iter().any(|r| r.contains(port))
                || probe.bindings().any(|b| sockets.conflict(&b).is_some())
        };
        let (mapping, next_dynamic) = match requested.host_ports {
            // Docker's `-p 8000-8010:80`: the first free port of the range.
            Some(range) if requested.picks_one() => {
                let port = find_free_run(range, 1, range.start, |p| !taken(p))
                    .ok_or(TableError::RangeFull(range))?;
                (requested.with_host_ports(port), None)
            }
            Some(_) => (requested.clone(), None),
            None => {
                let count = requested.port_count();
                let range = find_free_run(self.dynamic, count, self.next_dynamic, |p| !taken(p)).ok_or(
                    TableError::PoolExhausted {
                        count,
                        pool: self.dynamic,
                    },
                )?;
                let next = range.end.checked_add(1).unwrap_or(self.dynamic.start);
                (requested.with_host_ports(range), Some(next))
            }
        };
        if let Some(existing) = self.overlapping(&mapping) {
            return Err(TableError::Allocated {
                spec: mapping.to_string(),
                existing: existing.mapping.to_string(),
            });
        }
        if requested.host_ports.is_some() && !requested.picks_one() {
            for binding in mapping.bindings() {
                if let Some(socket) = sockets.conflict(&binding) {
                    return Err(TableError::InUse { binding, socket });
                }
            }
        }
        Ok((mapping, next_dynamic))
    }

    /// Publishes `requested` for the config; returns the mapping as applied (with its allocated
    /// host ports).
    pub fn add<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        requested: &Mapping,
        sockets: &dyn Sockets,
    ) -> Result<Mapping, TableError> {
        self.add_as(maps, requested, sockets, Origin::Config)
    }

    /// Publishes `requested` on behalf of `origin`.
    pub fn add_as<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        requested: &Mapping,
        sockets: &dyn Sockets,
        origin: Origin,
    ) -> Result<Mapping, TableError> {
        if self.ports_used + u64::from(requested.port_count()) > u64::from(self.max_ports) {
            return Err(self.mappings_full());
        }
        let (mapping, next_dynamic) = self.resolve(requested, sockets)?;
        let (place, taken) = self.place(&mapping, None)?;
        let new_ports = self.port_changes(&mapping, true);
        let written = write_new_list(maps, &taken)
            .and_then(|()| write_mapping(maps, &mapping, &place, &origin, taken.reset_stats()))
            .and_then(|()| maps.publish_ports(&new_ports));
        if let Err(e) = written {
            undo("an add", maps.remove_mappings(&mapping_keys(&mapping)));
            undo("an add", maps.unpublish_ports(&new_ports));
            if let Some(group) = &place.group {
                undo("an add", clear_group(maps, group));
            }
            undo("an add", clear_new_list(maps, &taken));
            self.untake(taken);
            return Err(TableError::Datapath(e));
        }
        if let Some(next) = next_dynamic {
            self.next_dynamic = next;
        }
        self.count_ports(&mapping, true);
        let key = key_of(&mapping).expect("resolved mappings have host ports");
        self.next_seq += 1;
        self.entries.insert(
            key,
            Arc::new(Entry {
                requested: requested.clone(),
                mapping: mapping.clone(),
                place,
                origin,
                seq: self.next_seq,
            }),
        );
        self.note_put(key, &taken);
        Ok(mapping)
    }

    /// Notes that the entry at `key` was placed (`taken`) and written: a list made for it is
    /// saved before it.
    fn note_put(&mut self, key: Key, taken: &place::Taken) {
        if let Some((list, allow_lists::ListTaken { created: Some(_) })) = &taken.list {
            self.changes.push(snapshot::Change::List(list.list));
        }
        self.changes.push(snapshot::Change::Put(key));
    }

    /// Finds the entry `spec` names: by its applied form, or by its requested form if that is
    /// unambiguous.
    fn find(&self, spec: &Mapping) -> Result<Key, TableError> {
        let exact = key_of(spec).and_then(|k| self.entries.get(&k).map(|e| (k, e)));
        if let Some((key, entry)) = exact {
            if entry.mapping.same_as(spec) || entry.requested.same_as(spec) {
                return Ok(key);
            }
            if same_ports(&entry.mapping, spec) {
                return Err(TableError::Mismatch {
                    spec: spec.to_string(),
                    existing: entry.mapping.to_string(),
                });
            }
        }
        let matches: Vec<(&Key, &Arc<Entry>)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.requested.same_as(spec))
            .collect();
        match matches.as_slice() {
            [] => Err(TableError::NotFound(spec.to_string())),
            [(key, _)] => Ok(**key),
            many => Err(TableError::Ambiguous {
                spec: spec.to_string(),
                count: many.len(),
                candidates: many
                    .iter()
                    .map(|(_, e)| format!("'{}'", e.mapping))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Unpublishes the mapping `spec` names; returns it as it was applied. Its flows expire by
    /// themselves (new packets of them are no longer NATed once they do).
    pub fn remove<M: Maps + ?Sized>(&mut self, maps: &mut M, spec: &Mapping) -> Result<Mapping, TableError> {
        let key = self.find(spec)?;
        let entry = &self.entries[&key];
        let freed_ports = self.port_changes(&entry.mapping, false);
        let removed = maps
            .remove_mappings(&mapping_keys(&entry.mapping))
            .and_then(|()| maps.unpublish_ports(&freed_ports));
        if let Err(e) = removed {
            undo(
                "a removal",
                maps.set_mappings(&mapping_entries(
                    &entry.mapping,
                    &entry.place,
                    entry.origin.runtime_reserves(),
                )),
            );
            undo("a removal", maps.publish_ports(&freed_ports));
            return Err(TableError::Datapath(e));
        }
        let entry = self.entries.remove(&key).expect("found");
        self.changes.push(snapshot::Change::Removed {
            seq: entry.seq,
            stats_slot: entry.place.stats_slot,
        });
        self.count_ports(&entry.mapping, false);
        self.free(maps, &entry.place, None);
        if flushes_udp(&entry.mapping) {
            self.flushes.push(FlowFlush {
                stats_slot: entry.place.stats_slot,
                backend: None,
                outside: None,
            });
        }
        Ok(Arc::unwrap_or_clone(entry).mapping)
    }

    /// Replaces the backends (and the allow-list) of the mapping that publishes `spec`'s host
    /// ports. Established flows keep their backend (also a removed one) until they end; new
    /// flows follow the new Maglev table, of which only about the changed backends' share
    /// differs. Flows from clients a narrowed allow-list no longer admits go at once.
    pub fn update<M: Maps + ?Sized>(&mut self, maps: &mut M, spec: &Mapping) -> Result<Mapping, TableError> {
        let key = key_of(spec).ok_or_else(|| TableError::UpdateNeedsPorts(spec.to_string()))?;
        self.entries
            .get(&key)
            .filter(|e| same_ports(&e.mapping, spec))
            .ok_or_else(|| TableError::NoSuchBinding(spec.to_string()))?;
        self.replace(maps, key, spec.clone(), spec.clone())?;
        Ok(spec.clone())
    }

    /// The own allow-list of the mapping that publishes `spec`'s host ports (what `update`
    /// keeps when the request names none); `None` when no mapping publishes them.
    #[must_use]
    pub fn own_allow(&self, spec: &Mapping) -> Option<Vec<ipnet::IpNet>> {
        self.entries
            .get(&key_of(spec)?)
            .filter(|e| same_ports(&e.mapping, spec))
            .map(|e| e.mapping.allow.clone())
    }

    /// Makes the entry at `key` `mapping` (same host ports), requested as `requested`: placed
    /// anew (its stats slot kept), its map contents written, what only the old version used
    /// freed; all or nothing.
    fn replace<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        key: Key,
        mapping: Mapping,
        requested: Mapping,
    ) -> Result<(), TableError> {
        let old = self.entries[&key].clone();
        let (place, taken) = self.place(&mapping, Some(&old))?;
        let written = write_new_list(maps, &taken)
            .and_then(|()| write_mapping(maps, &mapping, &place, &old.origin, false));
        if let Err(e) = written {
            // The old version in full (its table, backends and list were never freed), then
            // clear what only the new one used.
            undo(
                "an update",
                write_mapping(maps, &old.mapping, &old.place, &old.origin, false),
            );
            let fresh: Vec<u32> = taken.backends.iter().map(|(id, _)| *id).collect();
            undo("an update", clear_backends(maps, &fresh));
            if let Some((group, _)) = taken.group {
                undo(
                    "an update",
                    maps.set_maglev(group, &portmap_common::MaglevTable::ZERO),
                );
            }
            undo("an update", clear_new_list(maps, &taken));
            self.untake(taken);
            return Err(TableError::Datapath(e));
        }
        self.free(maps, &old.place, Some(&place));
        let stats_slot = place.stats_slot;
        if flushes_udp(&mapping) {
            self.flushes.extend(
                old.mapping
                    .backends
                    .iter()
                    .filter(|b| {
                        !mapping
                            .backends
                            .iter()
                            .any(|n| n.ip == b.ip && n.ports == b.ports)
                    })
                    .map(|b| FlowFlush {
                        stats_slot,
                        backend: Some((b.ip, b.ports)),
                        outside: None,
                    }),
            );
        }
        let narrowed = place.allow.as_ref().filter(|new| {
            old.place
                .allow
                .as_ref()
                .is_none_or(|was| was.prefixes != new.prefixes)
        });
        if let Some(list) = narrowed {
            self.flushes.push(FlowFlush {
                stats_slot,
                backend: None,
                outside: Some(list.prefixes.clone()),
            });
        }
        self.entries.insert(
            key,
            Arc::new(Entry {
                requested,
                mapping,
                place,
                origin: old.origin.clone(),
                seq: old.seq,
            }),
        );
        self.note_put(key, &taken);
        Ok(())
    }

    /// Makes `policy` the host's allow-list: every mapping without its own list enforces it
    /// from now on (flows from clients it no longer admits go). All or nothing: on a failure
    /// the table and the maps are as before. Returns how many mappings changed their list.
    pub fn set_policy<M: Maps + ?Sized>(
        &mut self,
        maps: &mut M,
        policy: &[ipnet::IpNet],
    ) -> Result<usize, TableError> {
        if self.policy == policy {
            return Ok(0);
        }
        let before = self.clone();
        self.policy = policy.to_vec();
        self.policy_lists = [portmap_common::FAMILY_V4, portmap_common::FAMILY_V6]
            .map(|family| crate::model::allow::of_family(policy, family).into());
        let affected: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                self.effective_list(&e.mapping).as_ref() != e.place.allow.as_ref().map(|a| &a.prefixes)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &affected {
            let entry = &self.entries[key];
            let (mapping, requested) = (entry.mapping.clone(), entry.requested.clone());
            if let Err(e) = self.replace(maps, *key, mapping, requested) {
                self.roll_back(maps, before);
                return Err(e);
            }
        }
        Ok(affected.len())
    }
}
