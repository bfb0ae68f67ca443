//! Types shared by the eBPF programs and the `portmap` binary.
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]`, has no implicit padding
//! (explicit `_pad` fields), no `bool`/enum/`Option`, and has its size pinned by a `const`
//! assertion. Fields that hold network-byte-order values end in `_be`: they are stored exactly as
//! the bytes appear on the wire (`u32::from_ne_bytes(addr.octets())`), so the datapath can compare
//! and copy them without swapping.
#![no_std]

pub mod csum;

use core::mem::size_of;

/// IP protocol numbers portmap handles.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// SCTP: only mappings that keep the port (its CRC32c covers no IP address, so only the IPv4
/// header checksum changes with the address).
pub const PROTO_SCTP: u8 = 132;

/// Address family codes of the `family` fields (the IP version).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// An IPv4 or IPv6 address as maps store it: four words holding the address bytes in wire order
/// (`u32::from_ne_bytes` of each 4-byte group). IPv4 fills word 0 and leaves the rest zero, as
/// Katran's address unions do, so one key layout serves both families (with a `family` field).
pub type Addr = [u32; 4];

/// `addr` of `family` as the words of an [`Addr`].
#[must_use]
pub fn addr_words(addr: core::net::IpAddr) -> Addr {
    match addr {
        core::net::IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        core::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The address an [`Addr`] of `family` holds.
#[must_use]
pub fn words_addr(family: u8, words: Addr) -> core::net::IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        core::net::IpAddr::from(o)
    } else {
        core::net::IpAddr::from(words[0].to_ne_bytes())
    }
}

/// Map names, exactly as declared in `portmap-ebpf` (and as pinned under the pin directory).
pub mod map_names {
    pub const MAPPINGS: &str = "PM_MAPPINGS";
    pub const BACKENDS: &str = "PM_BACKENDS";
    pub const MAGLEV: &str = "PM_MAGLEV";
    pub const CONNTRACK: &str = "PM_CONNTRACK";
    pub const MAPPING_STATS: &str = "PM_MAPPING_STATS";
    pub const GLOBAL_STATS: &str = "PM_GLOBAL_STATS";
    pub const REDIRECT_DEVS: &str = "PM_REDIRECT_DEVS";
    /// Every map, in the order `portmap` pins them.
    pub const ALL: [&str; 7] = [
        MAPPINGS,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        MAPPING_STATS,
        GLOBAL_STATS,
        REDIRECT_DEVS,
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
    /// Benchmark references (`cargo xtask bench`), never attached by the daemon: a no-op XDP
    /// program, and parse + forward without conntrack or rewrite.
    pub const BENCH_XDP_NOOP: &str = "bench_xdp_noop";
    pub const BENCH_XDP_FORWARD: &str = "bench_xdp_forward";
}

/// Default capacities; the daemon may override them at load time (`EbpfLoader::set_max_entries`).
/// One entry per published port (a range of N ports takes N).
pub const DEFAULT_MAX_MAPPINGS: u32 = 65_536;
/// Conntrack holds two entries per flow (forward and reply).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Backends of mappings with more than one backend (`PM_BACKENDS`).
pub const DEFAULT_MAX_BACKENDS: u32 = 4_096;
/// Maglev tables (`PM_MAGLEV`): one per mapping with more than one backend.
pub const DEFAULT_MAX_BACKEND_GROUPS: u32 = 256;
/// Interfaces the XDP program may `XDP_REDIRECT` to.
pub const MAX_REDIRECT_DEVS: u32 = 256;

/// Key of `PM_MAPPINGS`: what a client addresses. An all-zero `addr` is the wildcard (0.0.0.0 or
/// ::, by `family`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappingKey {
    pub addr: Addr,
    pub port_be: u16,
    /// `PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
const _: () = assert!(size_of::<MappingKey>() == 20);

/// `MappingValue::group` of a mapping with a single backend.
pub const NO_GROUP: u32 = u32::MAX;

/// Value of `PM_MAPPINGS`: where the traffic goes. A single backend is stored inline; several
/// are a Maglev table (`group`, an index into `PM_MAGLEV`) of `PM_BACKENDS` indices.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingValue {
    /// The backend when `group == NO_GROUP`.
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
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<MappingValue>() == 32);

/// Value of `PM_BACKENDS` (an array indexed by what Maglev tables hold).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// The backend's (first) port.
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Backend>() == 20);

/// Maglev table size: a prime, so every backend's permutation visits every slot, and about
/// 100 × the backends a mapping is expected to have, for an even split (Maglev paper, §3.4).
pub const MAGLEV_SIZE: usize = 4_099;

/// Value of `PM_MAGLEV`: slot → index into `PM_BACKENDS`. A flow takes slot
/// `maglev_slot(flow_hash(..))`, which is below `MAGLEV_SIZE`. The one spare entry at the end
/// (a copy of slot 0) exists for the verifier: it bounds the slot's byte offset by the shift
/// alone (`(h * 4099) >> 30`, up to 16395), not knowing that it is a multiple of 4 below 16396.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backends: [u32; MAGLEV_SIZE + 1],
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

/// Key of `PM_CONNTRACK`: a packet's 5-tuple as it travels (source first).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `FlowValue::direction` codes.
pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// `FlowValue::flags` bits.
/// A FIN or RST was seen in this entry's direction: the flow ends after the close grace.
pub const FLOW_F_CLOSING: u8 = 1;

/// Value of `PM_CONNTRACK`. A flow is two entries inserted together: the forward entry (key =
/// client → host address) rewrites the destination to `nat_*` (the backend); the reply entry
/// (key = backend → client) rewrites the source to `nat_*` (the published host address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}
const _: () = assert!(size_of::<FlowValue>() == 32);

/// How stale `FlowValue::last_seen_ns` may get before a packet refreshes it (~1 s).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1 << 30;

/// Value of `PM_MAPPING_STATS` (per-CPU array indexed by `MappingValue::stats_slot`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
const _: () = assert!(size_of::<MappingCounters>() == 40);

/// Global counters (`PM_GLOBAL_STATS`, per-CPU array of u64 indexed by these codes).
/// Each packet the programs see is counted exactly once, under the reason it left with.
pub mod stat {
    /// Client → backend, rewritten and redirected (XDP_REDIRECT / bpf_redirect).
    pub const FWD_REDIRECT: u32 = 0;
    /// Client → backend, rewritten and handed to the kernel's routing (bridge egress, neighbour
    /// not yet resolved, TTL expiring, MTU exceeded, VLAN-tagged ingress, non-redirect device).
    pub const FWD_STACK: u32 = 1;
    /// Backend → client, source rewritten to the published address (TC egress).
    pub const REPLY_NAT: u32 = 2;
    /// Not for portmap: not IPv4/IPv6, not TCP/UDP/SCTP, or an IPv6 routing header.
    pub const PASS_NOT_OURS: u32 = 3;
    /// TCP/UDP with no mapping and no flow.
    pub const PASS_NO_MAPPING: u32 = 4;
    /// IPv4 fragment or IPv6 fragment header: left to the kernel.
    pub const PASS_FRAGMENT: u32 = 5;
    /// Truncated TCP/UDP header: left to the kernel (which drops it).
    pub const PASS_MALFORMED_L4: u32 = 6;
    /// IP header invalid (IPv4: IHL < 5, total length beyond the frame or below the header;
    /// IPv6: payload length beyond the frame).
    pub const DROP_MALFORMED: u32 = 7;
    /// The route to the backend is unreachable / blackhole / prohibit.
    pub const DROP_NO_ROUTE: u32 = 8;
    /// A flow could not be recorded (conntrack full or insert failure).
    pub const DROP_CT_FULL: u32 = 9;
    /// The reply 5-tuple of a new flow is already used by another flow (same client port to two
    /// host ports that lead to the same backend port).
    pub const DROP_NAT_CLASH: u32 = 10;
    /// A helper or packet store failed (should not happen; kept visible).
    pub const DROP_ERROR: u32 = 11;
    /// A mapping's Maglev table or backend entry is missing (being replaced by the daemon).
    pub const DROP_NO_BACKEND: u32 = 12;
    /// New flows recorded in conntrack (counted in addition to the packet's outcome).
    pub const FLOW_NEW: u32 = 13;
    pub const COUNT: u32 = 14;

    /// Names for `portmap stats`, indexed by code.
    pub const NAMES: [&str; COUNT as usize] = [
        "fwd_redirect",
        "fwd_stack",
        "reply_nat",
        "pass_not_ours",
        "pass_no_mapping",
        "pass_fragment",
        "pass_malformed_l4",
        "drop_malformed",
        "drop_no_route",
        "drop_ct_full",
        "drop_nat_clash",
        "drop_error",
        "drop_no_backend",
        "flow_new",
    ];

    /// The outcome drops the packet (the `drop_*` codes).
    #[must_use]
    pub const fn is_drop(code: u32) -> bool {
        matches!(code, DROP_MALFORMED..=DROP_NO_BACKEND)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding (sizes asserted above).
    unsafe impl aya::Pod for super::MappingKey {}
    unsafe impl aya::Pod for super::MappingValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::MappingCounters {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::MaglevTable {}
}
