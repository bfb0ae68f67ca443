//! Ethernet (+ one 802.1Q tag) / IPv4 (IHL-aware) or IPv6 (+ up to two hop-by-hop or
//! destination-options headers) / TCP|UDP|SCTP parsing into [`Packet`].
//!
//! Outcomes for what is not a parseable packet of ours (documented in the README):
//! - not IPv4/IPv6, not TCP/UDP/SCTP, QinQ, an IPv6 routing header or more than three extension
//!   headers: pass untouched (`pass_not_ours`);
//! - fragments: the first (offset 0) is parsed with its L4 header; later ones carry none and
//!   are marked `FRAG_LATER` for `frag::ports` (IPv4 flags/offset, one IPv6 fragment header);
//! - invalid IP header (IPv4: version, IHL < 5, total length beyond the packet or below the
//!   header; IPv6: payload beyond the packet): drop (`drop_malformed`), as the kernel would;
//! - truncated L4 header or TCP data offset < 5: pass untouched (`pass_malformed_l4`) and let
//!   the kernel decide.

use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use portmap_common::{
    Addr, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Stat,
};

use crate::ctx::{Header, PacketCtx, Verdict, load};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
/// IPv4 `frag_off` bits: More Fragments and the 13-bit offset; the offset alone.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const IP_OFFSET_MASK: u16 = 0x1fff;
/// `Packet::frag`: not a fragment, the first fragment (with the L4 header), a later one.
pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;
/// IPv6 extension headers that are skipped, and the ones that end parsing.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_FRAGMENT: u8 = 44;
/// Extension headers followed before giving up (`pass_not_ours`): three, each a hop-by-hop or
/// destination-options header or the (one) fragment header.
const MAX_EXT_HEADERS: usize = 3;
/// IPv6 traffic class and flow label: the first header word without the version.
const IPV6_FLOWINFO_MASK: u32 = u32::from_be(0x0fff_ffff);

/// The source and destination ports open the TCP, UDP and SCTP headers alike.
pub const L4_SRC_PORT_OFF: usize = offset_of!(UdpHdr, src);
pub const L4_DST_PORT_OFF: usize = offset_of!(UdpHdr, dst);
const _: () = assert!(
    offset_of!(TcpHdr, source) == L4_SRC_PORT_OFF
        && offset_of!(SctpHdr, src) == L4_SRC_PORT_OFF
        && offset_of!(TcpHdr, dest) == L4_DST_PORT_OFF
        && offset_of!(SctpHdr, dst) == L4_DST_PORT_OFF
);
/// ICMP and ICMPv6 headers (type, code, checksum, 4 bytes of rest).
pub const ICMP_HDR_LEN: usize = 8;
pub const ICMP_CHECK_OFF: usize = 2;

/// TCP's data offset (high nibble) and flags byte.
const TCP_DOFF_FLAGS_OFF: usize = offset_of!(TcpHdr, _bitfield_1);

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
    /// IPv4 TOS byte (0 for IPv6), for the FIB lookup (policy routing by TOS).
    pub tos: u8,
    /// IPv6 traffic class and flow label in wire order (0 for IPv4), for the FIB lookup.
    pub flowinfo: u32,
    /// TCP flags, 0 for UDP and SCTP.
    pub tcp_flags: u8,
    /// Carried an 802.1Q tag in the frame.
    pub vlan: bool,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER` (ports 0 until `frag::ports` fills them).
    pub frag: u8,
    /// The datagram's identification when fragmented (IPv4: 16 bits).
    pub frag_id: u32,
    /// L3 bytes (IPv4 total length; IPv6 header + payload length), counted per mapping.
    pub tot_len: u32,
}

impl Packet {
    /// Offset of the checksum an address or port change must update: TCP and UDP; `None` for
    /// SCTP, whose CRC32c covers neither the addresses nor (unchanged) ports.
    #[inline(always)]
    pub fn l4_check_off(&self) -> Option<usize> {
        if self.frag == FRAG_LATER {
            return None;
        }
        match self.proto {
            PROTO_TCP => Some(self.l4_off + offset_of!(TcpHdr, check)),
            PROTO_UDP => Some(self.l4_off + offset_of!(UdpHdr, check)),
            // ICMPv6's checksum covers a pseudo-header with the addresses; ICMP's does not.
            PROTO_ICMPV6 => Some(self.l4_off + ICMP_CHECK_OFF),
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
    tos: u8,
    flowinfo: u32,
    frag: u8,
    frag_id: u32,
    saddr: Addr,
    daddr: Addr,
}

#[inline(always)]
pub fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet, Verdict> {
    let not_ours = Verdict::pass(Stat::PassNotOurs);
    let mut ether_type: [u8; 2] = load(ctx, offset_of!(EthHdr, ether_type)).ok_or(not_ours)?;
    let mut l3_off = EthHdr::LEN;
    let mut vlan = false;
    if u16::from_be_bytes(ether_type) == ETH_P_8021Q {
        ether_type = load(ctx, l3_off + offset_of!(VlanHdr, ether_type)).ok_or(not_ours)?;
        l3_off += VlanHdr::LEN;
        vlan = true;
    }
    let l3 = match u16::from_be_bytes(ether_type) {
        ETH_P_IP => parse_ipv4(ctx, l3_off)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3_off)?,
        _ => return Err(not_ours),
    };
    let l4_len = match l3.proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        PROTO_SCTP => SctpHdr::LEN,
        // Type, code, checksum and 4 bytes; errors then carry the packet they are about.
        PROTO_ICMP if l3.family == FAMILY_V4 && l3.frag == FRAG_NONE => ICMP_HDR_LEN,
        PROTO_ICMPV6 if l3.family == FAMILY_V6 && l3.frag == FRAG_NONE => ICMP_HDR_LEN,
        _ => return Err(not_ours),
    };
    // A later fragment has no L4 header: its ports come from the first (`frag::complete`).
    let (sport, dport, tcp_flags) = if l3.frag == FRAG_LATER {
        (0, 0, 0)
    } else {
        parse_l4(ctx, &l3, l4_len)?
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
        tos: l3.tos,
        flowinfo: l3.flowinfo,
        tcp_flags,
        vlan,
        frag: l3.frag,
        frag_id: l3.frag_id,
        tot_len: (l3.end - l3_off) as u32,
    })
}

/// The ports and TCP flags of a packet that carries its L4 header of `l4_len` bytes.
#[inline(always)]
fn parse_l4<C: PacketCtx>(ctx: &C, l3: &L3, l4_len: usize) -> Result<(u16, u16, u8), Verdict> {
    let malformed = Verdict::pass(Stat::PassMalformedL4);
    if l3.l4_off + l4_len > l3.end {
        return Err(malformed);
    }
    let (sport, dport) = if l3.proto == PROTO_ICMP || l3.proto == PROTO_ICMPV6 {
        (0, 0)
    } else {
        ports(ctx, l3.l4_off).ok_or(malformed)?
    };
    let tcp_flags = if l3.proto == PROTO_TCP {
        let [doff, flags]: [u8; 2] = load(ctx, l3.l4_off + TCP_DOFF_FLAGS_OFF).ok_or(malformed)?;
        if usize::from(doff >> 4) * 4 < TcpHdr::LEN {
            return Err(malformed);
        }
        flags
    } else {
        0
    };
    Ok((sport, dport, tcp_flags))
}

#[inline(always)]
fn parse_ipv4<C: PacketCtx>(ctx: &C, l3_off: usize) -> Result<L3, Verdict> {
    let malformed = Verdict::drop(Stat::DropMalformed);
    let ip = Header::<Ipv4Hdr>::at(ctx, l3_off).ok_or(malformed)?;
    let vihl = ip.read(|h| &h.vihl);
    let tot_len = usize::from(u16::from_be_bytes(ip.read(|h| &h.tot_len)));
    // Masked to 4 bits so the verifier sees a bounded offset (20..=60).
    let ihl_bytes = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl_bytes < Ipv4Hdr::LEN {
        return Err(malformed);
    }
    if tot_len < ihl_bytes || tot_len > ctx.packet_len() - l3_off {
        return Err(malformed);
    }
    let frags = u16::from_be_bytes(ip.read(|h| &h.frags));
    let frag = if frags & IP_MF_OFFSET_MASK == 0 {
        FRAG_NONE
    } else if frags & IP_OFFSET_MASK == 0 {
        FRAG_FIRST
    } else {
        FRAG_LATER
    };
    let (saddr, daddr) = ipv4_addrs(&ip);
    Ok(L3 {
        family: FAMILY_V4,
        l4_off: l3_off + ihl_bytes,
        end: l3_off + tot_len,
        proto: ip.read(|h| &h.proto),
        ttl: ip.read(|h| &h.ttl),
        tos: ip.read(|h| &h.tos),
        flowinfo: 0,
        frag,
        frag_id: u32::from(u16::from_be_bytes(ip.read(|h| &h.id))),
        saddr,
        daddr,
    })
}

/// The source and destination addresses of an IPv4 header, as `Addr`s.
#[inline(always)]
pub fn ipv4_addrs(ip: &Header<Ipv4Hdr>) -> (Addr, Addr) {
    (
        [u32::from_ne_bytes(ip.read(|h| &h.src_addr)), 0, 0, 0],
        [u32::from_ne_bytes(ip.read(|h| &h.dst_addr)), 0, 0, 0],
    )
}

/// The source and destination addresses of an IPv6 header.
#[inline(always)]
pub fn ipv6_addrs(ip: &Header<Ipv6Hdr>) -> (Addr, Addr) {
    (words(ip.read(|h| &h.src_addr)), words(ip.read(|h| &h.dst_addr)))
}

/// The source and destination ports (wire order) that open a TCP, UDP or SCTP header.
#[inline(always)]
pub fn ports<C: PacketCtx>(ctx: &C, l4_off: usize) -> Option<(u16, u16)> {
    let p: [u8; 4] = load(ctx, l4_off + L4_SRC_PORT_OFF)?;
    Some((u16::from_ne_bytes([p[0], p[1]]), u16::from_ne_bytes([p[2], p[3]])))
}

/// An IPv6 address's bytes as the words of an `Addr`.
#[inline(always)]
pub fn words(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[inline(always)]
fn parse_ipv6<C: PacketCtx>(ctx: &C, l3_off: usize) -> Result<L3, Verdict> {
    let ip = Header::<Ipv6Hdr>::at(ctx, l3_off).ok_or(Verdict::drop(Stat::DropMalformed))?;
    let vcf = ip.read(|h| &h.vcf);
    let tot_len = Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(ip.read(|h| &h.payload_len)));
    if vcf[0] >> 4 != 6 || tot_len > ctx.packet_len() - l3_off {
        return Err(Verdict::drop(Stat::DropMalformed));
    }
    let mut next = ip.read(|h| &h.next_hdr);
    let mut off = l3_off + Ipv6Hdr::LEN;
    let (mut frag, mut frag_id) = (FRAG_NONE, 0);
    for _ in 0..MAX_EXT_HEADERS {
        if next == NEXTHDR_FRAGMENT && frag == FRAG_NONE {
            // next header, reserved, offset (13 bits) | M, identification.
            let h: [u8; 8] = load(ctx, off).ok_or(Verdict::pass(Stat::PassMalformedL4))?;
            next = h[0];
            off += 8;
            frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                frag = FRAG_LATER;
                break;
            }
            frag = FRAG_FIRST;
            continue;
        }
        if next != NEXTHDR_HOP && next != NEXTHDR_DEST {
            break;
        }
        // Every extension header starts with its next header and its length in 8-byte units
        // beyond the first 8.
        let [nh, len]: [u8; 2] = load(ctx, off).ok_or(Verdict::pass(Stat::PassMalformedL4))?;
        next = nh;
        off += (usize::from(len) + 1) * 8;
    }
    let (saddr, daddr) = ipv6_addrs(&ip);
    Ok(L3 {
        family: FAMILY_V6,
        l4_off: off,
        end: l3_off + tot_len,
        proto: next,
        ttl: ip.read(|h| &h.hop_limit),
        tos: 0,
        flowinfo: u32::from_ne_bytes(vcf) & IPV6_FLOWINFO_MASK,
        frag,
        frag_id,
        saddr,
        daddr,
    })
}
