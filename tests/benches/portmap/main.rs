//! `cargo xtask bench [--quick]`: portmap against iptables-nft DNAT, an nftables DNAT map, plain
//! routing and a no-rewrite XDP forwarder, on one machine, in one run. Everything happens in
//! namespaces: generator (client) → router (host, the variant under test) → sink (backend).
//!
//! Prints a table of ratios first, then the targets and whether they are met, then absolute
//! figures with the machine; writes `results.json` (raw samples included), `report.md` and a PNG
//! per scaling curve to the output directory. Nothing here asserts a timing.

mod micro;
mod plot;
mod setup;
mod traffic;

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Parser;
use serde::Serialize;

use crate::{
    setup::{Variant, target},
    traffic::{PacketRun, quantile, socket},
};

#[derive(Parser)]
struct Args {
    /// A short run (a few minutes) with fewer sizes: the CI smoke test.
    #[arg(long)]
    quick: bool,
    /// Where results.json, report.md and the plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Sizes and durations of one run.
struct Plan {
    flow_mappings: Vec<u32>,
    control_mappings: Vec<u32>,
    program_mappings: Vec<u32>,
    connect_secs: f64,
    /// Runs per new-connection measurement (the median is reported).
    repetitions: usize,
    iperf_secs: u32,
    round_trips: usize,
    repeat: u32,
    packet_secs: f64,
    offered_pps: f64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                flow_mappings: vec![1, 1_000],
                control_mappings: vec![1, 1_000, 10_000],
                program_mappings: vec![1, 1_000, 10_000],
                connect_secs: 1.0,
                repetitions: 1,
                iperf_secs: 2,
                round_trips: 2_000,
                repeat: 200_000,
                packet_secs: 1.0,
                offered_pps: 50_000.0,
            }
        } else {
            Self {
                flow_mappings: vec![1, 1_000, 10_000, 50_000],
                control_mappings: vec![1, 1_000, 10_000, 50_000],
                program_mappings: vec![1, 1_000, 10_000, 100_000, 1_000_000],
                connect_secs: 2.0,
                repetitions: 3,
                iperf_secs: 5,
                round_trips: 20_000,
                repeat: 2_000_000,
                packet_secs: 3.0,
                offered_pps: 100_000.0,
            }
        }
    }
}

#[derive(Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
    date: String,
    command: String,
}

fn machine(quick: bool) -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    Ok(Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: run("uname", &["-r"]),
        date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command: format!("cargo xtask bench{}", if quick { " --quick" } else { "" }),
    })
}

#[derive(Serialize)]
struct NewFlows {
    variant: Variant,
    mappings: u32,
    /// Median of the samples.
    per_second: f64,
    samples: Vec<f64>,
}

#[derive(Serialize)]
struct PerVariant {
    variant: Variant,
    tcp_gbps: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    /// Sorted round-trip samples (µs).
    rtt_samples_us: Vec<f64>,
}

#[derive(Serialize)]
struct Packets {
    variant: Variant,
    flows: u16,
    fixed: PacketRun,
    max: PacketRun,
}

#[derive(Serialize)]
struct Results {
    machine: Machine,
    quick: bool,
    new_flows: Vec<NewFlows>,
    per_variant: Vec<PerVariant>,
    packets: Vec<Packets>,
    programs: Vec<micro::ProgramCost>,
    control: Vec<micro::ControlPlane>,
    memory: micro::Memory,
    seconds: f64,
}

fn say(what: &str) {
    eprintln!("bench: {what}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark needs root (run cargo xtask bench)"
    );
    let plan = Plan::new(args.quick);
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)?;

    let mut new_flows = Vec::new();
    say(&format!(
        "new TCP connections per second (single-threaded connect/close, median of {})",
        plan.repetitions
    ));
    for &n in &plan.flow_mappings {
        // Routing is measured at every size too: it shows the run-to-run noise.
        for variant in [
            Variant::Routing,
            Variant::Iptables,
            Variant::Nftables,
            Variant::PortmapTc,
            Variant::PortmapXdp,
        ] {
            let bed = setup::bed(variant, n)?;
            let (ip, port) = target(variant, n - 1, false);
            let mut samples = (0..plan.repetitions)
                .map(|_| traffic::new_flows_per_second(&bed.topo, socket(ip, port), plan.connect_secs))
                .collect::<anyhow::Result<Vec<f64>>>()
                .with_context(|| format!("{} with {n} mappings", variant.name()))?;
            samples.sort_by(f64::total_cmp);
            let per_second = quantile(&samples, 0.5);
            say(&format!(
                "  {:<26} {n:>6} mappings: {per_second:>8.0}/s",
                variant.name()
            ));
            new_flows.push(NewFlows {
                variant,
                mappings: n,
                per_second,
                samples,
            });
        }
    }

    say("TCP bulk throughput (iperf3) and request/response latency");
    let mut per_variant = Vec::new();
    for variant in [
        Variant::Routing,
        Variant::Iptables,
        Variant::Nftables,
        Variant::PortmapTc,
        Variant::PortmapXdp,
    ] {
        let bed = setup::bed(variant, 1)?;
        let (ip, port) = target(variant, 0, false);
        let tcp_gbps = traffic::iperf3_gbps(&bed.topo, socket(ip, port), plan.iperf_secs)?;
        let samples = traffic::round_trips(&bed.topo, socket(ip, port), plan.round_trips)?;
        say(&format!(
            "  {:<26} {tcp_gbps:>6.2} Gb/s, round trip p50 {:.1} µs p99 {:.1} µs",
            variant.name(),
            quantile(&samples, 0.5),
            quantile(&samples, 0.99)
        ));
        per_variant.push(PerVariant {
            variant,
            tcp_gbps,
            rtt_p50_us: quantile(&samples, 0.5),
            rtt_p99_us: quantile(&samples, 0.99),
            rtt_samples_us: samples,
        });
    }

    say("64-byte UDP packets: CPU per packet at a fixed load, and the maximum forwarded rate");
    let mut packets = Vec::new();
    for variant in [
        Variant::Routing,
        Variant::Iptables,
        Variant::Nftables,
        Variant::PortmapTc,
        Variant::PortmapXdp,
        Variant::XdpFloor,
    ] {
        for flows in [1u16, 10_000] {
            let bed = setup::bed(variant, 1)?;
            let dst = target(variant, 0, true);
            let fixed = traffic::packet_run(&bed.topo, dst, flows, Some(plan.offered_pps), plan.packet_secs)?;
            let max = traffic::packet_run(&bed.topo, dst, flows, None, plan.packet_secs)?;
            say(&format!(
                "  {:<26} {flows:>5} flows: {:>6.0} ns CPU/packet at {:.0} kpps; max {:.0} kpps (generator sent {:.0} kpps)",
                variant.name(),
                fixed.cpu_ns_per_packet.unwrap_or(f64::NAN),
                plan.offered_pps / 1e3,
                max.forwarded_pps / 1e3,
                max.sent_pps / 1e3
            ));
            packets.push(Packets {
                variant,
                flows,
                fixed,
                max,
            });
        }
    }

    say("eBPF cost per packet (BPF_PROG_TEST_RUN)");
    let mut programs = Vec::new();
    {
        let bed = setup::bed(Variant::Routing, 1)?;
        for &n in &plan.program_mappings {
            let cost = micro::program_cost(&bed.topo, n, plan.repeat)?;
            say(&format!(
                "  {n:>8} mappings: no-op {:.1} ns, established XDP {:.1} ns / TC {:.1} ns, new flow {:.1} ns",
                cost.noop_ns, cost.established_xdp_ns, cost.established_tc_ns, cost.new_flow_xdp_ns
            ));
            programs.push(cost);
        }
    }

    say("control plane");
    let mut control = Vec::new();
    for &n in &plan.control_mappings {
        let c = micro::control_plane(n)?;
        say(&format!(
            "  {n:>6}: portmap install {:.2} ms (in daemon), iptables-restore {:.1} ms, nft -f {:.1} ms",
            c.portmap_install_in_daemon_ms, c.iptables_restore_ms, c.nft_file_ms
        ));
        control.push(c);
    }

    let results = Results {
        machine: machine(args.quick)?,
        quick: args.quick,
        new_flows,
        per_variant,
        packets,
        programs,
        control,
        memory: micro::memory()?,
        seconds: started.elapsed().as_secs_f64(),
    };
    let report = report(&results);
    print!("{report}");
    std::fs::write(args.out.join("report.md"), &report)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    plots(&results, &args.out)?;
    say(&format!(
        "wrote {}/report.md, results.json and plots in {:.0} s",
        args.out.display(),
        results.seconds
    ));
    Ok(())
}

fn new_flows_of(r: &Results, variant: Variant, n: u32) -> Option<f64> {
    r.new_flows
        .iter()
        .find(|f| f.variant == variant && f.mappings == n)
        .map(|f| f.per_second)
}

fn per_variant(r: &Results, variant: Variant) -> Option<&PerVariant> {
    r.per_variant.iter().find(|p| p.variant == variant)
}

fn packets_of(r: &Results, variant: Variant, flows: u16) -> Option<&Packets> {
    r.packets
        .iter()
        .find(|p| p.variant == variant && p.flows == flows)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

/// The report: ratios first, then targets, then absolute figures and the machine.
fn report(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "# portmap benchmark{}\n",
        if r.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        s,
        "`{}` on {} ({} cores), kernel {}, {}; {:.0} s.\n",
        m.command, m.cpu, m.cores, m.kernel, m.date, r.seconds
    );

    let _ = writeln!(
        s,
        "## Ratios (portmap ÷ other; for CPU and latency lower is better, else higher)\n"
    );
    let _ = writeln!(
        s,
        "| metric | vs routing | vs iptables-nft | vs nftables map | vs XDP floor |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    let cpu = |v, flows| packets_of(r, v, flows).and_then(|p| p.fixed.cpu_ns_per_packet);
    let max = |v, flows| packets_of(r, v, flows).map(|p| p.max.forwarded_pps);
    for (label, v) in [("TC", Variant::PortmapTc), ("XDP", Variant::PortmapXdp)] {
        for flows in [1u16, 10_000] {
            let _ = writeln!(
                s,
                "| CPU per forwarded packet, portmap {label}, {flows} flow(s) | {} | {} | {} | {} |",
                ratio(cpu(v, flows), cpu(Variant::Routing, flows)),
                ratio(cpu(v, flows), cpu(Variant::Iptables, flows)),
                ratio(cpu(v, flows), cpu(Variant::Nftables, flows)),
                ratio(cpu(v, flows), cpu(Variant::XdpFloor, flows)),
            );
            let _ = writeln!(
                s,
                "| max forwarded rate, portmap {label}, {flows} flow(s) | {} | {} | {} | {} |",
                ratio(max(v, flows), max(Variant::Routing, flows)),
                ratio(max(v, flows), max(Variant::Iptables, flows)),
                ratio(max(v, flows), max(Variant::Nftables, flows)),
                ratio(max(v, flows), max(Variant::XdpFloor, flows)),
            );
        }
    }
    let last_n = r.new_flows.iter().map(|f| f.mappings).max().unwrap_or(1);
    for n in [1, last_n] {
        let p = new_flows_of(r, Variant::PortmapTc, n);
        let _ = writeln!(
            s,
            "| new flows/s, portmap TC, {n} mappings | {} | {} | {} | |",
            ratio(p, new_flows_of(r, Variant::Routing, n)),
            ratio(p, new_flows_of(r, Variant::Iptables, n)),
            ratio(p, new_flows_of(r, Variant::Nftables, n)),
        );
    }
    let pv = |v, f: fn(&PerVariant) -> f64| per_variant(r, v).map(f);
    for (label, f) in [
        (
            "TCP throughput",
            (|p: &PerVariant| p.tcp_gbps) as fn(&PerVariant) -> f64,
        ),
        ("round trip p50", |p: &PerVariant| p.rtt_p50_us),
        ("round trip p99", |p: &PerVariant| p.rtt_p99_us),
    ] {
        for (mode, v) in [("TC", Variant::PortmapTc), ("XDP", Variant::PortmapXdp)] {
            let _ = writeln!(
                s,
                "| {label}, portmap {mode} | {} | {} | {} | |",
                ratio(pv(v, f), pv(Variant::Routing, f)),
                ratio(pv(v, f), pv(Variant::Iptables, f)),
                ratio(pv(v, f), pv(Variant::Nftables, f)),
            );
        }
    }

    let _ = writeln!(s, "\n## Targets\n");
    let _ = writeln!(s, "| target | measured | met |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let mut check = |what: &str, measured: Option<f64>, unit: &str, ok: &dyn Fn(f64) -> bool| {
        let (value, met) = match measured {
            Some(v) if v.is_finite() => (format!("{v:.2}{unit}"), if ok(v) { "yes" } else { "**no**" }),
            _ => ("not measured".to_string(), "—"),
        };
        let _ = writeln!(s, "| {what} | {value} | {met} |");
    };
    let best_cpu = |flows| {
        [Variant::PortmapTc, Variant::PortmapXdp]
            .iter()
            .filter_map(|v| cpu(*v, flows))
            .reduce(f64::min)
    };
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    check(
        "CPU per forwarded packet ≤ 1/5 of iptables DNAT (1 flow, better mode)",
        over(best_cpu(1), cpu(Variant::Iptables, 1)),
        "×",
        &|v| v <= 0.2,
    );
    for n in [10_000, 50_000] {
        if r.new_flows.iter().any(|f| f.mappings == n) {
            check(
                &format!("new flows/s with {n} mappings within 5 % of routing (portmap TC)"),
                over(
                    new_flows_of(r, Variant::PortmapTc, n),
                    new_flows_of(r, Variant::Routing, n),
                ),
                "×",
                &|v| v >= 0.95,
            );
        }
    }
    if let (Some(first), Some(last)) = (r.programs.first(), r.programs.last()) {
        check(
            "eBPF cost of an established-flow packet ≤ 3× the no-op program (XDP)",
            Some(last.established_xdp_ns / last.noop_ns),
            "×",
            &|v| v <= 3.0,
        );
        check(
            &format!(
                "eBPF cost flat within 10 % from {} to {} mappings",
                first.mappings, last.mappings
            ),
            Some(last.established_xdp_ns / first.established_xdp_ns),
            "×",
            &|v| (0.9..=1.1).contains(&v),
        );
    }
    check(
        "forwarded rate ≥ 90 % of the no-rewrite XDP floor (portmap XDP, 1 flow)",
        over(max(Variant::PortmapXdp, 1), max(Variant::XdpFloor, 1)),
        "×",
        &|v| v >= 0.9,
    );
    let control = |n: u32| r.control.iter().find(|c| c.mappings == n);
    check(
        "10k mappings installed < 20 ms (in the daemon)",
        control(10_000).map(|c| c.portmap_install_in_daemon_ms),
        " ms",
        &|v| v < 20.0,
    );
    check(
        "50k mappings installed < 100 ms (in the daemon)",
        control(50_000).map(|c| c.portmap_install_in_daemon_ms),
        " ms",
        &|v| v < 100.0,
    );
    if let Some(c) = r.control.last() {
        check(
            &format!("one add with {} installed < 1 ms (in the daemon)", c.mappings),
            Some(c.portmap_add_in_daemon_ms),
            " ms",
            &|v| v < 1.0,
        );
        check(
            &format!("one del with {} installed < 1 ms (in the daemon)", c.mappings),
            Some(c.portmap_del_in_daemon_ms),
            " ms",
            &|v| v < 1.0,
        );
        check(
            &format!(
                "a 10,000-port range added < 1 s, with {} installed (in the daemon)",
                c.mappings
            ),
            Some(c.portmap_add_range_10k_ms),
            " ms",
            &|v| v < 1000.0,
        );
        check(
            "`portmap add` round trip ÷ `nft add element` ≤ 1",
            Some(c.portmap_add_round_trip_ms / c.nft_add_element_ms),
            "×",
            &|v| v <= 1.0,
        );
    }
    check(
        "TCP throughput ≥ 95 % of routing (TC mode)",
        over(
            pv(Variant::PortmapTc, |p| p.tcp_gbps),
            pv(Variant::Routing, |p| p.tcp_gbps),
        ),
        "×",
        &|v| v >= 0.95,
    );
    let best_tcp = [Variant::PortmapTc, Variant::PortmapXdp]
        .iter()
        .filter_map(|v| pv(*v, |p| p.tcp_gbps))
        .reduce(f64::max);
    check(
        "TCP throughput ≥ iptables DNAT (better mode)",
        over(best_tcp, pv(Variant::Iptables, |p| p.tcp_gbps)),
        "×",
        &|v| v >= 1.0,
    );

    let _ = writeln!(
        s,
        "\n## New TCP connections per second (single-threaded connect/close, RST close)\n\nTraffic goes to the \
         last-installed mapping. Routing (no NAT) is measured beside every size: its spread is the noise of this \
         measurement on this machine.\n"
    );
    let _ = writeln!(s, "| variant | mappings | connections/s (median) | samples |");
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for f in &r.new_flows {
        let samples: Vec<String> = f.samples.iter().map(|v| format!("{v:.0}")).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} |",
            f.variant.name(),
            f.mappings,
            f.per_second,
            samples.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\n## TCP bulk (iperf3, one stream) and 1-byte request/response over one connection\n"
    );
    let _ = writeln!(s, "| variant | Gb/s | round trip p50 (µs) | p99 (µs) |");
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for p in &r.per_variant {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.1} | {:.1} |",
            p.variant.name(),
            p.tcp_gbps,
            p.rtt_p50_us,
            p.rtt_p99_us
        );
    }
    let _ = writeln!(
        s,
        "\n## 64-byte UDP\n\nThe generator (AF_PACKET sendmmsg, qdisc bypassed) runs on CPU 0; the router's receive \
         work is steered to CPU 1 (RPS, and threaded NAPI pinned there for XDP on the veth), where the sink's receive \
         work also runs (the same for every variant). CPU per forwarded packet = CPU 1's busy time (/proc/stat) \
         at a fixed offered load ÷ packets that reached the sink. \"sent\" is what the generator managed: where \
         forwarded ≈ sent, the generator was the bottleneck, not the router.\n"
    );
    let _ = writeln!(
        s,
        "| variant | flows | CPU ns/packet (fixed load) | all CPU ns/packet | max forwarded kpps | sent kpps |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- |");
    for p in &r.packets {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            p.variant.name(),
            p.flows,
            p.fixed.cpu_ns_per_packet.unwrap_or(f64::NAN),
            p.fixed.total_cpu_ns_per_packet,
            p.max.forwarded_pps / 1e3,
            p.max.sent_pps / 1e3
        );
    }
    let _ = writeln!(
        s,
        "\n## eBPF cost per packet (BPF_PROG_TEST_RUN, mean over repeated runs)\n"
    );
    let _ = writeln!(
        s,
        "| mappings | no-op XDP (ns) | parse + forward, no NAT (ns) | established, XDP (ns) | established, TC (ns) | new flow, XDP (ns) |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- |");
    for p in &r.programs {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.mappings,
            p.noop_ns,
            p.forward_floor_ns,
            p.established_xdp_ns,
            p.established_tc_ns,
            p.new_flow_xdp_ns
        );
    }
    let _ = writeln!(s, "\n## Control plane (ms)\n");
    let _ = writeln!(
        s,
        "| mappings | portmap install (daemon) | portmap install (reload round trip) | portmap add (daemon) | portmap del (daemon) | `portmap add` round trip | portmap add of a 10k-port range (daemon) | iptables-restore | iptables one by one | one `iptables -A` | one `iptables -D` | `nft -f` | one `nft add element` |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for c in &r.control {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.1} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            c.mappings,
            c.portmap_install_in_daemon_ms,
            c.portmap_install_round_trip_ms,
            c.portmap_add_in_daemon_ms,
            c.portmap_del_in_daemon_ms,
            c.portmap_add_round_trip_ms,
            c.portmap_add_range_10k_ms,
            c.iptables_restore_ms,
            c.iptables_one_by_one_ms.map_or("—".into(), |v| format!("{v:.0}")),
            c.iptables_append_one_ms,
            c.iptables_delete_one_ms,
            c.nft_file_ms,
            c.nft_add_element_ms
        );
    }
    let _ = writeln!(
        s,
        "\n## Memory\n\nKernel memory (memlock) of the maps at default capacities: {:.0} bytes per mapping (host port), {:.0} bytes per flow.\n",
        r.memory.bytes_per_mapping, r.memory.bytes_per_flow
    );
    let _ = writeln!(s, "| map | entries | bytes |");
    let _ = writeln!(s, "| --- | --- | --- |");
    for (name, entries, bytes) in &r.memory.maps {
        let _ = writeln!(s, "| {name} | {entries} | {bytes} |");
    }
    s
}

/// One line of a scaling plot: (mappings, value) for each measurement.
fn curve<T>(items: &[T], name: &str, x: fn(&T) -> u32, y: fn(&T) -> f64) -> plot::Series {
    (
        name.to_string(),
        items.iter().map(|i| (f64::from(x(i)), y(i))).collect(),
    )
}

fn plots(r: &Results, out: &std::path::Path) -> anyhow::Result<()> {
    let series: Vec<plot::Series> = [
        Variant::Routing,
        Variant::Iptables,
        Variant::Nftables,
        Variant::PortmapTc,
        Variant::PortmapXdp,
    ]
    .iter()
    .map(|v| {
        let points = r.new_flows.iter().filter(|f| f.variant == *v);
        (
            v.name().to_string(),
            points.map(|f| (f64::from(f.mappings), f.per_second)).collect(),
        )
    })
    .collect();
    plot::log_x_chart(
        &out.join("new_flows.png"),
        "New TCP connections per second vs mappings installed",
        "mappings (traffic to the last one)",
        "connections / s",
        &series,
    )?;
    let programs =
        |name: &str, y: fn(&micro::ProgramCost) -> f64| curve(&r.programs, name, |p| p.mappings, y);
    plot::log_x_chart(
        &out.join("ebpf_cost.png"),
        "eBPF cost per packet vs mappings (BPF_PROG_TEST_RUN)",
        "mappings",
        "ns per packet",
        &[
            programs("no-op XDP", |p| p.noop_ns),
            programs("parse + forward, no NAT", |p| p.forward_floor_ns),
            programs("portmap XDP, established", |p| p.established_xdp_ns),
            programs("portmap TC, established", |p| p.established_tc_ns),
            programs("portmap XDP, new flow", |p| p.new_flow_xdp_ns),
        ],
    )?;
    let control = |name: &str, y: fn(&micro::ControlPlane) -> f64| curve(&r.control, name, |c| c.mappings, y);
    plot::log_x_chart(
        &out.join("control_plane.png"),
        "Time to install N mappings",
        "mappings",
        "ms",
        &[
            control("portmap (in the daemon)", |c| c.portmap_install_in_daemon_ms),
            control("portmap reload round trip", |c| c.portmap_install_round_trip_ms),
            control("iptables-restore", |c| c.iptables_restore_ms),
            control("nft -f", |c| c.nft_file_ms),
        ],
    )?;
    Ok(())
}
