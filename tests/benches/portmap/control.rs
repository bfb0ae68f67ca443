//! The control plane: installing N mappings (portmap's reload, `iptables-restore`, `nft -f`)
//! and one change with N installed, each timed `samples` times from the same starting point
//! (nothing installed, or N installed) and reported as the median. One sample of a few
//! milliseconds moves by a quarter with what else the machine does; the median of several
//! installs per size, for every tool alike, is what a row can be compared on.

use std::{path::Path, time::Instant};

use anyhow::Context as _;
use portmap_tests::{Daemon, TempDir, Topology};

use crate::setup::{self, BASE_PORT, ROUTER, SINK, Variant};

/// Control-plane timings for one N (milliseconds): medians over `samples` runs; the install
/// figures keep every sample for their spread.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ControlPlane {
    pub mappings: u32,
    /// How many times each figure was measured.
    pub samples: usize,
    pub portmap_install_in_daemon_ms: f64,
    pub portmap_install_in_daemon_samples: Vec<f64>,
    pub portmap_install_round_trip_ms: f64,
    pub portmap_add_in_daemon_ms: f64,
    pub portmap_del_in_daemon_ms: f64,
    pub portmap_add_round_trip_ms: f64,
    /// One `portmap add` of a 10,000-port range, with N installed (in the daemon).
    pub portmap_add_range_10k_ms: f64,
    /// A reload that changes the backend of all N mappings (N updates, in the daemon).
    pub portmap_reload_all_changed_ms: f64,
    pub iptables_restore_ms: f64,
    pub iptables_restore_samples: Vec<f64>,
    /// `iptables -A` one rule at a time (only measured up to 1,000 rules, once).
    pub iptables_one_by_one_ms: Option<f64>,
    pub iptables_append_one_ms: f64,
    pub iptables_delete_one_ms: f64,
    pub nft_file_ms: f64,
    pub nft_file_samples: Vec<f64>,
    pub nft_add_element_ms: f64,
}

/// The median of `samples` (NaN for none).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The last "... in X ms|µs" the daemon logged for `what`, in ms.
fn logged_ms(daemon: &Daemon, what: &str) -> anyhow::Result<f64> {
    let log = daemon.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(what))
        .with_context(|| format!("no '{what}' in the daemon log"))?;
    let (_, timing) = line.rsplit_once(" in ").context("no timing")?;
    let mut parts = timing.split_whitespace();
    let value: f64 = parts.next().context("no value")?.parse()?;
    Ok(match parts.next() {
        Some(u) if u.starts_with("µs") => value / 1e3,
        _ => value,
    })
}

pub fn control_plane(n: u32, samples: usize) -> anyhow::Result<ControlPlane> {
    let samples = samples.max(1);
    let dir = TempDir::new("cp")?;
    let mut r = ControlPlane {
        mappings: n,
        samples,
        ..ControlPlane::default()
    };
    portmap(&mut r, dir.path())?;
    iptables(&mut r, dir.path())?;
    nftables(&mut r, dir.path())?;
    Ok(r)
}

/// The port of the one mapping added and deleted with N installed.
fn next_port(n: u32) -> u16 {
    BASE_PORT + n as u16
}

/// A daemon started empty; each sample reloads its config rewritten with N mappings, then with
/// all N changed, adds and deletes one mapping and a 10,000-port range, and reloads it empty.
fn portmap(r: &mut ControlPlane, dir: &Path) -> anyhow::Result<()> {
    let bed = setup::bed(Variant::Routing, 0)?;
    let config = dir.join("portmap.toml");
    let empty = setup::portmap_config(0, "tc", false);
    std::fs::write(&config, &empty)?;
    let config_arg = config.to_str().context("utf-8")?.to_string();
    let daemon = Daemon::start(&bed.topo.host, &["--config", &config_arg])?;
    let installed = setup::portmap_config(r.mappings, "tc", false);
    // Every mapping to port 81 instead of 80: N updates in one diff.
    let changed = installed.replace(":80\"", ":81\"");
    let spec = format!("{}:{SINK}:80", next_port(r.mappings));
    let range = format!("198.18.0.99:20000-29999:{SINK}:20000-29999");
    let round_trip = |args: &[&str]| -> anyhow::Result<f64> {
        let started = Instant::now();
        daemon.cli_ok(args)?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    let (mut install_round_trip, mut install, mut changed_all) = (Vec::new(), Vec::new(), Vec::new());
    let (mut add_round_trip, mut add, mut del, mut add_range) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..r.samples {
        std::fs::write(&config, &installed)?;
        install_round_trip.push(round_trip(&["reload"])?);
        install.push(logged_ms(&daemon, "reloaded")?);
        std::fs::write(&config, &changed)?;
        round_trip(&["reload"])?;
        changed_all.push(logged_ms(&daemon, "reloaded")?);
        add_round_trip.push(round_trip(&["add", &spec])?);
        add.push(logged_ms(&daemon, "added")?);
        round_trip(&["del", &spec])?;
        del.push(logged_ms(&daemon, "deleted")?);
        round_trip(&["add", &range])?;
        add_range.push(logged_ms(&daemon, "added")?);
        round_trip(&["del", &range])?;
        std::fs::write(&config, &empty)?;
        round_trip(&["reload"])?;
    }
    r.portmap_install_round_trip_ms = median(&install_round_trip);
    r.portmap_install_in_daemon_ms = median(&install);
    r.portmap_install_in_daemon_samples = install;
    r.portmap_reload_all_changed_ms = median(&changed_all);
    r.portmap_add_round_trip_ms = median(&add_round_trip);
    r.portmap_add_in_daemon_ms = median(&add);
    r.portmap_del_in_daemon_ms = median(&del);
    r.portmap_add_range_10k_ms = median(&add_range);
    Ok(())
}

/// `iptables -t nat -A|-D PORTMAP` of the one rule added and deleted with N installed.
fn iptables_rule(op: &str, n: u32) -> Vec<String> {
    let words = format!(
        "-t nat {op} PORTMAP -d {ROUTER}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {SINK}:80",
        next_port(n)
    );
    words.split(' ').map(str::to_string).collect()
}

/// Each sample restores N rules into an empty nat table, appends and deletes one rule, and
/// restores the table empty (untimed); then, up to 1,000 rules, one `iptables -A` per rule, once.
fn iptables(r: &mut ControlPlane, dir: &Path) -> anyhow::Result<()> {
    let bed = setup::bed(Variant::Routing, 0)?;
    let rules = dir.join("rules");
    std::fs::write(&rules, setup::iptables_rules(r.mappings, false))?;
    let empty = dir.join("empty");
    std::fs::write(&empty, setup::iptables_rules(0, false))?;
    let iptables = |op: &str| -> anyhow::Result<f64> {
        let args = iptables_rule(op, r.mappings);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(setup::timed_in(&bed.topo, "iptables", &args, None)? * 1e3)
    };
    let (mut restore, mut append, mut delete) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..r.samples {
        restore.push(setup::timed_in(&bed.topo, "iptables-restore", &[], Some(&rules))? * 1e3);
        append.push(iptables("-A")?);
        delete.push(iptables("-D")?);
        setup::timed_in(&bed.topo, "iptables-restore", &[], Some(&empty))?;
    }
    r.iptables_restore_ms = median(&restore);
    r.iptables_restore_samples = restore;
    r.iptables_append_one_ms = median(&append);
    r.iptables_delete_one_ms = median(&delete);
    if r.mappings <= 1_000 {
        r.iptables_one_by_one_ms = Some(iptables_one_by_one(&bed.topo, r.mappings)?);
    }
    Ok(())
}

/// `iptables -A` once per rule into the empty nat table, ms in all.
fn iptables_one_by_one(topo: &Topology, n: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    for i in 0..n {
        let port = (BASE_PORT + i as u16).to_string();
        let dst = format!("{SINK}:80");
        let args = [
            "-t",
            "nat",
            "-A",
            "PORTMAP",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &dst,
        ];
        setup::timed_in(topo, "iptables", &args, None)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// Each sample loads a table with an N-element map (`nft -f`), adds one element and deletes the
/// table (untimed).
fn nftables(r: &mut ControlPlane, dir: &Path) -> anyhow::Result<()> {
    let bed = setup::bed(Variant::Routing, 0)?;
    let file = dir.join("rules.nft");
    std::fs::write(&file, setup::nft_ruleset(r.mappings, false))?;
    let file = file.to_str().context("utf-8")?;
    let element = format!("{{ {} : {SINK} . 80 }}", next_port(r.mappings));
    let (mut load, mut add_element) = (Vec::new(), Vec::new());
    let add = ["add", "element", "ip", "pm", "tports", &element];
    for _ in 0..r.samples {
        load.push(setup::timed_in(&bed.topo, "nft", &["-f", file], None)? * 1e3);
        add_element.push(setup::timed_in(&bed.topo, "nft", &add, None)? * 1e3);
        setup::timed_in(&bed.topo, "nft", &["delete", "table", "ip", "pm"], None)?;
    }
    r.nft_file_ms = median(&load);
    r.nft_file_samples = load;
    r.nft_add_element_ms = median(&add_element);
    Ok(())
}
