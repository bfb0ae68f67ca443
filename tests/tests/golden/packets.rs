//! Fixture packets: described by a [`Frame`] and serialised by etherparse's `PacketBuilder`
//! (which computes every length and checksum from scratch), plus named mutations for the
//! malformed cases a builder refuses to produce, and an independent checksum checker.

use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions,
    Ipv4Header, Ipv4Options, PacketBuilder, VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x02];
pub const HOST_CLIENT_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x01];
pub const HOST_BACKEND_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const HOST_BACKEND2_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const BACKEND2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];

/// (destination, source) MACs of a frame the host redirects to a backend it has a neighbour
/// entry for.
pub fn backend_macs(backend: Ipv4Addr) -> Option<([u8; 6], [u8; 6])> {
    match backend.octets() {
        [198, 18, 1, 2] => Some((BACKEND_MAC, HOST_BACKEND_SIDE_MAC)),
        [198, 18, 2, 2] => Some((BACKEND2_MAC, HOST_BACKEND2_SIDE_MAC)),
        _ => None,
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
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
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

/// An Ethernet / IPv4 / L4 frame as a fixture row describes it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    pub fragment: Fragment,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: HOST_CLIENT_SIDE_MAC,
            vlan: None,
            src,
            dst,
            ttl: 64,
            options: Vec::new(),
            fragment: Fragment::Whole,
            l4,
            payload: Vec::new(),
        }
    }

    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        let l4 = L4::Tcp {
            sport: src.1,
            dport: dst.1,
            flags,
        };
        Self::new(src.0, dst.0, l4)
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self::new(
            src.0,
            dst.0,
            L4::Udp {
                sport: src.1,
                dport: dst.1,
            },
        )
    }

    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::new(src, dst, L4::IcmpEcho)
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
    pub fn dnat(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.dst = addr;
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::IcmpEcho => {}
        }
        self
    }

    /// The same frame with its source rewritten (the reply's reverse NAT).
    pub fn snat(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.src = addr;
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
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

    pub fn build(&self) -> Vec<u8> {
        let mut ip = Ipv4Header::new(0, self.ttl, IpNumber::TCP, self.src.octets(), self.dst.octets())
            .expect("empty payload fits");
        ip.identification = 0x1234;
        ip.options = Ipv4Options::try_from(self.options.as_slice()).expect("options: multiple of 4, <= 40");
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
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let headers = IpHeaders::Ipv4(ip, Ipv4Extensions::default());
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
        out
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

/// A TCP SYN over IPv6 (fd00::/8) to `dport`.
pub fn ipv6_tcp_syn(dport: u16) -> Vec<u8> {
    let src = "fd00::2".parse::<std::net::Ipv6Addr>().expect("address").octets();
    let dst = "fd00::1".parse::<std::net::Ipv6Addr>().expect("address").octets();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, HOST_CLIENT_SIDE_MAC)
        .ipv6(src, dst, 64)
        .tcp(40000, dport, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("buildable");
    out
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

/// Offset of the IPv4 header in a frame with at most one 802.1Q tag (`None`: not IPv4).
pub fn l3_offset(frame: &[u8]) -> Option<usize> {
    let ether_type = |off: usize| frame.get(off..off + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match ether_type(12)? {
        0x0800 => Some(ETH_LEN),
        0x8100 if ether_type(16)? == 0x0800 => Some(ETH_LEN + VLAN_LEN),
        _ => None,
    }
}

/// Named mutations for what no builder produces. Each keeps the IPv4 header checksum valid, so
/// the only thing wrong with the frame is the named defect.
pub mod mutate {
    use super::{l3_offset, set_ipv4_checksum};

    fn l3(frame: &[u8]) -> usize {
        l3_offset(frame).expect("an IPv4 frame")
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

/// Where a frame's IPv4 and TCP/UDP headers are, as far as they are well-formed.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub l3: usize,
    pub ihl: usize,
    pub tot_len: usize,
    pub proto: u8,
    /// Offset of a complete TCP/UDP header inside the IPv4 total length, for a non-fragment.
    pub l4: Option<usize>,
}

pub fn layout(frame: &[u8]) -> Option<Layout> {
    let l3 = l3_offset(frame)?;
    let ip = frame.get(l3..l3 + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || tot_len < ihl || l3 + tot_len > frame.len() {
        return None;
    }
    let proto = ip[9];
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let l4_len = match proto {
        6 => 20,
        17 => 8,
        _ => usize::MAX,
    };
    let l4 = (!fragment && tot_len >= ihl.saturating_add(l4_len)).then_some(l3 + ihl);
    Some(Layout {
        l3,
        ihl,
        tot_len,
        proto,
        l4,
    })
}

/// Whether the IPv4 header checksum and the TCP/UDP checksum (over the pseudo-header and the
/// segment up to the IPv4 total length) verify; `None` where there is no such header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksums {
    pub ipv4: Option<bool>,
    pub l4: Option<bool>,
}

pub fn checksums(frame: &[u8]) -> Checksums {
    let Some(l) = layout(frame) else {
        return Checksums { ipv4: None, l4: None };
    };
    let ipv4 = Some(ones_sum(0, &frame[l.l3..l.l3 + l.ihl]) == 0xffff);
    let l4 = l.l4.map(|l4| {
        let segment = &frame[l4..l.l3 + l.tot_len];
        if l.proto == 17 && segment[6..8] == [0, 0] {
            return true; // UDP over IPv4 without a checksum
        }
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&frame[l.l3 + 12..l.l3 + 20]);
        pseudo[9] = l.proto;
        pseudo[10..].copy_from_slice(&(segment.len() as u16).to_be_bytes());
        ones_sum(ones_sum(0, &pseudo), segment) == 0xffff
    });
    Checksums { ipv4, l4 }
}

/// Makes every checksum of a frame valid (used by the fuzzer to produce well-formed inputs).
pub fn fix_checksums(frame: &mut [u8]) {
    let Some(l) = layout(frame) else { return };
    set_ipv4_checksum(frame, l.l3);
    let Some(l4) = l.l4 else { return };
    let check = l4 + if l.proto == 6 { 16 } else { 6 };
    frame[check..check + 2].fill(0);
    let segment_len = l.l3 + l.tot_len - l4;
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&frame[l.l3 + 12..l.l3 + 20]);
    pseudo[9] = l.proto;
    pseudo[10..].copy_from_slice(&(segment_len as u16).to_be_bytes());
    let sum = ones_sum(ones_sum(0, &pseudo), &frame[l4..l4 + segment_len]);
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
        ] {
            let valid = Checksums {
                ipv4: Some(true),
                l4: Some(true),
            };
            assert_eq!(checksums(&frame), valid);
            let mut broken = frame.clone();
            let last = broken.len() - 1;
            broken[last] ^= 0x40;
            assert_eq!(checksums(&broken).l4, Some(false));
            fix_checksums(&mut broken);
            assert_eq!(checksums(&broken), valid);
        }
    }
}
