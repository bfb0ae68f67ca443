//! What a source allow-list costs: the list every allow-list measurement uses (1,000 IPv4
//! prefixes, the generator's address among them), its eBPF cost per packet through
//! `BPF_PROG_TEST_RUN`, and the report's section that puts every allow-list figure beside the
//! same figure without a list.

use std::{fmt::Write as _, net::Ipv4Addr};

use crate::{micro::ProgramCost, results::Results, setup::Variant};

/// Prefixes in the benchmark's allow-list.
pub const PREFIXES: usize = 1_000;

/// A client outside the list (for the cost of a refused new flow).
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 7);

/// The list, as a user writes it: the generator's own address (198.18.0.2/32) in the middle of
/// 499 other single addresses of its /23 (the deepest path through the trie: the lookup walks
/// the dense part to a /32), and 500 /28s of 198.19.0.0/16. Sorted; `OUTSIDE` matches none.
pub fn prefixes() -> Vec<String> {
    let hosts = (0..)
        .map(|i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i))
        .filter(|a| a.octets()[3] != 0)
        .take(PREFIXES / 2)
        .map(|a| format!("{a}/32"));
    let nets = (0..PREFIXES as u32 / 2).map(|i| {
        format!(
            "{}/28",
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i * 16)
        )
    });
    hosts.chain(nets).collect()
}

/// The list as the config's top-level `allow` line (every mapping without its own list).
pub fn config_line() -> String {
    let quoted: Vec<String> = prefixes().iter().map(|p| format!("\"{p}\"")).collect();
    format!("allow = [{}]\n", quoted.join(", "))
}

/// ns per run with `PREFIXES` prefixes on the measured mapping, beside `ProgramCost`'s figures
/// without a list (the same flow, the same frames).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AllowCost {
    /// The established flow's next packet (the list is only consulted where a flow starts).
    pub established_xdp_ns: f64,
    pub established_tc_ns: f64,
    /// A new flow from a client on the list: the lookup, then what any new flow costs.
    pub new_flow_xdp_ns: f64,
    /// A new flow from `OUTSIDE`: dropped after the lookup (`drop_denied`).
    pub new_flow_refused_xdp_ns: f64,
}

/// The report's allow-list section: every figure with the list beside the same one without.
pub fn table(s: &mut String, r: &Results) {
    let tc_cpu = |v, flows| {
        r.packets
            .iter()
            .find(|p| p.variant == v && p.flows == flows)
            .and_then(|p| p.cpu_ns.map(|c| c.median))
    };
    let new_flows = |v, n| {
        r.new_flows
            .iter()
            .find(|f| f.variant == v && f.mappings == n)
            .map(|f| f.per_second)
    };
    let mut rows: Vec<(String, Option<f64>, Option<f64>, &str)> = Vec::new();
    for flows in [1u16, 10_000] {
        rows.push((
            format!("CPU per forwarded packet, portmap TC, {flows} established flow(s)"),
            tc_cpu(Variant::PortmapTc, flows),
            tc_cpu(Variant::PortmapTcAllow, flows),
            "ns",
        ));
    }
    let mut sizes: Vec<u32> = r.new_flows.iter().map(|f| f.mappings).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        rows.push((
            format!("new TCP connections/s, portmap TC, {n} mapping(s)"),
            new_flows(Variant::PortmapTc, n),
            new_flows(Variant::PortmapTcAllow, n),
            "/s",
        ));
    }
    // The fewest and the most mappings measured (the list's cost does not depend on them).
    let mut ends: Vec<&ProgramCost> = r.programs.first().into_iter().chain(r.programs.last()).collect();
    ends.dedup_by_key(|p| p.mappings);
    for p in ends {
        let Some(a) = &p.allow else { continue };
        let m = p.mappings;
        let eb = |plain: f64, with: f64| (Some(plain), Some(with), "ns");
        for (what, (plain, with, unit)) in [
            (
                "eBPF, established packet, XDP",
                eb(p.established_xdp_ns, a.established_xdp_ns),
            ),
            (
                "eBPF, established packet, TC",
                eb(p.established_tc_ns, a.established_tc_ns),
            ),
            (
                "eBPF, new flow from a listed client, XDP",
                eb(p.new_flow_xdp_ns, a.new_flow_xdp_ns),
            ),
            (
                "eBPF, new flow from outside the list (dropped), XDP",
                (None, Some(a.new_flow_refused_xdp_ns), "ns"),
            ),
        ] {
            rows.push((format!("{what}, {m} mapping(s)"), plain, with, unit));
        }
    }
    let _ = writeln!(
        s,
        "\n## Source allow-list ({PREFIXES} prefixes)\n\n\"portmap TC, allow-list\" is portmap TC with the \
         config's top-level `allow` set to {PREFIXES} IPv4 prefixes: 500 single addresses of 198.18.0.0/23, \
         the generator's among them, and 500 /28s of 198.19.0.0/16. The list is consulted once, where a \
         flow starts (a miss in the flow table); established packets and replies do not look at it. The \
         eBPF rows set the same list on the measured mapping and time the same frames as the table above.\n"
    );
    let _ = writeln!(s, "| measurement | without a list | with the list | ratio |");
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    let show = |v: Option<f64>, unit: &str| v.map_or("not measured".into(), |v| format!("{v:.1} {unit}"));
    for (what, plain, with, unit) in rows {
        let ratio = match (plain, with) {
            (Some(p), Some(w)) if p > 0.0 => format!("{:.2}×", w / p),
            _ => "—".into(),
        };
        let plain = if plain.is_none() && with.is_some() {
            "—".to_string()
        } else {
            show(plain, unit)
        };
        let _ = writeln!(s, "| {what} | {plain} | {} | {ratio} |", show(with, unit));
    }
}

/// The established packet's eBPF cost with the list over without it (the first program run,
/// XDP): the "flows already allowed cost no more" as a number.
pub fn established_ratio(p: &ProgramCost) -> Option<f64> {
    p.allow
        .as_ref()
        .map(|a| a.established_xdp_ns / p.established_xdp_ns)
}
