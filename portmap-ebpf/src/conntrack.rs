//! Flow table: find, create (forward + reply entries together), refresh and assure flows.
//!
//! Two maps, as netfilter tells assured connections from the rest, used as a cache and its
//! backing store. `PM_CT_NEW`, an LRU, holds every active flow: a new flow's two entries, and a
//! copy of each assured flow's (marked `FLOW_F_ASSURED`), so that a packet of any active flow
//! costs one lookup (a miss in a second table costs a cold bucket per packet: 200 ns at 10,000
//! flows, docs/bench/notes.md). `PM_CONNTRACK`, a hash that never evicts, keeps the assured
//! flows: the backend answered (the reply entry is marked `FLOW_F_REPLIED`) and the client then
//! sent a packet that is not a SYN (for TCP, the handshake's ACK). A flood of spoofed SYNs (or of
//! any new flows) therefore only ever sheds unassured flows and cached copies; an assured flow
//! whose copy was shed is found in `PM_CONNTRACK` and cached again by its next packet. When
//! `PM_CONNTRACK` is full an assured flow stays unassured (`ct_assured_full`).
//!
//! The copy in `PM_CONNTRACK` follows its cache where that matters to expiry: a refresh of
//! `last_seen_ns` (at most once per `LAST_SEEN_GRANULARITY_NS`) and a new mark are written to
//! both, so the store is never staler than that when the LRU sheds the cache.
//!
//! Expiry is the daemon's job (it walks both maps, pairs the two entries of a flow and deletes
//! both once idle past the protocol's timeout, the handshake timeout for unassured TCP, or the
//! close grace after FIN/RST). The datapath refreshes `last_seen_ns` (at most once per
//! `LAST_SEEN_GRANULARITY_NS`) and marks closing and replied flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use portmap_common::{
    Addr, DIR_FORWARD, DIR_REPLY, FLOW_F_ASSURED, FLOW_F_CLOSING, FLOW_F_REPLIED, FlowKey, FlowRoute,
    FlowValue, LAST_SEEN_GRANULARITY_NS, PROTO_TCP, ROUTE_NONE, Stat, TCP_ACK, TCP_SYN, close_marks,
    flow_ended,
};

use crate::{
    maps::{PM_CONNTRACK, PM_CT_NEW, zeroed},
    parse::Packet,
    stats::count,
};

/// The address and port a flow's packets are rewritten to, and the mapping's stats slot.
#[derive(Clone, Copy)]
pub struct Nat {
    pub addr: Addr,
    pub port: u16,
    pub stats_slot: u32,
    /// The flow is assured: it has a copy in `PM_CONNTRACK`.
    pub assured: bool,
    /// The entry found carried `FLOW_F_REPLIED`: for a forward entry, the backend has answered.
    pub replied: bool,
    /// The entry's cached route, in place (null for a flow created by this packet).
    pub route: *mut FlowRoute,
}

/// The flow tables' clock: the last `bpf_ktime_get_coarse_ns` read and the jiffies it was read
/// at (global data, shared by every CPU and program of this load; a new load starts from zero,
/// which reads the clock on its first packet).
#[repr(C)]
struct Clock {
    jiffies: u64,
    ns: u64,
}

#[unsafe(no_mangle)]
static mut PM_CLOCK: Clock = Clock { jiffies: 0, ns: 0 };

/// How many ticks a clock read serves (8 ms at HZ=1000, 80 ms at HZ=100).
const CLOCK_TICKS: u64 = 8;

/// CLOCK_MONOTONIC, at most `CLOCK_TICKS` + 1 ticks old: a flow's timestamps only need the
/// resolution of its timeouts (seconds). The coarse clock (kernel >= 5.11, the tick's time
/// instead of a clocksource read, in a VM a paravirtual one) is still a helper call: ~35 ns of
/// an established packet in `test_run` on the benchmark's machine. `bpf_jiffies64`, which the
/// verifier inlines to a load, tells when to call it again, so a packet usually takes the time
/// kept in `PM_CLOCK`. Racing CPUs store times one tick apart.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments; plain volatile accesses to this object's global data
    // (torn pairs across CPUs are one tick apart, which a flow's timestamps do not notice).
    unsafe {
        let jiffies = bpf_jiffies64();
        let clock = &raw mut PM_CLOCK;
        if jiffies.wrapping_sub(core::ptr::read_volatile(&raw const (*clock).jiffies)) < CLOCK_TICKS {
            return core::ptr::read_volatile(&raw const (*clock).ns);
        }
        let ns = bpf_ktime_get_coarse_ns();
        core::ptr::write_volatile(&raw mut (*clock).ns, ns);
        core::ptr::write_volatile(&raw mut (*clock).jiffies, jiffies);
        ns
    }
}

#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.saddr,
        dst: pkt.daddr,
        src_port_be: pkt.sport,
        dst_port_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn entry(key: &FlowKey, assured: bool) -> Option<*mut FlowValue> {
    if assured {
        PM_CONNTRACK.get_ptr_mut(key)
    } else {
        PM_CT_NEW.get_ptr_mut(key)
    }
}

#[inline(always)]
fn remove(key: &FlowKey, assured: bool) {
    let _ = if assured {
        PM_CONNTRACK.remove(key)
    } else {
        PM_CT_NEW.remove(key)
    };
}

/// Removes `key`'s entry from both tables: the store first, so that a packet in between finds at
/// most a cache that no longer has a store to follow (never a store it would cache again).
#[inline(always)]
fn forget(key: &FlowKey) {
    remove(key, true);
    remove(key, false);
}

/// Refreshes an entry for a packet seen now: last-seen time (rate-limited), the closing mark,
/// and on the reply entry of an unassured flow the replied mark. Returns whether it wrote.
#[inline(always)]
fn touch(entry: *mut FlowValue, tcp_flags: u8, now: u64, mark: u8) -> bool {
    // SAFETY: `entry` comes from a successful map lookup; concurrent writers only store the same
    // kind of values (a racy last_seen or flag is harmless).
    unsafe {
        let mut wrote = false;
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
            wrote = true;
        }
        let flags = (*entry).flags | mark | close_marks(tcp_flags);
        if flags != (*entry).flags {
            (*entry).flags = flags;
            wrote = true;
        }
        wrote
    }
}

/// An assured flow's cached entry (`PM_CT_NEW`) for `key` was refreshed or marked: its copy in
/// `PM_CONNTRACK` takes the same time and marks.
#[inline(always)]
fn follow_cache(key: &FlowKey, cached: *mut FlowValue) {
    if let Some(stored) = PM_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: pointers from successful lookups; racy stores as in `touch`.
        unsafe {
            (*stored).last_seen_ns = (*cached).last_seen_ns;
            (*stored).flags = (*cached).flags;
        }
    }
}

/// A TCP SYN without ACK.
#[inline(always)]
fn is_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Looks up the entry for `key` in direction `dir` (the cache first) and refreshes it. A TCP SYN
/// (without ACK) on a closing flow is a new connection reusing the 5-tuple, and the caller
/// creates a fresh flow: the old flow's copies in the store are removed, its cached entries left
/// for `create` to reopen in place (or, for another backend, to replace the forward one; the
/// reply one then goes as a lone entry after the close grace). Found in the store only, the old
/// flow's entries are removed.
#[inline(always)]
pub fn lookup(key: &FlowKey, dir: u8, tcp_flags: u8, now: u64) -> Option<Nat> {
    let (entry, stored) = locate(key, dir)?;
    // SAFETY: pointer from a successful lookup, valid for the program's run (RCU).
    let flags = unsafe { (*entry).flags };
    if dir == DIR_FORWARD && is_syn(tcp_flags) && flags & FLOW_F_CLOSING != 0 {
        // SAFETY: as above.
        let (addr, port) = unsafe { ((*entry).nat_addr, (*entry).nat_port_be) };
        let reply_key = key.reply(addr, port);
        if stored {
            forget(&reply_key);
            forget(key);
        } else if flags & FLOW_F_ASSURED != 0 {
            remove(&reply_key, true);
            remove(key, true);
        }
        return None;
    }
    let nat = nat_of(entry, stored);
    let mark = if !nat.assured && dir == DIR_REPLY {
        FLOW_F_REPLIED
    } else {
        0
    };
    if touch(entry, tcp_flags, now, mark) && nat.assured && !stored {
        follow_cache(key, entry);
    }
    if mark != 0 && !nat.replied {
        mark_forward_replied(key, &nat);
    }
    Some(nat)
}

/// The first answer of an unassured flow (`reply_key`, rewritten to `nat`): its forward entry is
/// marked too, so that the client's packets learn it from their own entry (`Nat::replied`) and
/// `assure` looks at the reply entry only then, not on every packet of a flow never answered.
#[inline(always)]
fn mark_forward_replied(reply_key: &FlowKey, nat: &Nat) {
    mark_replied(&reply_key.forward(nat.addr, nat.port));
}

#[inline(always)]
fn mark_replied(forward: &FlowKey) {
    if let Some(entry) = PM_CT_NEW.get_ptr_mut(forward) {
        // SAFETY: pointer from a successful lookup; a racy flag store is harmless (as `touch`).
        unsafe { (*entry).flags |= FLOW_F_REPLIED };
    }
}

/// The entry for `key` (the cache `PM_CT_NEW` first, then the store `PM_CONNTRACK`) if it is
/// one of direction `dir`: its pointer and whether it is the store's. An entry found in the
/// store only is cached again. Entries are read in place, never copied whole: a copy would cost
/// the ingress programs stack they do not have.
#[inline(always)]
fn locate(key: &FlowKey, dir: u8) -> Option<(*mut FlowValue, bool)> {
    if let Some(entry) = PM_CT_NEW.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid for the program's run (RCU).
        return (unsafe { (*entry).direction } == dir).then_some((entry, false));
    }
    let entry = PM_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: as above.
    if unsafe { (*entry).direction } != dir {
        return None;
    }
    recache(key, entry);
    Some((entry, true))
}

/// An assured flow's entry found in the store only (the LRU shed its copy, or a daemon before
/// the cache assured it): marked, and copied into `PM_CT_NEW` for the packets that follow (this
/// one goes on with the store's entry). The copy is inserted from where the entry is, not from
/// the stack.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the insert would copy the 56-byte entry to the stack, which the ingress programs lack on 6.1"
)]
fn recache(key: &FlowKey, stored: *mut FlowValue) {
    // SAFETY: pointer from a successful lookup, valid for the program's run (RCU); a racy flag
    // store is harmless (as `touch`).
    unsafe {
        if (*stored).flags & FLOW_F_ASSURED == 0 {
            (*stored).flags |= FLOW_F_ASSURED;
        }
        let _ = PM_CT_NEW.insert(key, &*stored, u64::from(BPF_NOEXIST));
    }
}

/// What a packet of the flow of `entry` (a lookup's, read in place; `stored`: found in
/// `PM_CONNTRACK`) is rewritten with.
#[inline(always)]
fn nat_of(entry: *mut FlowValue, stored: bool) -> Nat {
    // SAFETY: pointer from a successful lookup, valid for the program's run (RCU).
    unsafe {
        let flags = (*entry).flags;
        Nat {
            addr: (*entry).nat_addr,
            port: (*entry).nat_port_be,
            stats_slot: (*entry).stats_slot,
            assured: stored || flags & FLOW_F_ASSURED != 0,
            replied: flags & FLOW_F_REPLIED != 0,
            route: &raw mut (*entry).route,
        }
    }
}

/// A flow's reply entry found but not refreshed yet: a reply that may still be left to the
/// kernel (and be counted where it leaves) must not mark its flow replied (a flood of spoofed
/// SYNs whose answers lead nowhere would otherwise get assured).
pub struct Reply {
    entry: *mut FlowValue,
    /// `entry` is the store's (`PM_CONNTRACK`).
    stored: bool,
    pub nat: Nat,
}

/// The reply entry for `key`, not refreshed until `Reply::seen`.
#[inline(always)]
pub fn find_reply(key: &FlowKey) -> Option<Reply> {
    locate(key, DIR_REPLY).map(|(entry, stored)| Reply {
        entry,
        stored,
        nat: nat_of(entry, stored),
    })
}

impl Reply {
    /// The reply goes on to the client: refresh the entry as `lookup` does.
    #[inline(always)]
    pub fn seen(&self, pkt: &Packet, now: u64) {
        let mark = if self.nat.assured { 0 } else { FLOW_F_REPLIED };
        if touch(self.entry, pkt.tcp_flags, now, mark) && self.nat.assured && !self.stored {
            // The reply key again from the packet (backend → client), not kept across the FIB
            // lookup: the reply hook's stack has no room for it.
            follow_cache(&flow_key(pkt), self.entry);
        }
        if mark != 0 && !self.nat.replied {
            // The forward key straight from the packet (backend → client), not from a reply key
            // kept across the FIB lookup: the reply hook's stack has no room for both.
            let forward = FlowKey {
                src: pkt.daddr,
                dst: self.nat.addr,
                src_port_be: pkt.dport,
                dst_port_be: self.nat.port,
                proto: pkt.proto,
                family: pkt.family,
                _pad: [0; 2],
            };
            mark_replied(&forward);
        }
    }
}

/// The flow entry for `key` in direction `dir`, read only (no refresh, no marks).
#[inline(always)]
pub fn find(key: &FlowKey, dir: u8) -> Option<Nat> {
    locate(key, dir).map(|(entry, stored)| nat_of(entry, stored))
}

/// After a forward packet of an unassured flow: if the backend has answered (the forward entry's
/// mark, then the reply entry's) and this packet completes the exchange (anything but a TCP
/// SYN), marks both entries assured and copies them into `PM_CONNTRACK`; they stay in
/// `PM_CT_NEW` as the store's cache.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, each insert would copy the 56-byte entry to the stack, which the ingress programs lack on 6.1"
)]
pub fn assure(key: &FlowKey, nat: &Nat, tcp_flags: u8) {
    if nat.assured || !nat.replied || (key.proto == PROTO_TCP && tcp_flags & TCP_SYN != 0) {
        return;
    }
    let reply_key = key.reply(nat.addr, nat.port);
    let Some(reply) = PM_CT_NEW.get_ptr_mut(reply_key) else {
        return;
    };
    // SAFETY: both entries stay valid for the program's run (RCU); they are inserted into
    // `PM_CONNTRACK` from where they are, not copied to the stack. A racy flag store is harmless
    // (as `touch`): until the copies are in, the mark only spares the flow another try.
    unsafe {
        if (*reply).flags & FLOW_F_REPLIED == 0 {
            return;
        }
        let Some(forward) = PM_CT_NEW.get_ptr_mut(key) else {
            return;
        };
        (*reply).flags |= FLOW_F_ASSURED;
        (*forward).flags |= FLOW_F_ASSURED;
        if PM_CONNTRACK
            .insert(reply_key, &*reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            if PM_CONNTRACK
                .insert(key, &*forward, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                count(Stat::FlowAssured);
                return;
            }
            let _ = PM_CONNTRACK.remove(reply_key);
        }
        (*reply).flags &= !FLOW_F_ASSURED;
        (*forward).flags &= !FLOW_F_ASSURED;
    }
    count(Stat::CtAssuredFull);
}

/// What the reply key `reply_key` of a new flow from `pkt` (key `key`) to the published address
/// is to it (the store's entry, else the cache's): `Err(drop_nat_clash)` if another flow holds
/// it. Two flows are not a clash:
/// - an earlier incarnation of this very flow (same client port, same published address): a
///   SYN's closing flow with both entries cached is reopened in place for it (`reopen`,
///   `Ok(Some)`); otherwise the old entries leave both tables (`Ok(None)`);
/// - for a TCP SYN, a flow to another published address or port of the same backend port that
///   is over at both ends (`flow_ended`: a RST either way, or a FIN each way): the client's
///   kernel may reuse a local port towards another destination once its connection closed, and
///   after the rewrite the backend sees this SYN exactly as one reusing the old 5-tuple, which
///   `lookup` also lets through. Its entries leave both tables. A flow closed one way only may
///   still carry data the other way, so it keeps its reply key.
#[inline(always)]
fn claim(
    reply_key: &FlowKey,
    pkt: &Packet,
    key: &FlowKey,
    stats_slot: u32,
    now: u64,
) -> Result<Option<Nat>, Stat> {
    let (old, stored) = match entry(reply_key, true) {
        Some(old) => (old, true),
        None => match entry(reply_key, false) {
            Some(old) => (old, false),
            None => return Ok(None),
        },
    };
    // SAFETY: pointer from a successful lookup, read in place.
    let (direction, addr, port, flags) = unsafe {
        (
            (*old).direction,
            (*old).nat_addr,
            (*old).nat_port_be,
            (*old).flags,
        )
    };
    if direction != DIR_REPLY {
        return Err(Stat::DropNatClash);
    }
    let same_flow = addr == pkt.daddr && port == pkt.dport;
    if same_flow
        && !stored
        && is_syn(pkt.tcp_flags)
        && let Some(nat) = reopen(pkt, key, old, stats_slot, now)
    {
        return Ok(Some(nat));
    }
    let old_forward = reply_key.forward(addr, port);
    if !same_flow
        && (pkt.proto != PROTO_TCP
            || !is_syn(pkt.tcp_flags)
            || !flow_ended(forward_flags(&old_forward), flags))
    {
        return Err(Stat::DropNatClash);
    }
    forget(&old_forward);
    forget(reply_key);
    Ok(None)
}

/// A SYN's new flow in the place of its closing flow (`lookup` found it and removed the
/// store's copies), whose reply entry is `reply` in the cache: when the forward entry is cached
/// too, both are reset in place to a new flow's (no marks but the SYN's, a fresh time,
/// `stats_slot`; the cached routes are kept, checked by stamp as any) instead of two deletes
/// and two inserts in the LRU.
#[inline(always)]
fn reopen(pkt: &Packet, key: &FlowKey, reply: *mut FlowValue, stats_slot: u32, now: u64) -> Option<Nat> {
    let forward = PM_CT_NEW.get_ptr_mut(key)?;
    // SAFETY: pointers from successful lookups, valid for the program's run (RCU); racy stores
    // as in `touch`.
    unsafe {
        if (*forward).direction != DIR_FORWARD || (*forward).flags & FLOW_F_CLOSING == 0 {
            return None;
        }
        (*reply).last_seen_ns = now;
        (*reply).flags = 0;
        (*reply).stats_slot = stats_slot;
        (*forward).last_seen_ns = now;
        (*forward).flags = close_marks(pkt.tcp_flags);
        (*forward).stats_slot = stats_slot;
        Some(Nat {
            addr: (*forward).nat_addr,
            port: (*forward).nat_port_be,
            stats_slot,
            assured: false,
            replied: false,
            route: &raw mut (*forward).route,
        })
    }
}

/// The flags of the forward entry for `key` (the cache's, else the store's; 0 if there is none).
#[inline(always)]
fn forward_flags(key: &FlowKey) -> u8 {
    match entry(key, false).or_else(|| entry(key, true)) {
        // SAFETY: pointer from a successful lookup, read in place.
        Some(entry) if unsafe { (*entry).direction } == DIR_FORWARD => unsafe { (*entry).flags },
        _ => 0,
    }
}

/// A new entry's route: nothing cached (its packets after the first fill it in, `forward`), all
/// zeros read from global data (`maps::zeroed`: a zero literal would be a `memset` call).
#[inline(always)]
fn no_route() -> FlowRoute {
    const { assert!(ROUTE_NONE == 0) };
    // SAFETY: `FlowRoute` is plain integers; all zeros is `ROUTE_NONE`, nothing cached.
    unsafe { zeroed() }
}

/// Records a new flow to `backend` through `mapping` in `PM_CT_NEW`: the reply entry first (it
/// may clash with another flow), then the forward entry; if the forward insert fails the reply
/// entry is removed again, so the two are only ever present together. A SYN's closing flow
/// with the same 5-tuple and backend is reopened in place instead (`claim`).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, each insert would copy the 56-byte entry to the stack, which the ingress programs lack on 6.1"
)]
pub fn create(
    pkt: &Packet,
    key: &FlowKey,
    backend: (Addr, u16),
    stats_slot: u32,
    now: u64,
) -> Result<Nat, Stat> {
    let (backend_addr, backend_port) = backend;
    let reply_key = key.reply(backend_addr, backend_port);
    if let Some(reopened) = claim(&reply_key, pkt, key, stats_slot, now)? {
        return Ok(reopened);
    }
    let closing = close_marks(pkt.tcp_flags);
    // One value on the stack for both entries (the ingress programs have no room for two).
    let mut value = FlowValue {
        last_seen_ns: now,
        nat_addr: pkt.daddr,
        nat_port_be: pkt.dport,
        direction: DIR_REPLY,
        flags: 0,
        stats_slot,
        route: no_route(),
    };
    if PM_CT_NEW.insert(reply_key, &value, u64::from(BPF_ANY)).is_err() {
        return Err(Stat::DropCtFull);
    }
    value.nat_addr = backend_addr;
    value.nat_port_be = backend_port;
    value.direction = DIR_FORWARD;
    value.flags = closing;
    if PM_CT_NEW.insert(key, &value, u64::from(BPF_ANY)).is_err() {
        let _ = PM_CT_NEW.remove(reply_key);
        return Err(Stat::DropCtFull);
    }
    Ok(Nat {
        addr: backend_addr,
        port: backend_port,
        stats_slot,
        assured: false,
        replied: false,
        route: core::ptr::null_mut(),
    })
}
