//! `portmap`: publish host ports to backends with an eBPF/XDP datapath.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser as _;
use portmap::{
    api::control::{self, Request, Response, StatsReport},
    cli::{Cli, Command},
    config::{self, Config},
    daemon,
    model::mapping::Mapping,
    model::spec,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_daemon = matches!(cli.command, Command::Run { .. });
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if is_daemon {
        "info"
    } else {
        "warn"
    }))
    .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portmap: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket.clone();
    let client_socket = || socket.clone().unwrap_or_else(|| config::DEFAULT_SOCKET.into());
    match cli.command {
        Command::Run {
            config,
            ifaces,
            attach,
            redirect_ifaces,
            pin_dir,
            state_file,
            cgroup,
            cgroup_mount,
            metrics,
        } => {
            let overrides = config::Overrides {
                interfaces: ifaces,
                attach,
                redirect_interfaces: redirect_ifaces,
                pin_dir,
                socket,
                state_file,
                cgroup,
                cgroup_mount,
                metrics,
            };
            let (mut cfg, path) = load_config(config)?;
            overrides.apply(&mut cfg);
            let valid = cfg.validate()?;
            let reload = path.map(|path| daemon::ReloadSource { path, overrides });
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(valid, reload))
        }
        Command::Add { spec, backends } => simple(
            &client_socket(),
            &Request::Add {
                spec: with_backends(&spec, &backends)?,
            },
        ),
        Command::Update { spec, backends } => simple(
            &client_socket(),
            &Request::Update {
                spec: with_backends(&spec, &backends)?,
            },
        ),
        Command::Del { spec } => simple(&client_socket(), &Request::Del { spec }),
        Command::Reload => simple(&client_socket(), &Request::Reload),
        Command::Cleanup { pin_dir, state_file } => {
            let pin_dir = pin_dir.unwrap_or_else(|| config::DEFAULT_PIN_DIR.into());
            let state_file = state_file.unwrap_or_else(|| config::DEFAULT_STATE_FILE.into());
            let removed = portmap::datapath::cleanup(
                &pin_dir,
                &client_socket(),
                &portmap::daemon::state_files(&state_file),
            )?;
            if removed.is_empty() {
                println!("nothing to clean up in {}", pin_dir.display());
            }
            for path in removed {
                println!("removed {}", path.display());
            }
            Ok(())
        }
        Command::List { json } => {
            let mappings = list(&client_socket())?;
            if json {
                return print_json(&serde_json::json!({ "mappings": mappings }));
            }
            for m in mappings {
                for line in m.docker_lines() {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "portmap", &mut std::io::stdout());
            Ok(())
        }
        Command::Port { backend } => {
            let query = spec::PortQuery::parse(&backend)?;
            let lines = spec::port_lines(&list(&client_socket())?, &query);
            // As `docker port`: a port nobody publishes is an error, no port at all is not.
            if let Some((port, protocol)) = query.port
                && lines.is_empty()
            {
                anyhow::bail!(
                    "No public port '{port}/{protocol}' published for {}",
                    portmap::model::mapping::SpecAddr(query.ip)
                );
            }
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        Command::Stats {
            json,
            watch: true,
            interval,
            count,
        } => watch_stats(&client_socket(), json, interval, count),
        Command::Stats { json: true, .. } => print_json(&fetch_stats(&client_socket())?),
        Command::Stats { .. } => {
            print_stats(&fetch_stats(&client_socket())?);
            Ok(())
        }
    }
}

/// The spec with `--backend` arguments added to its backends, in canonical form.
fn with_backends(spec: &str, backends: &[String]) -> anyhow::Result<String> {
    if backends.is_empty() {
        return Ok(spec.to_string());
    }
    let mut mapping = spec::parse(spec)?;
    for b in backends {
        mapping
            .backends
            .push(spec::parse_backend_arg(b).with_context(|| format!("--backend {b}"))?);
    }
    spec::check(&mapping, &mapping.to_string())?;
    Ok(mapping.to_string())
}

fn list(socket: &std::path::Path) -> anyhow::Result<Vec<Mapping>> {
    match control::call(socket, &Request::List)? {
        Response::Mappings { mappings } => Ok(mappings),
        other => unexpected(other).map(|()| Vec::new()),
    }
}

/// The config, and the file it came from (what `reload` reads again), if any.
fn load_config(path: Option<PathBuf>) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let (path, required) = match path {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    if !required && !path.exists() {
        return Ok((Config::default(), None));
    }
    Ok((Config::read(&path)?, Some(path)))
}

fn simple(socket: &std::path::Path, request: &Request) -> anyhow::Result<()> {
    match control::call(socket, request)? {
        Response::Ok { message } => {
            println!("{message}");
            Ok(())
        }
        other => unexpected(other),
    }
}

fn unexpected(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The daemon's stats report.
fn fetch_stats(socket: &Path) -> anyhow::Result<StatsReport> {
    match control::call(socket, &Request::Stats)? {
        Response::Stats { stats } => Ok(stats),
        other => Err(unexpected(other).expect_err("unexpected() always fails")),
    }
}

/// `--interval`: seconds, fractions allowed, at least 0.1 (a daemon asked more often than that
/// spends its time answering).
/// `stats --watch`: asks for stats every `interval` and shows the rates since the previous
/// answer, in place on a terminal (one block after the other otherwise, one JSON line each with
/// `--json`).
fn watch_stats(socket: &Path, json: bool, interval: Duration, count: Option<u64>) -> anyhow::Result<()> {
    let sample = || fetch_stats(socket).map(|stats| (stats, Instant::now()));
    let in_place = !json && std::io::stdout().is_terminal();
    let (mut old, mut at) = sample()?;
    let mut shown = 0;
    while count.is_none_or(|n| shown < n) {
        std::thread::sleep(interval.saturating_sub(at.elapsed()));
        let (new, now) = sample()?;
        let rates = portmap::cli::rates::rates(&old, &new, now - at);
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string(&rates)?)?;
        } else if in_place {
            // Home the cursor and clear the screen, then draw the table.
            write!(out, "\x1b[H\x1b[2J{}", portmap::cli::rates::render(&rates))?;
        } else {
            writeln!(out, "{}", portmap::cli::rates::render(&rates))?;
        }
        out.flush()?;
        (old, at) = (new, now);
        shown += 1;
    }
    Ok(())
}

fn print_stats(stats: &StatsReport) {
    println!(
        "{:<40} {:>12} {:>14} {:>12} {:>14} {:>8}",
        "MAPPING (spec)", "FWD_PKTS", "FWD_BYTES", "REPLY_PKTS", "REPLY_BYTES", "FLOWS"
    );
    for m in &stats.mappings {
        println!(
            "{:<40} {:>12} {:>14} {:>12} {:>14} {:>8}",
            m.mapping.to_string(),
            m.counters.fwd_packets,
            m.counters.fwd_bytes,
            m.counters.reply_packets,
            m.counters.reply_bytes,
            m.counters.flows
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
}
