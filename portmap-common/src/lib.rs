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

/// Map names, exactly as declared in `portmap-ebpf` (and as pinned under the pin directory).
pub mod map_names {
    pub const MAPPINGS: &str = "PM_MAPPINGS";
    pub const CONNTRACK: &str = "PM_CONNTRACK";
    pub const MAPPING_STATS: &str = "PM_MAPPING_STATS";
    pub const GLOBAL_STATS: &str = "PM_GLOBAL_STATS";
    pub const REDIRECT_DEVS: &str = "PM_REDIRECT_DEVS";
    /// Every map, in the order `portmap` pins them.
    pub const ALL: [&str; 5] = [MAPPINGS, CONNTRACK, MAPPING_STATS, GLOBAL_STATS, REDIRECT_DEVS];
}

/// Program names, exactly as the functions are named in `portmap-ebpf`.
pub mod prog_names {
    /// XDP, client-facing ingress: DNAT of new and established flows.
    pub const XDP_INGRESS: &str = "portmap_xdp_ingress";
    /// TC (tcx) ingress, client-facing: the same datapath as the XDP program.
    pub const TC_INGRESS: &str = "portmap_tc_ingress";
    /// TC (tcx) egress, client-facing: reverse NAT of backend replies.
    pub const TC_EGRESS: &str = "portmap_tc_egress";
}

/// Default capacities; the daemon may override them at load time (`EbpfLoader::set_max_entries`).
pub const DEFAULT_MAX_MAPPINGS: u32 = 65_536;
/// Conntrack holds two entries per flow (forward and reply).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Interfaces the XDP program may `XDP_REDIRECT` to.
pub const MAX_REDIRECT_DEVS: u32 = 256;

/// Key of `PM_MAPPINGS`: what a client addresses. `addr_be == 0` is the wildcard (0.0.0.0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappingKey {
    pub addr_be: u32,
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<MappingKey>() == 8);

/// Value of `PM_MAPPINGS`: where the traffic goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingValue {
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
    /// Index into `PM_MAPPING_STATS`, allocated by the daemon.
    pub stats_slot: u32,
}
const _: () = assert!(size_of::<MappingValue>() == 12);

/// Key of `PM_CONNTRACK`: a packet's 5-tuple as it travels (source first).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 16);

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
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    /// `DIR_FORWARD` or `DIR_REPLY`.
    pub direction: u8,
    /// `FLOW_F_*` bits.
    pub flags: u8,
    pub stats_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowValue>() == 24);

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
    /// Not for portmap: not IPv4 or not TCP/UDP.
    pub const PASS_NOT_OURS: u32 = 3;
    /// TCP/UDP with no mapping and no flow.
    pub const PASS_NO_MAPPING: u32 = 4;
    /// IPv4 fragment: left to the kernel.
    pub const PASS_FRAGMENT: u32 = 5;
    /// Truncated TCP/UDP header: left to the kernel (which drops it).
    pub const PASS_MALFORMED_L4: u32 = 6;
    /// IPv4 header invalid (IHL < 5, total length beyond the frame or below the header).
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
    /// New flows recorded in conntrack (counted in addition to the packet's outcome).
    pub const FLOW_NEW: u32 = 12;
    pub const COUNT: u32 = 13;

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
        "flow_new",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding (sizes asserted above).
    unsafe impl aya::Pod for super::MappingKey {}
    unsafe impl aya::Pod for super::MappingValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::MappingCounters {}
}
