//! Address/port rewrite with incremental checksums, and the forwarding decision.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
    },
    helpers::generated::bpf_fib_lookup,
};
use portmap_common::{Addr, FAMILY_V6, PROTO_UDP, stat};

use crate::{
    Verdict,
    ctx::{Action, L4Csum, PacketCtx, StoreError},
    parse::Packet,
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// Forward path (DNAT): destination address and port.
    Destination,
    /// Reply path (reverse NAT): source address and port.
    Source,
}

/// Rewrites one side's address and port, updating the IPv4 header checksum and the TCP/UDP
/// checksum (pseudo-header for the address, segment for the port) by RFC 1624 differences.
/// IPv6 has no header checksum; SCTP's CRC32c covers no address, and its port never changes
/// (the daemon only accepts SCTP mappings that keep it).
#[inline(always)]
pub fn rewrite<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    side: Side,
    addr: Addr,
    port: u16,
) -> Result<(), StoreError> {
    let v6 = pkt.family == FAMILY_V6;
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Destination => (
            pkt.l3_off + if v6 { 24 } else { 16 },
            pkt.l4_off + 2,
            pkt.daddr,
            pkt.dport,
        ),
        Side::Source => (
            pkt.l3_off + if v6 { 8 } else { 12 },
            pkt.l4_off,
            pkt.saddr,
            pkt.sport,
        ),
    };
    let udp = pkt.proto == PROTO_UDP;
    let check_off = pkt.l4_check_off();
    let words = if v6 { 4 } else { 1 };
    for i in 0..4 {
        if i >= words || old_addr[i] == addr[i] {
            continue;
        }
        if let Some(off) = check_off {
            ctx.l4_csum_replace(off, old_addr[i], addr[i], 4, L4Csum { pseudo: true, udp })?;
        }
        if !v6 {
            ctx.l3_csum_replace(pkt.l3_off + 10, old_addr[i], addr[i], 4)?;
        }
        ctx.store(addr_off + 4 * i, addr[i])?;
    }
    if old_port != port
        && let Some(off) = check_off
    {
        ctx.l4_csum_replace(
            off,
            u32::from(old_port),
            u32::from(port),
            2,
            L4Csum { pseudo: false, udp },
        )?;
        ctx.store(port_off, port)?;
    }
    Ok(())
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends a packet whose destination was just rewritten to `daddr` on its way: a FIB lookup, then
/// TTL/hop-limit decrement + MAC rewrite + redirect when the egress device accepts redirects;
/// otherwise it is handed to the kernel's routing (which forwards it without netfilter rules
/// being involved).
#[inline(always)]
pub fn forward<C: PacketCtx>(ctx: &mut C, pkt: &Packet, daddr: &Addr, dport: u16) -> Verdict {
    // Tagged frames belong to a VLAN device; an expiring TTL needs the kernel's ICMP Time Exceeded.
    if pkt.vlan || ctx.vlan_offloaded() || pkt.ttl <= 1 {
        return Verdict::pass(stat::FWD_STACK);
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (plain data and unions of integers).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.l4_protocol = pkt.proto;
    fib.sport = pkt.sport;
    fib.dport = dport;
    let tot_len = if pkt.tot_len > 0xffff {
        0xffff
    } else {
        pkt.tot_len as u16
    };
    fib.__bindgen_anon_1.tot_len = ctx.fib_tot_len(tot_len);
    fib.ifindex = ctx.hook_ifindex();
    if pkt.family == FAMILY_V6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = pkt.saddr;
        fib.__bindgen_anon_4.ipv6_dst = *daddr;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = pkt.saddr[0];
        fib.__bindgen_anon_4.ipv4_dst = daddr[0];
    }
    // SAFETY: helper call with a valid context and parameter block.
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), &raw mut fib, size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return Verdict::drop(stat::DROP_NO_ROUTE);
        }
        // No neighbour entry yet, MTU exceeded, forwarding disabled, local destination, ...: the
        // kernel resolves, fragments or refuses it exactly as it would any routed packet.
        _ => return Verdict::pass(stat::FWD_STACK),
    }
    // Redirect first: a device that refuses it leaves the packet as the kernel expects it.
    let Some(code) = ctx.redirect(fib.ifindex) else {
        return Verdict::pass(stat::FWD_STACK);
    };
    if decrement_ttl(ctx, pkt).is_err() || set_macs(ctx, &fib).is_err() {
        return Verdict::drop(stat::DROP_ERROR);
    }
    Verdict {
        stat: stat::FWD_REDIRECT,
        action: Action::Redirected(code),
    }
}

/// ip_decrease_ttl(): the TTL shares a 16-bit checksum word with the protocol byte. IPv6's
/// hop limit (byte 7) has no checksum.
#[inline(always)]
fn decrement_ttl<C: PacketCtx>(ctx: &mut C, pkt: &Packet) -> Result<(), StoreError> {
    if pkt.family == FAMILY_V6 {
        return ctx.store(pkt.l3_off + 7, pkt.ttl - 1);
    }
    let old = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
    let new = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    ctx.l3_csum_replace(pkt.l3_off + 10, u32::from(old), u32::from(new), 2)?;
    ctx.store(pkt.l3_off + 8, new)
}

#[inline(always)]
fn set_macs<C: PacketCtx>(ctx: &mut C, fib: &FibParams) -> Result<(), StoreError> {
    ctx.store(0, fib.dmac)?;
    ctx.store(6, fib.smac)
}
