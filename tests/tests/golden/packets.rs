//! Fixture packets: described by a [`Frame`] and serialised by etherparse's `PacketBuilder`
//! (which computes every length and checksum from scratch), plus named mutations for the
//! malformed cases a builder refuses to produce, and an independent checksum checker.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portmap_tests::{sctp_checksum, sctp_crc_ok, sctp_packet};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpDscp, IpEcn, IpFragOffset, IpHeaders, IpNumber,
    Ipv4Extensions, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header,
    Ipv6RawExtHeader, Ipv6RoutingExtensions, PacketBuilder, VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x02];
pub const HOST_CLIENT_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x01];
pub const HOST_BACKEND_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const HOST_BACKEND2_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const BACKEND2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
/// The MAC of every local backend (`LOCAL_BACKENDS`).
pub const LOCAL_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x05, 0x05];

/// (destination, source) MACs of a frame the host redirects to a backend it has a neighbour
/// entry for, or has cached as a local backend.
pub fn backend_macs(backend: IpAddr) -> Option<([u8; 6], [u8; 6])> {
    match backend.to_string().as_str() {
        "198.18.1.2" | "198.18.1.4" | "fd00:1::2" => Some((BACKEND_MAC, HOST_BACKEND_SIDE_MAC)),
        "198.18.2.2" | "fd00:2::2" => Some((BACKEND2_MAC, HOST_BACKEND2_SIDE_MAC)),
        _ => crate::LOCAL_BACKENDS
            .iter()
            .find(|(addr, ..)| *addr == backend.to_string())
            .map(|(.., smac)| (LOCAL_BACKEND_MAC, *smac)),
    }
}

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// An SCTP packet with one INIT chunk, CRC32c computed.
    Sctp {
        sport: u16,
        dport: u16,
    },
    IcmpEcho,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    Whole,
    /// More Fragments set, offset 0.
    First,
    /// Offset > 0 (the last fragment, MF clear).
    Later,
}

/// An Ethernet / IPv4 or IPv6 / L4 frame as a fixture row describes it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 TOS byte or IPv6 traffic class (DSCP and ECN).
    pub tos: u8,
    /// IPv4 options (a multiple of 4 bytes, at most 40); for IPv6, the payload of a hop-by-hop
    /// options header (6 + 8n bytes) if not empty.
    pub options: Vec<u8>,
    /// IPv4 flags and offset, or an IPv6 fragment header.
    pub fragment: Fragment,
    /// IPv6: a (type 0, segments left 0) routing header.
    pub routing: bool,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: HOST_CLIENT_SIDE_MAC,
            vlan: None,
            src,
            dst,
            ttl: 64,
            tos: 0,
            options: Vec::new(),
            fragment: Fragment::Whole,
            routing: false,
            l4,
            payload: Vec::new(),
        }
    }

    pub fn routing_header(mut self) -> Self {
        self.routing = true;
        self
    }

    pub fn tcp(src: (impl Into<IpAddr>, u16), dst: (impl Into<IpAddr>, u16), flags: u8) -> Self {
        let l4 = L4::Tcp {
            sport: src.1,
            dport: dst.1,
            flags,
        };
        Self::new(src.0.into(), dst.0.into(), l4)
    }

    pub fn udp(src: (impl Into<IpAddr>, u16), dst: (impl Into<IpAddr>, u16)) -> Self {
        Self::new(
            src.0.into(),
            dst.0.into(),
            L4::Udp {
                sport: src.1,
                dport: dst.1,
            },
        )
    }

    pub fn sctp(src: (impl Into<IpAddr>, u16), dst: (impl Into<IpAddr>, u16)) -> Self {
        Self::new(
            src.0.into(),
            dst.0.into(),
            L4::Sctp {
                sport: src.1,
                dport: dst.1,
            },
        )
    }

    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::new(src.into(), dst.into(), L4::IcmpEcho)
    }

    /// An IPv6 hop-by-hop options header of `len` bytes (8n) before the L4 header.
    pub fn hop_by_hop(mut self, len: usize) -> Self {
        // PadN option filling the header: type 1, length, zeros.
        let mut payload = vec![0u8; len - 2];
        payload[0] = 1;
        payload[1] = (len - 4) as u8;
        self.options = payload;
        self
    }

    /// A backend's packet as it enters the host from the backend's veth (the backend's MACs).
    pub fn entering_from_backend(mut self) -> Self {
        self.src_mac = BACKEND_MAC;
        self.dst_mac = HOST_BACKEND_SIDE_MAC;
        self
    }

    /// A backend's packet on its way out of the client-facing interface (MACs as routed).
    pub fn sent_by_backend(mut self) -> Self {
        self.src_mac = HOST_CLIENT_SIDE_MAC;
        self.dst_mac = CLIENT_MAC;
        self
    }

    pub fn payload(mut self, len: usize) -> Self {
        self.payload = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        self
    }

    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn fragment(mut self, fragment: Fragment) -> Self {
        self.fragment = fragment;
        self
    }

    /// IPv4 options making the header `ihl` words long: NOPs ending in End of Options.
    pub fn ihl(mut self, ihl: u8) -> Self {
        let len = usize::from(ihl - 5) * 4;
        self.options = vec![1; len];
        if let Some(last) = self.options.last_mut() {
            *last = 0;
        }
        self
    }

    /// The same frame with its destination rewritten (the forward DNAT).
    pub fn dnat(mut self, addr: impl Into<IpAddr>, port: u16) -> Self {
        self.dst = addr.into();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } | L4::Sctp { dport, .. } => *dport = port,
            L4::IcmpEcho => {}
        }
        self
    }

    /// The same frame with its source rewritten (the reply's reverse NAT).
    pub fn snat(mut self, addr: impl Into<IpAddr>, port: u16) -> Self {
        self.src = addr.into();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } | L4::Sctp { sport, .. } => *sport = port,
            L4::IcmpEcho => {}
        }
        self
    }

    /// The frame as the host routes it to its (rewritten) destination: one hop less, the
    /// backend link's MACs.
    pub fn routed_to_backend(mut self) -> Self {
        self.ttl -= 1;
        (self.dst_mac, self.src_mac) = backend_macs(self.dst).expect("a backend with a neighbour entry");
        self
    }

    fn ip_headers(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = Ipv4Header::new(0, self.ttl, IpNumber::TCP, src.octets(), dst.octets())
                    .expect("empty payload fits");
                ip.identification = 0x1234;
                ip.dscp = IpDscp::try_new(self.tos >> 2).expect("6 bits");
                ip.ecn = IpEcn::try_new(self.tos & 3).expect("2 bits");
                ip.options =
                    Ipv4Options::try_from(self.options.as_slice()).expect("options: multiple of 4, <= 40");
                match self.fragment {
                    Fragment::Whole => {}
                    Fragment::First => {
                        ip.dont_fragment = false;
                        ip.more_fragments = true;
                    }
                    Fragment::Later => {
                        ip.dont_fragment = false;
                        ip.fragment_offset = IpFragOffset::try_new(185).expect("13 bits");
                    }
                }
                IpHeaders::Ipv4(ip, Ipv4Extensions::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ip = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).expect("20 bits"),
                    payload_length: 0,
                    next_header: IpNumber::TCP,
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                // Next-header fields are filled in by the builder.
                let mut exts = Ipv6Extensions::default();
                if !self.options.is_empty() {
                    exts.hop_by_hop_options =
                        Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &self.options).expect("6 + 8n bytes"));
                }
                if self.routing {
                    exts.routing = Some(Ipv6RoutingExtensions {
                        routing: Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0; 6]).expect("6 bytes"),
                        final_destination_options: None,
                    });
                }
                let offset = |o: u16| IpFragOffset::try_new(o).expect("13 bits");
                exts.fragment = match self.fragment {
                    Fragment::Whole => None,
                    Fragment::First => Some(Ipv6FragmentHeader::new(IpNumber::TCP, offset(0), true, 7)),
                    Fragment::Later => Some(Ipv6FragmentHeader::new(IpNumber::TCP, offset(185), false, 7)),
                };
                IpHeaders::Ipv6(ip, exts)
            }
            _ => panic!("a frame stays within one address family"),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let headers = self.ip_headers();
        let mut out = Vec::new();
        macro_rules! finish {
            ($step:expr) => {{
                let step = $step;
                match self.l4 {
                    L4::Tcp {
                        sport,
                        dport,
                        flags,
                    } => {
                        let mut tcp = step.tcp(sport, dport, 0x0102_0304, 64240);
                        if flags & FIN != 0 {
                            tcp = tcp.fin();
                        }
                        if flags & SYN != 0 {
                            tcp = tcp.syn();
                        }
                        if flags & RST != 0 {
                            tcp = tcp.rst();
                        }
                        if flags & PSH != 0 {
                            tcp = tcp.psh();
                        }
                        if flags & ACK != 0 {
                            tcp = tcp.ack(0x0a0b_0c0d);
                        }
                        tcp.write(&mut out, &self.payload)
                    }
                    L4::Udp { sport, dport } => step.udp(sport, dport).write(&mut out, &self.payload),
                    L4::Sctp { sport, dport } => step.write(
                        &mut out,
                        IpNumber::SCTP,
                        &sctp_packet(sport, dport, &self.payload),
                    ),
                    L4::IcmpEcho => step
                        .icmpv4_echo_request(7, 1)
                        .write(&mut out, &self.payload),
                }
            }};
        }
        match self.vlan {
            Some(id) => finish!(eth.single_vlan(VlanId::try_new(id).expect("12 bits")).ip(headers)),
            None => finish!(eth.ip(headers)),
        }
        .expect("fixture frames are buildable");
        self.fix_ipv6_fragment_header(&mut out);
        out
    }

    /// etherparse 0.19 writes an IPv6 fragment header's fourth byte as `offset & 0x1f | M << 7`;
    /// RFC 8200 (and the kernel) read `(offset & 0x1f) << 3 | M`. Rewrites it the RFC's way.
    fn fix_ipv6_fragment_header(&self, out: &mut [u8]) {
        if !self.dst.is_ipv6() || matches!(self.fragment, Fragment::Whole) {
            return;
        }
        let l3 = ETH_LEN + if self.vlan.is_some() { VLAN_LEN } else { 0 };
        let hop_by_hop = if self.options.is_empty() {
            0
        } else {
            2 + self.options.len()
        };
        let routing = if self.routing { 8 } else { 0 };
        let at = l3 + 40 + hop_by_hop + routing;
        let (offset, more) = match self.fragment {
            Fragment::First => (0u16, 1u16),
            Fragment::Later => (185, 0),
            Fragment::Whole => unreachable!("returned above"),
        };
        out[at + 2..at + 4].copy_from_slice(&(offset << 3 | more).to_be_bytes());
    }
}

/// An ARP who-has from the client for `target`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &sender.octets(),
        &[0; 6],
        &target.octets(),
    )
    .expect("valid ARP");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut out)
        .expect("buildable");
    out
}

/// An ICMPv6 echo request from `src` to `dst`.
pub fn icmpv6_echo(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, HOST_CLIENT_SIDE_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut out, &[1, 2, 3, 4])
        .expect("buildable");
    out
}

/// What an ICMP error says happened to the packet it carries.
#[derive(Clone, Copy, Debug)]
pub enum IcmpError {
    PortUnreachable,
    /// IPv4 fragmentation needed / IPv6 packet too big, with the next hop's MTU.
    TooBig(u16),
    TimeExceeded,
}

/// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` with MACs (`dst_mac`, `src_mac`) and TTL
/// `ttl`, carrying `embedded` (an IP packet, as much of it as given); checksums computed.
pub fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): (IpAddr, IpAddr),
    ttl: u8,
    what: IcmpError,
    embedded: &[u8],
) -> Vec<u8> {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};
    let mut out = Vec::new();
    let eth = PacketBuilder::ethernet2(macs.1, macs.0);
    let written = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ty =
                match what {
                    IcmpError::PortUnreachable => {
                        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
                    }
                    IcmpError::TooBig(mtu) => Icmpv4Type::DestinationUnreachable(
                        icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                    ),
                    IcmpError::TimeExceeded => {
                        Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
                    }
                };
            eth.ipv4(s.octets(), d.octets(), ttl)
                .icmpv4(ty)
                .write(&mut out, embedded)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ty = match what {
                IcmpError::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
                }
                IcmpError::TooBig(mtu) => Icmpv6Type::PacketTooBig { mtu: u32::from(mtu) },
                IcmpError::TimeExceeded => {
                    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
                }
            };
            eth.ipv6(s.octets(), d.octets(), ttl)
                .icmpv6(ty)
                .write(&mut out, embedded)
        }
        _ => panic!("an ICMP error stays within one family"),
    };
    written.expect("buildable");
    out
}

/// The IP packet of a frame (what an ICMP error carries of it).
#[must_use]
pub fn ip_packet(frame: &[u8]) -> Vec<u8> {
    let (l3, _) = l3_offset(frame).expect("an IP frame");
    frame[l3..].to_vec()
}

/// A UDP datagram in two 802.1Q tags (QinQ).
pub fn qinq_udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, HOST_CLIENT_SIDE_MAC)
        .double_vlan(
            VlanId::try_new(10).expect("12 bits"),
            VlanId::try_new(20).expect("12 bits"),
        )
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut out, &[1, 2, 3, 4])
        .expect("buildable");
    out
}

/// Offset of the IP header in a frame with at most one 802.1Q tag, and whether it is IPv6
/// (`None`: neither IPv4 nor IPv6).
pub fn l3_offset(frame: &[u8]) -> Option<(usize, bool)> {
    let ether_type = |off: usize| frame.get(off..off + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (off, et) = match ether_type(12)? {
        0x8100 => (ETH_LEN + VLAN_LEN, ether_type(16)?),
        et => (ETH_LEN, et),
    };
    match et {
        0x0800 => Some((off, false)),
        0x86dd => Some((off, true)),
        _ => None,
    }
}

/// Named mutations for what no builder produces. Each keeps the IPv4 header checksum valid, so
/// the only thing wrong with the frame is the named defect.
pub mod mutate {
    use std::net::IpAddr;

    use super::{backend_macs, l3_offset, layout, set_ipv4_checksum};

    /// A fragment after the first with its destination (`dst`) or source (`src`) address
    /// rewritten and the IPv4 header checksum recomputed; its payload untouched (it holds no L4
    /// header, whatever bytes the builder put there).
    pub fn fragment_addresses(mut frame: Vec<u8>, src: Option<IpAddr>, dst: Option<IpAddr>) -> Vec<u8> {
        let l = layout(&frame).expect("a well-formed fragment");
        let (s, d, len) = l.addrs();
        let octets = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        for (off, addr) in [(s, src), (d, dst)] {
            if let Some(a) = addr {
                frame[off..off + len].copy_from_slice(&octets(a));
            }
        }
        if !l.v6 {
            set_ipv4_checksum(&mut frame, l.l3);
        }
        frame
    }

    /// A fragment as the host redirects it to backend `dst`: destination rewritten, TTL / hop
    /// limit one less, the backend link's MACs, IPv4 header checksum recomputed.
    pub fn fragment_forwarded(frame: Vec<u8>, dst: IpAddr) -> Vec<u8> {
        let mut frame = fragment_addresses(frame, None, Some(dst));
        let l = layout(&frame).expect("a well-formed fragment");
        frame[l.ttl()] -= 1;
        let (dmac, smac) = backend_macs(dst).expect("a backend with a neighbour entry");
        frame[..6].copy_from_slice(&dmac);
        frame[6..12].copy_from_slice(&smac);
        if !l.v6 {
            set_ipv4_checksum(&mut frame, l.l3);
        }
        frame
    }

    fn l3(frame: &[u8]) -> usize {
        match l3_offset(frame) {
            Some((off, false)) => off,
            _ => panic!("an IPv4 frame"),
        }
    }

    pub fn ihl(mut frame: Vec<u8>, ihl: u8) -> Vec<u8> {
        let off = l3(&frame);
        frame[off] = 0x40 | ihl;
        set_ipv4_checksum(&mut frame, off);
        frame
    }

    pub fn total_length(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
        let off = l3(&frame);
        frame[off + 2..off + 4].copy_from_slice(&len.to_be_bytes());
        set_ipv4_checksum(&mut frame, off);
        frame
    }

    /// Cuts the IPv4 packet to its header plus `l4_bytes` (total length adjusted to match).
    pub fn truncate_l4(mut frame: Vec<u8>, l4_bytes: usize) -> Vec<u8> {
        let off = l3(&frame);
        let ihl = usize::from(frame[off] & 0x0f) * 4;
        frame.truncate(off + ihl + l4_bytes);
        total_length(frame, u16::try_from(ihl + l4_bytes).expect("small"))
    }

    /// Sets the TCP data offset (header length in words), checksum kept valid.
    pub fn tcp_data_offset(mut frame: Vec<u8>, words: u8) -> Vec<u8> {
        let off = l3(&frame);
        let l4 = off + usize::from(frame[off] & 0x0f) * 4;
        frame[l4 + 12] = (words << 4) | (frame[l4 + 12] & 0x0f);
        super::fix_checksums(&mut frame);
        frame
    }

    /// An IPv6 payload length (the frame itself unchanged).
    pub fn ipv6_payload_length(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
        let Some((off, true)) = l3_offset(&frame) else {
            panic!("an IPv6 frame")
        };
        frame[off + 4..off + 6].copy_from_slice(&len.to_be_bytes());
        frame
    }

    /// UDP without a checksum (checksum field 0, which UDP over IPv4 allows).
    pub fn no_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
        let off = l3(&frame);
        let l4 = off + usize::from(frame[off] & 0x0f) * 4;
        frame[l4 + 6..l4 + 8].fill(0);
        frame
    }

    /// Ethernet padding after the IPv4 packet (a short frame padded to 60 bytes, or trailer).
    pub fn pad(mut frame: Vec<u8>, bytes: usize) -> Vec<u8> {
        frame.extend(std::iter::repeat_n(0u8, bytes));
        frame
    }
}

/// One's-complement sum of `bytes` as big-endian 16-bit words (odd tail padded with zero).
fn ones_sum(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for word in &mut chunks {
        acc += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

fn set_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let end = (l3 + ihl.max(20)).min(frame.len());
    frame[l3 + 10..l3 + 12].fill(0);
    let sum = ones_sum(0, &frame[l3..end]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Where a frame's IP and TCP/UDP/SCTP headers are, as far as they are well-formed.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub l3: usize,
    pub v6: bool,
    /// IP header length (IPv6: with the skipped extension headers).
    pub ihl: usize,
    /// IP packet length (IPv4 total length; IPv6 40 + payload length).
    pub tot_len: usize,
    pub proto: u8,
    /// Offset of a complete L4 header inside the IP packet, for a non-fragment (whose
    /// checksum can be verified).
    pub l4: Option<usize>,
    /// Offset of a complete L4 header, also in a first fragment (ports, checksum field).
    pub l4_header: Option<usize>,
    /// A fragment after the first: no L4 header at all.
    pub later_fragment: bool,
}

impl Layout {
    /// Offsets of the source and destination addresses, and their length.
    #[must_use]
    pub fn addrs(&self) -> (usize, usize, usize) {
        if self.v6 {
            (self.l3 + 8, self.l3 + 24, 16)
        } else {
            (self.l3 + 12, self.l3 + 16, 4)
        }
    }

    /// Offset of the TTL / hop limit.
    #[must_use]
    pub fn ttl(&self) -> usize {
        self.l3 + if self.v6 { 7 } else { 8 }
    }

    /// Offset of the TCP/UDP checksum field (SCTP's CRC32c covers no address), also of a first
    /// fragment.
    #[must_use]
    pub fn l4_check(&self) -> Option<usize> {
        let l4 = self.l4_header?;
        match self.proto {
            6 => Some(l4 + 16),
            17 => Some(l4 + 6),
            1 | 58 => Some(l4 + 2),
            _ => None,
        }
    }
}

/// The layout as the datapath reads it (IPv6: up to two hop-by-hop/destination-options headers
/// skipped; other extension headers end the parse).
pub fn layout(frame: &[u8]) -> Option<Layout> {
    let (l3, v6) = l3_offset(frame)?;
    let (ihl, tot_len, proto, fragment) = if v6 {
        let ip = frame.get(l3..l3 + 40)?;
        let tot_len = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        if ip[0] >> 4 != 6 || l3 + tot_len > frame.len() {
            return None;
        }
        let (mut next, mut off) = (ip[6], 40);
        let mut fragment = None;
        for _ in 0..3 {
            if next == 44 && fragment.is_none() {
                let h = frame.get(l3 + off..l3 + off + 8)?;
                next = h[0];
                off += 8;
                let later = u16::from_be_bytes([h[2], h[3]]) >> 3 != 0;
                fragment = Some(later);
                if later {
                    break;
                }
                continue;
            }
            if next != 0 && next != 60 {
                break;
            }
            let ext = frame.get(l3 + off..l3 + off + 2)?;
            next = ext[0];
            off += (usize::from(ext[1]) + 1) * 8;
        }
        (off, tot_len, next, fragment)
    } else {
        let ip = frame.get(l3..l3 + 20)?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[0] >> 4 != 4 || ihl < 20 || tot_len < ihl || l3 + tot_len > frame.len() {
            return None;
        }
        let frags = u16::from_be_bytes([ip[6], ip[7]]);
        let fragment = (frags & 0x3fff != 0).then_some(frags & 0x1fff != 0);
        (ihl, tot_len, ip[9], fragment)
    };
    let l4_len = match proto {
        6 => 20,
        17 => 8,
        132 => 12,
        1 | 58 => 8,
        _ => usize::MAX,
    };
    let later_fragment = fragment == Some(true);
    let l4_header = (!later_fragment && tot_len >= ihl.saturating_add(l4_len)).then_some(l3 + ihl);
    Some(Layout {
        l3,
        v6,
        ihl,
        tot_len,
        proto,
        l4: l4_header.filter(|_| fragment.is_none()),
        l4_header,
        later_fragment,
    })
}

/// Whether the IPv4 header checksum and the TCP/UDP checksum (over the pseudo-header and the
/// segment up to the IP packet's end) or SCTP CRC32c verify; `None` where there is no such
/// field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksums {
    pub ipv4: Option<bool>,
    pub l4: Option<bool>,
}

/// The TCP/UDP pseudo-header sum of a layout (addresses, protocol, segment length).
fn pseudo_sum(frame: &[u8], l: &Layout, segment_len: usize) -> u32 {
    let (src, _, len) = l.addrs();
    let addrs = &frame[src..src + 2 * len];
    let mut tail = [0u8; 8];
    tail[3] = l.proto;
    tail[4..].copy_from_slice(&(segment_len as u32).to_be_bytes());
    ones_sum(ones_sum(0, addrs), &tail)
}

pub fn checksums(frame: &[u8]) -> Checksums {
    let Some(l) = layout(frame) else {
        return Checksums { ipv4: None, l4: None };
    };
    let ipv4 = (!l.v6).then(|| ones_sum(0, &frame[l.l3..l.l3 + l.ihl]) == 0xffff);
    let l4 = l.l4.map(|l4| {
        let segment = &frame[l4..l.l3 + l.tot_len];
        match l.proto {
            132 => sctp_crc_ok(segment),
            // ICMP: over the message alone; ICMPv6 also over the pseudo-header.
            1 => ones_sum(0, segment) == 0xffff,
            17 if segment[6..8] == [0, 0] => true, // UDP without a checksum
            _ => ones_sum(pseudo_sum(frame, &l, segment.len()), segment) == 0xffff,
        }
    });
    Checksums { ipv4, l4 }
}

/// Makes every checksum of a frame valid (used by the fuzzer to produce well-formed inputs).
pub fn fix_checksums(frame: &mut [u8]) {
    let Some(l) = layout(frame) else { return };
    if !l.v6 {
        set_ipv4_checksum(frame, l.l3);
    }
    let Some(l4) = l.l4 else { return };
    let end = l.l3 + l.tot_len;
    if l.proto == 132 {
        let crc = sctp_checksum(&frame[l4..end]);
        frame[l4 + 8..l4 + 12].copy_from_slice(&crc);
        return;
    }
    let check = l.l4_check().expect("TCP, UDP, ICMP or ICMPv6");
    frame[check..check + 2].fill(0);
    let pseudo = if l.proto == 1 {
        0
    } else {
        pseudo_sum(frame, &l, end - l4)
    };
    let sum = ones_sum(pseudo, &frame[l4..end]);
    let mut csum = !(sum as u16);
    if l.proto == 17 && csum == 0 {
        csum = 0xffff;
    }
    frame[check..check + 2].copy_from_slice(&csum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_mutations_break_only_what_they_name() {
        let c = (Ipv4Addr::new(198, 18, 0, 2), 40000);
        let h = (Ipv4Addr::new(198, 18, 0, 1), 8080);
        for frame in [
            Frame::tcp(c, h, SYN).build(),
            Frame::udp(c, h).payload(33).vlan(5).build(),
            Frame::tcp(c, h, ACK).ihl(15).payload(10).build(),
            Frame::udp((Ipv6Addr::LOCALHOST, 1), (Ipv6Addr::LOCALHOST, 2))
                .payload(7)
                .build(),
            Frame::tcp((Ipv6Addr::LOCALHOST, 1), (Ipv6Addr::LOCALHOST, 2), SYN)
                .hop_by_hop(16)
                .build(),
            Frame::sctp(c, h).payload(5).build(),
        ] {
            let valid = Checksums {
                ipv4: l3_offset(&frame).is_some_and(|(_, v6)| !v6).then_some(true),
                l4: Some(true),
            };
            assert_eq!(checksums(&frame), valid);
            let mut broken = frame.clone();
            let last = broken.len() - 2;
            broken[last] ^= 0x40;
            assert_eq!(checksums(&broken).l4, Some(false));
            fix_checksums(&mut broken);
            assert_eq!(checksums(&broken), valid);
        }
    }
}
