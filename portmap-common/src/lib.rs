//! Types shared by the eBPF programs and the `portmap` binary.
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]` and derives zerocopy's
//! `IntoBytes` (which fails to compile if the layout has any implicit padding: deleting a `_pad`
//! field is a compile error) and `FromBytes` (no `bool`/enum/`Option`: every bit pattern is a
//! value); its size is pinned by a `const` assertion. Fields that hold network-byte-order values end in `_be`: they are stored exactly as
//! the bytes appear on the wire (`u32::from_ne_bytes(addr.octets())`), so the datapath can compare
//! and copy them without swapping.
#![no_std]

mod addr;
pub mod csum;
pub mod stat;

use core::{mem::size_of, ops::AddAssign};

pub use addr::{Addr, addr_words, words_addr};
pub use stat::Stat;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The derives every map key and value carries (see the crate docs).
macro_rules! map_layout {
    ($($item:item)*) => {
        $(
            #[repr(C)]
            #[derive(Clone, Copy, Debug, PartialEq, Eq, IntoBytes, FromBytes, Immutable, KnownLayout)]
            $item
        )*
    };
}

/// IP protocol numbers portmap handles.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// SCTP: only mappings that keep the port (its CRC32c covers no IP address, so only the IPv4
/// header checksum changes with the address).
pub const PROTO_SCTP: u8 = 132;
/// ICMP and ICMPv6: only their error messages about flows are translated (the embedded packet).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Address family codes of the `family` fields (the IP version).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Map names, exactly as declared in `portmap-ebpf` (and as pinned under the pin directory).
pub mod map_names {
    pub const MAPPINGS: &str = "PM_MAPPINGS";
    pub const BACKENDS: &str = "PM_BACKENDS";
    pub const MAGLEV: &str = "PM_MAGLEV";
    pub const CONNTRACK: &str = "PM_CONNTRACK";
    pub const MAPPING_STATS: &str = "PM_MAPPING_STATS";
    pub const GLOBAL_STATS: &str = "PM_GLOBAL_STATS";
    pub const REDIRECT_DEVS: &str = "PM_REDIRECT_DEVS";
    pub const LOCAL_ADDRS: &str = "PM_LOCAL_ADDRS";
    pub const PUBLISHED_PORTS: &str = "PM_PUBLISHED_PORTS";
    pub const SOCK_REVERSE: &str = "PM_SOCK_REVERSE";
    pub const CT_NEW: &str = "PM_CT_NEW";
    pub const FRAGMENTS: &str = "PM_FRAGMENTS";
    /// A program array belongs to one program type: one for XDP, one for TC.
    pub const ICMP_PROGS_XDP: &str = "PM_ICMP_XDP";
    pub const ICMP_PROGS_TC: &str = "PM_ICMP_TC";
    /// The stamp of the pinned state ([`crate::DatapathStamp`]).
    pub const META: &str = "PM_META";
    pub const LOCAL_BACKENDS: &str = "PM_LOCAL_BACKENDS";
    pub const LOCAL_DEVS: &str = "PM_LOCAL_DEVS";
    /// Source allow-lists of mappings (an LPM trie, [`crate::AllowKey`]).
    pub const ALLOW: &str = "PM_ALLOW";
    /// New flows each mapping refused by its allow-list (per-CPU u64 by stats slot).
    pub const MAPPING_DENIED: &str = "PM_MAPPING_DENIED";
    /// The generation of the host's routes as the daemon saw them (one u32, [`crate::FlowRoute`]).
    pub const ROUTE_GEN: &str = "PM_ROUTE_GEN";
    /// Per-CPU scratch space of the programs (`bpf_fib_lookup`'s parameter block).
    pub const FIB_SCRATCH: &str = "PM_FIB_SCRATCH";
    /// Every map, in the order `portmap` pins them.
    pub const ALL: [&str; 21] = [
        MAPPINGS,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        MAPPING_STATS,
        GLOBAL_STATS,
        REDIRECT_DEVS,
        LOCAL_ADDRS,
        PUBLISHED_PORTS,
        SOCK_REVERSE,
        CT_NEW,
        FRAGMENTS,
        ICMP_PROGS_XDP,
        ICMP_PROGS_TC,
        META,
        LOCAL_BACKENDS,
        LOCAL_DEVS,
        ALLOW,
        MAPPING_DENIED,
        ROUTE_GEN,
        FIB_SCRATCH,
    ];
}

/// Program names, exactly as the functions are named in `portmap-ebpf`.
pub mod prog_names {
    /// XDP, client-facing ingress: DNAT of new and established flows.
    pub const XDP_INGRESS: &str = "portmap_xdp_ingress";
    /// TC (tcx) ingress, client-facing: the same datapath as the XDP program.
    pub const TC_INGRESS: &str = "portmap_tc_ingress";
    /// TC (tcx) egress, client-facing: reverse NAT of backend replies.
    pub const TC_EGRESS: &str = "portmap_tc_egress";
    /// TC (tcx) ingress of every veth of the host but the client-facing ones (a container's
    /// host side): replies reverse-NATed and sent to the client past the host's netfilter.
    pub const TC_FROM_BACKEND: &str = "portmap_tc_from_backend";
    /// ICMP errors about flows, reached by tail call from the program of the same hook (their
    /// work would not fit the 512-byte stack beside the datapath): slot `ICMP_SLOT_INGRESS` of
    /// `PM_ICMP_XDP`, slots `ICMP_SLOT_INGRESS` and `ICMP_SLOT_EGRESS` of `PM_ICMP_TC`.
    pub const XDP_ICMP: &str = "portmap_xdp_icmp";
    pub const TC_ICMP_INGRESS: &str = "portmap_tc_icmp_in";
    pub const TC_ICMP_EGRESS: &str = "portmap_tc_icmp_out";
    /// cgroup socket hooks (host-local clients): translate a connect()/sendmsg() to a published
    /// address into its backend, report the published address back (recvmsg, getpeername),
    /// and refuse bind() of a published port in the host's network namespace.
    pub const CONNECT4: &str = "portmap_connect4";
    pub const CONNECT6: &str = "portmap_connect6";
    pub const SENDMSG4: &str = "portmap_sendmsg4";
    pub const SENDMSG6: &str = "portmap_sendmsg6";
    pub const RECVMSG4: &str = "portmap_recvmsg4";
    pub const RECVMSG6: &str = "portmap_recvmsg6";
    pub const GETPEERNAME4: &str = "portmap_getpeername4";
    pub const GETPEERNAME6: &str = "portmap_getpeername6";
    pub const BIND4: &str = "portmap_bind4";
    pub const BIND6: &str = "portmap_bind6";
    /// Benchmark references (`cargo xtask bench`), never attached by the daemon: a no-op XDP
    /// program, parse + forward without conntrack or rewrite, and a TC program that only
    /// redirects into a veth's peer (`BENCH_REDIRECT_IFINDEX_GLOBAL`).
    pub const BENCH_XDP_NOOP: &str = "bench_xdp_noop";
    pub const BENCH_XDP_FORWARD: &str = "bench_xdp_forward";
    pub const BENCH_TC_REDIRECT_PEER: &str = "bench_tc_redirect_peer";
    /// The established-flow path of the XDP and TC ingress programs cut after each step (parse,
    /// conntrack lookup, rewrite, counters); the full program adds the forwarding.
    pub const BENCH_XDP_STEPS: [&str; 4] = [
        "bench_xdp_parse",
        "bench_xdp_lookup",
        "bench_xdp_rewrite",
        "bench_xdp_count",
    ];
    pub const BENCH_TC_STEPS: [&str; 4] = [
        "bench_tc_parse",
        "bench_tc_lookup",
        "bench_tc_rewrite",
        "bench_tc_count",
    ];
}

/// The global of `bench_tc_redirect_peer`: the ifindex it redirects to.
pub const BENCH_REDIRECT_IFINDEX_GLOBAL: &str = "BENCH_REDIRECT_IFINDEX";

/// Default capacities; the daemon may override them at load time (`EbpfLoader::set_max_entries`).
/// One entry per published port (a range of N ports takes N).
pub const DEFAULT_MAX_MAPPINGS: u32 = 65_536;
/// Conntrack holds two entries per flow (forward and reply). `PM_CT_NEW`, an LRU, holds every
/// active flow: new flows, and a cached copy of each assured one, so that a packet looks in one
/// table. `PM_CONNTRACK` keeps the assured flows (never evicted: when full, flows stay
/// unassured), so a flood of new flows only ever sheds other new flows and caches.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
pub const DEFAULT_CONNTRACK_NEW_ENTRIES: u32 = 131_072;
/// Backends of mappings with more than one backend (`PM_BACKENDS`).
pub const DEFAULT_MAX_BACKENDS: u32 = 4_096;
/// Maglev tables (`PM_MAGLEV`): one per mapping with more than one backend.
pub const DEFAULT_MAX_BACKEND_GROUPS: u32 = 256;
/// Interfaces the XDP program may `XDP_REDIRECT` to.
pub const MAX_REDIRECT_DEVS: u32 = 256;
/// Addresses of the host (`PM_LOCAL_ADDRS`).
pub const MAX_LOCAL_ADDRS: u32 = 4_096;
/// Addresses reached through a veth of this host (`PM_LOCAL_BACKENDS`): its containers; their
/// veths (`PM_LOCAL_DEVS`) are as many at most.
pub const MAX_LOCAL_BACKENDS: u32 = 4_096;
/// Slots of `PM_GLOBAL_STATS`: the counters of [`Stat`] and room for counters added later, so
/// that a newer daemon adopts the pinned array (its size is part of the layout it checks).
pub const GLOBAL_STATS_SLOTS: u32 = 64;
const _: () = assert!(Stat::COUNT as u32 <= GLOBAL_STATS_SLOTS);
/// (protocol, port) pairs published on some address (`PM_PUBLISHED_PORTS`): at most one per
/// mapping entry.
pub const MAX_PUBLISHED_PORTS: u32 = DEFAULT_MAX_MAPPINGS;
/// Sockets of host-local clients whose replies are reported from the published address
/// (`PM_SOCK_REVERSE`, an LRU).
pub const DEFAULT_SOCK_REVERSE_ENTRIES: u32 = 65_536;

/// Slots of `PM_ICMP_XDP` and `PM_ICMP_TC` (program arrays): the ICMP-error program of each
/// hook.
pub const ICMP_SLOT_INGRESS: u32 = 0;
pub const ICMP_SLOT_EGRESS: u32 = 1;
pub const ICMP_SLOTS: u32 = 2;

/// Datagrams in flight in fragments (`PM_FRAGMENTS`, an LRU): the first fragment's ports, for the
/// fragments that follow.
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8_192;

/// The skb mark bit the reply hook sets on a reply it sent on from a local backend's veth, so
/// that the client-facing TC egress, which it reaches next, clears it and lets it leave without
/// a second lookup or count (Cilium marks its own packets the same way). Bit 22: clear of
/// kube-proxy's 0x4000/0x8000 and Docker's and podman's (none).
pub const MARK_REPLY_SENT: u32 = 1 << 22;

/// Name of the load-time global holding the cookie of the daemon's network namespace (the
/// host's): loopback destinations and bind protection apply only to sockets there.
pub const HOST_NETNS_COOKIE_GLOBAL: &str = "HOST_NETNS_COOKIE";

map_layout! {
/// Key of `PM_MAPPINGS`: what a client addresses. An all-zero `addr` is the wildcard (0.0.0.0 or
/// ::, by `family`).
#[derive(Hash)]
pub struct MappingKey {
    pub addr: Addr,
    pub port_be: u16,
    /// `PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
}
const _: () = assert!(size_of::<MappingKey>() == 20);

/// `MappingValue::group` of a mapping with a single backend.
pub const NO_GROUP: u32 = u32::MAX;

/// `MappingValue::backend_addr` of a mapping to a port of the host itself: the destination
/// address of each flow is kept, only its port changes (a mapping spec's `0.0.0.0` / `[::]`
/// backend). Never in a Maglev group: such a mapping has that one backend.
pub const DESTINATION_BACKEND: Addr = [0; 4];

map_layout! {
/// Value of `PM_MAPPINGS`: where the traffic goes. A single backend is stored inline; several
/// are a Maglev table (`group`, an index into `PM_MAGLEV`) of `PM_BACKENDS` indices.
pub struct MappingValue {
    /// The backend when `group == NO_GROUP`; all zeros (`DESTINATION_BACKEND`, the unspecified
    /// address) stands for the packet's own destination address: a port of the host itself,
    /// reached at the address the packet came to (iptables' `REDIRECT`; only the port changes).
    pub backend_addr: Addr,
    pub backend_port_be: u16,
    /// Added to the chosen group backend's port (host order): the position of this port in a
    /// port range that maps onto a backend port range; 0 otherwise.
    pub port_offset: u16,
    pub group: u32,
    /// Index into `PM_MAPPING_STATS`, allocated by the daemon (shared by a range's ports).
    pub stats_slot: u32,
    /// Of the backend(s); always that of the key (no NAT between families).
    pub family: u8,
    /// `MAPPING_F_*`.
    pub flags: u8,
    /// The mapping's source allow-list in `PM_ALLOW` ([`AllowKey::list`]); `NO_ALLOW_LIST`:
    /// every source may start a flow. (Was padding in earlier versions, always 0: maps pinned
    /// by them read as mappings without a list.)
    pub allow_list: u16,
}
}
const _: () = assert!(size_of::<MappingValue>() == 32);

/// `MappingValue::allow_list` of a mapping that every source may reach.
pub const NO_ALLOW_LIST: u16 = 0;
/// Most prefixes one allow-list holds (per family).
pub const MAX_ALLOW_PREFIXES: usize = 1_024;
/// Prefixes `PM_ALLOW` holds, all lists together (lists with the same prefixes are one list).
pub const MAX_ALLOW_ENTRIES: u32 = 65_536;

map_layout! {
/// The data of a `PM_ALLOW` key (an LPM trie key is the prefix length in bits, then this): a
/// list and an address. An entry's prefix length covers the whole `list_be` (32 bits) and then
/// the prefix of the address, so a lookup with the mapping's list and the client's address
/// (prefix length 32 + 32 for IPv4, 32 + 128 for IPv6) finds whether any prefix of that list
/// holds the client. A list holds prefixes of one family, which `list_be` carries beside the
/// list (so that the daemon reads the entries back as prefixes); the daemon makes one list per
/// (family, set of prefixes) and shares it between the mappings that have it. The value is 1.
pub struct AllowKey {
    /// `family << 16 | MappingValue::allow_list`, big-endian (the trie matches bits in memory
    /// order).
    pub list_be: u32,
    pub addr: Addr,
}
}
const _: () = assert!(size_of::<AllowKey>() == 20);

impl AllowKey {
    /// Bits of `list_be`, the part of every prefix length before the address's.
    pub const LIST_BITS: u32 = 32;

    #[inline(always)]
    #[must_use]
    pub fn new(list: u16, family: u8, addr: Addr) -> Self {
        Self {
            list_be: (u32::from(family) << 16 | u32::from(list)).to_be(),
            addr,
        }
    }

    /// The list and family of the key (`new`'s inverse).
    #[must_use]
    pub fn list(&self) -> (u16, u8) {
        let word = u32::from_be(self.list_be);
        (word as u16, (word >> 16) as u8)
    }

    /// The prefix length of a lookup of a whole address of `family`.
    #[inline(always)]
    #[must_use]
    pub fn full_len(family: u8) -> u32 {
        Self::LIST_BITS + if family == FAMILY_V6 { 128 } else { 32 }
    }
}

/// `MappingValue::flags`: a container runtime owns the port and holds a socket on it as its
/// reservation (podman's conmon, dockerd, after CNI ADD): the bind hook lets binds of it through,
/// and the runtime's own socket refuses the others (EADDRINUSE). Ports published with
/// `portmap add` or the config file lack it: the bind hook refuses their binds (EPERM).
pub const MAPPING_F_RUNTIME_RESERVES: u8 = 1;

map_layout! {
/// Value of `PM_BACKENDS` (an array indexed by what Maglev tables hold). A slot no mapping
/// uses is all zero.
#[derive(Default)]
pub struct BackendValue {
    pub addr: Addr,
    /// The backend's (first) port.
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
}
}
const _: () = assert!(size_of::<BackendValue>() == 20);

/// Maglev table size: a prime, so every backend's permutation visits every slot, and about
/// 100 × the backends a mapping is expected to have, for an even split (Maglev paper, §3.4).
pub const MAGLEV_SIZE: usize = 4_099;

map_layout! {
/// Value of `PM_MAGLEV`: slot → index into `PM_BACKENDS`. A flow takes slot
/// `maglev_slot(flow_hash(..))`, which is below `MAGLEV_SIZE`. The one spare entry at the end
/// (a copy of slot 0) exists for the verifier: it bounds the slot's byte offset by the shift
/// alone (`(h * 4099) >> 30`, up to 16395), not knowing that it is a multiple of 4 below 16396.
/// A table no mapping uses is all zero.
pub struct MaglevTable {
    pub backends: [u32; MAGLEV_SIZE + 1],
}
}

impl MaglevTable {
    /// The all-zero table of an unused slot.
    pub const ZERO: Self = Self {
        backends: [0; MAGLEV_SIZE + 1],
    };
}
const _: () = assert!(size_of::<MaglevTable>() == 4 * (MAGLEV_SIZE + 1));

/// The hash that picks a flow's Maglev slot: of the client's address, port and the protocol, so
/// every packet of a flow (and a client's retransmitted SYN) lands on the same backend.
/// A murmur3-style mix; shared by the datapath and the tests.
#[inline(always)]
#[must_use]
pub fn flow_hash(src: &Addr, src_port_be: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9 ^ u32::from(proto);
    for w in src {
        h ^= *w;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
    }
    h ^= u32::from(src_port_be);
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Maps a hash onto `0..MAGLEV_SIZE` without a division (Lemire's multiply-shift), in a form
/// the verifier can bound by itself.
#[inline(always)]
#[must_use]
pub fn maglev_slot(hash: u32) -> usize {
    ((u64::from(hash) * MAGLEV_SIZE as u64) >> 32) as usize
}

map_layout! {
/// Key of `PM_CONNTRACK`: a packet's 5-tuple as it travels (source first).
#[derive(Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key of the replies to the flow whose forward packets carry `self` (client →
    /// published address) and are rewritten to `nat_addr`:`nat_port_be` (the backend): backend →
    /// client. The datapath inserts the reply entry under this key and the daemon's expiry pairs
    /// the two entries of a flow with it, so the two can never disagree.
    #[inline(always)]
    #[must_use]
    pub fn reply(&self, nat_addr: Addr, nat_port_be: u16) -> Self {
        Self {
            src: nat_addr,
            dst: self.src,
            src_port_be: nat_port_be,
            dst_port_be: self.src_port_be,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// The inverse of `reply`: the forward key of the flow whose replies carry `self` (backend →
    /// client) and are rewritten to `nat_addr`:`nat_port_be` (the published address).
    #[inline(always)]
    #[must_use]
    pub fn forward(&self, nat_addr: Addr, nat_port_be: u16) -> Self {
        Self {
            src: self.dst,
            dst: nat_addr,
            src_port_be: self.dst_port_be,
            dst_port_be: nat_port_be,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// `FlowValue::direction` codes.
pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// `FlowValue::flags` bits.
/// A FIN or RST was seen in this entry's direction: the flow ends after the close grace.
pub const FLOW_F_CLOSING: u8 = 1;
/// On both entries of an unassured flow: the backend answered (set on the reply entry by every
/// answer, on the forward entry by the first). The client's next packet (for TCP one without
/// SYN: the handshake's ACK) then makes the flow assured; a flow the backend never answers is
/// told so by its forward entry alone, without a look at its reply entry per packet.
pub const FLOW_F_REPLIED: u8 = 2;
/// On both entries of an assured flow, in both tables: the flow has a copy in `PM_CONNTRACK`
/// (which the LRU never sheds) and its entries in `PM_CT_NEW` are that copy's cache, read first
/// by every packet (one lookup per packet for every active flow).
pub const FLOW_F_ASSURED: u8 = 4;
/// A RST was seen in this entry's direction (always with `FLOW_F_CLOSING`): the connection is
/// over at both ends, whatever the other direction did (`flow_ended`).
pub const FLOW_F_RESET: u8 = 8;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The `FLOW_F_*` marks a TCP segment with flags `tcp_flags` leaves on its direction's entry:
/// closing after a FIN or RST, reset after a RST (0 for anything else, and for UDP's zero).
#[inline(always)]
#[must_use]
pub const fn close_marks(tcp_flags: u8) -> u8 {
    let closing = if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        FLOW_F_CLOSING
    } else {
        0
    };
    let reset = if tcp_flags & TCP_RST != 0 { FLOW_F_RESET } else { 0 };
    closing | reset
}

/// Whether a TCP flow whose forward and reply entries carry the flags `forward` and `reply` is
/// over at both ends: a RST either way, or a FIN each way. A flow closed one way only may still
/// carry data the other way (a half-close), so it is not.
#[inline(always)]
#[must_use]
pub const fn flow_ended(forward: u8, reply: u8) -> bool {
    (forward | reply) & FLOW_F_RESET != 0 || forward & reply & FLOW_F_CLOSING != 0
}

map_layout! {
/// Value of `PM_CONNTRACK`. A flow is two entries inserted together: the forward entry (key =
/// client → host address) rewrites the destination to `nat_*` (the backend); the reply entry
/// (key = backend → client) rewrites the source to `nat_*` (the published host address).
pub struct FlowValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet, refreshed at most every
    /// `LAST_SEEN_GRANULARITY_NS` to keep the hot path free of needless writes.
    pub last_seen_ns: u64,
    pub nat_addr: Addr,
    pub nat_port_be: u16,
    /// `DIR_FORWARD` or `DIR_REPLY`.
    pub direction: u8,
    /// `FLOW_F_*` bits.
    pub flags: u8,
    pub stats_slot: u32,
    /// Where this entry's packets leave after the rewrite, cached by the datapath.
    pub route: FlowRoute,
}
}
const _: () = assert!(size_of::<FlowValue>() == 56);

/// `FlowRoute::kind`: nothing cached, a local backend's veth (`PM_LOCAL_BACKENDS`), the egress
/// device a FIB lookup found.
pub const ROUTE_NONE: u8 = 0;
pub const ROUTE_LOCAL: u8 = 1;
pub const ROUTE_FIB: u8 = 2;

/// A cached route is stale once the clock's epoch (`now >> ROUTE_EPOCH_SHIFT`, ~1 s) moves on,
/// whatever the daemon saw: the bound on how long a route change it misses (or makes while no
/// daemon runs) keeps being followed.
pub const ROUTE_EPOCH_SHIFT: u32 = 30;

map_layout! {
/// The forwarding decision of a flow entry's packets (Cilium and Katran keep it per flow too):
/// the egress device and the MACs, so that an established packet skips `bpf_fib_lookup` (and
/// the `PM_LOCAL_BACKENDS` lookup). Valid while `stamp` equals `PM_ROUTE_GEN` plus the clock's
/// epoch (the daemon bumps the generation on every link, address, neighbour and route change and
/// whenever it rewrites `PM_LOCAL_BACKENDS`), and only for packets up to `max_len`.
#[derive(Default)]
pub struct FlowRoute {
    /// Egress device (`kind` says how it is reached).
    pub ifindex: u32,
    /// `route_stamp(generation, now)` when cached.
    pub stamp: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The largest IP packet known to fit: a local backend's MTU, or the largest packet a FIB
    /// lookup of this flow accepted (a larger one takes the lookup, which checks the route's MTU).
    pub max_len: u16,
    /// `ROUTE_*`.
    pub kind: u8,
    /// The IPv4 TOS or IPv6 traffic class the lookup was made with: policy routing may choose
    /// by it (`ip rule tos`), so a packet with another takes the lookup.
    pub tos: u8,
}
}
const _: () = assert!(size_of::<FlowRoute>() == 24);

/// The stamp a route cached now carries: it changes whenever the daemon's generation or the
/// clock's epoch does (both only grow, so their sum does too, up to wrapping).
#[inline(always)]
#[must_use]
pub fn route_stamp(generation: u32, now_ns: u64) -> u32 {
    generation.wrapping_add((now_ns >> ROUTE_EPOCH_SHIFT) as u32)
}

map_layout! {
/// An address, as the key of `PM_LOCAL_ADDRS` and `PM_LOCAL_BACKENDS`.
///
/// `PM_LOCAL_ADDRS` (value: 1): an address of the host, that is of the daemon's network
/// namespace, kept in sync with the interfaces by the daemon. A wildcard mapping matches only
/// destinations in this map (iptables' `--dst-type LOCAL`); 127.0.0.0/8 and ::1 count as local
/// without an entry.
#[derive(Hash, PartialOrd, Ord)]
pub struct LocalAddrKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}
}
const _: () = assert!(size_of::<LocalAddrKey>() == 20);

impl LocalAddrKey {
    /// The key of `addr` (of `family`). Built from five words: field by field, LLVM zeroes the
    /// padding with a `memset` call, and any call costs the XDP program stack it does not have
    /// on 6.1's verifier (which counts a called function's frame as 32 bytes at least).
    #[inline(always)]
    #[must_use]
    pub fn new(addr: Addr, family: u8) -> Self {
        zerocopy::transmute!([
            addr[0],
            addr[1],
            addr[2],
            addr[3],
            u32::from_ne_bytes([family, 0, 0, 0])
        ])
    }
}

map_layout! {
/// Value of `PM_LOCAL_BACKENDS`: how to reach an address that lives behind a veth of this host
/// (a container, directly routed or on a bridge port), learnt by the daemon from the kernel's
/// neighbour, bridge FDB and route tables and kept in sync with them. The datapath sends a packet
/// for it straight into the veth (TC: `bpf_redirect_peer`, into the container's namespace; XDP:
/// a devmap redirect to the host side) instead of a FIB lookup; a missing entry, a packet
/// larger than `mtu`, a device XDP may not redirect to, or one that is gone (not in
/// `PM_LOCAL_DEVS` any more, from which the kernel removes unregistered devices itself, even
/// while no daemon runs) take the FIB path.
#[derive(Hash)]
pub struct LocalBackend {
    /// The host side of the veth whose peer holds the address (for a bridged container: the
    /// bridge port, not the bridge).
    pub ifindex: u32,
    /// The smallest MTU on the way (the veth's, and the bridge's for a bridged container).
    pub mtu: u32,
    /// The address's MAC (its neighbour entry).
    pub dmac: [u8; 6],
    /// The host's MAC on that link (the veth's, or the bridge's): what the container's
    /// neighbour entry for its gateway holds.
    pub smac: [u8; 6],
}
}
const _: () = assert!(size_of::<LocalBackend>() == 20);

map_layout! {
/// Key of `PM_PUBLISHED_PORTS` (value: 1): a (protocol, port) that a mapping publishes on some
/// address. A bind() of it to the wildcard address is refused.
#[derive(Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
}
const _: () = assert!(size_of::<PortKey>() == 4);

map_layout! {
/// Key of `PM_SOCK_REVERSE`: a socket (its cookie) and the backend address and port a connect()
/// or sendmsg() of it was translated to, as the socket's family writes it (an IPv6 socket
/// reaching an IPv4 backend sees `::ffff:a.b.c.d`).
#[derive(Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: Addr,
    pub port_be: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}
}
const _: () = assert!(size_of::<SockRevKey>() == 32);

map_layout! {
/// Value of `PM_SOCK_REVERSE`: the published address and port the socket addressed, which
/// recvmsg() and getpeername() report instead of the backend's.
pub struct SockRevValue {
    pub addr: Addr,
    pub port_be: u16,
    pub _pad: [u8; 2],
}
}
const _: () = assert!(size_of::<SockRevValue>() == 20);

map_layout! {
/// Key of `PM_FRAGMENTS`: one fragmented datagram as its fragments arrive (addresses before any
/// rewrite, the IPv4 identification or the IPv6 fragment header's identification).
#[derive(Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
}
const _: () = assert!(size_of::<FragKey>() == 40);

map_layout! {
/// Value of `PM_FRAGMENTS`: the L4 ports the first fragment carried.
pub struct FragPorts {
    pub src_port_be: u16,
    pub dst_port_be: u16,
}
}
const _: () = assert!(size_of::<FragPorts>() == 4);

/// How stale `FlowValue::last_seen_ns` may get before a packet refreshes it (~1 s).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1 << 30;

/// Version of what the pinned maps mean. The daemon adopts pinned maps only when their stamp
/// carries this version and each map has the type, key, value and size this build creates;
/// bump it when the meaning of a map's contents changes without its sizes changing (a field
/// reordered or reused), so that a new daemon refuses the old maps instead of misreading them.
pub const LAYOUT_VERSION: u32 = 2;

map_layout! {
/// The single entry of `PM_META`: which layout the pinned maps have and which datapath they
/// belong to (random, chosen when the maps were created: the daemon's saved state names it, so
/// state of another datapath is never applied to these maps).
pub struct DatapathStamp {
    pub layout_version: u32,
    pub _pad: u32,
    pub id: u64,
}
}
const _: () = assert!(size_of::<DatapathStamp>() == 16);

map_layout! {
/// Value of `PM_MAPPING_STATS` (per-CPU array indexed by `MappingValue::stats_slot`); also the
/// per-mapping part of `portmap stats` (serialised with these field names).
#[derive(Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct MappingCounters {
    /// Client → backend packets and L3 bytes (IP header included).
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Backend → client packets and L3 bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows created through this mapping.
    pub flows: u64,
}
}
const _: () = assert!(size_of::<MappingCounters>() == 40);

/// Sums counters (of several CPUs): the one place that lists the fields for it.
impl AddAssign for MappingCounters {
    fn add_assign(&mut self, other: Self) {
        self.fwd_packets += other.fwd_packets;
        self.fwd_bytes += other.fwd_bytes;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.flows += other.flows;
    }
}

impl core::iter::Sum for MappingCounters {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut total, c| {
            total += c;
            total
        })
    }
}

#[cfg(feature = "user")]
mod pod {
    /// aya's `Pod` for types that zerocopy proved to be plain bytes: the bound fails to compile
    /// for a type without the derives.
    macro_rules! pod {
        ($($t:ty),*) => {$(
            const _: () = {
                const fn plain_bytes<T: zerocopy::IntoBytes + zerocopy::FromBytes + Copy>() {}
                plain_bytes::<$t>();
            };
            // SAFETY: `$t` is Copy, IntoBytes (no padding, checked by the derive) and FromBytes
            // (every bit pattern is valid): exactly what aya::Pod promises.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        super::MappingKey,
        super::MappingValue,
        super::FlowKey,
        super::FlowValue,
        super::MappingCounters,
        super::BackendValue,
        super::MaglevTable,
        super::LocalAddrKey,
        super::LocalBackend,
        super::PortKey,
        super::SockRevKey,
        super::SockRevValue,
        super::FragKey,
        super::FragPorts,
        super::DatapathStamp,
        super::AllowKey
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_key_swaps_the_translated_tuple() {
        let forward = FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            src_port_be: 1000,
            dst_port_be: 8080,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let reply = forward.reply([3, 0, 0, 0], 80);
        assert_eq!((reply.src, reply.src_port_be), ([3, 0, 0, 0], 80));
        assert_eq!((reply.dst, reply.dst_port_be), ([1, 0, 0, 0], 1000));
        assert_eq!((reply.proto, reply.family), (PROTO_TCP, FAMILY_V4));
    }

    #[test]
    fn counters_sum_field_by_field() {
        let c = |n: u64| MappingCounters {
            fwd_packets: n,
            fwd_bytes: 2 * n,
            reply_packets: 3 * n,
            reply_bytes: 4 * n,
            flows: 5 * n,
        };
        assert_eq!([c(1), c(2), c(4)].into_iter().sum::<MappingCounters>(), c(7));
    }

    #[test]
    fn a_fin_marks_closing_and_a_rst_also_reset() {
        assert_eq!(close_marks(TCP_SYN | TCP_ACK), 0);
        assert_eq!(close_marks(0), 0);
        assert_eq!(close_marks(TCP_FIN | TCP_ACK), FLOW_F_CLOSING);
        assert_eq!(close_marks(TCP_RST), FLOW_F_CLOSING | FLOW_F_RESET);
        assert_eq!(close_marks(TCP_RST | TCP_ACK), FLOW_F_CLOSING | FLOW_F_RESET);
    }

    #[test]
    fn a_flow_ends_with_a_rst_either_way_or_a_fin_each_way() {
        let (fin, rst) = (close_marks(TCP_FIN), close_marks(TCP_RST));
        let other = FLOW_F_REPLIED | FLOW_F_ASSURED;
        // Half-closed either way: the other direction may still carry data.
        assert!(!flow_ended(fin | other, other));
        assert!(!flow_ended(other, fin | other));
        assert!(!flow_ended(0, 0));
        assert!(flow_ended(fin, fin));
        assert!(flow_ended(rst, 0));
        assert!(flow_ended(0, rst | other));
        assert!(flow_ended(fin, rst));
    }
}
