//! Every map of the datapath (Katran's balancer_maps.h). Layouts, names and default capacities
//! live in `portmap_common`; the daemon overrides the capacities at load time.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use portmap_common::{
    AllowKey, BackendValue, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK_NEW_ENTRIES,
    DEFAULT_MAX_BACKEND_GROUPS, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_MAPPINGS, DEFAULT_SOCK_REVERSE_ENTRIES,
    DatapathStamp, FlowKey, FlowValue, FragKey, FragPorts, GLOBAL_STATS_SLOTS, ICMP_SLOTS, LocalAddrKey,
    LocalBackend, MAX_ALLOW_ENTRIES, MAX_FRAGMENTED_DATAGRAMS, MAX_LOCAL_ADDRS, MAX_LOCAL_BACKENDS,
    MAX_PUBLISHED_PORTS, MAX_REDIRECT_DEVS, MaglevTable, MappingCounters, MappingKey, MappingValue, PortKey,
    SockRevKey, SockRevValue,
};

/// (proto, host address, host port) → backend. Written by the daemon only.
#[map]
pub static PM_MAPPINGS: HashMap<MappingKey, MappingValue> =
    HashMap::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

/// Backends of mappings with several backends, indexed by what `PM_MAGLEV` tables hold.
#[map]
pub static PM_BACKENDS: Array<BackendValue> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// One Maglev table per mapping with several backends (`MappingValue::group`).
#[map]
pub static PM_MAGLEV: Array<MaglevTable> = Array::with_max_entries(DEFAULT_MAX_BACKEND_GROUPS, 0);

/// Assured flows: two entries each (forward and reply), never evicted, see `conntrack`.
#[map]
pub static PM_CONNTRACK: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Flows not assured yet, an LRU: under pressure it sheds only these.
#[map]
pub static PM_CT_NEW: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_NEW_ENTRIES, 0);

/// Per-mapping packet/byte counters, indexed by `MappingValue::stats_slot`.
#[map]
pub static PM_MAPPING_STATS: PerCpuArray<MappingCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

/// Global outcome counters, indexed by `Stat` codes.
#[map]
pub static PM_GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_STATS_SLOTS, 0);

/// Devices the XDP program may redirect into (keyed by ifindex).
#[map]
pub static PM_REDIRECT_DEVS: DevMapHash = DevMapHash::with_max_entries(MAX_REDIRECT_DEVS, 0);

/// Addresses of the host (the daemon's network namespace), kept in sync by the daemon: wildcard
/// mappings match only these destinations.
#[map]
pub static PM_LOCAL_ADDRS: HashMap<LocalAddrKey, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Addresses behind a veth of this host (containers) and how to reach them without a FIB lookup;
/// kept in sync with the kernel's neighbour, FDB and route tables by the daemon.
#[map]
pub static PM_LOCAL_BACKENDS: HashMap<LocalAddrKey, LocalBackend> =
    HashMap::with_max_entries(MAX_LOCAL_BACKENDS, 0);

/// The veths of `PM_LOCAL_BACKENDS` (keyed by ifindex). A devmap: the kernel deletes the entry of
/// a device that is unregistered, so an entry of `PM_LOCAL_BACKENDS` whose veth went (a container
/// removed while no daemon runs) is not followed.
#[map]
pub static PM_LOCAL_DEVS: DevMapHash = DevMapHash::with_max_entries(MAX_LOCAL_BACKENDS, 0);

/// (protocol, port) published on some address: bind() to the wildcard address is refused.
#[map]
pub static PM_PUBLISHED_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_PUBLISHED_PORTS, 0);

/// Host-local sockets translated to a backend → the published address they addressed.
#[map]
pub static PM_SOCK_REVERSE: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVERSE_ENTRIES, 0);

/// Fragmented datagrams: the first fragment's ports for the fragments that follow.
#[map]
pub static PM_FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(MAX_FRAGMENTED_DATAGRAMS, 0);

/// The ICMP-error programs (`ICMP_SLOT_*`), reached by tail call; one array per program type.
#[map]
pub static PM_ICMP_XDP: ProgramArray = ProgramArray::with_max_entries(ICMP_SLOTS, 0);

#[map]
pub static PM_ICMP_TC: ProgramArray = ProgramArray::with_max_entries(ICMP_SLOTS, 0);

/// The stamp of the pinned state (one entry, written by the daemon when it creates the maps).
/// No program reads it: it tells the next daemon whether it can adopt these maps.
#[map]
pub static PM_META: Array<DatapathStamp> = Array::with_max_entries(1, 0);

/// Source allow-lists of mappings (`MappingValue::allow_list`): (list, prefix) → 1. Written by
/// the daemon only; read where a flow starts (`lb::allowed`). (aya adds `BPF_F_NO_PREALLOC`,
/// which an LPM trie requires.)
#[map]
pub static PM_ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);

/// New flows and host-local connects each mapping's allow-list refused, by stats slot.
#[map]
pub static PM_MAPPING_DENIED: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

/// The generation of the host's links, addresses, neighbours and routes (entry 0): bumped by the
/// daemon on each change it sees and each rewrite of `PM_LOCAL_BACKENDS`; a flow's cached route
/// (`FlowRoute::stamp`) is followed only while it has not moved.
#[map]
pub static PM_ROUTE_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// `bpf_fib_lookup`'s 64-byte parameter block, one per CPU: the ingress programs' stacks have no
/// room for it beside the packet, the flow key and the flow (6.1's verifier, 512 bytes). A
/// program runs to its end on its CPU, so the one block is never used by two at once.
#[map]
pub static PM_FIB_SCRATCH: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// 64 zero bytes in global data (`.bss`), which the compiler cannot take for constants: a copy
/// from them stays a `memcpy`, which the BPF backend expands inline. Zeroing a place any other
/// way (a zeroed literal, a copy from a zero constant) compiles to a call to `memset`, a byte
/// loop in a subprogram: 64 iterations for `bpf_fib_lookup`'s block on every FIB lookup, 24 for
/// a new flow's route, and a call frame on 6.1's verifier. Nothing writes them.
#[unsafe(no_mangle)]
static mut PM_ZEROS: [u64; 8] = [0; 8];

/// Zeroes `*dst` from `PM_ZEROS` (for plain-data types of at most 64 bytes, aligned to at most 8,
/// whose all-zero value is valid).
///
/// # Safety
/// `dst` is valid for a write of `T`, and an all-zero `T` is a valid value.
#[inline(always)]
pub unsafe fn zero<T>(dst: *mut T) {
    const { assert!(size_of::<T>() <= 64 && align_of::<T>() <= 8) };
    // SAFETY: `PM_ZEROS` is 64 bytes aligned to 8, never written; the caller's for `dst`.
    unsafe { core::ptr::copy_nonoverlapping((&raw const PM_ZEROS).cast::<T>(), dst, 1) }
}

/// An all-zero `T` read from `PM_ZEROS` (as `zero`, for a value built on the stack).
///
/// # Safety
/// An all-zero `T` is a valid value.
#[inline(always)]
pub unsafe fn zeroed<T>() -> T {
    const { assert!(size_of::<T>() <= 64 && align_of::<T>() <= 8) };
    // SAFETY: as in `zero`; the caller's for the value.
    unsafe { core::ptr::read((&raw const PM_ZEROS).cast::<T>()) }
}
