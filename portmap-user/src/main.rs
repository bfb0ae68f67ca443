//! `portmap`: publish host ports to backends with an eBPF/XDP datapath.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portmap::{
    config::{self, AttachMode, Config},
    control::{self, Request, Response, StatsReport},
    daemon,
};

#[derive(Parser)]
#[command(
    name = "portmap",
    version,
    about = "Publish host ports to backends in the kernel's fast path (eBPF/XDP)"
)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "PORTMAP_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (until SIGTERM/SIGINT).
    Run {
        /// Configuration file (TOML). Default: /etc/portmap/portmap.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Client-facing interface (repeatable); replaces the config's `interfaces`.
        #[arg(long = "iface")]
        ifaces: Vec<String>,
        /// How to attach the ingress program.
        #[arg(long, value_enum)]
        attach: Option<AttachMode>,
        /// Extra device XDP may redirect to (repeatable); replaces `redirect_interfaces`.
        #[arg(long = "redirect-iface")]
        redirect_ifaces: Vec<String>,
        /// bpffs directory for pinned maps and links.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Publish a port: [HOST_IP:]HOST_PORT:BACKEND_IP:BACKEND_PORT[/tcp|udp].
    Add { spec: String },
    /// Remove a published port (same spec as it was added with).
    Del { spec: String },
    /// List mappings, one per line in `docker port` style.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show per-mapping and global counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

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
        } => {
            let mut cfg = load_config(config)?;
            if !ifaces.is_empty() {
                cfg.interfaces = ifaces;
            }
            if !redirect_ifaces.is_empty() {
                cfg.redirect_interfaces = redirect_ifaces;
            }
            if let Some(attach) = attach {
                cfg.attach = attach;
            }
            if let Some(dir) = pin_dir {
                cfg.pin_dir = dir;
            }
            if let Some(socket) = socket {
                cfg.socket = socket;
            }
            let valid = cfg.validate()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(valid))
        }
        Command::Add { spec } => simple(&client_socket(), &Request::Add { spec }),
        Command::Del { spec } => simple(&client_socket(), &Request::Del { spec }),
        Command::List { json } => match control::call(&client_socket(), &Request::List)? {
            Response::Mappings { mappings } if json => print_json(&mappings),
            Response::Mappings { mappings } => {
                for m in mappings {
                    println!("{}", m.docker_line());
                }
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Stats { json } => match control::call(&client_socket(), &Request::Stats)? {
            Response::Stats { stats } if json => print_json(&stats),
            Response::Stats { stats } => {
                print_stats(&stats);
                Ok(())
            }
            other => unexpected(other),
        },
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let (path, required) = match path {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Config::from_toml(&text).with_context(|| format!("{}", path.display())),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
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

fn print_stats(stats: &StatsReport) {
    println!(
        "{:<40} {:>12} {:>14} {:>12} {:>14} {:>8}",
        "MAPPING", "FWD_PKTS", "FWD_BYTES", "REPLY_PKTS", "REPLY_BYTES", "FLOWS"
    );
    for m in &stats.mappings {
        println!(
            "{:<40} {:>12} {:>14} {:>12} {:>14} {:>8}",
            m.mapping.docker_line(),
            m.fwd_packets,
            m.fwd_bytes,
            m.reply_packets,
            m.reply_bytes,
            m.flows
        );
    }
    println!();
    println!("{:<24} {:>14}", "COUNTER", "VALUE");
    for (name, value) in &stats.counters {
        println!("{name:<24} {value:>14}");
    }
    println!("{:<24} {:>14}", "active_flows", stats.active_flows);
    println!("{:<24} {:>14}", "flow_capacity", stats.flow_capacity);
}
