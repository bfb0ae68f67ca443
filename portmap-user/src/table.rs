//! The daemon's mapping state: which mappings are applied, where they live in the maps, which
//! host ports were allocated, and how a new configuration is applied as one diff.
//!
//! Every operation checks everything before it touches a map, and undoes what it wrote when a
//! map update fails, so a refused request or a bad config leaves the running state as it was.
//! The decisions (diff, port allocation, local-socket conflicts) are pure functions.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    datapath::{Datapath, GroupPlacement, Placement},
    spec::{Binding, Mapping, PortRange, Protocol, SpecError},
};

/// Why a request was refused. Nothing is changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("port is already allocated: '{spec}' overlaps '{existing}'")]
    Allocated { spec: String, existing: String },
    #[error("port is already allocated: {binding} is in use by a local socket ({socket})")]
    InUse { binding: Binding, socket: LocalSocket },
    #[error("no {count} free host port(s) in a row left in the dynamic range {pool}")]
    PoolExhausted { count: u32, pool: PortRange },
    #[error("no mapping '{0}'")]
    NotFound(String),
    #[error("no mapping '{spec}'; its host port is published as '{existing}'")]
    Mismatch { spec: String, existing: String },
    #[error("'{spec}' matches {count} mappings; name one by its host port: {candidates}")]
    Ambiguous {
        spec: String,
        count: usize,
        candidates: String,
    },
    #[error("no mapping publishes {0}: `update` replaces the backends of an existing mapping")]
    NoSuchBinding(String),
    #[error("`update` needs the mapping's host port(s): '{0}' has none")]
    UpdateNeedsPorts(String),
    #[error("{what} is full ({max}, limits.{limit})")]
    Full {
        what: &'static str,
        max: u32,
        limit: &'static str,
    },
    #[error("kernel map update failed: {0:#}")]
    Datapath(anyhow::Error),
}

/// A socket of this host bound to a port (from /proc/net).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSocket {
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for LocalSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Parses a /proc/net/{tcp,udp}{,6} table: the local address of every socket, TCP only when it
/// listens (state 0A). Addresses are hex words in host order.
#[must_use]
pub fn parse_proc_net(text: &str, protocol: Protocol, v6: bool) -> Vec<LocalSocket> {
    const TCP_LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if protocol == Protocol::Tcp && *state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let word = |i: usize| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok();
            let addr = if v6 {
                let mut octets = [0u8; 16];
                for i in 0..4 {
                    octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_ne_bytes());
                }
                let v6 = Ipv6Addr::from(octets);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            } else {
                IpAddr::V4(Ipv4Addr::from(word(0)?.to_ne_bytes()))
            };
            Some(LocalSocket { protocol, addr, port })
        })
        .collect()
}

/// Parses /proc/net/sctp/eps: listening SCTP endpoints (`LADDRS` may list several addresses).
#[must_use]
pub fn parse_sctp_eps(text: &str) -> Vec<LocalSocket> {
    text.lines()
        .skip(1)
        .flat_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(5).and_then(|p| p.parse::<u16>().ok());
            fields
                .iter()
                .skip(8)
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .filter_map(move |addr| {
                    Some(LocalSocket {
                        protocol: Protocol::Sctp,
                        addr,
                        port: port?,
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// TCP sockets listening in this network namespace, from the kernel's sock_diag interface
/// (which walks only the listening hash, unlike /proc/net/tcp, which walks every connection).
fn tcp_listeners() -> std::io::Result<Vec<LocalSocket>> {
    use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::{
        SockDiagMessage,
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    };
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

    let mut out = Vec::new();
    for (family, id) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: id,
        });
        let mut packet = NetlinkMessage::new(header, request.into());
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0)?;
        let mut reply = vec![0u8; 64 * 1024];
        'recv: loop {
            let size = socket.recv(&mut &mut reply[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&reply[offset..size])
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let addr = match r.header.socket_id.source_address {
                            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                            v4 => v4,
                        };
                        out.push(LocalSocket {
                            protocol: Protocol::Tcp,
                            addr,
                            port: r.header.socket_id.source_port,
                        });
                    }
                    NetlinkPayload::Done(_) => break 'recv,
                    NetlinkPayload::Error(e) => {
                        return Err(std::io::Error::other(format!("sock_diag: {e:?}")));
                    }
                    _ => {}
                }
                if message.header.length == 0 {
                    break;
                }
                offset += message.header.length as usize;
            }
        }
    }
    Ok(out)
}

/// The sockets bound on this host now (in the daemon's network namespace): TCP listeners
/// through sock_diag, UDP sockets from /proc/net/udp{,6}, SCTP endpoints from
/// /proc/net/sctp/eps. One snapshot serves a whole request (an add, or a config applied).
#[must_use]
pub fn local_sockets() -> Vec<LocalSocket> {
    let mut out = tcp_listeners().unwrap_or_else(|e| {
        log::warn!("listing TCP listeners: {e}; reading /proc/net/tcp instead");
        let mut all = Vec::new();
        for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            if let Ok(text) = std::fs::read_to_string(file) {
                all.extend(parse_proc_net(&text, Protocol::Tcp, v6));
            }
        }
        all
    });
    for (file, v6) in [("/proc/net/udp", false), ("/proc/net/udp6", true)] {
        if let Ok(text) = std::fs::read_to_string(file) {
            out.extend(parse_proc_net(&text, Protocol::Udp, v6));
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/sctp/eps") {
        out.extend(parse_sctp_eps(&text));
    }
    out
}

/// The local socket a binding would take traffic from, if any: same protocol and port, and the
/// same address or a wildcard on either side (a socket on `::` also takes IPv4).
#[must_use]
pub fn socket_conflict(binding: &Binding, sockets: &[LocalSocket]) -> Option<LocalSocket> {
    sockets.iter().copied().find(|s| {
        let same_family = s.addr.is_ipv6() == binding.host_ip.is_ipv6();
        let dual_stack = s.addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        s.protocol == binding.protocol
            && s.port == binding.host_port
            && (same_family || dual_stack)
            && (s.addr.is_unspecified() || binding.host_ip.is_unspecified() || s.addr == binding.host_ip)
    })
}

/// Which local socket, if any, a binding would take traffic from.
pub trait Sockets {
    fn conflict(&self, binding: &Binding) -> Option<LocalSocket>;
}

/// A fixed list of sockets (tests).
impl Sockets for Vec<LocalSocket> {
    fn conflict(&self, binding: &Binding) -> Option<LocalSocket> {
        socket_conflict(binding, self)
    }
}

/// No local sockets: for re-applying what was applied before (a rollback), and for datapaths
/// that are not the host's (tests, benchmarks).
pub struct NoSockets;

impl Sockets for NoSockets {
    fn conflict(&self, _: &Binding) -> Option<LocalSocket> {
        None
    }
}

/// The first run of `count` ports in `pool`, starting the search at `from` and wrapping around,
/// for which `free` holds on every port (Docker also hands out ports round-robin).
#[must_use]
pub fn find_free_run(
    pool: PortRange,
    count: u32,
    from: u16,
    free: impl Fn(u16) -> bool,
) -> Option<PortRange> {
    if count == 0 || count > pool.count() {
        return None;
    }
    let last_start = u32::from(pool.end) + 1 - count;
    let first = u32::from(from.clamp(pool.start, pool.end));
    let starts = (first..=last_start).chain(u32::from(pool.start)..first.min(last_start + 1));
    for start in starts {
        let range = PortRange {
            start: start as u16,
            end: (start + count - 1) as u16,
        };
        if range.ports().all(&free) {
            return Some(range);
        }
    }
    None
}

/// What applying a new list of mappings changes: an exact match stays; a mapping with the same
/// published ports but other backends is updated in place (its flows keep going); the rest is
/// removed or added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<Mapping>,
    /// (current, desired)
    pub update: Vec<(Mapping, Mapping)>,
    pub add: Vec<Mapping>,
}

impl Plan {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.update.is_empty() && self.add.is_empty()
    }
}

fn same_ports(a: &Mapping, b: &Mapping) -> bool {
    a.host_ports.is_some()
        && a.protocol == b.protocol
        && a.host_ip == b.host_ip
        && a.host_ports == b.host_ports
}

/// The diff from `current` to `desired` (both as requested, dynamic ones without host ports).
#[must_use]
pub fn plan(current: &[Mapping], desired: &[Mapping]) -> Plan {
    let mut left: Vec<Option<&Mapping>> = current.iter().map(Some).collect();
    let mut plan = Plan::default();
    let mut pending = Vec::new();
    for want in desired {
        match left.iter().position(|c| *c == Some(want)) {
            Some(i) => left[i] = None,
            None => pending.push(want),
        }
    }
    for want in pending {
        match left.iter().position(|c| c.is_some_and(|c| same_ports(c, want))) {
            Some(i) => {
                let old = left[i].take().expect("position found it");
                plan.update.push((old.clone(), want.clone()));
            }
            None => plan.add.push(want.clone()),
        }
    }
    plan.remove = left.into_iter().flatten().cloned().collect();
    plan
}

/// Ids handed out lowest-new first, reused oldest-freed first (so that a freed stats slot's
/// lingering flows rarely count into its next owner).
struct Pool {
    free: VecDeque<u32>,
    next: u32,
    max: u32,
}

impl Pool {
    fn new(max: u32) -> Self {
        Self {
            free: VecDeque::new(),
            next: 0,
            max,
        }
    }

    fn available(&self) -> u32 {
        self.max - self.next + self.free.len() as u32
    }

    /// An id, and whether it was used before.
    fn take_reused(&mut self) -> Option<(u32, bool)> {
        if let Some(id) = self.free.pop_front() {
            return Some((id, true));
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            (self.next - 1, false)
        })
    }

    fn take(&mut self) -> Option<u32> {
        self.take_reused().map(|(id, _)| id)
    }

    fn give(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// One applied mapping.
#[derive(Clone, Debug)]
pub struct Entry {
    /// As requested by `add` or the config (a dynamic one without host ports).
    pub requested: Mapping,
    /// As applied, host ports allocated.
    pub mapping: Mapping,
    pub place: Placement,
    /// Order of addition (`list` shows mappings in this order).
    seq: u64,
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
/// mappings (plus the mapping's own ports): 50,000 mappings are applied in one pass.
pub struct Table {
    entries: BTreeMap<Key, Entry>,
    /// How many mappings publish each (protocol, port) on any address: dynamic allocation skips
    /// ports in use anywhere.
    port_users: HashMap<(Protocol, u16), u32>,
    next_seq: u64,
    slots: Pool,
    groups: Pool,
    backends: Pool,
    ports_used: u64,
    max_ports: u32,
    pub dynamic: PortRange,
    next_dynamic: u16,
}

impl Table {
    #[must_use]
    pub fn new(capacity: Capacity, dynamic: PortRange) -> Self {
        Self {
            entries: BTreeMap::new(),
            port_users: HashMap::new(),
            next_seq: 0,
            slots: Pool::new(capacity.ports),
            groups: Pool::new(capacity.groups),
            backends: Pool::new(capacity.backends),
            ports_used: 0,
            max_ports: capacity.ports,
            dynamic,
            next_dynamic: dynamic.start,
        }
    }

    /// The applied mappings, in the order they were added.
    #[must_use]
    pub fn entries(&self) -> Vec<&Entry> {
        let mut all: Vec<&Entry> = self.entries.values().collect();
        all.sort_unstable_by_key(|e| e.seq);
        all
    }

    /// The applied mappings, in the order they were added.
    #[must_use]
    pub fn mappings(&self) -> Vec<Mapping> {
        self.entries().into_iter().map(|e| e.mapping.clone()).collect()
    }

    /// The requested mappings, in the order they were added (what a config diff starts from).
    #[must_use]
    pub fn requested(&self) -> Vec<Mapping> {
        self.entries().into_iter().map(|e| e.requested.clone()).collect()
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
    /// against the applied mappings and the host's sockets.
    fn resolve(&mut self, requested: &Mapping, sockets: &dyn Sockets) -> Result<Mapping, TableError> {
        let mapping = match requested.host_ports {
            Some(_) => requested.clone(),
            None => {
                let count = requested.port_count();
                let taken = |port: u16| {
                    let probe = requested.with_host_ports(PortRange::single(port));
                    self.port_users.contains_key(&(probe.protocol, port))
                        || probe.bindings().any(|b| sockets.conflict(&b).is_some())
                };
                let range = find_free_run(self.dynamic, count, self.next_dynamic, |p| !taken(p)).ok_or(
                    TableError::PoolExhausted {
                        count,
                        pool: self.dynamic,
                    },
                )?;
                self.next_dynamic = range.end.checked_add(1).unwrap_or(self.dynamic.start);
                requested.with_host_ports(range)
            }
        };
        if let Some(existing) = self.overlapping(&mapping) {
            return Err(TableError::Allocated {
                spec: mapping.to_string(),
                existing: existing.mapping.to_string(),
            });
        }
        if requested.host_ports.is_some() {
            for binding in mapping.bindings() {
                if let Some(socket) = sockets.conflict(&binding) {
                    return Err(TableError::InUse { binding, socket });
                }
            }
        }
        Ok(mapping)
    }

    /// Takes stats slot, Maglev table and backend slots for `mapping` (reusing `reuse`'s where
    /// an update keeps them). Nothing is taken when this fails.
    fn place(&mut self, mapping: &Mapping, reuse: Option<&Entry>) -> Result<Placement, TableError> {
        let (stats_slot, reset_stats) = match reuse {
            Some(e) => (e.place.stats_slot, false),
            None => self.slots.take_reused().ok_or(TableError::Full {
                what: "the mapping table",
                max: self.max_ports,
                limit: "max_mappings",
            })?,
        };
        if mapping.backends.len() == 1 {
            return Ok(Placement {
                stats_slot,
                reset_stats,
                group: None,
            });
        }
        let old_group = reuse.and_then(|e| e.place.group.as_ref());
        let needed_backends = mapping.backends.len() as u32;
        let group_needed = u32::from(old_group.is_none());
        if self.groups.available() < group_needed || self.backends.available() < needed_backends {
            if reuse.is_none() {
                self.slots.give(stats_slot);
            }
            let (what, max, limit) = if self.groups.available() < group_needed {
                ("the Maglev table map", self.groups.max, "max_backend_groups")
            } else {
                ("the backend map", self.backends.max, "max_backends")
            };
            return Err(TableError::Full { what, max, limit });
        }
        let group = match old_group {
            Some(g) => g.group,
            None => self.groups.take().expect("checked available"),
        };
        // Fresh backend slots: the old ones stay valid for readers of the old table until the new
        // table is written, and are freed afterwards.
        let backend_slots = (0..needed_backends)
            .map(|_| self.backends.take().expect("checked available"))
            .collect();
        Ok(Placement {
            stats_slot,
            reset_stats,
            group: Some(GroupPlacement { group, backend_slots }),
        })
    }

    /// Gives back what `place` took, except what `keep` still uses.
    fn release(&mut self, place: &Placement, keep: Option<&Placement>) {
        if keep.is_none_or(|k| k.stats_slot != place.stats_slot) {
            self.slots.give(place.stats_slot);
        }
        if let Some(g) = &place.group {
            let kept = keep.and_then(|k| k.group.as_ref());
            if kept.is_none_or(|k| k.group != g.group) {
                self.groups.give(g.group);
            }
            for &b in &g.backend_slots {
                if kept.is_none_or(|k| !k.backend_slots.contains(&b)) {
                    self.backends.give(b);
                }
            }
        }
    }

    fn count_ports(&mut self, mapping: &Mapping, add: bool) {
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

    /// Publishes `requested`; returns the mapping as applied (with its allocated host ports).
    pub fn add(
        &mut self,
        dp: &mut Datapath,
        requested: &Mapping,
        sockets: &dyn Sockets,
    ) -> Result<Mapping, TableError> {
        if self.ports_used + u64::from(requested.port_count()) > u64::from(self.max_ports) {
            return Err(TableError::Full {
                what: "the mapping table",
                max: self.max_ports,
                limit: "max_mappings",
            });
        }
        let mapping = self.resolve(requested, sockets)?;
        let place = self.place(&mapping, None)?;
        if let Err(e) = dp.insert_mapping(&mapping, &place) {
            let _ = dp.remove_mapping(&mapping);
            self.release(&place, None);
            return Err(TableError::Datapath(e));
        }
        self.count_ports(&mapping, true);
        let key = key_of(&mapping).expect("resolved mappings have host ports");
        self.next_seq += 1;
        self.entries.insert(
            key,
            Entry {
                requested: requested.clone(),
                mapping: mapping.clone(),
                place,
                seq: self.next_seq,
            },
        );
        Ok(mapping)
    }

    /// Finds the entry `spec` names: by its applied form, or by its requested form if that is
    /// unambiguous.
    fn find(&self, spec: &Mapping) -> Result<Key, TableError> {
        let exact = key_of(spec).and_then(|k| self.entries.get(&k).map(|e| (k, e)));
        if let Some((key, entry)) = exact {
            if entry.mapping == *spec || entry.requested == *spec {
                return Ok(key);
            }
            if same_ports(&entry.mapping, spec) {
                return Err(TableError::Mismatch {
                    spec: spec.to_string(),
                    existing: entry.mapping.to_string(),
                });
            }
        }
        let matches: Vec<(&Key, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.requested == *spec)
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
    pub fn remove(&mut self, dp: &mut Datapath, spec: &Mapping) -> Result<Mapping, TableError> {
        let key = self.find(spec)?;
        dp.remove_mapping(&self.entries[&key].mapping)
            .map_err(TableError::Datapath)?;
        let entry = self.entries.remove(&key).expect("found");
        self.count_ports(&entry.mapping, false);
        self.release(&entry.place, None);
        Ok(entry.mapping)
    }

    /// Replaces the backends of the mapping that publishes `spec`'s host ports. Established
    /// flows keep their backend (also a removed one) until they end; new flows follow the new
    /// Maglev table, of which only about the changed backends' share differs.
    pub fn update(&mut self, dp: &mut Datapath, spec: &Mapping) -> Result<Mapping, TableError> {
        let key = key_of(spec).ok_or_else(|| TableError::UpdateNeedsPorts(spec.to_string()))?;
        let old = self
            .entries
            .get(&key)
            .filter(|e| same_ports(&e.mapping, spec))
            .cloned()
            .ok_or_else(|| TableError::NoSuchBinding(spec.to_string()))?;
        let place = self.place(spec, Some(&old))?;
        if let Err(e) = dp.insert_mapping(spec, &place) {
            // Put the old version back in full (its group and backends were never released).
            let _ = dp.insert_mapping(&old.mapping, &old.place);
            self.release(&place, Some(&old.place));
            return Err(TableError::Datapath(e));
        }
        self.release(&old.place, Some(&place));
        self.entries.insert(
            key,
            Entry {
                requested: spec.clone(),
                mapping: spec.clone(),
                place,
                seq: old.seq,
            },
        );
        Ok(spec.clone())
    }

    /// Makes the applied mappings equal `desired`, all or nothing: on any failure what was done
    /// is undone, in reverse. Returns the plan that was applied.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        desired: &[Mapping],
        sockets: &dyn Sockets,
    ) -> Result<Plan, TableError> {
        let plan = plan(&self.requested(), desired);
        let mut removed: Vec<Entry> = Vec::new();
        let mut updated: Vec<Entry> = Vec::new();
        let mut added: Vec<Mapping> = Vec::new();
        let result = (|| {
            for m in &plan.remove {
                let key = self.find(m)?;
                let entry = self.entries[&key].clone();
                self.remove(dp, &entry.mapping)?;
                removed.push(entry);
            }
            for (old, new) in &plan.update {
                let key = self.find(old)?;
                let entry = self.entries[&key].clone();
                self.update(dp, new)?;
                updated.push(entry);
            }
            // The new mappings' entries are written together, in few system calls.
            dp.defer_mapping_writes();
            let adding = plan.add.iter().try_for_each(|m| {
                added.push(self.add(dp, m, sockets)?);
                Ok::<(), TableError>(())
            });
            let flushed = dp.flush_mapping_writes().map_err(TableError::Datapath);
            adding.and(flushed)
        })();
        if let Err(e) = result {
            for m in added.iter().rev() {
                let _ = self.remove(dp, m);
            }
            for old in updated.iter().rev() {
                let _ = self.update(dp, &old.mapping);
                self.restore_requested(old);
            }
            for old in removed.iter().rev() {
                if self.add(dp, &old.mapping, &NoSockets).is_ok() {
                    self.restore_requested(old);
                }
            }
            return Err(e);
        }
        Ok(plan)
    }

    /// After a rollback re-applied `old.mapping`: give it back its requested form and place in
    /// the order.
    fn restore_requested(&mut self, old: &Entry) {
        if let Some(e) = key_of(&old.mapping).and_then(|k| self.entries.get_mut(&k)) {
            e.requested = old.requested.clone();
            e.seq = old.seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse;

    fn ms(specs: &[&str]) -> Vec<Mapping> {
        specs.iter().map(|s| parse(s).unwrap()).collect()
    }

    #[test]
    fn plan_keeps_updates_removes_and_adds() {
        let current = ms(&[
            "8080:198.18.2.2:80",
            "8081:198.18.2.2:81",
            ":198.18.2.2:90",
            "53:198.18.2.2:53/udp",
        ]);
        let desired = ms(&[
            ":198.18.2.2:90",
            "8080:198.18.2.2:80,198.18.2.3:80",
            "9000-9009:198.18.2.2:9000-9009",
            "53:198.18.2.2:53/udp",
        ]);
        let p = plan(&current, &desired);
        assert_eq!(p.remove, ms(&["8081:198.18.2.2:81"]));
        assert_eq!(p.update, vec![(current[0].clone(), desired[1].clone())]);
        assert_eq!(p.add, ms(&["9000-9009:198.18.2.2:9000-9009"]));
        assert!(plan(&current, &current).is_empty());
    }

    #[test]
    fn free_runs_wrap_around_and_skip_taken_ports() {
        let pool = PortRange { start: 100, end: 109 };
        assert_eq!(
            find_free_run(pool, 1, 100, |_| true),
            Some(PortRange::single(100))
        );
        assert_eq!(
            find_free_run(pool, 3, 108, |_| true),
            Some(PortRange { start: 100, end: 102 })
        );
        assert_eq!(
            find_free_run(pool, 2, 100, |p| p != 101 && p != 103),
            Some(PortRange { start: 104, end: 105 })
        );
        assert_eq!(
            find_free_run(pool, 1, 105, |p| p < 103),
            Some(PortRange::single(100))
        );
        assert_eq!(find_free_run(pool, 11, 100, |_| true), None);
        assert_eq!(find_free_run(pool, 1, 100, |_| false), None);
    }

    const PROC_TCP: &str =
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:A000 0200007F:0050 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
    const PROC_TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000
";

    #[test]
    fn proc_net_tables_parse_to_listening_sockets() {
        let tcp = parse_proc_net(PROC_TCP, Protocol::Tcp, false);
        let want = |addr: &str, port| LocalSocket {
            protocol: Protocol::Tcp,
            addr: addr.parse().unwrap(),
            port,
        };
        assert_eq!(tcp, vec![want("0.0.0.0", 8080), want("127.0.0.1", 80)]);
        let tcp6 = parse_proc_net(PROC_TCP6, Protocol::Tcp, true);
        assert_eq!(tcp6, vec![want("::", 8081), want("127.0.0.1", 8082)]);
        let udp = parse_proc_net(PROC_TCP, Protocol::Udp, false);
        assert_eq!(udp.len(), 3, "UDP sockets count in any state");
        let eps = "ENDPT SOCK STY SST HBKT LPORT UID INODE LADDRS\n\
                   0 0 2 10 5 9999 0 123 198.18.0.1 fd00::1\n";
        assert_eq!(parse_sctp_eps(eps).len(), 2);
        assert_eq!(parse_sctp_eps(eps)[1].addr, "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn sockets_conflict_on_same_port_protocol_and_overlapping_address() {
        let sock = |addr: &str, port, protocol| LocalSocket {
            protocol,
            addr: addr.parse().unwrap(),
            port,
        };
        let binding = |spec: &str| parse(spec).unwrap().bindings().next().unwrap();
        let sockets = [
            sock("0.0.0.0", 8080, Protocol::Tcp),
            sock("198.18.0.1", 9090, Protocol::Tcp),
            sock("::", 7070, Protocol::Udp),
        ];
        assert!(socket_conflict(&binding("8080:198.18.2.2:80"), &sockets).is_some());
        assert!(socket_conflict(&binding("198.18.0.5:8080:198.18.2.2:80"), &sockets).is_some());
        assert!(socket_conflict(&binding("8080:198.18.2.2:80/udp"), &sockets).is_none());
        assert!(socket_conflict(&binding("8080:[fd00::2]:80"), &sockets).is_none());
        assert!(socket_conflict(&binding("9090:198.18.2.2:80"), &sockets).is_some());
        assert!(socket_conflict(&binding("198.18.0.9:9090:198.18.2.2:80"), &sockets).is_none());
        assert!(
            socket_conflict(&binding("7070:198.18.2.2:80/udp"), &sockets).is_some(),
            "dual stack"
        );
        assert!(socket_conflict(&binding("7070:[fd00::2]:80/udp"), &sockets).is_some());
    }
}
