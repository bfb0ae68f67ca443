//! Address/port rewrite with incremental checksums.

use core::mem::offset_of;

use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use portmap_common::{Addr, FAMILY_V6, PROTO_UDP, csum};

use crate::{
    ctx::{L4Nat, PacketCtx, StoreError, load},
    parse::{L4_DST_PORT_OFF, L4_SRC_PORT_OFF, Packet},
};

/// The IPv4 header checksum.
pub const IPV4_CHECK_OFF: usize = offset_of!(Ipv4Hdr, check);

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// Forward path (DNAT): destination address and port.
    Destination,
    /// Reply path (reverse NAT): source address and port.
    Source,
}

impl Side {
    /// This side's address offset in the IP header and port offset in the L4 header.
    #[inline(always)]
    pub fn offsets(self, v6: bool) -> (usize, usize) {
        match (self, v6) {
            (Self::Destination, true) => (offset_of!(Ipv6Hdr, dst_addr), L4_DST_PORT_OFF),
            (Self::Destination, false) => (offset_of!(Ipv4Hdr, dst_addr), L4_DST_PORT_OFF),
            (Self::Source, true) => (offset_of!(Ipv6Hdr, src_addr), L4_SRC_PORT_OFF),
            (Self::Source, false) => (offset_of!(Ipv4Hdr, src_addr), L4_SRC_PORT_OFF),
        }
    }

    /// This side's address and port of a packet whose ends are `src` and `dst`.
    #[inline(always)]
    pub fn of(self, src: (Addr, u16), dst: (Addr, u16)) -> (Addr, u16) {
        match self {
            Self::Destination => dst,
            Self::Source => src,
        }
    }
}

/// Whether `pkt` may be CHECKSUM_PARTIAL (`L4Nat::maybe_partial`): a GSO packet, or one whose
/// L4 checksum field holds its pseudo-header's sum (`csum::may_be_partial`); decided before the
/// rewrite changes either. XDP never asks (the compiler drops it there).
///
/// Decided here, once, as a flag, rather than where the checksum is written: compared there,
/// next to the writes, the two ways cost the 6.18 verifier more than twice the work on the TC
/// programs (TC ingress 568k instructions against 257k this way).
#[inline(always)]
fn may_be_partial<C: PacketCtx>(ctx: &C, pkt: &Packet) -> bool {
    if ctx.gso() {
        return true;
    }
    let Some(check) = pkt.l4_check_off().and_then(|off| load::<_, u16>(ctx, off)) else {
        return true;
    };
    // The segment's length as its pseudo-header counts it: the L3 bytes less the IP header and
    // its extensions.
    let l4_len = pkt.tot_len.wrapping_sub((pkt.l4_off - pkt.l3_off) as u32);
    csum::may_be_partial(
        check,
        csum::pseudo_header(&pkt.saddr, &pkt.daddr, pkt.proto, l4_len),
    )
}

/// Rewrites one side's address and port, updating the IPv4 header checksum (per address word)
/// and the TCP/UDP checksum (the pseudo-header's difference and the port's, in one update:
/// `PacketCtx::l4_csum_nat`) by RFC 1624 differences. IPv6 has no header checksum; SCTP's
/// CRC32c covers no address, and its port never changes (the daemon only accepts SCTP mappings
/// that keep it).
#[inline(always)]
pub fn rewrite<C: PacketCtx>(
    ctx: &mut C,
    pkt: &Packet,
    side: Side,
    addr: Addr,
    port: u16,
) -> Result<(), StoreError> {
    let v6 = pkt.family == FAMILY_V6;
    let (addr_off, port_off) = side.offsets(v6);
    let (old_addr, old_port) = side.of((pkt.saddr, pkt.sport), (pkt.daddr, pkt.dport));
    let (addr_off, port_off) = (pkt.l3_off + addr_off, pkt.l4_off + port_off);
    let maybe_partial = may_be_partial(ctx, pkt);
    let words = if v6 { 4 } else { 1 };
    let mut diff = None;
    for i in 0..4 {
        if i >= words || old_addr[i] == addr[i] {
            continue;
        }
        diff = Some(csum::add_change(diff.unwrap_or(0), old_addr[i], addr[i]));
        if !v6 {
            ctx.l3_csum_replace(pkt.l3_off + IPV4_CHECK_OFF, old_addr[i], addr[i], 4)?;
        }
        ctx.store(addr_off + 4 * i, addr[i])?;
    }
    // A later fragment has no L4 header (l4_check_off is None): addresses only.
    let Some(check_off) = pkt.l4_check_off() else {
        return Ok(());
    };
    let port_change = (old_port != port).then_some((old_port, port));
    if diff.is_some() || port_change.is_some() {
        let change = L4Nat {
            addr_diff: diff,
            port: port_change,
            udp: pkt.proto == PROTO_UDP,
            v6,
            maybe_partial,
        };
        ctx.l4_csum_nat(check_off, change)?;
    }
    if port_change.is_some() {
        ctx.store(port_off, port)?;
    }
    Ok(())
}
