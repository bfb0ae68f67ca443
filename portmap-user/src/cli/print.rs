//! What the CLI prints: tables, JSON, `docker port` lines, and `stats --watch`.

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use crate::api::control::{Listed, StatsReport};

/// One line of output.
pub fn line(text: &str) {
    println!("{text}");
}

pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `list`: one line per published port in `docker port` style, its owner, and its own
/// allow-list if it has one (`allow 198.18.1.0/24,198.18.3.7/32`).
pub fn mappings(mappings: &[Listed]) {
    for listed in mappings {
        let owner = listed.short_owner();
        let allow = if listed.mapping.allow.is_empty() {
            String::new()
        } else {
            let prefixes: Vec<String> = listed.mapping.allow.iter().map(ToString::to_string).collect();
            format!("  allow {}", prefixes.join(","))
        };
        for line in listed.mapping.docker_lines() {
            println!("{line}  {owner}{allow}");
        }
    }
}

/// `stats --watch`: asks for stats every `interval` and shows the rates since the previous
/// answer, in place on a terminal (one block after the other otherwise, one JSON line each with
/// `--json`).
pub fn watch_stats(socket: &Path, json: bool, interval: Duration, count: Option<u64>) -> anyhow::Result<()> {
    let sample = || super::client::fetch_stats(socket).map(|stats| (stats, Instant::now()));
    let in_place = !json && std::io::stdout().is_terminal();
    let (mut old, mut at) = sample()?;
    let mut shown = 0;
    while count.is_none_or(|n| shown < n) {
        std::thread::sleep(interval.saturating_sub(at.elapsed()));
        let (new, now) = sample()?;
        let rates = super::rates::rates(&old, &new, now - at);
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string(&rates)?)?;
        } else if in_place {
            // Home the cursor and clear the screen, then draw the table.
            write!(out, "\x1b[H\x1b[2J{}", super::rates::render(&rates))?;
        } else {
            writeln!(out, "{}", super::rates::render(&rates))?;
        }
        out.flush()?;
        (old, at) = (new, now);
        shown += 1;
    }
    Ok(())
}

pub fn stats(stats: &StatsReport) {
    println!(
        "{:<40} {:>12} {:>14} {:>12} {:>14} {:>8} {:>8}",
        "MAPPING (spec)", "FWD_PKTS", "FWD_BYTES", "REPLY_PKTS", "REPLY_BYTES", "FLOWS", "DENIED"
    );
    for m in &stats.mappings {
        println!(
            "{:<40} {:>12} {:>14} {:>12} {:>14} {:>8} {:>8}",
            m.mapping.to_string(),
            m.counters.fwd_packets,
            m.counters.fwd_bytes,
            m.counters.reply_packets,
            m.counters.reply_bytes,
            m.counters.flows,
            m.drop_denied
        );
    }
    println!();
    println!("{:<24} {:>14}", "COUNTER", "VALUE");
    for (name, value) in &stats.counters {
        println!("{name:<24} {value:>14}");
    }
    println!("{:<24} {:>14}", "active_flows", stats.active_flows);
    println!("{:<24} {:>14}", "flow_capacity", stats.flow_capacity);
    println!("{:<24} {:>14}", "new_flows", stats.new_flows);
    println!("{:<24} {:>14}", "new_flow_capacity", stats.new_flow_capacity);
    for (iface, attached) in &stats.interfaces {
        let state = if *attached {
            "attached"
        } else {
            "MISSING (attached again when it comes back)"
        };
        println!("interface {iface:<14} {state}");
    }
    for b in &stats.local_backends {
        println!("local backend {} via {} ({})", b.addr, b.device, b.mac);
    }
    if let Some(docker) = &stats.docker {
        match &docker.error {
            None => println!("docker {} connected", docker.url),
            Some(error) => println!("docker {} DISCONNECTED: {error}", docker.url),
        }
    }
}
