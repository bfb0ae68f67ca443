//! `portmap stats --watch`: rates between two stats reports. Pure functions, so the arithmetic
//! (matching mappings, counters that went backwards, the first sample) is tested without a daemon.

use std::time::Duration;

use serde::Serialize;

use crate::api::control::StatsReport;

/// Per-second rates of one mapping over one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MappingRates {
    /// The mapping, as `portmap list` prints its spec.
    pub mapping: String,
    pub fwd_packets_per_s: f64,
    pub fwd_bytes_per_s: f64,
    pub reply_packets_per_s: f64,
    pub reply_bytes_per_s: f64,
    pub new_flows_per_s: f64,
}

/// What one refresh of `stats --watch` shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds between the two reports.
    pub interval_s: f64,
    /// Mappings of the newer report, in its order. A mapping the older report did not have
    /// (added meanwhile) counts from zero.
    pub mappings: Vec<MappingRates>,
    /// Global outcome counters that moved, per second, in code order.
    pub counters: Vec<(String, f64)>,
    pub active_flows: u64,
    pub flow_capacity: u64,
    pub new_flows: u64,
    pub new_flow_capacity: u64,
}

/// The rates from `old` to `new`, `elapsed` apart. A counter lower than before (the mapping was
/// removed and added again) counts from zero rather than going negative.
#[must_use]
pub fn rates(old: &StatsReport, new: &StatsReport, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let per_s = |now: u64, before: u64| {
        let delta = if now >= before { now - before } else { now };
        delta as f64 / secs
    };
    let mappings = new
        .mappings
        .iter()
        .map(|m| {
            let before = old
                .mappings
                .iter()
                .find(|o| o.mapping == m.mapping)
                .map(|o| o.counters)
                .unwrap_or_default();
            let (c, b) = (m.counters, before);
            MappingRates {
                mapping: m.mapping.to_string(),
                fwd_packets_per_s: per_s(c.fwd_packets, b.fwd_packets),
                fwd_bytes_per_s: per_s(c.fwd_bytes, b.fwd_bytes),
                reply_packets_per_s: per_s(c.reply_packets, b.reply_packets),
                reply_bytes_per_s: per_s(c.reply_bytes, b.reply_bytes),
                new_flows_per_s: per_s(c.flows, b.flows),
            }
        })
        .collect();
    let counters = new
        .counters
        .iter()
        .filter_map(|(name, now)| {
            let before = old.counter(name).unwrap_or(0);
            (*now != before).then(|| (name.clone(), per_s(*now, before)))
        })
        .collect();
    Rates {
        interval_s: secs,
        mappings,
        counters,
        active_flows: new.active_flows,
        flow_capacity: new.flow_capacity,
        new_flows: new.new_flows,
        new_flow_capacity: new.new_flow_capacity,
    }
}

/// `rates` as the table `stats --watch` prints (bytes as bits per second, as link speeds are).
#[must_use]
pub fn render(rates: &Rates) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "MAPPING (spec)", "FWD_PPS", "FWD_BPS", "REPLY_PPS", "REPLY_BPS", "FLOWS/S"
    );
    for m in &rates.mappings {
        let _ = writeln!(
            out,
            "{:<40} {:>10} {:>10} {:>10} {:>10} {:>9}",
            m.mapping,
            si(m.fwd_packets_per_s),
            si(m.fwd_bytes_per_s * 8.0),
            si(m.reply_packets_per_s),
            si(m.reply_bytes_per_s * 8.0),
            si(m.new_flows_per_s)
        );
    }
    let _ = writeln!(
        out,
        "\nflows {} / {} assured, {} / {} new; over {:.1} s",
        rates.active_flows, rates.flow_capacity, rates.new_flows, rates.new_flow_capacity, rates.interval_s
    );
    for (name, per_s) in &rates.counters {
        let _ = writeln!(out, "{name:<24} {:>10}/s", si(*per_s));
    }
    out
}

/// A rate with an SI suffix: 950, 12.3k, 4.56M, 1.20G.
fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use portmap_common::MappingCounters;

    use super::*;
    use crate::api::control::MappingStats;

    fn report(entries: &[(&str, u64)], dropped: u64) -> StatsReport {
        StatsReport {
            mappings: entries
                .iter()
                .map(|(spec, n)| MappingStats {
                    mapping: crate::model::spec::parse(spec).unwrap(),
                    counters: MappingCounters {
                        fwd_packets: *n,
                        fwd_bytes: n * 100,
                        reply_packets: n / 2,
                        reply_bytes: n * 50,
                        flows: n / 10,
                    },
                    drop_denied: 0,
                })
                .collect(),
            counters: vec![("forwarded".into(), 7), ("dropped".into(), dropped)],
            active_flows: 3,
            flow_capacity: 100,
            ..StatsReport::default()
        }
    }

    #[test]
    fn rates_per_second_by_mapping() {
        let old = report(&[("8080:198.18.1.2:80", 1000), ("53:198.18.1.2:53/udp", 10)], 4);
        let new = report(&[("8080:198.18.1.2:80", 3000), ("53:198.18.1.2:53/udp", 10)], 8);
        let r = rates(&old, &new, Duration::from_secs(2));
        assert_eq!(r.mappings[0].mapping, "8080:198.18.1.2:80/tcp");
        assert_eq!(r.mappings[0].fwd_packets_per_s, 1000.0);
        assert_eq!(r.mappings[0].fwd_bytes_per_s, 100_000.0);
        assert_eq!(r.mappings[0].reply_packets_per_s, 500.0);
        assert_eq!(r.mappings[0].new_flows_per_s, 100.0);
        assert_eq!(r.mappings[1].fwd_packets_per_s, 0.0);
        // Only counters that moved.
        assert_eq!(r.counters, vec![("dropped".to_string(), 2.0)]);
        assert_eq!((r.active_flows, r.flow_capacity), (3, 100));
    }

    #[test]
    fn new_and_re_added_mappings_count_from_zero() {
        let old = report(&[("8080:198.18.1.2:80", 5000)], 0);
        // 8080 was deleted and added again (its counters restarted); 9090 is new.
        let new = report(&[("8080:198.18.1.2:80", 40), ("9090:198.18.1.2:90", 60)], 0);
        let r = rates(&old, &new, Duration::from_secs(1));
        assert_eq!(r.mappings[0].fwd_packets_per_s, 40.0);
        assert_eq!(r.mappings[1].fwd_packets_per_s, 60.0);
    }

    #[test]
    fn render_shows_bits_with_si_suffixes() {
        let old = report(&[("8080:198.18.1.2:80", 0)], 0);
        let new = report(&[("8080:198.18.1.2:80", 25_000)], 0);
        let text = render(&rates(&old, &new, Duration::from_secs(1)));
        // 25k packets/s of 100 bytes = 20 Mbit/s.
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("8080:198.18.1.2:80"), "{text}");
        assert!(row.contains(" 25.0k ") && row.contains(" 20.00M "), "{text}");
        assert!(text.contains("flows 3 / 100 assured"), "{text}");
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1_500_000_000.0), "1.50G");
    }
}
