//! The fixture table. A row: what it shows, the hooks it runs on, packets that set up conntrack
//! first, the input, the counter it must be recorded under (which fixes the verdict, see
//! `expected_action`), the exact output frame, and the conntrack table it leaves.
//! Adding a case is adding a row to `rows()`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use portmap::{datapath::Hook, model::maglev};
use portmap_common::{
    FLOW_F_ASSURED, FLOW_F_REPLIED, MappingCounters, Stat, addr_words, close_marks, flow_hash, maglev_slot,
};

use crate::{
    BACKEND, BACKEND6, CLIENT, CLIENT6, FlowEntry, Golden, HOST, HOST6, describe_counts, diff, expect,
    expected_action, outcome,
    packets::{
        ACK, BACKEND_MAC, CLIENT_MAC, FIN, Fragment, Frame, HOST_BACKEND_SIDE_MAC, HOST_CLIENT_SIDE_MAC,
        IcmpError, PSH, RST, SYN, arp_request, checksums, icmp_error, icmpv6_echo, ip_packet, l3_offset,
        mutate, qinq_udp,
    },
};

mod allow_rows;

pub const INGRESS: &[Hook] = &[Hook::XdpIngress, Hook::TcIngress];
pub const EGRESS: &[Hook] = &[Hook::TcEgress];
pub const FROM_BACKEND: &[Hook] = &[Hook::TcFromBackend];

/// The largest frame an XDP program without multi-buffer support sees whole: a 4 KiB page less
/// XDP headroom and `skb_shared_info`. Drivers refuse such programs at larger MTUs.
const XDP_MAX_FRAME: usize = 3_520;
/// The largest frame `BPF_PROG_TEST_RUN` builds an skb from (one page less skb headroom and
/// `skb_shared_info`). Larger frames reach TC as non-linear skbs, which `pull_headers` handles;
/// the end-to-end jumbo test covers those.
pub const TC_MAX_FRAME: usize = 3_712;

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
const CLIENT_PORT: u16 = 40_000;

pub struct Row {
    pub name: String,
    pub hooks: &'static [Hook],
    /// Run through TC ingress first (they must be forwarded), e.g. to establish a flow.
    /// Packets run first, each on its hook (ingress packets must be forwarded, by a redirect or the kernel; egress ones
    /// reverse-NATed).
    pub setup: Vec<(Hook, Vec<u8>)>,
    pub input: Vec<u8>,
    pub stat: Stat,
    pub new_flow: bool,
    /// Event counters the input moves besides its outcome and `flow_new` (each by one).
    pub events: Vec<Stat>,
    /// The stats slot of the mapping whose counters the input moves: one packet of the input's
    /// L3 length in the outcome's direction (`reply_nat`: reply, else forward), and the new flow.
    pub through: Option<u32>,
    pub output: Vec<u8>,
    pub flows: Vec<FlowEntry>,
    /// The stats slot of the mapping whose allow-list refuses the input (`PM_MAPPING_DENIED`).
    pub denied_by: Option<u32>,
}

impl Row {
    /// A row whose input must leave untouched, creating no flow.
    fn untouched(name: &str, hooks: &'static [Hook], input: Vec<u8>, stat: Stat) -> Self {
        Self {
            name: name.to_string(),
            hooks,
            setup: Vec::new(),
            output: input.clone(),
            input,
            stat,
            new_flow: false,
            events: Vec::new(),
            through: None,
            flows: Vec::new(),
            denied_by: None,
        }
    }

    /// A row whose input is rewritten to `output`.
    fn rewritten(name: &str, hooks: &'static [Hook], input: Vec<u8>, stat: Stat, output: Vec<u8>) -> Self {
        Self {
            output,
            ..Self::untouched(name, hooks, input, stat)
        }
    }

    /// Setup packets from the client (TC ingress).
    fn after(mut self, setup: Vec<Vec<u8>>) -> Self {
        self.setup = setup.into_iter().map(|p| (Hook::TcIngress, p)).collect();
        self
    }

    /// Setup packets both ways: from the client (TC ingress) and from the backend (TC egress).
    fn after_exchange(mut self, setup: Vec<(Hook, Vec<u8>)>) -> Self {
        self.setup = setup;
        self
    }

    /// The row creates a flow and leaves exactly `flows` behind.
    fn new_flow(mut self, flows: Vec<FlowEntry>) -> Self {
        self.new_flow = true;
        self.flows = flows;
        self
    }

    /// The row leaves exactly `flows` behind (created by its setup).
    fn leaves(mut self, flows: Vec<FlowEntry>) -> Self {
        self.flows = flows;
        self
    }

    /// The input is counted by the mapping with stats slot `slot` (its index in `MAPPINGS`).
    fn through(mut self, slot: u32) -> Self {
        self.through = Some(slot);
        self
    }

    /// The allow-list of the mapping with stats slot `slot` refuses the input.
    fn denied_by(mut self, slot: u32) -> Self {
        self.denied_by = Some(slot);
        self
    }

    /// The input also moves the event counter `stat`.
    fn also(mut self, stat: Stat) -> Self {
        self.events.push(stat);
        self
    }

    /// Every global counter the input moves, by `Stat` code: its outcome, the new flow, the events.
    fn global_counts(&self) -> Vec<u64> {
        let mut counts = vec![0; Stat::COUNT];
        let moved = [self.stat]
            .into_iter()
            .chain(self.new_flow.then_some(Stat::FlowNew))
            .chain(self.events.iter().copied());
        for stat in moved {
            counts[stat.code() as usize] += 1;
        }
        counts
    }

    /// The mapping counters the input moves (none without `through`).
    fn mapping_counts(&self) -> Vec<(u32, MappingCounters)> {
        let Some(slot) = self.through else {
            return Vec::new();
        };
        let bytes = l3_length(&self.input);
        let mut moved = MappingCounters {
            flows: u64::from(self.new_flow),
            ..MappingCounters::default()
        };
        if matches!(self.stat, Stat::ReplyNat | Stat::ReplyRedirect) {
            (moved.reply_packets, moved.reply_bytes) = (1, bytes);
        } else {
            (moved.fwd_packets, moved.fwd_bytes) = (1, bytes);
        }
        vec![(slot, moved)]
    }
}

/// The L3 length of a frame as its IP header states it (IPv4 total length, IPv6 payload length
/// plus the fixed header): what the mapping counters count, Ethernet padding excluded.
fn l3_length(frame: &[u8]) -> u64 {
    let Some((l3, v6)) = l3_offset(frame) else {
        return 0;
    };
    let field = |at: usize| u64::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    if v6 { 40 + field(l3 + 4) } else { field(l3 + 2) }
}

/// One flow's two conntrack entries, as `conntrack::create` records them.
struct Flow {
    proto: u8,
    client: (IpAddr, u16),
    host: (IpAddr, u16),
    backend: (IpAddr, u16),
    slot: u32,
    /// `FLOW_F_CLOSING` and `FLOW_F_RESET` marks of each entry (a FIN's or a RST's).
    close_forward: u8,
    close_reply: u8,
    /// The backend answered (`FLOW_F_REPLIED` on both entries, kept when assured).
    replied: bool,
    assured: bool,
}

impl Flow {
    fn new(
        proto: u8,
        client: (impl Into<IpAddr>, u16),
        host: (impl Into<IpAddr>, u16),
        backend: (impl Into<IpAddr>, u16),
        slot: u32,
    ) -> Self {
        Self {
            proto,
            client: (client.0.into(), client.1),
            host: (host.0.into(), host.1),
            backend: (backend.0.into(), backend.1),
            slot,
            close_forward: 0,
            replied: false,
            assured: false,
            close_reply: 0,
        }
    }

    fn tcp(host_port: u16, backend: (Ipv4Addr, u16), slot: u32) -> Self {
        Self {
            proto: 6,
            client: (CLIENT.into(), CLIENT_PORT),
            host: (HOST.into(), host_port),
            backend: (backend.0.into(), backend.1),
            slot,
            close_forward: 0,
            close_reply: 0,
            replied: false,
            assured: false,
        }
    }

    /// The flow of mapping 0 (8080/tcp → backend:80).
    fn web() -> Self {
        Self::tcp(TCP_PORT, (BACKEND, 80), 0)
    }

    /// The flow of mapping 1 (8081/udp → backend:81).
    fn dns() -> Self {
        Self {
            proto: 17,
            ..Self::tcp(UDP_PORT, (BACKEND, 81), 1)
        }
    }

    /// The client sent a FIN.
    fn closing_forward(mut self) -> Self {
        self.close_forward = close_marks(FIN);
        self
    }

    /// The backend sent a FIN.
    fn closing_reply(mut self) -> Self {
        self.close_reply = close_marks(FIN);
        self
    }

    /// The client sent a RST.
    fn reset_forward(mut self) -> Self {
        self.close_forward = close_marks(RST);
        self
    }

    /// The backend sent a RST.
    fn reset_reply(mut self) -> Self {
        self.close_reply = close_marks(RST);
        self
    }

    fn replied(mut self) -> Self {
        self.replied = true;
        self
    }

    /// Assured: the backend answered and the client's next packet copied it to `PM_CONNTRACK`
    /// (the entries keep their replied mark, and both copies carry `FLOW_F_ASSURED`).
    fn assured(mut self) -> Self {
        self.assured = true;
        self.replied = true;
        self
    }

    /// The flow's entries: an assured flow's twice, in `PM_CONNTRACK` and cached in `PM_CT_NEW`.
    fn entries(self) -> Vec<FlowEntry> {
        let marks =
            if self.replied { FLOW_F_REPLIED } else { 0 } | if self.assured { FLOW_F_ASSURED } else { 0 };
        let mut entries = vec![
            FlowEntry {
                src: self.client,
                dst: self.host,
                proto: self.proto,
                nat: self.backend,
                forward: true,
                flags: self.close_forward | marks,
                stats_slot: self.slot,
                assured: self.assured,
            },
            FlowEntry {
                src: self.backend,
                dst: self.client,
                proto: self.proto,
                nat: self.host,
                forward: false,
                flags: self.close_reply | marks,
                stats_slot: self.slot,
                assured: self.assured,
            },
        ];
        if self.assured {
            let cached: Vec<FlowEntry> = entries
                .iter()
                .map(|e| FlowEntry {
                    assured: false,
                    ..e.clone()
                })
                .collect();
            entries.extend(cached);
        }
        entries.sort();
        entries
    }
}

fn client() -> (Ipv4Addr, u16) {
    (CLIENT, CLIENT_PORT)
}

fn to_host(port: u16) -> (Ipv4Addr, u16) {
    (HOST, port)
}

fn from_backend(port: u16) -> (Ipv4Addr, u16) {
    (BACKEND, port)
}

/// A client's TCP segment to the published 8080.
fn web(flags: u8) -> Frame {
    Frame::tcp(client(), to_host(TCP_PORT), flags)
}

/// The same segment as it must reach the backend.
fn web_at_backend(frame: Frame) -> Vec<u8> {
    frame.dnat(BACKEND, 80).routed_to_backend().build()
}

/// The backend's answer to `dns()`.
fn dns_reply_frame() -> Frame {
    Frame::udp((BACKEND, 81), client()).sent_by_backend().payload(64)
}

fn dns() -> Frame {
    Frame::udp(client(), to_host(UDP_PORT)).payload(64)
}

#[allow(clippy::too_many_lines)] // a table
pub fn rows() -> Vec<Row> {
    let syn = web(SYN).build();
    let fin = web(FIN | ACK).build();
    let syn_ack = Frame::tcp(from_backend(80), client(), SYN | ACK)
        .sent_by_backend()
        .build();
    let dns_reply = Frame::udp((BACKEND, 81), client())
        .sent_by_backend()
        .payload(64)
        .build();
    let mut rows = vec![
        // --- TCP, forward path
        Row::rewritten(
            "tcp SYN to a published port: destination rewritten to the backend, routed (TTL, MACs) and redirected",
            INGRESS,
            syn.clone(),
            Stat::FwdRedirect,
            web_at_backend(web(SYN)),
        )
        .new_flow(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "tcp ACK with data on an established flow: same rewrite, no new flow",
            INGRESS,
            web(ACK | PSH).payload(100).build(),
            Stat::FwdRedirect,
            web_at_backend(web(ACK | PSH).payload(100)),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "tcp FIN on an established flow: rewritten, flow marked closing",
            INGRESS,
            fin.clone(),
            Stat::FwdRedirect,
            web_at_backend(web(FIN | ACK)),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().closing_forward().entries())
        .through(0),
        Row::rewritten(
            "tcp RST on an established flow: rewritten, flow marked closing and reset",
            INGRESS,
            web(RST).build(),
            Stat::FwdRedirect,
            web_at_backend(web(RST)),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().reset_forward().entries())
        .through(0),
        Row::rewritten(
            "tcp SYN reusing the 5-tuple of a closing flow: a fresh flow (its entries reopened in place)",
            INGRESS,
            syn.clone(),
            Stat::FwdRedirect,
            web_at_backend(web(SYN)),
        )
        .after(vec![syn.clone(), fin.clone()])
        .new_flow(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "tcp SYN reusing the 5-tuple of an assured flow the client reset: a fresh flow, not assured, its copies gone from the store",
            INGRESS,
            syn.clone(),
            Stat::FwdRedirect,
            web_at_backend(web(SYN)),
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (Hook::TcEgress, syn_ack.clone()),
            (Hook::TcIngress, web(ACK).build()),
            (Hook::TcIngress, web(RST).build()),
        ])
        .new_flow(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "tcp SYN that is the first packet of a flow closing at once (SYN|FIN): flow created closing",
            INGRESS,
            web(SYN | FIN).build(),
            Stat::FwdRedirect,
            web_at_backend(web(SYN | FIN)),
        )
        .new_flow(Flow::web().closing_forward().entries())
        .through(0),
        // --- TCP, reply path
        Row::rewritten(
            "tcp SYN-ACK from the backend: source restored to the published address and port",
            EGRESS,
            Frame::tcp(from_backend(80), client(), SYN | ACK).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::tcp(from_backend(80), client(), SYN | ACK)
                .sent_by_backend()
                .snat(HOST, TCP_PORT)
                .build(),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().replied().entries())
        .through(0),
        // --- assured flows (PM_CONNTRACK) and flows not assured yet (PM_CT_NEW)
        Row::rewritten(
            "tcp handshake ACK after the backend's SYN-ACK: the flow becomes assured",
            INGRESS,
            web(ACK).build(),
            Stat::FwdRedirect,
            web(ACK).dnat(BACKEND, 80).routed_to_backend().build(),
        )
        .after_exchange(vec![(Hook::TcIngress, syn.clone()), (Hook::TcEgress, syn_ack.clone())])
        .leaves(Flow::web().assured().entries())
        .through(0)
        .also(Stat::FlowAssured),
        Row::rewritten(
            "tcp SYN again after the backend's SYN-ACK (a retransmission): not assured",
            INGRESS,
            web(SYN).build(),
            Stat::FwdRedirect,
            web(SYN).dnat(BACKEND, 80).routed_to_backend().build(),
        )
        .after_exchange(vec![(Hook::TcIngress, syn.clone()), (Hook::TcEgress, syn_ack.clone())])
        .leaves(Flow::web().replied().entries())
        .through(0),
        Row::rewritten(
            "tcp ACK with no answer from the backend yet: not assured",
            INGRESS,
            web(ACK).build(),
            Stat::FwdRedirect,
            web(ACK).dnat(BACKEND, 80).routed_to_backend().build(),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "udp request after the backend's reply: the flow becomes assured",
            INGRESS,
            dns().build(),
            Stat::FwdRedirect,
            dns().dnat(BACKEND, 81).routed_to_backend().build(),
        )
        .after_exchange(vec![(Hook::TcIngress, dns().build()), (Hook::TcEgress, dns_reply.clone())])
        .leaves(Flow::dns().assured().entries())
        .through(1)
        .also(Stat::FlowAssured),
        Row::rewritten(
            "tcp FIN from the client on an assured flow: forwarded, its forward entry closing in both tables",
            INGRESS,
            web(FIN | ACK).build(),
            Stat::FwdRedirect,
            web(FIN | ACK).dnat(BACKEND, 80).routed_to_backend().build(),
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (Hook::TcEgress, syn_ack.clone()),
            (Hook::TcIngress, web(ACK).build()),
        ])
        .leaves(Flow::web().assured().closing_forward().entries())
        .through(0),
        Row::rewritten(
            "tcp data from the backend on an assured flow: restored",
            EGRESS,
            Frame::tcp(from_backend(80), client(), ACK).sent_by_backend().payload(10).build(),
            Stat::ReplyNat,
            Frame::tcp(from_backend(80), client(), ACK)
                .sent_by_backend()
                .payload(10)
                .snat(HOST, TCP_PORT)
                .build(),
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (Hook::TcEgress, syn_ack.clone()),
            (Hook::TcIngress, web(ACK).build()),
        ])
        .leaves(Flow::web().assured().entries())
        .through(0),
        Row::rewritten(
            "tcp RST from the backend: restored, reply entry marked closing and reset",
            EGRESS,
            Frame::tcp(from_backend(80), client(), RST | ACK).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::tcp(from_backend(80), client(), RST | ACK)
                .sent_by_backend()
                .snat(HOST, TCP_PORT)
                .build(),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().reset_reply().replied().entries())
        .through(0),
        Row::untouched(
            "tcp from a backend address with no flow: untouched",
            EGRESS,
            Frame::tcp(from_backend(80), client(), SYN | ACK).sent_by_backend().build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "a backend's reply arriving on ingress: not a forward entry, untouched",
            INGRESS,
            Frame::tcp(from_backend(80), client(), ACK).build(),
            Stat::PassNoMapping,
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries()),
        // --- UDP
        Row::rewritten(
            "udp with a checksum to a port bound on every address: rewritten and redirected",
            INGRESS,
            dns().build(),
            Stat::FwdRedirect,
            dns().dnat(BACKEND, 81).routed_to_backend().build(),
        )
        .new_flow(Flow::dns().entries())
        .through(1),
        Row::rewritten(
            "udp with a checksum to another address of the host, same wildcard port: mapped",
            INGRESS,
            Frame::udp(client(), (Ipv4Addr::new(198, 18, 0, 77), UDP_PORT)).build(),
            Stat::FwdRedirect,
            Frame::udp(client(), (Ipv4Addr::new(198, 18, 0, 77), UDP_PORT))
                .dnat(BACKEND, 81)
                .routed_to_backend()
                .build(),
        )
        .new_flow(
            Flow {
                host: (Ipv4Addr::new(198, 18, 0, 77).into(), UDP_PORT),
                ..Flow::dns()
            }
            .entries(),
        )
        .through(1),
        Row::rewritten(
            "udp with checksum 0 (none): rewritten, checksum stays 0",
            INGRESS,
            mutate::no_udp_checksum(dns().build()),
            Stat::FwdRedirect,
            mutate::no_udp_checksum(dns().dnat(BACKEND, 81).routed_to_backend().build()),
        )
        .new_flow(Flow::dns().entries())
        .through(1),
        Row::rewritten(
            "udp reply with a checksum: source restored",
            EGRESS,
            Frame::udp(from_backend(81), client()).payload(20).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::udp(from_backend(81), client())
                .payload(20)
                .sent_by_backend()
                .snat(HOST, UDP_PORT)
                .build(),
        )
        .after(vec![dns().build()])
        .leaves(Flow::dns().replied().entries())
        .through(1),
        Row::rewritten(
            "udp reply with checksum 0: source restored, checksum stays 0",
            EGRESS,
            mutate::no_udp_checksum(Frame::udp(from_backend(81), client()).sent_by_backend().build()),
            Stat::ReplyNat,
            mutate::no_udp_checksum(
                Frame::udp(from_backend(81), client())
                    .sent_by_backend()
                    .snat(HOST, UDP_PORT)
                    .build(),
            ),
        )
        .after(vec![dns().build()])
        .leaves(Flow::dns().replied().entries())
        .through(1),
        // --- what portmap leaves alone
        Row::untouched(
            "udp to an address that is not the host's (transit), wildcard port: not mapped, untouched",
            INGRESS,
            Frame::udp(client(), (Ipv4Addr::new(198, 18, 2, 2), UDP_PORT)).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "ipv6 udp to an address that is not the host's (transit), wildcard port: untouched",
            INGRESS,
            Frame::udp((CLIENT6, CLIENT_PORT), (BACKEND6, UDP_PORT)).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "tcp from the wire to 127.0.0.1 on a loopback-bound mapping: never mapped (moby#45610)",
            INGRESS,
            Frame::tcp(client(), (Ipv4Addr::LOCALHOST, 8086), SYN).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "udp from the wire to 127.0.0.1 on a wildcard port: never mapped",
            INGRESS,
            Frame::udp(client(), (Ipv4Addr::LOCALHOST, UDP_PORT)).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "ipv6 udp from the wire to ::1 on a wildcard port: never mapped",
            INGRESS,
            Frame::udp((CLIENT6, CLIENT_PORT), (std::net::Ipv6Addr::LOCALHOST, UDP_PORT)).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "ARP request for the host address: not ours, untouched",
            INGRESS,
            arp_request(CLIENT, HOST),
            Stat::PassNotOurs,
        ),
        Row::untouched(
            "QinQ (two 802.1Q tags): not ours, untouched",
            INGRESS,
            qinq_udp(client(), to_host(UDP_PORT)),
            Stat::PassNotOurs,
        ),
        Row::untouched(
            "ICMP echo request to the host address: untouched",
            INGRESS,
            Frame::icmp_echo(CLIENT, HOST).payload(56).build(),
            Stat::PassNotOurs,
        ),
        Row::untouched(
            "tcp to an unmapped port: untouched",
            INGRESS,
            Frame::tcp(client(), to_host(9999), SYN).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "tcp to the published port on another address (mapping bound to 198.18.0.1): untouched",
            INGRESS,
            Frame::tcp(client(), (Ipv4Addr::new(198, 18, 0, 77), TCP_PORT), SYN).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "udp to the published tcp port: untouched",
            INGRESS,
            Frame::udp(client(), to_host(TCP_PORT)).build(),
            Stat::PassNoMapping,
        ),
        // --- fragments: the first carries the ports, the rest find the flow through it
        Row::rewritten(
            "udp first fragment (MF set, offset 0): translated like a whole datagram",
            INGRESS,
            dns().fragment(Fragment::First).build(),
            Stat::FwdRedirect,
            dns()
                .fragment(Fragment::First)
                .dnat(BACKEND, 81)
                .routed_to_backend()
                .build(),
        )
        .new_flow(Flow::dns().entries())
        .through(1),
        Row::rewritten(
            "udp later fragment after its first: destination address rewritten, payload untouched",
            INGRESS,
            dns().fragment(Fragment::Later).build(),
            Stat::FwdRedirect,
            mutate::fragment_forwarded(dns().fragment(Fragment::Later).build(), BACKEND.into()),
        )
        .after(vec![dns().fragment(Fragment::First).build()])
        .leaves(Flow::dns().entries())
        .through(1),
        Row::untouched(
            "udp later fragment without its first (out of order): left to the kernel, untouched",
            INGRESS,
            dns().fragment(Fragment::Later).build(),
            Stat::PassFragment,
        ),
        Row::rewritten(
            "udp reply first fragment from the backend: source restored",
            EGRESS,
            dns_reply_frame().fragment(Fragment::First).build(),
            Stat::ReplyNat,
            dns_reply_frame()
                .fragment(Fragment::First)
                .snat(HOST, UDP_PORT)
                .build(),
        )
        .after(vec![dns().build()])
        .leaves(Flow::dns().replied().entries())
        .through(1),
        Row::rewritten(
            "udp reply later fragment after its first: source address restored, payload untouched",
            EGRESS,
            dns_reply_frame().fragment(Fragment::Later).build(),
            Stat::ReplyNat,
            mutate::fragment_addresses(
                dns_reply_frame().fragment(Fragment::Later).build(),
                Some(HOST.into()),
                None,
            ),
        )
        .after_exchange(vec![
            (Hook::TcIngress, dns().build()),
            (
                Hook::TcEgress,
                dns_reply_frame().fragment(Fragment::First).build(),
            ),
        ])
        .leaves(Flow::dns().replied().entries())
        .through(1),
        // --- ICMP errors about flows: the embedded packet and the outer address translated
        Row::rewritten(
            "ICMP port unreachable from the backend about a client's datagram: embedded packet and source restored",
            EGRESS,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (BACKEND.into(), CLIENT.into()),
                63,
                IcmpError::PortUnreachable,
                &ip_packet(&dns().ttl(63).dnat(BACKEND, 81).build()),
            ),
            Stat::ReplyNat,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (HOST.into(), CLIENT.into()),
                63,
                IcmpError::PortUnreachable,
                &ip_packet(&dns().ttl(63).build()),
            ),
        )
        .after(vec![dns().build()])
        .leaves(Flow::dns().entries())
        .through(1)
        .also(Stat::IcmpErrorNat),
        Row::rewritten(
            "ICMP fragmentation needed from the host's own forwarding: embedded restored, outer source kept",
            EGRESS,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (HOST.into(), CLIENT.into()),
                64,
                IcmpError::TooBig(1400),
                &ip_packet(&web(ACK).payload(1460).dnat(BACKEND, 80).build())[..548],
            ),
            Stat::ReplyNat,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (HOST.into(), CLIENT.into()),
                64,
                IcmpError::TooBig(1400),
                &ip_packet(&web(ACK).payload(1460).build())[..548],
            ),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries())
        .through(0)
        .also(Stat::IcmpErrorNat),
        Row::rewritten(
            "ICMP time exceeded carrying only 8 bytes of TCP (no checksum): embedded addresses and port restored",
            EGRESS,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (Ipv4Addr::new(198, 18, 1, 1).into(), CLIENT.into()),
                64,
                IcmpError::TimeExceeded,
                &ip_packet(&web(SYN).ttl(1).dnat(BACKEND, 80).build())[..28],
            ),
            Stat::ReplyNat,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (Ipv4Addr::new(198, 18, 1, 1).into(), CLIENT.into()),
                64,
                IcmpError::TimeExceeded,
                &ip_packet(&web(SYN).ttl(1).build())[..28],
            ),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries())
        .through(0)
        .also(Stat::IcmpErrorNat),
        Row::rewritten(
            "ICMP port unreachable from the client about a backend's reply: embedded source and destination translated, forwarded",
            INGRESS,
            icmp_error(
                (HOST_CLIENT_SIDE_MAC, CLIENT_MAC),
                (CLIENT.into(), HOST.into()),
                64,
                IcmpError::PortUnreachable,
                &ip_packet(&dns_reply_frame().snat(HOST, UDP_PORT).build()),
            ),
            Stat::FwdRedirect,
            icmp_error(
                (BACKEND_MAC, HOST_BACKEND_SIDE_MAC),
                (CLIENT.into(), BACKEND.into()),
                63,
                IcmpError::PortUnreachable,
                &ip_packet(&dns_reply_frame().build()),
            ),
        )
        .after(vec![dns().build()])
        .leaves(Flow::dns().entries())
        .through(1)
        .also(Stat::IcmpErrorNat),
        Row::untouched(
            "ICMP port unreachable about no flow: untouched",
            EGRESS,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (BACKEND.into(), CLIENT.into()),
                63,
                IcmpError::PortUnreachable,
                &ip_packet(&dns().ttl(63).dnat(BACKEND, 81).build()),
            ),
            Stat::PassNoMapping,
        ),
        // --- forwarding decisions
        Row::rewritten(
            "802.1Q-tagged SYN: rewritten, handed to the kernel (the VLAN device forwards it)",
            INGRESS,
            web(SYN).vlan(100).build(),
            Stat::FwdStack,
            web(SYN).vlan(100).dnat(BACKEND, 80).build(),
        )
        .new_flow(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "TTL 1: rewritten, handed to the kernel, which answers Time Exceeded as for any DNAT",
            INGRESS,
            web(SYN).ttl(1).build(),
            Stat::FwdStack,
            web(SYN).ttl(1).dnat(BACKEND, 80).build(),
        )
        .new_flow(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "TTL 0: rewritten, handed to the kernel (never decremented below 0)",
            INGRESS,
            web(SYN).ttl(0).build(),
            Stat::FwdStack,
            web(SYN).ttl(0).dnat(BACKEND, 80).build(),
        )
        .new_flow(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "backend neighbour not resolved yet: rewritten, handed to the kernel to resolve it",
            INGRESS,
            Frame::tcp(client(), to_host(8082), SYN).build(),
            Stat::FwdStack,
            Frame::tcp(client(), to_host(8082), SYN)
                .dnat(Ipv4Addr::new(198, 18, 1, 3), 8082)
                .build(),
        )
        .new_flow(Flow::tcp(8082, (Ipv4Addr::new(198, 18, 1, 3), 8082), 2).entries())
        .through(2),
        Row::rewritten(
            "backend behind a blackhole route: dropped and counted (the flow stays until it expires)",
            INGRESS,
            Frame::tcp(client(), to_host(8083), SYN).build(),
            Stat::DropNoRoute,
            Frame::tcp(client(), to_host(8083), SYN)
                .dnat(Ipv4Addr::new(198, 18, 9, 9), 80)
                .build(),
        )
        .new_flow(Flow::tcp(8083, (Ipv4Addr::new(198, 18, 9, 9), 80), 3).entries())
        .through(3),
        Row::untouched(
            "same client port to a second published port of the same backend port: NAT clash, dropped",
            INGRESS,
            Frame::tcp(client(), to_host(8084), SYN).build(),
            Stat::DropNatClash,
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries()),
        Row::rewritten(
            "same client port to a second published port after its flow closed (a FIN each way): the SYN takes the closed flow's place",
            INGRESS,
            Frame::tcp(client(), to_host(8084), SYN).build(),
            Stat::FwdRedirect,
            web_at_backend(Frame::tcp(client(), to_host(8084), SYN)),
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (Hook::TcIngress, fin.clone()),
            (
                Hook::TcEgress,
                Frame::tcp(from_backend(80), client(), FIN | ACK).sent_by_backend().build(),
            ),
        ])
        .new_flow(Flow::tcp(8084, (BACKEND, 80), 4).entries())
        .through(4),
        Row::rewritten(
            "same client port to a second published port after the backend reset its flow (RST): the SYN takes the closed flow's place",
            INGRESS,
            Frame::tcp(client(), to_host(8084), SYN).build(),
            Stat::FwdRedirect,
            web_at_backend(Frame::tcp(client(), to_host(8084), SYN)),
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (
                Hook::TcEgress,
                Frame::tcp(from_backend(80), client(), RST | ACK).sent_by_backend().build(),
            ),
        ])
        .new_flow(Flow::tcp(8084, (BACKEND, 80), 4).entries())
        .through(4),
        Row::rewritten(
            "same client port to a second published port after the client reset an assured flow: its entries leave both tables",
            INGRESS,
            Frame::tcp(client(), to_host(8084), SYN).build(),
            Stat::FwdRedirect,
            web_at_backend(Frame::tcp(client(), to_host(8084), SYN)),
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (Hook::TcEgress, syn_ack.clone()),
            (Hook::TcIngress, web(ACK).build()),
            (Hook::TcIngress, web(RST).build()),
        ])
        .new_flow(Flow::tcp(8084, (BACKEND, 80), 4).entries())
        .through(4),
        Row::untouched(
            "same client port to a second published port while the first flow is half-closed (the client's FIN only: the backend may still send): NAT clash, dropped",
            INGRESS,
            Frame::tcp(client(), to_host(8084), SYN).build(),
            Stat::DropNatClash,
        )
        .after(vec![syn.clone(), fin.clone()])
        .leaves(Flow::web().closing_forward().entries()),
        Row::untouched(
            "same client port to a second published port while the first flow is half-closed (the backend's FIN only: the client may still send): NAT clash, dropped",
            INGRESS,
            Frame::tcp(client(), to_host(8084), SYN).build(),
            Stat::DropNatClash,
        )
        .after_exchange(vec![
            (Hook::TcIngress, syn.clone()),
            (
                Hook::TcEgress,
                Frame::tcp(from_backend(80), client(), FIN | ACK).sent_by_backend().build(),
            ),
        ])
        .leaves(Flow::web().closing_reply().replied().entries()),
        Row::untouched(
            "same client port to a second published port after the first flow was reset, not a SYN: NAT clash, dropped",
            INGRESS,
            Frame::tcp(client(), to_host(8084), ACK).build(),
            Stat::DropNatClash,
        )
        .after(vec![syn.clone(), web(RST).build()])
        .leaves(Flow::web().reset_forward().entries()),
        // --- malformed IPv4
        Row::untouched(
            "IHL 4: dropped, as the kernel's ip_rcv would",
            INGRESS,
            mutate::ihl(syn.clone(), 4),
            Stat::DropMalformed,
        ),
        Row::untouched(
            "IHL 0: dropped",
            INGRESS,
            mutate::ihl(syn.clone(), 0),
            Stat::DropMalformed,
        ),
        Row::untouched(
            "total length beyond the frame: dropped",
            INGRESS,
            mutate::total_length(syn.clone(), 41),
            Stat::DropMalformed,
        ),
        Row::untouched(
            "total length below the IPv4 header: dropped",
            INGRESS,
            mutate::total_length(syn.clone(), 19),
            Stat::DropMalformed,
        ),
        Row::rewritten(
            "total length below the frame (Ethernet padding): rewritten, padding untouched",
            INGRESS,
            mutate::pad(syn.clone(), 6),
            Stat::FwdRedirect,
            mutate::pad(web_at_backend(web(SYN)), 6),
        )
        .new_flow(Flow::web().entries())
        .through(0),
        Row::untouched(
            "tcp header cut short (10 of 20 bytes): left to the kernel, untouched",
            INGRESS,
            mutate::truncate_l4(syn.clone(), 10),
            Stat::PassMalformedL4,
        ),
        Row::untouched(
            "udp header cut short (4 of 8 bytes): left to the kernel, untouched",
            INGRESS,
            mutate::truncate_l4(dns().build(), 4),
            Stat::PassMalformedL4,
        ),
        Row::untouched(
            "tcp data offset 4 (< 5 words): left to the kernel, untouched",
            INGRESS,
            mutate::tcp_data_offset(syn.clone(), 4),
            Stat::PassMalformedL4,
        ),
        // --- size
        Row::rewritten(
            "largest frame a single-buffer XDP program sees (3520 bytes, MTU 3506): rewritten and redirected",
            &[Hook::XdpIngress],
            web(ACK).payload(XDP_MAX_FRAME - 54).build(),
            Stat::FwdRedirect,
            web_at_backend(web(ACK).payload(XDP_MAX_FRAME - 54)),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "largest linear frame BPF_PROG_TEST_RUN builds for TC (3712 bytes): rewritten and redirected",
            &[Hook::TcIngress],
            web(ACK).payload(TC_MAX_FRAME - 54).build(),
            Stat::FwdRedirect,
            web_at_backend(web(ACK).payload(TC_MAX_FRAME - 54)),
        )
        .after(vec![syn.clone()])
        .leaves(Flow::web().entries())
        .through(0),
        Row::rewritten(
            "frame beyond the backend link's MTU (1600 bytes, MTU 1500): handed to the kernel (fragments or Frag Needed)",
            INGRESS,
            Frame::tcp(client(), to_host(8085), ACK).payload(1546).build(),
            Stat::FwdStack,
            Frame::tcp(client(), to_host(8085), ACK)
                .payload(1546)
                .dnat(Ipv4Addr::new(198, 18, 2, 2), 80)
                .build(),
        )
        .new_flow(Flow::tcp(8085, (Ipv4Addr::new(198, 18, 2, 2), 80), 5).entries())
        .through(5),
    ];
    rows.extend(ipv6_rows());
    rows.extend(sctp_range_and_maglev_rows());
    rows.extend(local_backend_rows());
    rows.extend(backend_veth_rows());
    rows.extend(host_itself_rows());
    rows.extend(allow_rows::rows());
    for ihl in 6..=15 {
        rows.push(
            Row::rewritten(
                &format!("tcp SYN with IPv4 options (IHL {ihl}): rewritten, options kept"),
                INGRESS,
                web(SYN).ihl(ihl).build(),
                Stat::FwdRedirect,
                web_at_backend(web(SYN).ihl(ihl)),
            )
            .new_flow(Flow::web().entries())
            .through(0),
        );
    }
    rows
}

/// Mappings 16 and 17 (`8092:0.0.0.0:9080`, `8092:[::]:9080`): a port of the host itself, as
/// iptables' `REDIRECT --to-port 9080`. Only the port changes, to whichever of the host's
/// addresses the packet came to; the packet goes up the host's own stack (a FIB lookup of a
/// local address is not forwarded), and the reply leaving the host gets its port back.
fn host_itself_rows() -> Vec<Row> {
    const PORT: u16 = 8092;
    const TARGET: u16 = 9080;
    let second: Ipv4Addr = "198.18.0.77".parse().expect("address");
    let client6 = (CLIENT6, CLIENT_PORT);
    let syn_to = |addr: Ipv4Addr| Frame::tcp(client(), (addr, PORT), SYN);
    let flow_at = |addr: Ipv4Addr| Flow::tcp(PORT, (addr, TARGET), 16);
    vec![
        Row::rewritten(
            "tcp SYN to a port of the host itself (8092:0.0.0.0:9080): only the port changes, up the host's stack",
            INGRESS,
            syn_to(HOST).build(),
            Stat::FwdStack,
            syn_to(HOST).dnat(HOST, TARGET).build(),
        )
        .new_flow(flow_at(HOST).entries())
        .through(16),
        Row::rewritten(
            "tcp SYN to a port of the host itself at its second address: that address is kept",
            INGRESS,
            syn_to(second).build(),
            Stat::FwdStack,
            syn_to(second).dnat(second, TARGET).build(),
        )
        .new_flow(
            Flow {
                host: (second.into(), PORT),
                ..flow_at(second)
            }
            .entries(),
        )
        .through(16),
        Row::rewritten(
            "tcp SYN-ACK of the host's own service (port 9080) leaving for the client: the published port restored",
            EGRESS,
            Frame::tcp((second, TARGET), client(), SYN | ACK).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::tcp((second, TARGET), client(), SYN | ACK)
                .sent_by_backend()
                .snat(second, PORT)
                .build(),
        )
        .after(vec![syn_to(second).build()])
        .leaves(
            Flow {
                host: (second.into(), PORT),
                ..flow_at(second).replied()
            }
            .entries(),
        )
        .through(16),
        Row::rewritten(
            "IPv6 tcp SYN to a port of the host itself (8092:[::]:9080): only the port changes, up the host's stack",
            INGRESS,
            Frame::tcp(client6, (HOST6, PORT), SYN).build(),
            Stat::FwdStack,
            Frame::tcp(client6, (HOST6, PORT), SYN).dnat(HOST6, TARGET).build(),
        )
        .new_flow(Flow::new(6, client6, (HOST6, PORT), (HOST6, TARGET), 17).entries())
        .through(17),
        Row::untouched(
            "tcp to the port of the host itself at an address that is not the host's: untouched",
            INGRESS,
            syn_to(BACKEND).build(),
            Stat::PassNoMapping,
        ),
    ]
}

/// The local fast path: backends cached in `PM_LOCAL_BACKENDS` (`LOCAL_BACKENDS`), for which the
/// kernel has no neighbour entry, so a FIB lookup would hand them to the kernel: sent into their
/// device with the cached MACs instead, unless the cache cannot serve the packet.
fn local_backend_rows() -> Vec<Row> {
    let local = Ipv4Addr::new(198, 18, 2, 5);
    let local6 = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 5);
    let small_mtu = Ipv4Addr::new(198, 18, 1, 5);
    let not_redirectable = Ipv4Addr::new(198, 18, 9, 5);
    let client6 = (CLIENT6, CLIENT_PORT);
    let to = |port, flags| Frame::tcp(client(), to_host(port), flags);
    vec![
        Row::rewritten(
            "tcp SYN to a local backend (a container behind veth h2): no FIB lookup; TTL - 1, cached MACs, sent into the veth",
            INGRESS,
            to(8087, SYN).build(),
            Stat::FwdLocal,
            to(8087, SYN).dnat(local, 80).routed_to_backend().build(),
        )
        .new_flow(Flow::tcp(8087, (local, 80), 12).entries())
        .through(12),
        Row::rewritten(
            "tcp ACK of an established flow to a local backend: the same",
            INGRESS,
            to(8087, ACK).payload(100).build(),
            Stat::FwdLocal,
            to(8087, ACK).payload(100).dnat(local, 80).routed_to_backend().build(),
        )
        .after(vec![to(8087, SYN).build()])
        .leaves(Flow::tcp(8087, (local, 80), 12).entries())
        .through(12),
        Row::rewritten(
            "IPv6 tcp SYN to a local backend: hop limit - 1, cached MACs, into the veth",
            INGRESS,
            Frame::tcp(client6, (HOST6, 8087), SYN).build(),
            Stat::FwdLocal,
            Frame::tcp(client6, (HOST6, 8087), SYN)
                .dnat(local6, 80)
                .routed_to_backend()
                .build(),
        )
        .new_flow(Flow::new(6, client6, (HOST6, 8087), (local6, 80), 13).entries())
        .through(13),
        Row::rewritten(
            "a local backend cached with MTU 1000, a 960-byte packet: into the veth",
            INGRESS,
            to(8088, SYN).payload(920).build(),
            Stat::FwdLocal,
            to(8088, SYN).payload(920).dnat(small_mtu, 80).routed_to_backend().build(),
        )
        .new_flow(Flow::tcp(8088, (small_mtu, 80), 14).entries())
        .through(14),
        Row::rewritten(
            "the same backend, a 1240-byte packet: beyond the cached MTU, the FIB path (no neighbour entry: handed to the kernel)",
            INGRESS,
            to(8088, SYN).payload(1200).build(),
            Stat::FwdStack,
            to(8088, SYN).payload(1200).dnat(small_mtu, 80).build(),
        )
        .new_flow(Flow::tcp(8088, (small_mtu, 80), 14).entries())
        .through(14),
        Row::rewritten(
            "XDP, a local backend cached on a device it may not redirect to (c0): the FIB path (a blackhole: dropped)",
            &[Hook::XdpIngress],
            to(8089, SYN).build(),
            Stat::DropNoRoute,
            to(8089, SYN).dnat(not_redirectable, 80).build(),
        )
        .new_flow(Flow::tcp(8089, (not_redirectable, 80), 15).entries())
        .through(15),
        Row::rewritten(
            "TC, the same backend: bpf_redirect_peer into c0's peer, no FIB lookup",
            &[Hook::TcIngress],
            to(8089, SYN).build(),
            Stat::FwdLocal,
            to(8089, SYN).dnat(not_redirectable, 80).routed_to_backend().build(),
        )
        .new_flow(Flow::tcp(8089, (not_redirectable, 80), 15).entries())
        .through(15),
    ]
}

/// Replies caught at the backend's own veth (`portmap_tc_from_backend`), where they enter the
/// host: sent to the client from there, so that no netfilter rule (a runtime's masquerade of its
/// container subnet) ever sees them.
fn backend_veth_rows() -> Vec<Row> {
    let syn_ack = || Frame::tcp(from_backend(80), client(), SYN | ACK).entering_from_backend();
    let client6 = (CLIENT6, CLIENT_PORT);
    let syn_ack6 = || Frame::tcp((BACKEND6, 80), client6, SYN | ACK);
    let web6_flow = || Flow::new(6, client6, (HOST6, TCP_PORT), (BACKEND6, 80), 6);
    vec![
        Row::rewritten(
            "tcp SYN-ACK at the backend's veth, the client's neighbour unresolved: source restored, TTL - 1, bpf_redirect_neigh to the client's device (the neighbour layer writes the MACs)",
            FROM_BACKEND,
            syn_ack().build(),
            Stat::ReplyRedirect,
            syn_ack().snat(HOST, TCP_PORT).ttl(63).build(),
        )
        .after(vec![web(SYN).build()])
        .leaves(Flow::web().replied().entries())
        .through(0),
        Row::rewritten(
            "IPv6 tcp SYN-ACK at the backend's veth: source restored, hop limit - 1, the client's MACs from the FIB lookup, redirected",
            FROM_BACKEND,
            syn_ack6().entering_from_backend().build(),
            Stat::ReplyRedirect,
            syn_ack6().sent_by_backend().snat(HOST6, TCP_PORT).ttl(63).build(),
        )
        .after(vec![Frame::tcp(client6, (HOST6, TCP_PORT), SYN).build()])
        .leaves(web6_flow().replied().entries())
        .through(6),
        Row::untouched(
            "tcp at the backend's veth that is no reply of a flow (the container's own traffic): left to the kernel",
            FROM_BACKEND,
            syn_ack().build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "tcp reply at the backend's veth with TTL 1: left to the kernel (its Time Exceeded); the client-facing egress restores what it sends on",
            FROM_BACKEND,
            syn_ack().ttl(1).build(),
            Stat::PassReply,
        )
        .after(vec![web(SYN).build()])
        // Not marked replied: the client-facing egress does that if the reply gets there.
        .leaves(Flow::web().entries()),
    ]
}

fn ipv6_rows() -> Vec<Row> {
    let client6 = (CLIENT6, CLIENT_PORT);
    let web6 = |flags| Frame::tcp(client6, (HOST6, TCP_PORT), flags);
    let web6_flow = || Flow::new(6, client6, (HOST6, TCP_PORT), (BACKEND6, 80), 6);
    let dns6 = || Frame::udp(client6, (HOST6, UDP_PORT)).payload(40);
    let dns6_flow = || Flow::new(17, client6, (HOST6, UDP_PORT), (BACKEND6, 81), 7);
    vec![
        Row::rewritten(
            "IPv6 tcp SYN to a published address: destination rewritten (no IP checksum; pseudo-header in TCP's), hop limit - 1, redirected",
            INGRESS,
            web6(SYN).build(),
            Stat::FwdRedirect,
            web6(SYN).dnat(BACKEND6, 80).routed_to_backend().build(),
        )
        .new_flow(web6_flow().entries())
        .through(6),
        Row::rewritten(
            "IPv6 tcp SYN-ACK from the backend: source restored",
            EGRESS,
            Frame::tcp((BACKEND6, 80), client6, SYN | ACK).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::tcp((BACKEND6, 80), client6, SYN | ACK)
                .sent_by_backend()
                .snat(HOST6, TCP_PORT)
                .build(),
        )
        .after(vec![web6(SYN).build()])
        .leaves(web6_flow().replied().entries())
        .through(6),
        Row::rewritten(
            "ICMPv6 packet too big from the backend about a client's segment: embedded and source restored (pseudo-header checksum)",
            EGRESS,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (BACKEND6.into(), CLIENT6.into()),
                63,
                IcmpError::TooBig(1280),
                &ip_packet(&web6(ACK).payload(100).ttl(63).dnat(BACKEND6, 80).build()),
            ),
            Stat::ReplyNat,
            icmp_error(
                (CLIENT_MAC, HOST_CLIENT_SIDE_MAC),
                (HOST6.into(), CLIENT6.into()),
                63,
                IcmpError::TooBig(1280),
                &ip_packet(&web6(ACK).payload(100).ttl(63).build()),
            ),
        )
        .after(vec![web6(SYN).build()])
        .leaves(web6_flow().entries())
        .through(6)
        .also(Stat::IcmpErrorNat),
        Row::rewritten(
            "IPv6 udp to a port bound on every address ([::]): rewritten and redirected",
            INGRESS,
            dns6().build(),
            Stat::FwdRedirect,
            dns6().dnat(BACKEND6, 81).routed_to_backend().build(),
        )
        .new_flow(dns6_flow().entries())
        .through(7),
        Row::rewritten(
            "IPv6 udp reply: source restored",
            EGRESS,
            Frame::udp((BACKEND6, 81), client6).payload(9).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::udp((BACKEND6, 81), client6)
                .payload(9)
                .sent_by_backend()
                .snat(HOST6, UDP_PORT)
                .build(),
        )
        .after(vec![dns6().build()])
        .leaves(dns6_flow().replied().entries())
        .through(7),
        Row::rewritten(
            "IPv6 with a hop-by-hop options header: skipped, rewritten, header kept",
            INGRESS,
            web6(SYN).hop_by_hop(16).build(),
            Stat::FwdRedirect,
            web6(SYN).hop_by_hop(16).dnat(BACKEND6, 80).routed_to_backend().build(),
        )
        .new_flow(web6_flow().entries())
        .through(6),
        Row::rewritten(
            "IPv6 hop limit 1: rewritten, handed to the kernel (Time Exceeded)",
            INGRESS,
            web6(SYN).ttl(1).build(),
            Stat::FwdStack,
            web6(SYN).ttl(1).dnat(BACKEND6, 80).build(),
        )
        .new_flow(web6_flow().entries())
        .through(6),
        Row::rewritten(
            "IPv6 first fragment (fragment header, offset 0): translated, TCP header after it",
            INGRESS,
            web6(SYN).fragment(Fragment::First).build(),
            Stat::FwdRedirect,
            web6(SYN)
                .fragment(Fragment::First)
                .dnat(BACKEND6, 80)
                .routed_to_backend()
                .build(),
        )
        .new_flow(web6_flow().entries())
        .through(6),
        Row::rewritten(
            "IPv6 later fragment after its first: destination rewritten, payload untouched",
            INGRESS,
            web6(ACK).fragment(Fragment::Later).build(),
            Stat::FwdRedirect,
            mutate::fragment_forwarded(web6(ACK).fragment(Fragment::Later).build(), BACKEND6.into()),
        )
        .after(vec![web6(SYN).fragment(Fragment::First).build()])
        .leaves(web6_flow().entries())
        .through(6),
        Row::untouched(
            "IPv6 later fragment without its first: left to the kernel, untouched",
            INGRESS,
            web6(ACK).fragment(Fragment::Later).build(),
            Stat::PassFragment,
        ),
        Row::untouched(
            "IPv6 routing header: not ours (the destination is not final), untouched",
            INGRESS,
            web6(SYN).routing_header().build(),
            Stat::PassNotOurs,
        ),
        Row::untouched(
            "IPv6 payload length beyond the frame: dropped",
            INGRESS,
            mutate::ipv6_payload_length(web6(SYN).build(), 21),
            Stat::DropMalformed,
        ),
        Row::untouched(
            "IPv6 tcp to an unmapped port: untouched",
            INGRESS,
            Frame::tcp(client6, (HOST6, 9999), SYN).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "IPv6 tcp to the published port on another address (mapping bound to fd00::1): untouched",
            INGRESS,
            Frame::tcp(client6, ("fd00::77".parse::<Ipv6Addr>().expect("address"), TCP_PORT), SYN).build(),
            Stat::PassNoMapping,
        ),
        Row::untouched(
            "ICMPv6 echo request to the host address: untouched",
            INGRESS,
            icmpv6_echo(CLIENT6, HOST6),
            Stat::PassNotOurs,
        ),
    ]
}

/// The backend mapping 9's Maglev table gives a client, computed from the table the daemon
/// writes and the datapath's flow hash.
fn maglev_backend(client: (Ipv4Addr, u16)) -> (Ipv4Addr, u16) {
    let members: Vec<maglev::Member> = [Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 1, 4)]
        .into_iter()
        .map(|ip| maglev::Member {
            ip: ip.into(),
            port: 80,
            weight: 1,
        })
        .collect();
    let table = maglev::table(&members).expect("weights");
    let hash = flow_hash(&addr_words(client.0.into()), client.1.to_be(), 6);
    let chosen = members[table[maglev_slot(hash)] as usize];
    let IpAddr::V4(ip) = chosen.ip else {
        unreachable!("IPv4 members")
    };
    (ip, chosen.port)
}

fn sctp_range_and_maglev_rows() -> Vec<Row> {
    let init = || Frame::sctp(client(), to_host(9999)).payload(8);
    let sctp_flow = || Flow::new(132, client(), to_host(9999), (BACKEND, 9999), 8);
    let range = || Frame::udp(client(), to_host(9005)).payload(12);
    let balanced = maglev_backend(client());
    vec![
        Row::rewritten(
            "SCTP INIT to a published port: only the address (and IPv4 checksum) changes, CRC32c stays valid",
            INGRESS,
            init().build(),
            Stat::FwdRedirect,
            init().dnat(BACKEND, 9999).routed_to_backend().build(),
        )
        .new_flow(sctp_flow().entries())
        .through(8),
        Row::rewritten(
            "SCTP from the backend: source address restored",
            EGRESS,
            Frame::sctp((BACKEND, 9999), client()).sent_by_backend().build(),
            Stat::ReplyNat,
            Frame::sctp((BACKEND, 9999), client())
                .sent_by_backend()
                .snat(HOST, 9999)
                .build(),
        )
        .after(vec![init().build()])
        .leaves(sctp_flow().replied().entries())
        .through(8),
        Row::untouched(
            "SCTP to an unmapped port: untouched",
            INGRESS,
            Frame::sctp(client(), to_host(9998)).build(),
            Stat::PassNoMapping,
        ),
        Row::rewritten(
            "udp to port 9005 of the range 9000-9009: to backend port 7005",
            INGRESS,
            range().build(),
            Stat::FwdRedirect,
            range().dnat(BACKEND, 7005).routed_to_backend().build(),
        )
        .new_flow(Flow::new(17, client(), to_host(9005), (BACKEND, 7005), 10).entries())
        .through(10),
        Row::rewritten(
            "tcp SYN to a port with two backends: to the one its Maglev slot names",
            INGRESS,
            Frame::tcp(client(), to_host(8090), SYN).build(),
            Stat::FwdRedirect,
            Frame::tcp(client(), to_host(8090), SYN)
                .dnat(balanced.0, balanced.1)
                .routed_to_backend()
                .build(),
        )
        .new_flow(Flow::new(6, client(), to_host(8090), balanced, 9).entries())
        .through(9),
    ]
}

/// An assured flow whose cached copies the LRU shed (`PM_CT_NEW` emptied): its reply and its
/// client's next packet are served from `PM_CONNTRACK`, byte for byte as before, and each
/// caches its entry again.
pub fn shed_cache(g: &mut Golden) -> anyhow::Result<String> {
    let syn_ack = Frame::tcp(from_backend(80), client(), SYN | ACK).sent_by_backend();
    let data = Frame::tcp(from_backend(80), client(), ACK)
        .sent_by_backend()
        .payload(10);
    let stored_only = |entries: Vec<FlowEntry>| entries.into_iter().filter(|e| e.assured).collect::<Vec<_>>();
    for hook in [Hook::TcIngress, Hook::XdpIngress] {
        g.dp.clear_flows()?;
        expect(g, hook, &web(SYN).build(), Stat::FwdRedirect, None)?;
        expect(g, Hook::TcEgress, &syn_ack.clone().build(), Stat::ReplyNat, None)?;
        expect(g, hook, &web(ACK).build(), Stat::FwdRedirect, None)?;
        anyhow::ensure!(
            g.flows()? == Flow::web().assured().entries(),
            "not assured: {:?}",
            g.flows()?
        );
        g.dp.clear_flow_cache()?;
        anyhow::ensure!(g.flows()? == stored_only(Flow::web().assured().entries()));
        expect(
            g,
            Hook::TcEgress,
            &data.clone().build(),
            Stat::ReplyNat,
            Some(&data.clone().snat(HOST, TCP_PORT).build()),
        )?;
        let mut flows = stored_only(Flow::web().assured().entries());
        flows.extend(
            Flow::web()
                .assured()
                .entries()
                .into_iter()
                .filter(|e| !e.assured && !e.forward),
        );
        flows.sort();
        anyhow::ensure!(
            g.flows()? == flows,
            "reply entry not cached again: {:?}",
            g.flows()?
        );
        let ack = web(ACK).payload(10);
        expect(
            g,
            hook,
            &ack.clone().build(),
            Stat::FwdRedirect,
            Some(&ack.dnat(BACKEND, 80).routed_to_backend().build()),
        )?;
        anyhow::ensure!(
            g.flows()? == Flow::web().assured().entries(),
            "forward entry not cached again: {:?}",
            g.flows()?
        );
    }
    Ok("an assured flow shed from the cache: served from PM_CONNTRACK and cached again".into())
}

/// The daemon's expiry pass over what the datapath made (its batch walk and deletes): an
/// assured flow whose cached copies are gone (its deletes from `PM_CT_NEW` find nothing) and a
/// new flow are counted and kept while young, and both go, every entry, once idle past their
/// timeouts.
pub fn expiry(g: &mut Golden) -> anyhow::Result<String> {
    let syn_ack = Frame::tcp(from_backend(80), client(), SYN | ACK).sent_by_backend();
    g.dp.clear_flows()?;
    expect(g, Hook::TcIngress, &web(SYN).build(), Stat::FwdRedirect, None)?;
    expect(g, Hook::TcEgress, &syn_ack.build(), Stat::ReplyNat, None)?;
    expect(g, Hook::TcIngress, &web(ACK).build(), Stat::FwdRedirect, None)?;
    g.dp.clear_flow_cache()?;
    let other = Frame::tcp((CLIENT, CLIENT_PORT + 1), to_host(TCP_PORT), SYN).build();
    expect(g, Hook::TcIngress, &other, Stat::FwdRedirect, None)?;
    anyhow::ensure!(g.flows()?.len() == 4, "{:?}", g.flows()?);
    let timeouts = portmap::config::Timeouts::default();
    let now = portmap::datapath::monotonic_ns()?;
    let young = g.dp.expire_flows(now, &timeouts)?;
    anyhow::ensure!(
        young.delete.is_empty() && (young.live_flows, young.new_flows) == (1, 1),
        "young flows: {young:?}"
    );
    let later = now + (timeouts.tcp_seconds + 1) * 1_000_000_000;
    let old = g.dp.expire_flows(later, &timeouts)?;
    anyhow::ensure!(
        old.delete.len() == 4 && (old.live_flows, old.new_flows) == (0, 0),
        "idle flows: {old:?}"
    );
    anyhow::ensure!(g.flows()?.is_empty(), "left behind: {:?}", g.flows()?);
    Ok("expiry: an assured flow shed from the cache and a new one, kept young, gone when idle".into())
}

/// With room in `PM_CONNTRACK` for one flow only (`with_golden_conntrack(2, ..)`): a first flow
/// is assured, a second one's handshake ACK finds the table full and both stay where they are.
pub fn assured_table_full(g: &mut Golden) -> anyhow::Result<String> {
    let other = (CLIENT, CLIENT_PORT + 1);
    let (syn, syn_ack) = (
        web(SYN).build(),
        Frame::tcp(from_backend(80), client(), SYN | ACK)
            .sent_by_backend()
            .build(),
    );
    let other_syn = Frame::tcp(other, to_host(TCP_PORT), SYN).build();
    let other_syn_ack = Frame::tcp(from_backend(80), other, SYN | ACK)
        .sent_by_backend()
        .build();
    let ack = Frame::tcp(other, to_host(TCP_PORT), ACK);
    let mut flows = Flow::web().assured().entries();
    flows.extend(
        Flow {
            client: (other.0.into(), other.1),
            ..Flow::web().replied()
        }
        .entries(),
    );
    flows.sort();
    let row = Row::rewritten(
        "tcp handshake ACK finding PM_CONNTRACK full: forwarded, the flow stays unassured",
        INGRESS,
        ack.clone().build(),
        Stat::FwdRedirect,
        web_at_backend(ack),
    )
    .after_exchange(vec![
        (Hook::TcIngress, syn),
        (Hook::TcEgress, syn_ack),
        (Hook::TcIngress, web(ACK).build()),
        (Hook::TcIngress, other_syn),
        (Hook::TcEgress, other_syn_ack),
    ])
    .leaves(flows)
    .through(0)
    .also(Stat::CtAssuredFull);
    for &hook in row.hooks {
        check(g, &row, hook).with_context(|| format!("[{}] {}", hook.as_str(), row.name))?;
    }
    Ok(format!("{}: passed", row.name))
}

/// Runs one row on one hook from an empty conntrack table; an error names what differed.
fn check(g: &mut Golden, row: &Row, hook: Hook) -> anyhow::Result<()> {
    g.dp.clear_flows()?;
    for (setup_hook, packet) in &row.setup {
        let run = g.run(*setup_hook, packet)?;
        let (code, _) = outcome(&run.counted)?;
        let want: &[Stat] = if *setup_hook == Hook::TcEgress {
            &[Stat::ReplyNat]
        } else {
            &[Stat::FwdRedirect, Stat::FwdLocal, Stat::FwdStack]
        };
        anyhow::ensure!(
            want.contains(&code),
            "setup packet on {} counted as {}",
            setup_hook.as_str(),
            code.name()
        );
    }
    let run = g.run(hook, &row.input)?;
    let want = row.global_counts();
    anyhow::ensure!(
        run.counted == want,
        "counted {}, expected {}",
        describe_counts(&run.counted),
        describe_counts(&want)
    );
    let want = row.mapping_counts();
    anyhow::ensure!(
        run.mappings == want,
        "mapping counters moved {:?}, expected {want:?}",
        run.mappings
    );
    let want: Vec<(u32, u64)> = row.denied_by.map(|slot| (slot, 1)).into_iter().collect();
    anyhow::ensure!(
        run.denied == want,
        "allow-list refusals moved {:?}, expected {want:?}",
        run.denied
    );
    let want = expected_action(hook, row.stat);
    anyhow::ensure!(
        run.output.return_value == want,
        "returned {}, expected {want}",
        run.output.return_value
    );
    anyhow::ensure!(
        run.output.packet == row.output,
        "output packet differs: {}",
        diff(&row.output, &run.output.packet)
    );
    let sums = checksums(&run.output.packet);
    anyhow::ensure!(
        sums.ipv4 != Some(false) && sums.l4 != Some(false),
        "output checksums do not verify: {sums:?}"
    );
    let flows = g.flows()?;
    anyhow::ensure!(
        flows == row.flows,
        "conntrack differs:\n  expected {:?}\n  actual   {flows:?}",
        row.flows
    );
    Ok(())
}

/// Runs every row on each of its hooks; fails naming every failing row.
/// The rows to run: all of them, or with `PORTMAP_FIXTURE=TEXT` those whose name contains TEXT
/// (`PORTMAP_FIXTURE='TCP SYN' cargo xtask test golden_fixtures` reruns one row). A filter that
/// matches nothing is an error that lists the names.
pub fn selected_rows() -> anyhow::Result<Vec<Row>> {
    let all = rows();
    let Ok(filter) = std::env::var("PORTMAP_FIXTURE") else {
        return Ok(all);
    };
    let names: Vec<String> = all.iter().map(|r| r.name.clone()).collect();
    let chosen: Vec<Row> = all.into_iter().filter(|r| r.name.contains(&filter)).collect();
    anyhow::ensure!(
        !chosen.is_empty(),
        "PORTMAP_FIXTURE='{filter}' matches no fixture row; rows:\n  {}",
        names.join("\n  ")
    );
    Ok(chosen)
}

pub fn run_all(g: &mut Golden) -> anyhow::Result<String> {
    let rows = selected_rows()?;
    let mut failures = Vec::new();
    let mut runs = 0;
    for row in &rows {
        // A fixture must describe a well-formed frame wherever its checksums exist.
        let sums = checksums(&row.input);
        anyhow::ensure!(
            sums.ipv4 != Some(false) && sums.l4 != Some(false),
            "fixture '{}' has invalid input checksums: {sums:?}",
            row.name
        );
        anyhow::ensure!(
            !row.new_flow || row.through.is_some(),
            "fixture '{}' creates a flow but names no mapping (`through`)",
            row.name
        );
        for &hook in row.hooks {
            runs += 1;
            if let Err(e) = check(g, row, hook).with_context(|| format!("[{}] {}", hook.as_str(), row.name)) {
                failures.push(format!("{e:#}"));
            }
        }
    }
    anyhow::ensure!(
        failures.is_empty(),
        "{} of {runs} fixture runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(format!("{} fixture rows, {runs} runs: all passed", rows.len()))
}
