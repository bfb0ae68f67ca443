//! Forwarding after the rewrite. A backend behind a veth of this host (a container) is sent
//! straight into it from the addresses cached in `PM_LOCAL_BACKENDS` (Cilium's local-endpoint
//! delivery); any other backend, or a local one the cache cannot serve, gets a FIB lookup, then
//! TTL/hop-limit decrement, MAC rewrite and redirect when the egress device takes redirects;
//! otherwise the kernel's routing. Replies caught at a local backend's veth leave for the client
//! the same way (`reply_to_client`).
//!
//! Either decision is cached in the flow's entry (`FlowRoute`): the flow's next packets go
//! straight to the device and MACs it holds, without the `PM_LOCAL_BACKENDS` or FIB lookup,
//! until the daemon's route generation (`PM_ROUTE_GEN`) or the clock's epoch moves on, or a
//! packet is larger than any the lookup accepted.
//!
//! Whichever of the three ways (cache, local backend, FIB) takes a packet leaves its device's
//! MACs in this CPU's `bpf_fib_lookup` block (`PM_FIB_SCRATCH`), and the TTL and MAC writes
//! follow once: inlined once per way, they tripled the work of the verifier, which walks each
//! copy for every path that reaches it.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_REDIRECT, bpf_fib_lookup as FibParams,
        bpf_redir_neigh as RedirNeigh,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use portmap_common::{
    Addr, FAMILY_V6, FlowRoute, LocalAddrKey, ROUTE_FIB, ROUTE_LOCAL, ROUTE_NONE, Stat, route_stamp,
};

use crate::{
    conntrack::Nat,
    ctx::{Action, PacketCtx, StoreError, Verdict},
    maps::{PM_FIB_SCRATCH, PM_LOCAL_BACKENDS, PM_ROUTE_GEN, zero, zeroed},
    nat::{self, IPV4_CHECK_OFF, Side},
    parse::Packet,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends a packet of a flow whose destination was just rewritten to `nat` on its way: the way its
/// flow's cached route says, else as `forward` does, caching what that finds.
#[inline(always)]
pub fn forward_flow<C: PacketCtx>(ctx: &mut C, pkt: &Packet, nat: &Nat, now: u64) -> Verdict {
    forward_via(ctx, pkt, (&nat.addr, nat.port), nat.route, now)
}

/// Sends a packet whose destination was just rewritten to `daddr` on its way: into the veth of a
/// local backend, or after a FIB lookup TTL/hop-limit decrement + MAC rewrite + redirect when the
/// egress device accepts redirects; otherwise it is handed to the kernel's routing (which
/// forwards it without netfilter rules being involved).
#[inline(always)]
pub fn forward<C: PacketCtx>(ctx: &mut C, pkt: &Packet, daddr: &Addr, dport: u16) -> Verdict {
    forward_via(ctx, pkt, (daddr, dport), core::ptr::null_mut(), 0)
}

/// `forward`, with the flow entry's route cache `route` (null: none) followed and filled.
///
/// Three ways to choose from (`choose_way`), one way out: the chosen way's device has taken the
/// redirect and its MACs are in this CPU's `PM_FIB_SCRATCH` block, whichever found them; the
/// TTL and MAC writes follow once (the verifier walks them once, not once per way).
#[inline(always)]
fn forward_via<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    dst: (&Addr, u16),
    route: *mut FlowRoute,
    now: u64,
) -> Verdict {
    // Tagged frames belong to a VLAN device; an expiring TTL needs the kernel's ICMP Time Exceeded.
    if pkt.vlan || ctx.vlan_offloaded() || pkt.ttl <= 1 {
        return Verdict::pass(Stat::FwdStack);
    }
    let Some(way) = scratch() else {
        return Verdict::pass(Stat::FwdStack);
    };
    let (stat, code) = match choose_way(ctx, pkt, dst, route, now, way) {
        Ok(chosen) => chosen,
        Err(verdict) => return verdict,
    };
    if decrement_ttl(ctx, pkt).is_err() || set_macs(ctx, way.dmac, way.smac).is_err() {
        return Verdict::drop(Stat::DropError);
    }
    Verdict {
        stat,
        action: Action::Redirected(code),
    }
}

/// The first way that takes the packet, in order: the flow's cached route, a local backend's
/// veth (`PM_LOCAL_BACKENDS`), the FIB. The chosen device has taken the redirect (its return
/// code is returned, with the stat of the way) and `way` holds its MACs; a lookup's way is
/// cached in the flow entry. `Err` when none does: the kernel's routing, or a drop for a route
/// that refuses the destination.
#[inline(always)]
fn choose_way<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    (daddr, dport): (&Addr, u16),
    route: *mut FlowRoute,
    now: u64,
    way: &mut FibParams,
) -> Result<(Stat, u32), Verdict> {
    let stamp = if route.is_null() { 0 } else { current_stamp(now) };
    if let Some(cached) = cached(ctx, pkt, route, stamp)
        // SAFETY: `cached` checked the pointer; read in place (RCU).
        && let Some(chosen) = unsafe { follow(ctx, &*cached, way) }
    {
        return Ok(chosen);
    }
    if let Some(code) = to_local_backend(ctx, pkt, daddr, route, stamp, way) {
        return Ok((Stat::FwdLocal, code));
    }
    clear(way);
    match fib_lookup(ctx, way, pkt, (&pkt.saddr, pkt.sport), (daddr, dport)) {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return Err(Verdict::drop(Stat::DropNoRoute));
        }
        // No neighbour entry yet, MTU exceeded, forwarding disabled, local destination, ...: the
        // kernel resolves, fragments or refuses it exactly as it would any routed packet.
        _ => return Err(Verdict::pass(Stat::FwdStack)),
    }
    // Redirect first: a device that refuses it leaves the packet as the kernel expects it.
    let Some(code) = ctx.redirect(way.ifindex) else {
        return Err(Verdict::pass(Stat::FwdStack));
    };
    remember(route, pkt, stamp, way, mtu_len(ctx, pkt));
    Ok((Stat::FwdRedirect, code))
}

/// The stamp a route cached now carries (`route_stamp`).
#[inline(always)]
fn current_stamp(now: u64) -> u32 {
    let generation = PM_ROUTE_GEN.get(0).copied().unwrap_or(0);
    route_stamp(generation, now)
}

/// The flow's cached route if it is current (`stamp`: `current_stamp`) and the packet fits it.
/// A TC GSO packet's length is 0 (`mtu_len`), so it always fits: its segments were checked
/// against the route's MTU by the lookup that filled the cache with one of the flow's packets,
/// a flow's segment size does not grow, and an MTU change is a link event (a new generation).
#[inline(always)]
fn cached<C: PacketCtx>(ctx: &C, pkt: &Packet, route: *mut FlowRoute, stamp: u32) -> Option<*mut FlowRoute> {
    if route.is_null() {
        return None;
    }
    // SAFETY: a field of a flow entry a lookup returned, valid for the program's run (RCU);
    // other CPUs store the same flow's route (a torn read at a route change lasts one packet).
    let (kind, cached_stamp, max_len, tos) =
        unsafe { ((*route).kind, (*route).stamp, (*route).max_len, (*route).tos) };
    let current = kind != ROUTE_NONE && cached_stamp == stamp && tos == route_tos(pkt);
    (current && mtu_len(ctx, pkt) <= max_len).then_some(route)
}

/// What of the packet's header a FIB lookup routes by besides its addresses (`fib_lookup`):
/// the IPv4 TOS, the IPv6 traffic class.
#[inline(always)]
fn route_tos(pkt: &Packet) -> u8 {
    if pkt.family == FAMILY_V6 {
        // The header's first two bytes: version, traffic class, the flow label's top bits.
        let b = pkt.flowinfo.to_ne_bytes();
        ((b[0] & 0x0f) << 4) | (b[1] >> 4)
    } else {
        pkt.tos
    }
}

/// A forward packet along its flow's cached route: its device takes the redirect and its MACs go
/// to `way`, for the way out. `None` when the redirect is refused (the device went): the packet
/// is untouched and takes the lookups.
#[inline(always)]
fn follow<C: PacketCtx>(ctx: &mut C, route: &FlowRoute, way: &mut FibParams) -> Option<(Stat, u32)> {
    let chosen = if route.kind == ROUTE_LOCAL {
        (Stat::FwdLocal, ctx.redirect_local(route.ifindex)?)
    } else {
        (Stat::FwdRedirect, ctx.redirect(route.ifindex)?)
    };
    copy_mac(&mut way.dmac, &route.dmac);
    copy_mac(&mut way.smac, &route.smac);
    Some(chosen)
}

/// Caches a successful FIB lookup's device and MACs in the flow's entry, for packets up to
/// `len` (or the largest one the lookup accepted under the same stamp).
#[inline(always)]
fn remember(route: *mut FlowRoute, pkt: &Packet, stamp: u32, fib: &FibParams, len: u16) {
    if route.is_null() {
        return;
    }
    // SAFETY: as in `cached`.
    unsafe {
        let max_len = if (*route).kind == ROUTE_FIB && (*route).stamp == stamp && (*route).max_len > len {
            (*route).max_len
        } else {
            len
        };
        store_route(
            route,
            pkt,
            ROUTE_FIB,
            fib.ifindex,
            (fib.dmac, fib.smac),
            max_len,
            stamp,
        );
    }
}

/// Writes the route of `pkt`'s lookups into its flow entry's cache, the stamp last.
///
/// # Safety
/// `route` points into a flow entry a lookup returned.
#[inline(always)]
unsafe fn store_route(
    route: *mut FlowRoute,
    pkt: &Packet,
    kind: u8,
    ifindex: u32,
    macs: ([u8; 6], [u8; 6]),
    max_len: u16,
    stamp: u32,
) {
    // SAFETY: the caller's.
    unsafe {
        (*route).kind = kind;
        (*route).ifindex = ifindex;
        (*route).dmac = macs.0;
        (*route).smac = macs.1;
        (*route).max_len = max_len;
        (*route).tos = route_tos(pkt);
        (*route).stamp = stamp;
    }
}

/// A reply at its backend's veth (TC ingress of the host side), its flow's published address and
/// port in `nat`: sent to the client as the kernel would route it from there, but past the
/// host's netfilter (Cilium's from-container path), whose masquerade rules would otherwise take
/// it for a new flow of the container subnet and rewrite its source. The flow's cached route, or
/// a FIB lookup from the published address to the client first; then the reverse NAT, TTL, MACs
/// and a redirect to the device the route leaves by, or `bpf_redirect_neigh` when the next hop's
/// neighbour is not resolved (requests came in past the host's stack, which then never learnt
/// the client's). `None` leaves the packet untouched to the kernel (`pass_reply`): any other
/// lookup result, a VLAN, an expiring TTL.
#[inline(always)]
pub fn reply_to_client(ctx: &mut TcContext, pkt: &Packet, nat: &Nat, now: u64) -> Option<Verdict> {
    if pkt.vlan || ctx.vlan_offloaded() || pkt.ttl <= 1 {
        return None;
    }
    let way = scratch()?;
    let stamp = current_stamp(now);
    // The cached way, or a lookup's (cached: TC's redirect cannot be refused): its device and
    // MACs in `way`; unresolved: the lookup found no neighbour entry for the next hop.
    let unresolved = if let Some(route) = cached(ctx, pkt, nat.route, stamp) {
        // SAFETY: `cached` checked the pointer; read in place (RCU).
        unsafe {
            way.ifindex = (*route).ifindex;
            copy_mac(&mut way.dmac, &(*route).dmac);
            copy_mac(&mut way.smac, &(*route).smac);
        }
        false
    } else {
        clear(way);
        match fib_lookup(ctx, way, pkt, (&nat.addr, nat.port), (&pkt.daddr, pkt.dport)) {
            BPF_FIB_LKUP_RET_SUCCESS => {
                remember(nat.route, pkt, stamp, way, mtu_len(ctx, pkt));
                false
            }
            BPF_FIB_LKUP_RET_NO_NEIGH => true,
            _ => return None,
        }
    };
    if translate_reply(ctx, pkt, nat).is_err() {
        return Some(Verdict::drop(Stat::DropError));
    }
    if unresolved {
        return Some(reply_sent(redirect_neigh(way, pkt.family)));
    }
    if set_macs(ctx, way.dmac, way.smac).is_err() {
        return Some(Verdict::drop(Stat::DropError));
    }
    Some(reply_sent(ctx.redirect(way.ifindex)))
}

/// The reply's reverse NAT (source back to the published address) and TTL.
#[inline(always)]
fn translate_reply(ctx: &mut TcContext, pkt: &Packet, nat: &Nat) -> Result<(), StoreError> {
    nat::rewrite(ctx, pkt, Side::Source, nat.addr, nat.port)?;
    decrement_ttl(ctx, pkt)
}

/// A translated reply's verdict: rewritten already, so a refused redirect (the device went) is
/// a drop, not a pass.
#[inline(always)]
fn reply_sent(code: Option<u32>) -> Verdict {
    match code {
        Some(code) => Verdict {
            stat: Stat::ReplyRedirect,
            action: Action::Redirected(code),
        },
        None => Verdict::drop(Stat::DropError),
    }
}

/// `bpf_redirect_neigh` to the device and next hop a FIB lookup found (`fib.ifindex`, and the
/// gateway or the destination in `fib`'s destination): the kernel's neighbour layer resolves the
/// next hop, queues the packet meanwhile and fills in the MACs.
#[inline(always)]
fn redirect_neigh(fib: &FibParams, family: u8) -> Option<u32> {
    // SAFETY: an all-zero bpf_redir_neigh is a valid value (integers and a union of them).
    let mut nh: RedirNeigh = unsafe { zeroed() };
    // SAFETY: the union member read is the one the lookup's family wrote.
    unsafe {
        if family == FAMILY_V6 {
            nh.nh_family = u32::from(AF_INET6);
            nh.__bindgen_anon_1.ipv6_nh = fib.__bindgen_anon_4.ipv6_dst;
        } else {
            nh.nh_family = u32::from(AF_INET);
            nh.__bindgen_anon_1.ipv4_nh = fib.__bindgen_anon_4.ipv4_dst;
        }
    }
    // SAFETY: `nh` is a parameter block of the size passed; the skb is the program's own.
    let code =
        unsafe { bpf_redirect_neigh(fib.ifindex, &raw mut nh, size_of::<RedirNeigh>() as i32, 0) } as u32;
    (code == TC_ACT_REDIRECT as u32).then_some(code)
}

/// This CPU's `bpf_fib_lookup` parameter block (`PM_FIB_SCRATCH`), as the last use left it: the
/// way out of a packet (device, MACs), whichever way found it; `clear` before a lookup.
#[inline(always)]
fn scratch() -> Option<&'static mut FibParams> {
    let fib = PM_FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the element is this CPU's and only this program run uses it (see the map).
    Some(unsafe { &mut *fib })
}

/// Zeroes a parameter block for a lookup (`maps::zero`: not a `memset` call).
#[inline(always)]
fn clear(fib: &mut FibParams) {
    // SAFETY: a valid `FibParams`; all zeros is one (plain data and unions of integers).
    unsafe { zero(fib) };
}

/// `bpf_fib_lookup` for a packet of `pkt`'s flow from `src` to `dst` (address, port), entering at the
/// hook's interface; the TOS / flow info as xdp-forward passes them, so that policy routing by
/// them applies. Returns the helper's `BPF_FIB_LKUP_RET_*`.
#[inline(always)]
fn fib_lookup<C: PacketCtx>(
    ctx: &C,
    fib: &mut FibParams,
    pkt: &Packet,
    (saddr, sport): (&Addr, u16),
    (daddr, dport): (&Addr, u16),
) -> u32 {
    fib.l4_protocol = pkt.proto;
    fib.sport = sport;
    fib.dport = dport;
    fib.__bindgen_anon_1.tot_len = mtu_len(ctx, pkt);
    fib.ifindex = ctx.hook_ifindex();
    if pkt.family == FAMILY_V6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_2.flowinfo = pkt.flowinfo;
        fib.__bindgen_anon_3.ipv6_src = *saddr;
        fib.__bindgen_anon_4.ipv6_dst = *daddr;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = pkt.tos;
        fib.__bindgen_anon_3.ipv4_src = saddr[0];
        fib.__bindgen_anon_4.ipv4_dst = daddr[0];
    }
    // SAFETY: the context is the program's own and `fib` a parameter block of the size passed.
    unsafe { bpf_fib_lookup(ctx.raw(), fib, size_of::<FibParams>() as i32, 0) as u32 }
}

/// A backend behind a veth of this host: routed as the kernel would (TTL, the host's MAC as
/// source, the backend's as destination), but with the addresses the daemon cached and straight
/// into the veth: its redirect's return code, its MACs in `way`, the flow's route cached.
/// `None` (the FIB path) when the address is not cached, the packet exceeds the cached MTU (the
/// kernel fragments it or answers Frag Needed), or the hook cannot redirect to the device (XDP:
/// a veth not in `PM_REDIRECT_DEVS`; a cached device that has gone).
#[inline(always)]
fn to_local_backend<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    daddr: &Addr,
    route: *mut FlowRoute,
    stamp: u32,
    way: &mut FibParams,
) -> Option<u32> {
    let key = LocalAddrKey::new(*daddr, pkt.family);
    // SAFETY: the element stays readable for the program's run (RCU); read in place, no copy:
    // the XDP program's stack is at the limit of 6.1's verifier.
    let local = unsafe { PM_LOCAL_BACKENDS.get(key) }?;
    if u32::from(mtu_len(ctx, pkt)) > local.mtu {
        return None;
    }
    let code = ctx.redirect_local(local.ifindex)?;
    copy_mac(&mut way.dmac, &local.dmac);
    copy_mac(&mut way.smac, &local.smac);
    if !route.is_null() {
        let max_len = if local.mtu > 0xffff {
            0xffff
        } else {
            local.mtu as u16
        };
        // SAFETY: `route` points into the flow's entry (`Nat::route`).
        unsafe {
            store_route(
                route,
                pkt,
                ROUTE_LOCAL,
                local.ifindex,
                (local.dmac, local.smac),
                max_len,
                stamp,
            )
        };
    }
    Some(code)
}

/// The length a route's MTU is checked against: the IP packet's (0 for a GSO skb, whose
/// segments are checked instead). Computed where it is used: kept live across the lookups it
/// would cost stack the XDP program does not have on 6.1's verifier.
#[inline(always)]
fn mtu_len<C: PacketCtx>(ctx: &C, pkt: &Packet) -> u16 {
    let tot_len = if pkt.tot_len > 0xffff {
        0xffff
    } else {
        pkt.tot_len as u16
    };
    ctx.fib_tot_len(tot_len)
}

/// ip_decrease_ttl(): the TTL shares a 16-bit checksum word with the protocol byte. IPv6's
/// hop limit (byte 7) has no checksum.
#[inline(always)]
fn decrement_ttl<C: PacketCtx>(ctx: &mut C, pkt: &Packet) -> Result<(), StoreError> {
    if pkt.family == FAMILY_V6 {
        return ctx.store(pkt.l3_off + offset_of!(Ipv6Hdr, hop_limit), pkt.ttl - 1);
    }
    const _: () = assert!(offset_of!(Ipv4Hdr, proto) == offset_of!(Ipv4Hdr, ttl) + 1);
    let old = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
    let new = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    ctx.l3_csum_replace(pkt.l3_off + IPV4_CHECK_OFF, u32::from(old), u32::from(new), 2)?;
    ctx.store(pkt.l3_off + offset_of!(Ipv4Hdr, ttl), new)
}

/// Copies a MAC between two places the compiler cannot tell apart (a flow entry's route, a map
/// element, the per-CPU scratch). A plain assignment between them compiles to `memmove`, which
/// the BPF backend does not expand: a call into a byte loop per MAC, ~13 ns of an established
/// packet in `perf` (`bpf_prog_…_memmove`). A non-overlapping copy is expanded inline.
#[inline(always)]
fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    // SAFETY: a `&mut` and a `&` never overlap; both are 6 bytes.
    unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), 6) }
}

#[inline(always)]
fn set_macs<C: PacketCtx>(ctx: &mut C, dmac: [u8; 6], smac: [u8; 6]) -> Result<(), StoreError> {
    ctx.store(offset_of!(EthHdr, dst_addr), dmac)?;
    ctx.store(offset_of!(EthHdr, src_addr), smac)
}
