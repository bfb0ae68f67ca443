//! ICMP and ICMPv6 errors about translated flows (Cilium's nat.h does the same): destination
//! unreachable (fragmentation needed included), packet too big, time exceeded and parameter
//! problem carry the start of the packet they are about. That packet names the backend on one
//! side of the host and the published address on the other, so it is translated like the flow's
//! own packets, with every checksum: the embedded IPv4 header's, the embedded TCP/UDP one (when
//! the error carries it), the ICMP/ICMPv6 checksum over all of it, and the outer header.
//!
//! - Towards the client (TC egress): an error about a packet the client sent (the backend's port
//!   unreachable, a router's or the host's own fragmentation needed or time exceeded) embeds
//!   client → backend; it becomes client → published address, and an outer source that is the
//!   backend becomes the published address. A connected UDP client then sees ECONNREFUSED and
//!   TCP learns the path MTU.
//! - Towards the backend (ingress): an error the client sends about a reply embeds published
//!   address → client; it becomes backend → client, the outer destination the backend, and the
//!   packet is forwarded like the flow's.
//!
//! This work runs in programs of its own (`portmap_xdp_icmp`, `portmap_tc_icmp_in`,
//! `portmap_tc_icmp_out`), which the datapath reaches by tail call (`PM_ICMP_XDP`, `PM_ICMP_TC`):
//! beside
//! the flow path it would not fit the 512-byte BPF stack.

use core::mem::offset_of;

use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use portmap_common::{
    Addr, DIR_FORWARD, DIR_REPLY, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP, Stat, csum,
};

use crate::{
    conntrack::{self, Nat},
    ctx::{Header, L4Csum, PacketCtx, StoreError, Verdict, load},
    forward,
    nat::{self, IPV4_CHECK_OFF, Side},
    parse::{ICMP_CHECK_OFF, ICMP_HDR_LEN, Packet, ipv4_addrs, ipv6_addrs, ports},
    stats::{count, count_mapping},
};

/// The packet an ICMP error is about, as far as the error carries it.
struct Embedded {
    l3_off: usize,
    l4_off: usize,
    saddr: Addr,
    daddr: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
}

/// Whether `pkt` (ICMP or ICMPv6) is an error message about another packet.
#[inline(always)]
fn is_error<C: PacketCtx>(ctx: &C, pkt: &Packet) -> bool {
    let Some(ty) = load::<C, u8>(ctx, pkt.l4_off) else {
        return false;
    };
    if pkt.proto == PROTO_ICMP {
        // Destination unreachable, time exceeded, parameter problem.
        matches!(ty, 3 | 11 | 12)
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(ty, 1..=4)
    }
}

/// The embedded IP header (no IPv6 extension headers) and the ports of its TCP/UDP header.
#[inline(always)]
fn embedded<C: PacketCtx>(ctx: &C, pkt: &Packet) -> Option<Embedded> {
    let l3_off = pkt.l4_off + ICMP_HDR_LEN;
    let (l4_off, proto, (saddr, daddr)) = if pkt.family == FAMILY_V6 {
        let ip = Header::<Ipv6Hdr>::at(ctx, l3_off)?;
        (l3_off + Ipv6Hdr::LEN, ip.read(|h| &h.next_hdr), ipv6_addrs(&ip))
    } else {
        let ip = Header::<Ipv4Hdr>::at(ctx, l3_off)?;
        let ihl = usize::from(ip.read(|h| &h.vihl) & 0x0f) * 4;
        if ihl < Ipv4Hdr::LEN {
            return None;
        }
        (l3_off + ihl, ip.read(|h| &h.proto), ipv4_addrs(&ip))
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let (sport, dport) = ports(ctx, l4_off)?;
    Some(Embedded {
        l3_off,
        l4_off,
        saddr,
        daddr,
        sport,
        dport,
        proto,
    })
}

/// Writes a 2- or 4-byte field inside the ICMP message and updates the message's checksum.
#[inline(always)]
fn store_in_message<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    off: usize,
    from: u32,
    to: u32,
    size: u8,
) -> Result<(), StoreError> {
    if from == to {
        return Ok(());
    }
    let how = L4Csum {
        pseudo: false,
        udp: false,
    };
    ctx.l4_csum_replace(pkt.l4_off + ICMP_CHECK_OFF, from, to, size, how)?;
    if size == 2 {
        ctx.store(off, to as u16)
    } else {
        ctx.store(off, to)
    }
}

/// Rewrites one end (`Side`) of the embedded packet to `addr`:`port`, with its IPv4 header
/// checksum and its TCP/UDP checksum when the error carries it.
#[inline(always)]
fn translate_embedded<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    inner: &Embedded,
    side: Side,
    addr: &Addr,
    port: u16,
) -> Result<(), StoreError> {
    let v6 = pkt.family == FAMILY_V6;
    let (addr_off, port_off) = side.offsets(v6);
    let (old_addr, old_port) = side.of((inner.saddr, inner.sport), (inner.daddr, inner.dport));
    let words = if v6 { 4 } else { 1 };
    // The embedded TCP/UDP checksum, if the error carries it: the address (pseudo-header) and
    // port changes applied to it; a UDP checksum of 0 ("none") stays 0.
    let check_off = inner.l4_off
        + if inner.proto == PROTO_TCP {
            offset_of!(TcpHdr, check)
        } else {
            offset_of!(UdpHdr, check)
        };
    if let Some(old) = load::<C, u16>(ctx, check_off) {
        let update = |check: u16| {
            let mut new = check;
            for i in 0..4 {
                if i < words {
                    new = csum::replace4(new, old_addr[i], addr[i]);
                }
            }
            csum::replace2(new, old_port, port)
        };
        let new = if inner.proto == PROTO_UDP {
            csum::udp_mangled(old, update)
        } else {
            update(old)
        };
        store_in_message(ctx, pkt, check_off, u32::from(old), u32::from(new), 2)?;
    }
    if !v6 {
        let ip_check_off = inner.l3_off + IPV4_CHECK_OFF;
        let old: u16 = load(ctx, ip_check_off).ok_or(StoreError)?;
        let new = csum::replace4(old, old_addr[0], addr[0]);
        store_in_message(ctx, pkt, ip_check_off, u32::from(old), u32::from(new), 2)?;
    }
    for i in 0..4 {
        if i < words {
            store_in_message(ctx, pkt, inner.l3_off + addr_off + 4 * i, old_addr[i], addr[i], 4)?;
        }
    }
    store_in_message(
        ctx,
        pkt,
        inner.l4_off + port_off,
        u32::from(old_port),
        u32::from(port),
        2,
    )
}

/// The flow an error is about, without refreshing it (an error is not traffic of the flow).
#[inline(always)]
fn flow_of(inner: &Embedded, family: u8, dir: u8) -> Option<Nat> {
    // The embedded packet travelled the other way: its reversed tuple is the entry's key.
    let key = FlowKey {
        src: inner.daddr,
        dst: inner.saddr,
        src_port_be: inner.dport,
        dst_port_be: inner.sport,
        proto: inner.proto,
        family,
        _pad: [0; 2],
    };
    conntrack::find(&key, dir)
}

/// Towards the client: an error about a packet the client sent.
#[inline(always)]
pub fn egress<C: PacketCtx>(ctx: &mut C, pkt: &Packet) -> Verdict {
    if !is_error(ctx, pkt) {
        return Verdict::pass(Stat::PassNotOurs);
    }
    // Embedded: client → backend, sent through the flow's forward path after translation.
    let Some(inner) = embedded(ctx, pkt) else {
        return Verdict::pass(Stat::PassMalformedL4);
    };
    let Some(nat) = flow_of(&inner, pkt.family, DIR_REPLY) else {
        return Verdict::pass(Stat::PassNoMapping);
    };
    if translate_embedded(ctx, pkt, &inner, Side::Destination, &nat.addr, nat.port).is_err() {
        return Verdict::drop(Stat::DropError);
    }
    if pkt.saddr == inner.daddr && nat::rewrite(ctx, pkt, Side::Source, nat.addr, pkt.sport).is_err() {
        return Verdict::drop(Stat::DropError);
    }
    count(Stat::IcmpErrorNat);
    count_mapping(nat.stats_slot, DIR_REPLY, pkt.tot_len, false);
    Verdict::pass(Stat::ReplyNat)
}

/// Towards the backend: an error the client sends about a reply it received.
#[inline(always)]
pub fn ingress<C: PacketCtx>(ctx: &mut C, pkt: &Packet) -> Verdict {
    if !is_error(ctx, pkt) {
        return Verdict::pass(Stat::PassNotOurs);
    }
    // Embedded: published address → client, as the reply left the host.
    let Some(inner) = embedded(ctx, pkt) else {
        return Verdict::pass(Stat::PassMalformedL4);
    };
    let Some(nat) = flow_of(&inner, pkt.family, DIR_FORWARD) else {
        return Verdict::pass(Stat::PassNoMapping);
    };
    if translate_embedded(ctx, pkt, &inner, Side::Source, &nat.addr, nat.port).is_err()
        || nat::rewrite(ctx, pkt, Side::Destination, nat.addr, pkt.dport).is_err()
    {
        return Verdict::drop(Stat::DropError);
    }
    count(Stat::IcmpErrorNat);
    count_mapping(nat.stats_slot, DIR_FORWARD, pkt.tot_len, false);
    forward::forward(ctx, pkt, &nat.addr, pkt.dport)
}
