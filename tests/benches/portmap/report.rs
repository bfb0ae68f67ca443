//! The report (ratios first, then targets, then absolute figures) and the plots.

use std::fmt::Write as _;

use crate::{
    control, micro, plot,
    results::{Packets, PerVariant, Results, Spread},
    setup::Variant,
};

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

/// CPU ns per packet at the fixed load (median over the repeats).
fn cpu_of(r: &Results, variant: Variant, flows: u16) -> Option<f64> {
    packets_of(r, variant, flows).and_then(|p| p.cpu_ns.map(|c| c.median))
}

/// The reply-direction measurement of `variant` at `flows`.
fn reply_of(r: &Results, variant: Variant, flows: u16) -> Option<&Packets> {
    r.replies
        .iter()
        .find(|p| p.variant == variant && p.flows == flows)
}

/// The flow counts the reply direction was measured at, ascending.
fn reply_flow_counts(r: &Results) -> Vec<u16> {
    let mut counts: Vec<u16> = r.replies.iter().map(|p| p.flows).collect();
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// Maximum forwarded packets per second (median over the repeats).
fn max_of(r: &Results, variant: Variant, flows: u16) -> Option<f64> {
    packets_of(r, variant, flows).and_then(|p| p.max_pps.map(|m| m.median))
}

/// A ratio of medians, marked "≈" when the two spreads overlap (the difference is inside the
/// run-to-run noise).
fn spread_ratio(a: Option<Spread>, b: Option<Spread>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!(
            "{:.2}×{}",
            a.median / b.median,
            if a.overlaps(&b) { " ≈" } else { "" }
        ),
        _ => "n/a".into(),
    }
}

fn pv_of(r: &Results, variant: Variant, f: fn(&PerVariant) -> f64) -> Option<f64> {
    per_variant(r, variant).map(f)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

/// The report: ratios first, then targets, then absolute figures and the machine.
pub fn report(r: &Results) -> String {
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

    ratios(&mut s, r);
    targets(&mut s, r);
    absolutes(&mut s, r);
    s
}

/// The ratio table: portmap against every peer, per metric.
fn ratios(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "## Ratios (portmap ÷ other; for CPU and latency lower is better, else higher)\n\n\
         Packet figures are ratios of medians over interleaved repeats; \"≈\" marks a ratio whose two \
         min–max spreads overlap: that difference is inside the run-to-run noise.\n"
    );
    let _ = writeln!(
        s,
        "| metric | vs routing | vs iptables-nft | vs nftables map | vs nftables stateless | vs XDP floor | vs TC redirect_peer floor |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    let spread = |v, f, key: fn(&Packets) -> Option<Spread>| packets_of(r, v, f).and_then(key);
    let peers = [
        Variant::Routing,
        Variant::Iptables,
        Variant::Nftables,
        Variant::NftStateless,
        Variant::XdpFloor,
        Variant::TcFloor,
    ];
    for (label, v) in [
        ("TC", Variant::PortmapTc),
        ("TC, FIB path", Variant::PortmapTcFib),
        ("XDP", Variant::PortmapXdp),
    ] {
        for flows in [1u16, 10_000] {
            for (metric, key) in [
                (
                    "CPU per forwarded packet",
                    (|p: &Packets| p.cpu_ns) as fn(&Packets) -> Option<Spread>,
                ),
                ("max forwarded rate", |p: &Packets| p.max_pps),
            ] {
                let cells: Vec<String> = peers
                    .iter()
                    .map(|peer| spread_ratio(spread(v, flows, key), spread(*peer, flows, key)))
                    .collect();
                let _ = writeln!(
                    s,
                    "| {metric}, portmap {label}, {flows} flow(s) | {} |",
                    cells.join(" | ")
                );
            }
        }
    }
    let reply = |v, flows| reply_of(r, v, flows).and_then(|p| p.cpu_ns);
    for flows in reply_flow_counts(r) {
        for (label, v) in [("TC", Variant::PortmapTc), ("XDP", Variant::PortmapXdp)] {
            let cells: Vec<String> = peers
                .iter()
                .map(|peer| {
                    if matches!(peer, Variant::XdpFloor | Variant::TcFloor) {
                        String::new()
                    } else {
                        spread_ratio(reply(v, flows), reply(*peer, flows))
                    }
                })
                .collect();
            let _ = writeln!(
                s,
                "| CPU per reply packet (sink → client), portmap {label}, {flows} flow(s) | {} |",
                cells.join(" | ")
            );
        }
    }
    let last_n = r.new_flows.iter().map(|f| f.mappings).max().unwrap_or(1);
    for n in [1, last_n] {
        let p = new_flows_of(r, Variant::PortmapTc, n);
        let _ = writeln!(
            s,
            "| new flows/s, portmap TC, {n} mappings | {} | {} | {} | | | |",
            ratio(p, new_flows_of(r, Variant::Routing, n)),
            ratio(p, new_flows_of(r, Variant::Iptables, n)),
            ratio(p, new_flows_of(r, Variant::Nftables, n)),
        );
    }
    let pv = |v, f| pv_of(r, v, f);
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
                "| {label}, portmap {mode} | {} | {} | {} | | | |",
                ratio(pv(v, f), pv(Variant::Routing, f)),
                ratio(pv(v, f), pv(Variant::Iptables, f)),
                ratio(pv(v, f), pv(Variant::Nftables, f)),
            );
        }
    }
}

/// The targets, each with what was measured and whether it is met.
fn targets(s: &mut String, r: &Results) {
    let (cpu, max) = (|v, f| cpu_of(r, v, f), |v, f| max_of(r, v, f));
    let pv = |v, f| pv_of(r, v, f);
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
    check(
        "local container backend: CPU per forwarded packet ≤ 0.8× routing without NAT (portmap TC, 1 flow)",
        over(cpu(Variant::PortmapTc, 1), cpu(Variant::Routing, 1)),
        "×",
        &|v| v <= 0.8,
    );
    check(
        "local container backend: CPU per forwarded packet ≤ 0.5× iptables DNAT (portmap TC, 1 flow)",
        over(cpu(Variant::PortmapTc, 1), cpu(Variant::Iptables, 1)),
        "×",
        &|v| v <= 0.5,
    );
    let last_n = r.new_flows.iter().map(|f| f.mappings).max().unwrap_or(1);
    for n in [1, last_n] {
        check(
            &format!("local container backend: new connections/s ≥ routing's (portmap TC, {n} mappings)"),
            over(
                new_flows_of(r, Variant::PortmapTc, n),
                new_flows_of(r, Variant::Routing, n),
            ),
            "×",
            &|v| v >= 1.0,
        );
    }
    for n in [10_000, 50_000] {
        if r.new_flows.iter().any(|f| f.mappings == n) {
            check(
                &format!("new flows/s with {n} mappings within ±5 % of routing (portmap TC, median)"),
                over(
                    new_flows_of(r, Variant::PortmapTc, n),
                    new_flows_of(r, Variant::Routing, n),
                ),
                "×",
                &|v| (0.95..=1.05).contains(&v),
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
            "local container backend: eBPF cost of an established-flow packet ≤ 3× the no-op program (TC)",
            Some(last.established_tc_local_ns / last.noop_ns),
            "×",
            &|v| v <= 3.0,
        );
        check(
            &format!(
                "with a {}-prefix allow-list, an established packet costs no more (eBPF, XDP, ≤ 1.05× without a list)",
                crate::allow::PREFIXES
            ),
            crate::allow::established_ratio(first),
            "×",
            &|v| v <= 1.05,
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
    // Round 3 (issue 26): every direction and every backend below routing.
    let reply_cpu = |v, flows| reply_of(r, v, flows).and_then(|p| p.cpu_ns.map(|c| c.median));
    let (tc, fib, routing) = (Variant::PortmapTc, Variant::PortmapTcFib, Variant::Routing);
    let rows: [(&str, Option<f64>, f64); 7] = [
        (
            "local backend (TC, redirect_peer): CPU per packet ≤ 0.75× routing (1 flow)",
            over(cpu(tc, 1), cpu(routing, 1)),
            0.75,
        ),
        (
            "local backend (TC): CPU per packet ≤ 1.15× the TC redirect_peer floor (1 flow)",
            over(cpu(tc, 1), cpu(Variant::TcFloor, 1)),
            1.15,
        ),
        (
            "local backend (TC): CPU per packet ≤ 0.8× routing (10,000 flows)",
            over(cpu(tc, 10_000), cpu(routing, 10_000)),
            0.8,
        ),
        (
            "local backend (TC): 10,000 flows within 10 % of 1 flow (CPU per packet)",
            over(cpu(tc, 10_000), cpu(tc, 1)),
            1.1,
        ),
        (
            "backend on another machine (TC, FIB path): CPU per packet ≤ 1.0× routing (1 flow)",
            over(cpu(fib, 1), cpu(routing, 1)),
            1.0,
        ),
        (
            "backend on another machine (TC, FIB path): CPU per packet ≤ 0.8× iptables (1 flow)",
            over(cpu(fib, 1), cpu(Variant::Iptables, 1)),
            0.8,
        ),
        (
            "backend on another machine (TC, FIB path): CPU per packet ≤ 1.1× routing (10,000 flows)",
            over(cpu(fib, 10_000), cpu(routing, 10_000)),
            1.1,
        ),
    ];
    for (what, measured, limit) in rows {
        check(what, measured, "×", &|v| v <= limit);
    }
    for flows in reply_flow_counts(r) {
        check(
            &format!("replies from a local backend (TC): CPU per packet ≤ 0.8× routing ({flows} flow(s))"),
            over(reply_cpu(tc, flows), reply_cpu(routing, flows)),
            "×",
            &|v| v <= 0.8,
        );
    }
    for n in [1, last_n] {
        check(
            &format!("new TCP connections/s ≥ 0.95× routing (portmap TC, {n} mappings)"),
            over(new_flows_of(r, tc, n), new_flows_of(r, routing, n)),
            "×",
            &|v| v >= 0.95,
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
        "10k mappings installed < 20 ms (in the daemon, median)",
        control(10_000).map(|c| c.portmap_install_in_daemon_ms),
        " ms",
        &|v| v < 20.0,
    );
    check(
        "50k mappings installed < 100 ms (in the daemon, median)",
        control(50_000).map(|c| c.portmap_install_in_daemon_ms),
        " ms",
        &|v| v < 100.0,
    );
    check(
        "a reload changing all of 50k mappings < 1 s (in the daemon)",
        control(50_000).map(|c| c.portmap_reload_all_changed_ms),
        " ms",
        &|v| v < 1000.0,
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
    let lost = r
        .flood
        .iter()
        .filter(|f| matches!(f.variant, Variant::PortmapTc | Variant::PortmapXdp))
        .map(|f| (f.idle - f.survived) as f64)
        .reduce(f64::max);
    check(
        "spoofed flood: no established connection lost (portmap, worse mode)",
        lost,
        " lost",
        &|v| v == 0.0,
    );
    check(
        "TCP throughput ≥ iptables DNAT (better mode)",
        over(best_tcp, pv(Variant::Iptables, |p| p.tcp_gbps)),
        "×",
        &|v| v >= 1.0,
    );
}

/// Absolute figures and raw samples, section by section.
fn absolutes(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## New TCP connections per second (single-threaded connect/close, RST close)\n\nTraffic goes to the \
         last-installed mapping. Routing (no NAT) is measured beside every size: its spread is the noise of this \
         measurement on this machine. At each size every variant is set up at once and measured in turn for \
         each sample, a different one first each time (a disturbance of the machine spreads over the variants); \
         the samples are listed in ascending order.\n"
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
        "\n## TCP bulk (iperf3, one stream; median of interleaved runs) and 1-byte request/response over one connection\n"
    );
    let _ = writeln!(
        s,
        "| variant | Gb/s (median) | runs | round trip p50 (µs) | p99 (µs) |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    for p in &r.per_variant {
        let runs: Vec<String> = p.tcp_gbps_runs.iter().map(|v| format!("{v:.1}")).collect();
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {:.1} | {:.1} |",
            p.variant.name(),
            p.tcp_gbps,
            runs.join(", "),
            p.rtt_p50_us,
            p.rtt_p99_us
        );
    }
    let _ = writeln!(
        s,
        "\n## 64-byte UDP\n\nThe generator (AF_PACKET sendmmsg, qdisc bypassed) runs on CPU 0; the router's receive \
         work is steered to CPU 1 (RPS, and threaded NAPI pinned there for XDP on the veth), where the sink's receive \
         work also runs (the same for every variant; the sink drops the packets at ingress with an nftables \
         netdev rule, so no socket lookup or ICMP error is measured). CPU per forwarded packet = CPU 1's busy time \
         at a fixed offered load ÷ packets that reached the sink, where busy = wall time − idle − iowait − steal \
         of the window (idle time is exact on this tickless kernel; the busy fields of /proc/stat are tick \
         samples and miss short softirq bursts); steal is reported, not counted. IPIs per 1,000 packets: \
         function-call IPIs (`CAL` in /proc/interrupts, all CPUs) in the fixed-load window; nearly all are RPS \
         handing the generator's packets to CPU 1, one whenever a packet finds CPU 1's backlog empty, so the faster \
         a variant empties it the more it gets (docs/bench/notes.md). Every variant is set up at once \
         and measured in turn, a different one first in each repeat; median [min–max] over the repeats. \
         \"sent\" is what the generator managed: where forwarded ≈ sent, the generator was the bottleneck. \
         Rows marked (replies) measure the other direction: after one packet per flow from the client, the sink \
         answers every flow (generator in the sink's namespace, the router's receive on h1 steered to CPU 1, the \
         client dropping the answers at ingress); portmap reverse-NATs them at the sink's veth and redirects them to the client (the reply hook). \
         IPVS and nftables flowtables would be the next peers, but this kernel is built without CONFIG_IP_VS and \
         CONFIG_NF_FLOW_TABLE. The sink is a container behind a veth of the router: portmap TC and XDP reach it \
         on the local fast path (TC: `bpf_redirect_peer` into its namespace; XDP: cached addresses and a devmap \
         redirect), \"portmap TC, FIB path\" is TC with `local_fast_path = false` (a FIB lookup and \
         `bpf_redirect` per packet, as for a backend on another machine).\n"
    );
    let _ = writeln!(
        s,
        "| variant | flows | CPU ns/packet (fixed load) | all CPU ns/packet | steal % | IPIs per 1,000 packets | max forwarded kpps | sent kpps |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let show = |spread: Option<Spread>, scale: f64| {
        spread.map_or_else(
            || "n/a".to_string(),
            |c| {
                format!(
                    "{:.0} [{:.0}–{:.0}]",
                    c.median / scale,
                    c.min / scale,
                    c.max / scale
                )
            },
        )
    };
    let rows = r
        .packets
        .iter()
        .map(|p| (p, ""))
        .chain(r.replies.iter().map(|p| (p, " (replies)")));
    for (p, direction) in rows {
        let _ = writeln!(
            s,
            "| {}{direction} | {} | {} | {:.0} | {:.1} | {} | {} | {:.0} |",
            p.variant.name(),
            p.flows,
            show(p.cpu_ns, 1.0),
            p.fixed.total_cpu_ns_per_packet,
            p.fixed.steal_percent,
            p.fixed
                .ipis_per_1000
                .map_or_else(|| "n/a".to_string(), |n| format!("{n:.1}")),
            show(p.max_pps, 1e3),
            p.max.sent_pps / 1e3
        );
    }
    let _ = writeln!(
        s,
        "\n## eBPF cost per packet (BPF_PROG_TEST_RUN, mean over repeated runs)\n"
    );
    let _ = writeln!(
        s,
        "| mappings | no-op XDP (ns) | parse + forward, no NAT (ns) | established, XDP (ns) | established, TC (ns) | established to a local backend, XDP (ns) | established to a local backend, TC (ns) | new flow, XDP (ns) |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for p in &r.programs {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.mappings,
            p.noop_ns,
            p.forward_floor_ns,
            p.established_xdp_ns,
            p.established_tc_ns,
            p.established_xdp_local_ns,
            p.established_tc_local_ns,
            p.new_flow_xdp_ns
        );
    }
    step_table(s, r);
    many_flows_table(s, r);
    crate::allow::table(s, r);
    let samples = r.control.first().map_or(1, |c| c.samples);
    let _ = writeln!(
        s,
        "\n## Control plane (ms)\n\nMedian of {samples} sample(s) per size for every tool, each from the same \
         starting point (an install into an empty daemon or table, a change with N installed); the installs \
         show [min–max]. \"iptables one by one\" is one pass.\n"
    );
    let spread = |median: f64, samples: &[f64]| match Spread::of(samples) {
        Some(s) if samples.len() > 1 => format!("{median:.2} [{:.2}–{:.2}]", s.min, s.max),
        _ => format!("{median:.2}"),
    };
    let _ = writeln!(
        s,
        "| mappings | portmap install (daemon) | portmap install (reload round trip) | reload changing all (daemon) | portmap add (daemon) | portmap del (daemon) | `portmap add` round trip | portmap add of a 10k-port range (daemon) | iptables-restore | iptables one by one | one `iptables -A` | one `iptables -D` | `nft -f` | one `nft add element` |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for c in &r.control {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {} | {:.1} | {:.1} | {} | {:.1} |",
            c.mappings,
            spread(
                c.portmap_install_in_daemon_ms,
                &c.portmap_install_in_daemon_samples
            ),
            c.portmap_install_round_trip_ms,
            c.portmap_reload_all_changed_ms,
            c.portmap_add_in_daemon_ms,
            c.portmap_del_in_daemon_ms,
            c.portmap_add_round_trip_ms,
            c.portmap_add_range_10k_ms,
            spread(c.iptables_restore_ms, &c.iptables_restore_samples),
            c.iptables_one_by_one_ms.map_or("—".into(), |v| format!("{v:.0}")),
            c.iptables_append_one_ms,
            c.iptables_delete_one_ms,
            spread(c.nft_file_ms, &c.nft_file_samples),
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
    let _ = writeln!(
        s,
        "\nThe daemon's own memory (VmRSS, and VmHWM: the peak while it applied the config) with N mappings \
         installed from its config:\n\n| mappings | resident MiB | peak MiB |\n| --- | --- | --- |"
    );
    for m in &r.daemon_memory {
        let _ = writeln!(s, "| {} | {:.1} | {:.1} |", m.mappings, m.rss_mib, m.peak_mib);
    }
    flood_table(s, r);
    restart_table(s, r);
}

/// The stream's longest wait across restarts.
/// The established-flow packet step by step (1 mapping): what each step adds to the one before
/// (parse over the no-op program; forward = the full program over the cut after the counters).
fn step_table(s: &mut String, r: &Results) {
    let Some(p) = r.programs.first() else { return };
    let _ = writeln!(
        s,
        "\n### eBPF cost per step of an established-flow packet ({} mapping(s); ns each step adds)\n",
        p.mappings
    );
    let _ = writeln!(
        s,
        "| program | run (no-op) | parse | conntrack lookup | rewrite | counters | forward | total | ÷ no-op |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let rows = [
        ("XDP, FIB path", p.xdp_steps_ns, p.established_xdp_ns),
        ("XDP, local backend", p.xdp_steps_ns, p.established_xdp_local_ns),
        ("TC, FIB path", p.tc_steps_ns, p.established_tc_ns),
        ("TC, local backend", p.tc_steps_ns, p.established_tc_local_ns),
    ];
    for (name, steps, full) in rows {
        let _ = writeln!(
            s,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {full:.0} | {:.1}× |",
            p.noop_ns,
            steps[0] - p.noop_ns,
            steps[1] - steps[0],
            steps[2] - steps[1],
            steps[3] - steps[2],
            full - steps[3],
            full / p.noop_ns
        );
    }
}

/// The established-flow packet over `MANY_FLOWS` flows beside the same packet of one flow, and
/// the TC program cut after its conntrack lookup both ways: what the flow count adds inside
/// the program, and how much of it is the lookup.
fn many_flows_table(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n### eBPF cost of an established-flow packet over {} flows (each run on the next flow's packet)\n",
        crate::micro::MANY_FLOWS
    );
    let _ = writeln!(
        s,
        "| mappings | XDP, FIB path: 1 flow (ns) | {n} flows (ns) | ÷ 1 flow | TC, local backend: 1 flow (ns) | {n} flows (ns) | ÷ 1 flow | TC up to the conntrack lookup: 1 flow (ns) | {n} flows (ns) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        n = crate::micro::MANY_FLOWS
    );
    for p in &r.programs {
        let Some(m) = &p.many_flows else { continue };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} |",
            p.mappings,
            p.established_xdp_ns,
            m.established_xdp_ns,
            m.established_xdp_ns / p.established_xdp_ns,
            p.established_tc_local_ns,
            m.established_tc_local_ns,
            m.established_tc_local_ns / p.established_tc_local_ns,
            p.tc_steps_ns[1],
            m.tc_lookup_ns
        );
    }
}

fn restart_table(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## A TCP stream across daemon restarts\n\nOne connection exchanges a 64-byte message every \
         millisecond through a published port while the daemon is stopped and started again (the datapath \
         stays and is adopted). A lost packet would show as a wait of 200 ms or more (TCP's minimum \
         retransmission timeout).\n\n| mode | phase | messages | longest wait (ms) |\n| --- | --- | --- | --- |"
    );
    for run in &r.restarts {
        for p in &run.phases {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} |",
                run.mode, p.phase, p.messages, p.longest_ms
            );
        }
    }
}

/// Idle connections through a flood of spoofed flows.
fn flood_table(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## Flood of spoofed flows\n\nEach spoofed flow is a SYN and an ACK from a source in 198.19.0.0/16 \
         (never answered); 20 idle connections are open before, and their server speaks first after \
         it. Table: flows the variant keeps for new connections (portmap: `conntrack_new_entries` / 2; \
         netfilter: nf_conntrack_max).\n"
    );
    let _ = writeln!(
        s,
        "| variant | spoofed flows | kpps | table (flows) | overcommit | idle survived | new connections |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for f in &r.flood {
        let overcommit = f.table_flows.filter(|t| *t > 0).map_or("n/a".to_string(), |t| {
            format!("{:.1}×", f64::from(f.flows) / t as f64)
        });
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {overcommit} | {}/{} | {}/{} |",
            f.variant.name(),
            f.flows,
            f.packets_per_second / 1e3,
            f.table_flows.map_or("n/a".to_string(), |t| t.to_string()),
            f.survived,
            f.idle,
            f.new_ok,
            f.new_tried
        );
    }
}

/// One line of a scaling plot: (mappings, value) for each measurement.
fn curve<T>(items: &[T], name: &str, x: fn(&T) -> u32, y: fn(&T) -> f64) -> plot::Series {
    (
        name.to_string(),
        items.iter().map(|i| (f64::from(x(i)), y(i))).collect(),
    )
}

pub fn plots(r: &Results, out: &std::path::Path) -> anyhow::Result<()> {
    let series: Vec<plot::Series> = Variant::STACK
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
            programs("portmap TC, established, local backend", |p| {
                p.established_tc_local_ns
            }),
            programs("portmap XDP, new flow", |p| p.new_flow_xdp_ns),
        ],
    )?;
    let control =
        |name: &str, y: fn(&control::ControlPlane) -> f64| curve(&r.control, name, |c| c.mappings, y);
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
