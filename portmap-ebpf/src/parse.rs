//! Ethernet (+ one 802.1Q tag) / IPv4 (IHL-aware) / TCP|UDP parsing into [`Packet`].
//!
//! Outcomes for what is not a parseable TCP/UDP-over-IPv4 packet (documented in the README):
//! - not IPv4, not TCP/UDP, QinQ: pass untouched (`pass_not_ours`);
//! - IPv4 fragments (first or not): pass untouched (`pass_fragment`);
//! - invalid IPv4 header (version != 4, IHL < 5, total length beyond the packet or below the
//!   header): drop (`drop_malformed`), as the kernel's `ip_rcv` would;
//! - truncated TCP/UDP header or TCP data offset < 5: pass untouched (`pass_malformed_l4`) and let
//!   the kernel decide.

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};
use portmap_common::{PROTO_TCP, PROTO_UDP, stat};

use crate::{
    Verdict,
    ctx::{PacketCtx, ptr_at},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
/// IPv4 `frag_off` bits: More Fragments and the 13-bit offset.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed TCP/UDP-over-IPv4 packet: offsets into the frame and raw (wire-order) fields.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    /// Carried an 802.1Q tag in the frame.
    pub vlan: bool,
    /// IPv4 total length (host order): the L3 bytes counted per mapping.
    pub tot_len: u16,
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
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
    if ether_type != ETH_P_IP {
        return Err(Verdict::pass(stat::PASS_NOT_OURS));
    }

    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Verdict::drop(stat::DROP_MALFORMED))?;
    let (vihl, proto, ttl) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).ttl) };
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len });
    let frags = u16::from_be_bytes(unsafe { (*ip).frags });
    // Masked to 4 bits so the verifier sees a bounded offset (20..=60).
    let ihl_bytes = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl_bytes < Ipv4Hdr::LEN {
        return Err(Verdict::drop(stat::DROP_MALFORMED));
    }
    let l3_len = ctx.packet_len() - l3_off;
    if usize::from(tot_len) < ihl_bytes || usize::from(tot_len) > l3_len {
        return Err(Verdict::drop(stat::DROP_MALFORMED));
    }
    if frags & IP_MF_OFFSET_MASK != 0 {
        return Err(Verdict::pass(stat::PASS_FRAGMENT));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(stat::PASS_NOT_OURS));
    }
    let l4_off = l3_off + ihl_bytes;

    let (sport, dport, tcp_flags) = if proto == PROTO_TCP {
        if usize::from(tot_len) < ihl_bytes + TcpHdr::LEN {
            return Err(Verdict::pass(stat::PASS_MALFORMED_L4));
        }
        let tcp: *const TcpHdr = ptr_at(ctx, l4_off).ok_or(Verdict::pass(stat::PASS_MALFORMED_L4))?;
        let (source, dest) = unsafe { ((*tcp).source, (*tcp).dest) };
        let bytes: *const [u8; 14] = tcp.cast();
        let (doff, flags) = unsafe { ((*bytes)[12] >> 4, (*bytes)[13]) };
        if doff < 5 {
            return Err(Verdict::pass(stat::PASS_MALFORMED_L4));
        }
        (u16::from_ne_bytes(source), u16::from_ne_bytes(dest), flags)
    } else {
        if usize::from(tot_len) < ihl_bytes + UdpHdr::LEN {
            return Err(Verdict::pass(stat::PASS_MALFORMED_L4));
        }
        let udp: *const UdpHdr = ptr_at(ctx, l4_off).ok_or(Verdict::pass(stat::PASS_MALFORMED_L4))?;
        let (source, dest) = unsafe { ((*udp).src, (*udp).dst) };
        (u16::from_ne_bytes(source), u16::from_ne_bytes(dest), 0)
    };

    Ok(Packet {
        l3_off,
        l4_off,
        saddr: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        daddr: u32::from_ne_bytes(unsafe { (*ip).dst_addr }),
        sport,
        dport,
        proto,
        ttl,
        tcp_flags,
        vlan,
        tot_len,
    })
}
