//! Hostile input: every prefix of every fixture, and random, mutated and generated packets, each
//! run through all four programs (the reply hook on the backend's veth too) and checked against the datapath's invariants:
//!
//! 1. the verdict is the one its counter implies (never XDP_ABORTED or XDP_TX), and exactly one
//!    outcome counter moves (plus `flow_new` only for a forwarded new flow, ingress only);
//! 2. the frame keeps its length;
//! 3. a packet not counted as rewritten (`fwd_*`, `reply_*`, or `drop_no_route`, which drops an
//!    already rewritten packet) leaves byte for byte as it came;
//! 4. a rewritten packet changes only its destination (ingress) or source (egress) address and
//!    port, the two checksums, and when redirected the MACs and TTL (by exactly one; a reply sent
//!    on from the backend's veth keeps its MACs for the neighbour layer or gets the client's); the new
//!    address is a configured backend (ingress) or port a published one (egress);
//! 5. rewriting never turns a verifying checksum into a failing one, nor the reverse.
//!
//! The fuzzer takes `PORTMAP_FUZZ_PACKETS` (default 100 000; `cargo xtask test --fuzz-packets N`)
//! and `PORTMAP_FUZZ_SEED` (default: random, printed, and named in any failure) from the
//! environment. An input that breaks an invariant is printed in hex; it becomes a fixture row.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, bail, ensure};
use portmap::{datapath::Hook, model::spec};
use portmap_common::Stat;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    BACKEND, BACKEND6, CLIENT, CLIENT6, Golden, HOST, HOST6, MAPPINGS, Run, expected_action, fixtures, hex,
    outcome,
    packets::{ETH_LEN, Fragment, Frame, backend_macs, checksums, fix_checksums, layout},
};

const HOOKS: [Hook; 4] = [
    Hook::XdpIngress,
    Hook::TcIngress,
    Hook::TcEgress,
    Hook::TcFromBackend,
];

/// What the configured mappings allow a rewrite to produce.
struct Targets {
    /// (addr, port) a forward rewrite may set as destination.
    backends: BTreeSet<(IpAddr, u16)>,
    /// Ports a reply rewrite may set as source.
    host_ports: BTreeSet<u16>,
    /// Addresses a reply rewrite may set as source: the namespace's own (wildcard mappings) and
    /// the mappings' specific ones.
    host_addrs: BTreeSet<IpAddr>,
}

impl Targets {
    fn new() -> anyhow::Result<Self> {
        let mappings: Vec<portmap::model::mapping::Mapping> = MAPPINGS
            .iter()
            .map(|s| spec::parse(s))
            .collect::<Result<_, _>>()?;
        let local = portmap::host::addresses()?;
        let mut targets = Self {
            backends: BTreeSet::new(),
            host_ports: BTreeSet::new(),
            host_addrs: local.clone(),
        };
        for m in &mappings {
            targets.host_addrs.insert(m.host_ip);
            let ports = m.host_ports.context("golden mappings have host ports")?;
            for (offset, port) in ports.ports().enumerate() {
                targets.host_ports.insert(port);
                for b in &m.backends {
                    let port = b.port_at(offset as u16);
                    if b.ip.is_unspecified() {
                        // A port of the host itself: at whichever host address the packet came to.
                        let at = if m.host_ip.is_unspecified() {
                            local
                                .iter()
                                .copied()
                                .filter(|a| a.is_ipv6() == b.ip.is_ipv6())
                                .collect()
                        } else {
                            vec![m.host_ip]
                        };
                        targets.backends.extend(at.into_iter().map(|a| (a, port)));
                    } else {
                        targets.backends.insert((b.ip, port));
                    }
                }
            }
        }
        Ok(targets)
    }
}

fn port_at(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

fn addr_at(frame: &[u8], off: usize, len: usize) -> IpAddr {
    if len == 16 {
        let octets: [u8; 16] = frame[off..off + 16].try_into().expect("16 bytes");
        IpAddr::from(octets)
    } else {
        IpAddr::from([frame[off], frame[off + 1], frame[off + 2], frame[off + 3]])
    }
}

/// Checks invariants 1–5 (module docs) for one run; returns the counter it was recorded under.
fn check_invariants(hook: Hook, input: &[u8], run: &Run, targets: &Targets) -> anyhow::Result<Stat> {
    let (code, new_flow) = outcome(&run.counted)?;
    let name = code.name();
    let ret = run.output.return_value;
    ensure!(
        ret == expected_action(hook, code),
        "returned {ret} for a packet counted as {name}"
    );
    // Replies: rewritten on their source side, never a flow's first packet.
    let egress = matches!(hook, Hook::TcEgress | Hook::TcFromBackend);
    ensure!(
        !new_flow
            || (!egress
                && matches!(
                    code,
                    Stat::FwdRedirect | Stat::FwdLocal | Stat::FwdStack | Stat::DropNoRoute
                )),
        "flow_new counted with {name} on {}",
        hook.as_str()
    );
    ensure!(
        !egress
            || !matches!(
                code,
                Stat::FwdRedirect | Stat::FwdLocal | Stat::FwdStack | Stat::DropNoRoute
            ),
        "egress counted {name}"
    );
    let out = &run.output.packet;
    ensure!(
        out.len() == input.len(),
        "length changed: {} -> {}",
        input.len(),
        out.len()
    );
    let rewritten = matches!(
        code,
        Stat::FwdRedirect
            | Stat::FwdLocal
            | Stat::FwdStack
            | Stat::ReplyNat
            | Stat::ReplyRedirect
            | Stat::DropNoRoute
    );
    if !rewritten {
        ensure!(out == input, "a packet counted as {name} was modified");
        return Ok(code);
    }

    let l = layout(input).context("rewrote a frame that is not well-formed IP")?;
    if l.proto == 1 || l.proto == 58 {
        let redirected = matches!(code, Stat::FwdRedirect | Stat::FwdLocal);
        check_icmp_rewrite(name, input, out, &l, egress, redirected)?;
        return Ok(code);
    }
    // A later fragment has no L4 header: only its addresses (and checksums of its IP header).
    let l4 = match l.l4_header {
        Some(l4) => l4,
        None if l.later_fragment => usize::MAX - 4,
        None => bail!("rewrote a packet without a complete L4 header"),
    };
    let redirected = matches!(code, Stat::FwdRedirect | Stat::FwdLocal | Stat::ReplyRedirect);
    let (src, dst, addr_len) = l.addrs();
    let (addr_off, port_off) = if egress { (src, l4) } else { (dst, l4 + 2) };
    let check = l.l4_check();
    let allowed = |i: usize| {
        (addr_off..addr_off + addr_len).contains(&i)
            // SCTP keeps its ports (its CRC32c covers them).
            || (check.is_some() && (port_off..port_off + 2).contains(&i))
            || (!l.v6 && (l.l3 + 10..l.l3 + 12).contains(&i))
            || check.is_some_and(|c| (c..c + 2).contains(&i))
            || (redirected && (i < 12 || i == l.ttl()))
    };
    if let Some(i) = (0..out.len()).find(|&i| out[i] != input[i] && !allowed(i)) {
        bail!("{name}: byte {i} changed, which a rewrite must not touch");
    }
    if l.later_fragment {
        let addr = addr_at(out, addr_off, addr_len);
        let known = if egress {
            targets.host_addrs.contains(&addr)
        } else {
            targets.backends.iter().any(|(a, _)| *a == addr)
        };
        ensure!(known, "later fragment rewritten to {addr}, no configured address");
        return Ok(code);
    }
    let target = (addr_at(out, addr_off, addr_len), port_at(out, port_off));
    if egress {
        ensure!(
            targets.host_ports.contains(&target.1),
            "reply source port {} is no published port",
            target.1
        );
    } else {
        ensure!(
            targets.backends.contains(&target),
            "destination {target:?} is no backend"
        );
    }
    if code == Stat::ReplyRedirect {
        // The neighbour layer's to write (unresolved), or the destination's neighbour entry.
        let dst_addr = addr_at(out, dst, addr_len);
        let routed = if dst_addr == IpAddr::from(CLIENT6) {
            Some((crate::packets::CLIENT_MAC, crate::packets::HOST_CLIENT_SIDE_MAC))
        } else {
            backend_macs(dst_addr)
        };
        let routed = routed.map(|(dmac, smac)| [dmac, smac].concat());
        ensure!(
            out[..12] == input[..12] || routed.is_some_and(|r| out[..12] == r[..]),
            "a reply redirected with MACs {}",
            hex(&out[..12])
        );
        ensure!(out[l.ttl()] + 1 == input[l.ttl()], "TTL not decremented by one");
    } else if redirected {
        let (dmac, smac) = backend_macs(target.0).context("redirected to a backend without a neighbour")?;
        // `ip rule tos 0x10` (golden namespace) takes the policy route through h2. The kernel
        // matches IPv4 TOS under IPTOS_RT_MASK (0x1c) and IPv6 on the whole DSCP.
        let policy_routed = match target.0 {
            IpAddr::V4(a) => a == crate::BACKEND && out[l.l3 + 1] & 0x1c == 0x10,
            IpAddr::V6(a) => {
                let tclass = (out[l.l3] << 4) | (out[l.l3 + 1] >> 4);
                a == crate::BACKEND6 && tclass & 0xfc == 0x10
            }
        };
        let (dmac, smac) = if policy_routed {
            (
                crate::packets::BACKEND2_MAC,
                crate::packets::HOST_BACKEND2_SIDE_MAC,
            )
        } else {
            (dmac, smac)
        };
        ensure!(
            out[..6] == dmac && out[6..12] == smac,
            "redirected with MACs {} (policy routed: {policy_routed})",
            hex(&out[..12])
        );
        ensure!(out[l.ttl()] + 1 == input[l.ttl()], "TTL not decremented by one");
    }
    let (before, after) = (checksums(input), checksums(out));
    ensure!(
        before == after,
        "checksum validity changed: {before:?} -> {after:?}"
    );
    Ok(code)
}

/// A translated ICMP error (`icmp.rs`): only the outer address on the flow's side, the IPv4
/// header checksum, the ICMP checksum, the embedded packet's IP header and first 18 bytes of
/// its TCP/UDP header (addresses, ports, checksums) and, when redirected, TTL and MACs change.
fn check_icmp_rewrite(
    name: &str,
    input: &[u8],
    out: &[u8],
    l: &crate::packets::Layout,
    egress: bool,
    redirected: bool,
) -> anyhow::Result<()> {
    let icmp = l
        .l4_header
        .context("rewrote an ICMP message without its header")?;
    let (src, dst, addr_len) = l.addrs();
    let outer = if egress { src } else { dst };
    let embedded = icmp + 8;
    let embedded_ihl = if l.v6 {
        40
    } else {
        usize::from(input.get(embedded).context("no embedded packet")? & 0x0f) * 4
    };
    let embedded_end = embedded + embedded_ihl + 18;
    let allowed = |i: usize| {
        (outer..outer + addr_len).contains(&i)
            || (!l.v6 && (l.l3 + 10..l.l3 + 12).contains(&i))
            || (icmp + 2..icmp + 4).contains(&i)
            || (embedded..embedded_end).contains(&i)
            || (redirected && (i < 12 || i == l.ttl()))
    };
    if let Some(i) = (0..out.len()).find(|&i| out[i] != input[i] && !allowed(i)) {
        bail!("{name}: byte {i} of an ICMP error changed, which its translation must not touch");
    }
    Ok(())
}

/// Outcome counts over a set of runs, for the report.
#[derive(Default)]
struct Tally {
    runs: u64,
    by_code: [u64; Stat::COUNT],
}

impl Tally {
    fn add(&mut self, code: Stat) {
        self.runs += 1;
        self.by_code[code.code() as usize] += 1;
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .by_code
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != 0)
            .map(|(c, n)| format!("{} {n}", Stat::ALL[c].name()))
            .collect();
        format!("{} runs: {}", self.runs, parts.join(", "))
    }
}

fn run_checked(
    g: &Golden,
    hook: Hook,
    input: &[u8],
    targets: &Targets,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let run = g.run(hook, input)?;
    let code = check_invariants(hook, input, &run, targets)
        .with_context(|| format!("on {}, input {}", hook.as_str(), hex(input)))?;
    tally.add(code);
    Ok(())
}

/// Whether `BPF_PROG_TEST_RUN` may refuse `frame` (EINVAL) before any program runs: shorter
/// than an Ethernet header, or, for an skb (TC), shorter than the network header its ethertype
/// announces (IPv4: IHL words, at least 20 bytes; IPv6: 40), as measured on 6.18, or longer
/// than the one page it builds an skb in. No NIC delivers such runts, and a refusal of any other
/// frame fails the test.
fn kernel_may_refuse(hook: Hook, frame: &[u8]) -> bool {
    if frame.len() < ETH_LEN {
        return true;
    }
    if hook == Hook::XdpIngress {
        return false;
    }
    if frame.len() > fixtures::TC_MAX_FRAME {
        return true;
    }
    let l3_len = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame
            .get(ETH_LEN)
            .map_or(20, |b| (usize::from(b & 0x0f) * 4).max(20)),
        0x86dd => 40,
        _ => 0,
    };
    frame.len() < ETH_LEN + l3_len
}

/// Runs and checks one frame; `false` if the kernel refused a runt (`kernel_may_refuse`).
fn run_checked_or_runt(
    g: &Golden,
    hook: Hook,
    input: &[u8],
    targets: &Targets,
    tally: &mut Tally,
) -> anyhow::Result<bool> {
    if kernel_may_refuse(hook, input) && g.dp.test_run(hook, input, g.ifindex(hook), 1).is_err() {
        return Ok(false);
    }
    run_checked(g, hook, input, targets, tally)?;
    Ok(true)
}

/// Every prefix (0..=len bytes) of every fixture input on each of its hooks.
pub fn every_prefix(g: &mut Golden) -> anyhow::Result<String> {
    let targets = Targets::new()?;
    let mut tally = Tally::default();
    let mut refused = 0;
    for row in fixtures::selected_rows()? {
        for &hook in row.hooks {
            for len in 0..=row.input.len() {
                let ran = run_checked_or_runt(g, hook, &row.input[..len], &targets, &mut tally)
                    .with_context(|| format!("prefix of {len} bytes of '{}'", row.name))?;
                refused += u32::from(!ran);
            }
        }
    }
    Ok(format!(
        "every prefix: {} (and {refused} runt frames refused by the kernel)",
        tally.summary()
    ))
}

/// A client-side or backend-side TCP/UDP frame with fields drawn mostly from what the mappings
/// and flows use, so that many packets hit mappings and flows; checksums valid.
fn generated(rng: &mut StdRng) -> Vec<u8> {
    let reply = rng.random_bool(0.3);
    let v6 = rng.random_bool(0.3);
    let pick = |rng: &mut StdRng, known: &[u16]| {
        if rng.random_bool(0.8) {
            known[rng.random_range(0..known.len())]
        } else {
            rng.random()
        }
    };
    let client_port = pick(rng, &[40_000, 40_001, 40_002]);
    let client: IpAddr = if v6 { CLIENT6.into() } else { CLIENT.into() };
    let (src, dst): ((IpAddr, u16), (IpAddr, u16)) = if reply {
        let backends: [IpAddr; 4] = if v6 {
            [BACKEND6.into(); 4]
        } else {
            [
                BACKEND.into(),
                Ipv4Addr::new(198, 18, 1, 4).into(),
                Ipv4Addr::new(198, 18, 1, 3).into(),
                Ipv4Addr::new(198, 18, 2, 2).into(),
            ]
        };
        let backend = backends[rng.random_range(0..4)];
        (
            (backend, pick(rng, &[80, 81, 8082, 9999, 7005])),
            (client, client_port),
        )
    } else {
        let to: IpAddr = match (v6, rng.random_bool(0.8)) {
            (false, true) => HOST.into(),
            (false, false) => Ipv4Addr::from(rng.random::<u32>()).into(),
            (true, true) => HOST6.into(),
            (true, false) => Ipv6Addr::from(rng.random::<u128>()).into(),
        };
        let ports = [8080, 8081, 8082, 8083, 8084, 8085, 8090, 9005, 9999];
        ((client, client_port), (to, pick(rng, &ports)))
    };
    let mut frame = match rng.random_range(0..10) {
        0..=4 => Frame::tcp(src, dst, rng.random::<u8>() & 0x3f),
        5..=8 => Frame::udp(src, dst),
        _ => Frame::sctp(src, dst),
    };
    if reply {
        frame = frame.sent_by_backend();
    }
    frame = frame.ttl(rng.random()).payload(rng.random_range(0..64));
    if v6 {
        if rng.random_bool(0.1) {
            frame = frame.hop_by_hop(8 * rng.random_range(1..4));
        }
        if rng.random_bool(0.03) {
            frame = frame.routing_header();
        }
    } else if rng.random_bool(0.2) {
        frame = frame.ihl(rng.random_range(5..=15));
    }
    if rng.random_bool(0.1) {
        frame = frame.vlan(rng.random_range(1..4095));
    }
    if rng.random_bool(0.05) {
        frame = frame.fragment(if rng.random_bool(0.5) {
            Fragment::First
        } else {
            Fragment::Later
        });
    }
    frame.build()
}

/// `base` with 1–4 random changes (a byte in the headers, a bit anywhere, a cut, an extension),
/// and its checksums made valid again half of the time.
fn mutated(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut frame = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..4) {
            0 => {
                let i = rng.random_range(0..frame.len().min(80));
                frame[i] = rng.random();
            }
            1 => {
                let i = rng.random_range(0..frame.len());
                frame[i] ^= 1 << rng.random_range(0..8);
            }
            2 => frame.truncate(rng.random_range(ETH_LEN..=frame.len())),
            _ => frame.extend((0..rng.random_range(1..16)).map(|_| rng.random::<u8>())),
        }
    }
    if rng.random_bool(0.5) {
        fix_checksums(&mut frame);
    }
    frame
}

/// Random bytes, mostly with an IPv4 ethertype and version so that they reach the IPv4 parser.
fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..rng.random_range(ETH_LEN..=160))
        .map(|_| rng.random())
        .collect();
    if rng.random_bool(0.7) && frame.len() > ETH_LEN {
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame[ETH_LEN] = (frame[ETH_LEN] & 0x0f) | 0x40;
        if rng.random_bool(0.5) {
            fix_checksums(&mut frame);
        }
    }
    frame
}

fn env_number(name: &str) -> anyhow::Result<Option<u64>> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().with_context(|| format!("{name}={v} is not a number")))
        .transpose()
}

pub fn fuzz(g: &mut Golden) -> anyhow::Result<String> {
    let packets = env_number("PORTMAP_FUZZ_PACKETS")?.unwrap_or(100_000);
    ensure!(
        packets > 0,
        "PORTMAP_FUZZ_PACKETS=0 would fuzz nothing: give at least 1 (default 100000)"
    );
    let seed = env_number("PORTMAP_FUZZ_SEED")?.unwrap_or_else(rand::random);
    // Recorded before the run, so that a failing or killed run still names its seed; `cargo
    // xtask test` prints it after every run (the test's own output is captured when it passes).
    std::fs::write(
        concat!(env!("CARGO_TARGET_TMPDIR"), "/fuzz-run.txt"),
        format!(
            "fuzz: {packets} packets, seed {seed} (replay: cargo xtask test --fuzz-seed {seed} fuzzed_packets)\n"
        ),
    )?;
    let mut rng = StdRng::seed_from_u64(seed);
    let targets = Targets::new()?;
    let corpus: Vec<Vec<u8>> = fixtures::rows()
        .into_iter()
        .flat_map(|row| row.setup.into_iter().map(|(_, p)| p).chain([row.input]))
        .collect();
    let mut tally = Tally::default();
    for i in 0..packets {
        let (kind, input) = match rng.random_range(0..10) {
            0..=3 => ("generated", generated(&mut rng)),
            4..=5 => {
                let base = corpus[rng.random_range(0..corpus.len())].clone();
                ("mutated fixture", mutated(&mut rng, &base))
            }
            6..=7 => {
                let base = generated(&mut rng);
                ("mutated generated", mutated(&mut rng, &base))
            }
            _ => ("random", random_frame(&mut rng)),
        };
        for hook in HOOKS {
            run_checked_or_runt(g, hook, &input, &targets, &mut tally).with_context(|| {
                format!("PORTMAP_FUZZ_SEED={seed}: packet {i} ({kind}) broke an invariant")
            })?;
        }
    }
    Ok(format!(
        "fuzz: {packets} packets, seed {seed}: {}",
        tally.summary()
    ))
}
