//! Ethernet (+ one 802.1Q tag) / IPv4 (IHL-aware) or IPv6 (+ up to two hop-by-hop or
//! destination-options headers) / TCP|UDP|SCTP parsing into [`Packet`].
//!
//! Outcomes for what is not a parseable packet of ours (documented in the README):
//! - not IPv4/IPv6, not TCP/UDP/SCTP, QinQ, an IPv6 routing header or more than two extension
//!   headers: pass untouched (`pass_not_ours`);
//! - IPv4 fragments (first or not), IPv6 fragment header: pass untouched (`pass_fragment`);
//! - invalid IP header (IPv4: version, IHL < 5, total length beyond the packet or below the
//!   header; IPv6: payload beyond the packet): drop (`drop_malformed`), as the kernel would;
//! - truncated L4 header or TCP data offset < 5: pass untouched (`pass_malformed_l4`) and let
//!   the kernel decide.

use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, vlan::VlanHdr};
use portmap_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, stat};

use crate::{
    Verdict,
    ctx::{PacketCtx, ptr_at},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
/// IPv4 `frag_off` bits: More Fragments and the 13-bit offset.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// IPv6 extension headers that are skipped, and the ones that end parsing.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_FRAGMENT: u8 = 44;
/// Skippable extension headers followed before giving up (`pass_not_ours`).
const MAX_EXT_HEADERS: usize = 2;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed TCP/UDP/SCTP packet: offsets into the frame and raw (wire-order) fields.
#[derive(Clone, Copy)]
pub struct Packet {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// TCP flags, 0 for UDP and SCTP.
    pub tcp_flags: u8,
    /// Carried an 802.1Q tag in the frame.
    pub vlan: bool,
    /// L3 bytes (IPv4 total length; IPv6 header + payload length), counted per mapping.
    pub tot_len: u32,
}

impl Packet {
    /// Offset of the checksum an address or port change must update: TCP and UDP; `None` for
    /// SCTP, whose CRC32c covers neither the addresses nor (unchanged) ports.
    #[inline(always)]
    pub fn l4_check_off(&self) -> Option<usize> {
        match self.proto {
            PROTO_TCP => Some(self.l4_off + 16),
            PROTO_UDP => Some(self.l4_off + 6),
            _ => None,
        }
    }
}

/// Where the L3 header of a packet of ours ends and what follows it.
struct L3 {
    family: u8,
    l4_off: usize,
    /// End of the IP packet (l3_off + total length).
    end: usize,
    proto: u8,
    ttl: u8,
    saddr: Addr,
    daddr: Addr,
}

#[inline(always)]
pub fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(stat::PASS_NOT_OURS))?;
    // SAFETY: bounds checked by ptr_at (as every dereference below).
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3_off = EthHdr::LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q {
        let tag: *const VlanHdr = ptr_at(ctx, l3_off).ok_or(Verdict::pass(stat::PASS_NOT_OURS))?;
        ether_type = u16::from_be(unsafe { (*tag).ether_type });
        l3_off += VlanHdr::LEN;
        vlan = true;
    }
    let l3 = match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3_off)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3_off)?,
        _ => return Err(Verdict::pass(stat::PASS_NOT_OURS)),
    };
    let l4_len = match l3.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => return Err(Verdict::pass(stat::PASS_NOT_OURS)),
    };
    if l3.l4_off + l4_len > l3.end {
        return Err(Verdict::pass(stat::PASS_MALFORMED_L4));
    }
    // Ports are the first four bytes of all three headers; TCP's data offset and flags follow.
    let (sport, dport, tcp_flags) = if l3.proto == PROTO_TCP {
        let tcp: *const [u8; 14] = ptr_at(ctx, l3.l4_off).ok_or(Verdict::pass(stat::PASS_MALFORMED_L4))?;
        let b = unsafe { *tcp };
        if b[12] >> 4 < 5 {
            return Err(Verdict::pass(stat::PASS_MALFORMED_L4));
        }
        (
            u16::from_ne_bytes([b[0], b[1]]),
            u16::from_ne_bytes([b[2], b[3]]),
            b[13],
        )
    } else {
        let ports: *const [u8; 4] = ptr_at(ctx, l3.l4_off).ok_or(Verdict::pass(stat::PASS_MALFORMED_L4))?;
        let b = unsafe { *ports };
        (
            u16::from_ne_bytes([b[0], b[1]]),
            u16::from_ne_bytes([b[2], b[3]]),
            0,
        )
    };
    Ok(Packet {
        family: l3.family,
        l3_off,
        l4_off: l3.l4_off,
        saddr: l3.saddr,
        daddr: l3.daddr,
        sport,
        dport,
        proto: l3.proto,
        ttl: l3.ttl,
        tcp_flags,
        vlan,
        tot_len: (l3.end - l3_off) as u32,
    })
}

#[inline(always)]
fn parse_ipv4<C: PacketCtx>(ctx: &C, l3_off: usize) -> Result<L3, Verdict> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Verdict::drop(stat::DROP_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, ttl) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).ttl) };
    let tot_len = usize::from(u16::from_be_bytes(unsafe { (*ip).tot_len }));
    let frags = u16::from_be_bytes(unsafe { (*ip).frags });
    // Masked to 4 bits so the verifier sees a bounded offset (20..=60).
    let ihl_bytes = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl_bytes < Ipv4Hdr::LEN {
        return Err(Verdict::drop(stat::DROP_MALFORMED));
    }
    if tot_len < ihl_bytes || tot_len > ctx.packet_len() - l3_off {
        return Err(Verdict::drop(stat::DROP_MALFORMED));
    }
    if frags & IP_MF_OFFSET_MASK != 0 {
        return Err(Verdict::pass(stat::PASS_FRAGMENT));
    }
    Ok(L3 {
        family: FAMILY_V4,
        l4_off: l3_off + ihl_bytes,
        end: l3_off + tot_len,
        proto,
        ttl,
        saddr: [u32::from_ne_bytes(unsafe { (*ip).src_addr }), 0, 0, 0],
        daddr: [u32::from_ne_bytes(unsafe { (*ip).dst_addr }), 0, 0, 0],
    })
}

#[inline(always)]
fn words(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[inline(always)]
fn parse_ipv6<C: PacketCtx>(ctx: &C, l3_off: usize) -> Result<L3, Verdict> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).ok_or(Verdict::drop(stat::DROP_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at.
    let (vcf, payload_len, mut next, hop) =
        unsafe { ((*ip).vcf[0], (*ip).payload_len, (*ip).next_hdr, (*ip).hop_limit) };
    let tot_len = Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(payload_len));
    if vcf >> 4 != 6 || tot_len > ctx.packet_len() - l3_off {
        return Err(Verdict::drop(stat::DROP_MALFORMED));
    }
    let mut off = l3_off + Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        if next != NEXTHDR_HOP && next != NEXTHDR_DEST {
            break;
        }
        let ext: *const [u8; 2] = ptr_at(ctx, off).ok_or(Verdict::pass(stat::PASS_MALFORMED_L4))?;
        let [nh, len] = unsafe { *ext };
        next = nh;
        off += (usize::from(len) + 1) * 8;
    }
    if next == NEXTHDR_FRAGMENT {
        return Err(Verdict::pass(stat::PASS_FRAGMENT));
    }
    Ok(L3 {
        family: FAMILY_V6,
        l4_off: off,
        end: l3_off + tot_len,
        proto: next,
        ttl: hop,
        saddr: words(unsafe { (*ip).src_addr }),
        daddr: words(unsafe { (*ip).dst_addr }),
    })
}
