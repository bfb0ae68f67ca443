//! Forwarding after the rewrite. A backend behind a veth of this host (a container) is sent
//! straight into it from the addresses cached in `PM_LOCAL_BACKENDS` (Cilium's local-endpoint
//! delivery); any other backend, or a local one the cache cannot serve, gets a FIB lookup, then
//! TTL/hop-limit decrement, MAC rewrite and redirect when the egress device takes redirects;
//! otherwise the kernel's routing. Replies caught at a local backend's veth leave for the client
//! the same way (`reply_to_client`).

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
use portmap_common::{Addr, FAMILY_V6, LocalAddrKey, Stat};

use crate::{
    conntrack::Nat,
    ctx::{Action, PacketCtx, StoreError, Verdict},
    maps::PM_LOCAL_BACKENDS,
    nat::{self, IPV4_CHECK_OFF, Side},
    parse::Packet,
};

// SAFETY: an all-zero bpf_fib_lookup is a valid value (plain data and unions of integers).
static FIB_ZERO: FibParams = unsafe { core::mem::zeroed() };

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends a packet whose destination was just rewritten to `daddr` on its way: into the veth of a
/// local backend, or after a FIB lookup TTL/hop-limit decrement + MAC rewrite + redirect when the
/// egress device accepts redirects; otherwise it is handed to the kernel's routing (which
/// forwards it without netfilter rules being involved).
#[inline(always)]
pub fn forward<C: PacketCtx>(ctx: &mut C, pkt: &Packet, daddr: &Addr, dport: u16) -> Verdict {
    // Tagged frames belong to a VLAN device; an expiring TTL needs the kernel's ICMP Time Exceeded.
    if pkt.vlan || ctx.vlan_offloaded() || pkt.ttl <= 1 {
        return Verdict::pass(Stat::FwdStack);
    }
    if let Some(verdict) = to_local_backend(ctx, pkt, daddr) {
        return verdict;
    }
    let mut fib = fib_zero();
    let rc = fib_lookup(ctx, &mut fib, pkt, (&pkt.saddr, pkt.sport), (daddr, dport));
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return Verdict::drop(Stat::DropNoRoute);
        }
        // No neighbour entry yet, MTU exceeded, forwarding disabled, local destination, ...: the
        // kernel resolves, fragments or refuses it exactly as it would any routed packet.
        _ => return Verdict::pass(Stat::FwdStack),
    }
    // Redirect first: a device that refuses it leaves the packet as the kernel expects it.
    let Some(code) = ctx.redirect(fib.ifindex) else {
        return Verdict::pass(Stat::FwdStack);
    };
    if decrement_ttl(ctx, pkt).is_err() || set_macs(ctx, fib.dmac, fib.smac).is_err() {
        return Verdict::drop(Stat::DropError);
    }
    Verdict {
        stat: Stat::FwdRedirect,
        action: Action::Redirected(code),
    }
}

/// A reply at its backend's veth (TC ingress of the host side), its flow's published address and
/// port in `nat`: sent to the client as the kernel would route it from there, but past the
/// host's netfilter (Cilium's from-container path), whose masquerade rules would otherwise take
/// it for a new flow of the container subnet and rewrite its source. A FIB lookup from the
/// published address to the client first; then the reverse NAT, TTL, MACs and a redirect to the
/// device the route leaves by, or `bpf_redirect_neigh` when the next hop's neighbour is not
/// resolved (requests came in past the host's stack, which then never learnt the client's).
/// `None` leaves the packet untouched to the kernel (`pass_reply`): any other lookup result,
/// a VLAN, an expiring TTL.
#[inline(always)]
pub fn reply_to_client(ctx: &mut TcContext, pkt: &Packet, nat: &Nat) -> Option<Verdict> {
    if pkt.vlan || ctx.vlan_offloaded() || pkt.ttl <= 1 {
        return None;
    }
    let mut fib = fib_zero();
    let rc = fib_lookup(ctx, &mut fib, pkt, (&nat.addr, nat.port), (&pkt.daddr, pkt.dport));
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    if nat::rewrite(ctx, pkt, Side::Source, nat.addr, nat.port).is_err() || decrement_ttl(ctx, pkt).is_err() {
        return Some(Verdict::drop(Stat::DropError));
    }
    let code = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        if set_macs(ctx, fib.dmac, fib.smac).is_err() {
            return Some(Verdict::drop(Stat::DropError));
        }
        ctx.redirect(fib.ifindex)
    } else {
        redirect_neigh(&fib, pkt.family)
    };
    // Rewritten already: a refused redirect (the device went) is a drop, not a pass.
    Some(match code {
        Some(code) => Verdict {
            stat: Stat::ReplyRedirect,
            action: Action::Redirected(code),
        },
        None => Verdict::drop(Stat::DropError),
    })
}

/// `bpf_redirect_neigh` to the device and next hop a FIB lookup found (`fib.ifindex`, and the
/// gateway or the destination in `fib`'s destination): the kernel's neighbour layer resolves the
/// next hop, queues the packet meanwhile and fills in the MACs.
#[inline(always)]
fn redirect_neigh(fib: &FibParams, family: u8) -> Option<u32> {
    // SAFETY: an all-zero bpf_redir_neigh is a valid value (integers and a union of them).
    let mut nh: RedirNeigh = unsafe { core::mem::zeroed() };
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

#[inline(always)]
fn fib_zero() -> FibParams {
    // SAFETY: a read of a static (zero from read-only data, not a `memset` call: see
    // `lb::ZERO_ADDR`).
    unsafe { core::ptr::read_volatile(&raw const FIB_ZERO) }
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
/// into the veth. `None` (the FIB path) when the address is not cached, the packet exceeds the
/// cached MTU (the kernel fragments it or answers Frag Needed), or the hook cannot redirect to
/// the device (XDP: a veth not in `PM_REDIRECT_DEVS`; a cached device that has gone).
#[inline(always)]
fn to_local_backend<C: PacketCtx>(ctx: &mut C, pkt: &Packet, daddr: &Addr) -> Option<Verdict> {
    let key = LocalAddrKey::new(*daddr, pkt.family);
    // SAFETY: the element stays readable for the program's run (RCU); read in place, no copy:
    // the XDP program's stack is at the limit of 6.1's verifier.
    let local = unsafe { PM_LOCAL_BACKENDS.get(key) }?;
    if u32::from(mtu_len(ctx, pkt)) > local.mtu {
        return None;
    }
    let code = ctx.redirect_local(local.ifindex)?;
    if decrement_ttl(ctx, pkt).is_err() || set_macs(ctx, local.dmac, local.smac).is_err() {
        return Some(Verdict::drop(Stat::DropError));
    }
    Some(Verdict {
        stat: Stat::FwdLocal,
        action: Action::Redirected(code),
    })
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

#[inline(always)]
fn set_macs<C: PacketCtx>(ctx: &mut C, dmac: [u8; 6], smac: [u8; 6]) -> Result<(), StoreError> {
    ctx.store(offset_of!(EthHdr, dst_addr), dmac)?;
    ctx.store(offset_of!(EthHdr, src_addr), smac)
}
