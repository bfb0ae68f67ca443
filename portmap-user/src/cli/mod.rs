//! The `portmap` command line (clap derive), in the library so that tests check manifests and
//! scripts against the real definitions.

pub mod client;
pub mod print;
pub mod rates;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use crate::config::Overrides;

#[derive(Parser)]
#[command(
    name = "portmap",
    version,
    about = "Publish host ports to backends in the kernel's fast path (eBPF/XDP)"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "PORTMAP_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (until SIGTERM/SIGINT).
    Run {
        /// Configuration file (TOML, or JSON if it ends in .json). Default:
        /// /etc/portmap/portmap.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Settings that replace the config file's.
        #[command(flatten)]
        overrides: Box<Overrides>,
    },
    /// Publish ports: [HOST_IP:][HOST_PORT[-END]]:BACKEND_IP:PORT[-END][,BACKEND...][/tcp|udp|sctp].
    /// Without a host port one is allocated from the dynamic range and printed. BACKEND_IP 0.0.0.0
    /// or [::] is the host itself at the address each packet came to (iptables' REDIRECT:
    /// 8082:0.0.0.0:8080).
    Add {
        spec: String,
        /// A further backend, IP:PORT[-END][@WEIGHT] (repeatable); flows are balanced with Maglev.
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Only clients from this prefix may start flows (ADDR/LEN or one address, of the
        /// mapping's family; repeatable or comma-separated). Default: the config's `allow`, or
        /// everyone.
        #[arg(long = "allow", value_name = "PREFIX", value_delimiter = ',', value_parser = parse_allow)]
        allow: Vec<ipnet::IpNet>,
    },
    /// Replace the backends of a published port (same host address and ports); its established
    /// flows keep their backend until they end. Its allow-list stays unless --allow or
    /// --allow-all is given; flows of clients a narrowed list leaves out end at once.
    Update {
        spec: String,
        /// A further backend, IP:PORT[-END][@WEIGHT] (repeatable).
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// The mapping's allow-list from now on, replacing its own (repeatable or
        /// comma-separated).
        #[arg(long = "allow", value_name = "PREFIX", value_delimiter = ',', value_parser = parse_allow)]
        allow: Vec<ipnet::IpNet>,
        /// Remove the mapping's own allow-list (the config's `allow` applies, or none).
        #[arg(long, conflicts_with = "allow")]
        allow_all: bool,
    },
    /// Remove published ports (the spec as added, or as `list` shows it).
    Del { spec: String },
    /// List published ports, one line per port in `docker port` style, with its owner:
    /// `config`, `cli` (`portmap add`) or the container (NETWORK/CONTAINER_ID/IFNAME).
    List {
        /// JSON: `{"mappings": [...]}` with an `owner` field each, which is also a valid
        /// config file (`--config x.json`; the config owns what it lists).
        #[arg(long)]
        json: bool,
        /// Only the mappings of this owner: as listed, or a prefix of a container's ID.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Which host ports lead to a backend: BACKEND_IP[:PORT][/PROTO] (like `docker port`).
    Port { backend: String },
    /// Read the config file again and apply its mappings as one change (also on SIGHUP).
    Reload,
    /// Remove everything portmap attached: its links (its XDP, TC and cgroup programs detach),
    /// maps, pins and saved state. Stopping the daemon leaves the datapath forwarding for the next
    /// daemon to adopt; this removes it (established flows end). Refuses while a daemon runs.
    Cleanup {
        /// bpffs directory of the pins (default /sys/fs/bpf/portmap).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// The daemon's saved mappings (default /run/portmap/state.json).
        #[arg(long)]
        state_file: Option<PathBuf>,
    },
    /// Print a completion script for a shell (bash: save it as
    /// /usr/share/bash-completion/completions/portmap; zsh: as _portmap in your $fpath; fish:
    /// as ~/.config/fish/completions/portmap.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Show per-mapping and global counters.
    Stats {
        #[arg(long)]
        json: bool,
        /// Show live per-second rates, refreshed in place every --interval (Ctrl-C ends it);
        /// with --json, one JSON object of rates per line.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes of --watch (fractions allowed, at least 0.1).
        #[arg(long, default_value = "1", requires = "watch", value_parser = parse_interval)]
        interval: Duration,
        /// Stop --watch after this many refreshes (default: run until interrupted).
        #[arg(long, requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
}

/// One `--allow` prefix (`model::allow::parse_prefix`).
pub fn parse_allow(text: &str) -> Result<ipnet::IpNet, String> {
    crate::model::allow::parse_prefix(text).map_err(|e| e.to_string())
}

pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(format!("{secs} s is out of range 0.1-86400"));
    }
    Ok(Duration::from_secs_f64(secs))
}
