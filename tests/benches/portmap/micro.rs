//! Measurements that need no traffic: the programs' cost per packet through
//! `BPF_PROG_TEST_RUN` (established flows, one and `MANY_FLOWS`, and new ones, 1 to 1M mappings,
//! beside a no-op program), and map memory.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use portmap::{
    config::{DEFAULT_DYNAMIC_PORTS, Limits},
    datapath::{Datapath, Hook},
    host::sockets::NoSockets,
    model::spec,
    model::table::{Capacity, Table},
};
use portmap_common::prog_names;
use portmap_tests::{Daemon, HOST_CLIENT_IFACE, TempDir, Topology};

use crate::{
    allow::{self, AllowCost},
    setup::{self, BASE_PORT, ROUTER, SINK, Variant},
};

/// ns per run of one program on one packet, as the kernel times `repeat` runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramCost {
    pub mappings: u32,
    pub noop_ns: f64,
    pub forward_floor_ns: f64,
    pub established_xdp_ns: f64,
    pub established_tc_ns: f64,
    /// The same packet with the sink learnt as a local backend (the fast path: no FIB lookup).
    pub established_xdp_local_ns: f64,
    pub established_tc_local_ns: f64,
    /// A new flow each run (mapping lookup, conntrack insert of both entries).
    pub new_flow_xdp_ns: f64,
    /// The established-flow path cut after parse, conntrack lookup, rewrite and counters
    /// (`prog_names::BENCH_XDP_STEPS`, `BENCH_TC_STEPS`), cumulative; the full programs above
    /// add the forwarding.
    pub xdp_steps_ns: [f64; 4],
    pub tc_steps_ns: [f64; 4],
    /// The same with `allow::PREFIXES` prefixes on the measured mapping.
    pub allow: Option<AllowCost>,
    /// Established packets over `MANY_FLOWS` flows, each run on the next flow's packet.
    pub many_flows: Option<ManyFlowsCost>,
}

/// How many flows `ManyFlowsCost` spreads its packets over: the traffic rows' flow count.
pub const MANY_FLOWS: u16 = 10_000;

/// The established-flow programs over `MANY_FLOWS` flows: what the flow count adds to a
/// packet's cost inside the program (the flow table's cache misses), beside the traffic rows'
/// 10,000-flow figures, which also count the kernel around it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ManyFlowsCost {
    pub established_xdp_ns: f64,
    pub established_tc_local_ns: f64,
    /// The TC program cut after the conntrack lookup (cumulative, as `ProgramCost::tc_steps_ns[1]`).
    pub tc_lookup_ns: f64,
}

fn tcp_frame(src_port: u16, dst: (Ipv4Addr, u16), flags_syn: bool) -> Vec<u8> {
    tcp_frame_from(GENERATOR, src_port, dst, flags_syn)
}

/// The generator's address (the client of every frame but the refused ones).
const GENERATOR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn tcp_frame_from(src: Ipv4Addr, src_port: u16, dst: (Ipv4Addr, u16), flags_syn: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let step = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src.octets(), dst.0.octets(), 64)
        .tcp(src_port, dst.1, 1, 64240);
    let step = if flags_syn { step.syn() } else { step.ack(1) };
    step.write(&mut out, &[0u8; 16]).expect("buildable");
    out
}

/// The sink's SYN-ACK from `sink_port` to `tcp_frame(client_port, ..)`, as it leaves the router
/// towards the client.
fn syn_ack_from_sink(sink_port: u16, client_port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(SINK.octets(), [198, 18, 0, 2], 63)
        .tcp(sink_port, client_port, 1, 64240)
        .syn()
        .ack(2)
        .write(&mut out, &[])
        .expect("buildable");
    out
}

/// Loads the datapath with `mappings` host ports (in runs of up to 50,000 over several host
/// addresses, as the daemon's table places them) inside the router namespace of `topo`, and
/// times the programs on an established-flow packet to the last mapping.
pub fn program_cost(topo: &Topology, mappings: u32, repeat: u32) -> anyhow::Result<ProgramCost> {
    topo.host.run(move || {
        let limits = Limits {
            max_mappings: mappings.max(1024),
            conntrack_entries: 1 << 20,
            ..Limits::default()
        };
        let mut dp = Datapath::load_unpinned(&limits)?;
        for name in [prog_names::BENCH_XDP_NOOP, prog_names::BENCH_XDP_FORWARD]
            .into_iter()
            .chain(prog_names::BENCH_XDP_STEPS)
            .chain(prog_names::BENCH_TC_STEPS)
        {
            dp.load_bench(name, None)?;
        }
        let mut table = Table::new(
            Capacity {
                ports: limits.max_mappings,
                groups: 1,
                backends: 1,
            },
            DEFAULT_DYNAMIC_PORTS,
        );
        const RUN: u32 = 50_000;
        let mut last = (ROUTER, BASE_PORT);
        let mut last_spec = None;
        let mut last_backend_port = 80;
        let mut left = mappings;
        let mut address = 0u8;
        while left > 0 {
            let n = left.min(RUN);
            address += 1;
            let host = Ipv4Addr::new(198, 18, 0, address);
            // Port by port (a host range onto ONE backend port would publish one port of it).
            let spec = format!(
                "{host}:{BASE_PORT}-{}:{SINK}:80-{}",
                u32::from(BASE_PORT) + n - 1,
                80 + n - 1
            );
            let mapping = spec::parse(&spec)?;
            let placed = table.add(&mut dp, &mapping, &NoSockets)?;
            last_spec = Some(mapping);
            anyhow::ensure!(
                placed.host_ports.is_some_and(|p| p.count() == n),
                "{spec} placed as {placed}"
            );
            last = (host, BASE_PORT + (n - 1) as u16);
            last_backend_port = 80 + (n - 1) as u16;
            left -= n;
        }
        let ifindex = nix::net::if_::if_nametoindex(HOST_CLIENT_IFACE)?;
        dp.allow_xdp_redirect(nix::net::if_::if_nametoindex(portmap_tests::HOST_BACKEND_IFACE)?)?;
        let syn = tcp_frame(40_000, last, true);
        let ack = tcp_frame(40_000, last, false);
        // An established flow is an assured one: SYN, the sink's SYN-ACK (reverse-NATed on
        // egress), and the client's ACK, which moves it to PM_CONNTRACK.
        dp.test_run(Hook::TcIngress, &syn, ifindex, 1)?;
        dp.test_run(
            Hook::TcEgress,
            &syn_ack_from_sink(last_backend_port, 40_000),
            ifindex,
            1,
        )?;
        dp.test_run(Hook::TcIngress, &ack, ifindex, 1)?;
        // BPF_PROG_TEST_RUN runs a program `repeat` times on one buffer: after a rewrite (or a
        // TTL decrement) every later run would see the packet as the first left it — a packet of
        // no flow. So each program is timed one run per call on a fresh copy of `frame`, less the
        // kernel's timer overhead of a single run (the no-op's single run less its repeated one).
        let ns = |d: std::time::Duration| d.as_secs_f64() * 1e9;
        let runs = (repeat / 20).max(1_000);
        let noop = ns(dp
            .test_run_bench(prog_names::BENCH_XDP_NOOP, true, &ack, ifindex, repeat)?
            .duration);
        let overhead =
            (single_run_ns(&dp, prog_names::BENCH_XDP_NOOP, true, &ack, ifindex, runs)? - noop).max(0.0);
        let cost = |dp: &Datapath, name: &str, xdp: bool, frame: &[u8]| -> anyhow::Result<f64> {
            Ok(single_run_ns(dp, name, xdp, frame, ifindex, runs)? - overhead)
        };
        let (xdp_prog, tc_prog) = (Hook::XdpIngress.program_name(), Hook::TcIngress.program_name());
        let floor = cost(&dp, prog_names::BENCH_XDP_FORWARD, true, &ack)?;
        let xdp = cost(&dp, xdp_prog, true, &ack)?;
        let tc = cost(&dp, tc_prog, false, &ack)?;
        let steps = |names: [&str; 4], xdp: bool| -> anyhow::Result<[f64; 4]> {
            let mut out = [0.0; 4];
            for (ns, name) in out.iter_mut().zip(names) {
                *ns = cost(&dp, name, xdp, &ack)?;
            }
            Ok(out)
        };
        let xdp_steps = steps(prog_names::BENCH_XDP_STEPS, true)?;
        let tc_steps = steps(prog_names::BENCH_TC_STEPS, false)?;
        // As the daemon learns it: the sink's (permanent) neighbour entry on its veth.
        let local = portmap::host::local_backends::read()?.local;
        anyhow::ensure!(
            local.contains_key(&std::net::IpAddr::V4(SINK)),
            "the sink is not a local backend: {local:?}"
        );
        dp.sync_local_backends(local.iter().map(|(a, l)| (*a, &l.backend)))?;
        let xdp_local = cost(&dp, xdp_prog, true, &ack)?;
        let tc_local = cost(&dp, tc_prog, false, &ack)?;
        let flows = many_flows(&dp, ifindex, last, last_backend_port)?;
        let many_tc_local = cycle_run_ns(&dp, tc_prog, false, &flows, ifindex)? - overhead;
        dp.sync_local_backends([])?;
        let many_xdp = cycle_run_ns(&dp, xdp_prog, true, &flows, ifindex)? - overhead;
        // The TC program cut after its conntrack lookup (`BENCH_TC_STEPS`' second), over the
        // same flows: how much of what they add is the lookup.
        let many_tc_lookup =
            cycle_run_ns(&dp, prog_names::BENCH_TC_STEPS[1], false, &flows, ifindex)? - overhead;
        // New flows: one run per client port (a fresh port range for each measurement).
        let new_runs = 2_000u16;
        // XDP_DROP for the refused ones, anything else for the rest.
        const XDP_DROP: u32 = 1;
        let new_flow =
            |dp: &Datapath, src: Ipv4Addr, first_port: u16, refused: bool| -> anyhow::Result<f64> {
                let mut total = 0.0;
                for port in 0..new_runs {
                    let frame = tcp_frame_from(src, first_port + port, last, true);
                    let run = dp.test_run(Hook::XdpIngress, &frame, ifindex, 1)?;
                    anyhow::ensure!(
                        (run.return_value == XDP_DROP) == refused,
                        "a new flow from {src}: XDP verdict {} (refused expected: {refused})",
                        run.return_value
                    );
                    total += ns(run.duration) - overhead;
                }
                Ok(total / f64::from(new_runs))
            };
        let new_flow_xdp = new_flow(&dp, GENERATOR, 1_000, false)?;
        // The allow-list on the measured mapping: the same established flow, then new ones
        // from a listed client and from one outside the list.
        let list = allow::prefixes()
            .iter()
            .map(|p| portmap::model::allow::parse_prefix(p))
            .collect::<Result<Vec<_>, _>>()?;
        let listed = last_spec.context("no mapping")?.with_allow(list);
        table.update(&mut dp, &listed)?;
        let allow = AllowCost {
            established_xdp_ns: cost(&dp, xdp_prog, true, &ack)?,
            established_tc_ns: cost(&dp, tc_prog, false, &ack)?,
            new_flow_xdp_ns: new_flow(&dp, GENERATOR, 1_000 + new_runs, false)?,
            new_flow_refused_xdp_ns: new_flow(&dp, allow::OUTSIDE, 1_000, true)?,
        };
        Ok(ProgramCost {
            mappings,
            noop_ns: noop,
            forward_floor_ns: floor,
            established_xdp_ns: xdp,
            established_tc_ns: tc,
            established_xdp_local_ns: xdp_local,
            established_tc_local_ns: tc_local,
            new_flow_xdp_ns: new_flow_xdp,
            xdp_steps_ns: xdp_steps,
            tc_steps_ns: tc_steps,
            allow: Some(allow),
            many_flows: Some(ManyFlowsCost {
                established_xdp_ns: many_xdp,
                established_tc_local_ns: many_tc_local,
                tc_lookup_ns: many_tc_lookup,
            }),
        })
    })
}

/// The time of one run of the loaded program `name` on `frame`, over `runs` calls of one run each
/// (every call starts from a fresh copy of the frame), timer overhead included: the median of
/// nine batches' means, so that a burst of other work on this shared machine does not count.
fn single_run_ns(
    dp: &Datapath,
    name: &str,
    xdp: bool,
    frame: &[u8],
    ifindex: u32,
    runs: u32,
) -> anyhow::Result<f64> {
    const BATCHES: u32 = 9;
    let per_batch = (runs / BATCHES).max(1);
    let mut means = Vec::with_capacity(BATCHES as usize);
    for _ in 0..BATCHES {
        let mut total = 0.0;
        for _ in 0..per_batch {
            total += one_run_ns(dp, name, xdp, frame, ifindex)?;
        }
        means.push(total / f64::from(per_batch));
    }
    means.sort_by(f64::total_cmp);
    Ok(means[means.len() / 2])
}

/// One run of the loaded program `name` on a fresh copy of `frame`, as the kernel times it;
/// an error if the program dropped it.
fn one_run_ns(dp: &Datapath, name: &str, xdp: bool, frame: &[u8], ifindex: u32) -> anyhow::Result<f64> {
    let run = dp.test_run_bench(name, xdp, frame, ifindex, 1)?;
    // XDP_DROP / TC_ACT_SHOT: a step failed (the flow was not found, say).
    let dropped = if xdp { 1 } else { 2 };
    anyhow::ensure!(run.return_value != dropped, "{name} dropped the packet");
    Ok(run.duration.as_secs_f64() * 1e9)
}

/// Opens `MANY_FLOWS` assured flows to `dst` (SYN, the sink's SYN-ACK, ACK; client ports from
/// 30000) and returns each one's next packet.
fn many_flows(
    dp: &Datapath,
    ifindex: u32,
    dst: (Ipv4Addr, u16),
    backend_port: u16,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut acks = Vec::with_capacity(MANY_FLOWS.into());
    for port in (30_000..).take(MANY_FLOWS.into()) {
        dp.test_run(Hook::TcIngress, &tcp_frame(port, dst, true), ifindex, 1)?;
        dp.test_run(Hook::TcEgress, &syn_ack_from_sink(backend_port, port), ifindex, 1)?;
        let ack = tcp_frame(port, dst, false);
        dp.test_run(Hook::TcIngress, &ack, ifindex, 1)?;
        acks.push(ack);
    }
    Ok(acks)
}

/// As `single_run_ns`, with each call on the next of `frames` (one per flow) in turn: the
/// median of five passes' means, after a pass that warms what fits in the caches.
fn cycle_run_ns(
    dp: &Datapath,
    name: &str,
    xdp: bool,
    frames: &[Vec<u8>],
    ifindex: u32,
) -> anyhow::Result<f64> {
    const PASSES: usize = 5;
    let mut means = Vec::with_capacity(PASSES);
    for pass in 0..=PASSES {
        let mut total = 0.0;
        for frame in frames {
            total += one_run_ns(dp, name, xdp, frame, ifindex)?;
        }
        if pass > 0 {
            means.push(total / frames.len() as f64);
        }
    }
    means.sort_by(f64::total_cmp);
    Ok(means[means.len() / 2])
}

/// The daemon's resident memory with N mappings installed from its config.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DaemonMemory {
    pub mappings: u32,
    /// VmRSS and VmHWM (peak) of the daemon process, MiB.
    pub rss_mib: f64,
    pub peak_mib: f64,
}

/// A `/proc/PID/status` field in kB, as MiB.
fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .parse()?;
    Ok(kb / 1024.0)
}

pub fn daemon_memory(n: u32) -> anyhow::Result<DaemonMemory> {
    let bed = setup::bed(Variant::Routing, 0)?;
    let dir = TempDir::new("rss")?;
    let config = dir.path().join("portmap.toml");
    let mappings: Vec<String> = (0..n).map(|i| format!("\"{}:{SINK}:80\"", i + 1)).collect();
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"{}\"]\nattach = \"tc\"\nmappings = [{}]\n",
            HOST_CLIENT_IFACE,
            mappings.join(", ")
        ),
    )?;
    let daemon = Daemon::start(&bed.topo.host, &["--config", config.to_str().context("utf-8")?])?;
    let pid = daemon.pid().context("daemon pid")?;
    Ok(DaemonMemory {
        mappings: n,
        rss_mib: status_mib(pid, "VmRSS")?,
        peak_mib: status_mib(pid, "VmHWM")?,
    })
}

/// Kernel memory per mapping and per flow, from the maps' memlock at default capacities.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Memory {
    pub maps: Vec<(String, u32, u64)>,
    pub bytes_per_mapping: f64,
    pub bytes_per_flow: f64,
}

pub fn memory() -> anyhow::Result<Memory> {
    let dp = Datapath::load_unpinned(&Limits::default())?;
    let maps = dp.map_memory()?;
    let per = |name: &str, divisor: f64| {
        maps.iter()
            .find(|m| m.name == name)
            .map_or(0.0, |m| m.bytes as f64 / (f64::from(m.max_entries) / divisor))
    };
    let mapping = per(portmap_common::map_names::MAPPINGS, 1.0)
        + per(portmap_common::map_names::MAPPING_STATS, 1.0)
        + per(portmap_common::map_names::MAPPING_DENIED, 1.0);
    let flow = per(portmap_common::map_names::CONNTRACK, 2.0);
    Ok(Memory {
        maps: maps
            .iter()
            .map(|m| (m.name.to_string(), m.max_entries, m.bytes))
            .collect(),
        bytes_per_mapping: mapping,
        bytes_per_flow: flow,
    })
}
