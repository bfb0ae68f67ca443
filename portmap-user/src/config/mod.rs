//! The daemon's configuration (TOML, or JSON such as `portmap list --json` prints), validated as
//! a whole before anything is applied.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use portmap_common::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK_NEW_ENTRIES, DEFAULT_MAX_BACKEND_GROUPS,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_MAPPINGS,
};
use serde::{Deserialize, Serialize};

use crate::{
    model::mapping::{Mapping, PortRange},
    model::spec::{self, SpecError},
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/portmap/portmap.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portmap";
pub const DEFAULT_SOCKET: &str = "/run/portmap/portmap.sock";
/// The daemon's saved mappings, for the next daemon (on tmpfs, like the pins: both are gone
/// after a reboot).
pub const DEFAULT_STATE_FILE: &str = "/run/portmap/state.json";
/// The whole host: every process reaches published ports as a host-local client.
pub const DEFAULT_CGROUP: &str = "/";

/// How the ingress program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// XDP (driver mode) on NICs that support it, TC on everything else (veth, bridges, ...).
    #[default]
    Auto,
    /// XDP on every interface (on a veth this turns off the peer's TSO/GSO).
    Xdp,
    /// TC on every interface: tcx links (kernel >= 6.6), or cls_bpf filters on a clsact qdisc
    /// on older kernels (`PORTMAP_TC_NETLINK=1` forces those).
    Tc,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Idle timeout of an established TCP flow (RFC 5382: at least 2 h 4 min).
    pub tcp_seconds: u64,
    /// How long a TCP flow lives on after its first FIN or RST.
    pub tcp_close_seconds: u64,
    /// Idle timeout of a TCP flow whose handshake has not completed (Cilium's default).
    pub tcp_syn_seconds: u64,
    /// Idle timeout of a UDP flow (RFC 4787: at least 2 min).
    pub udp_seconds: u64,
    /// How often the daemon walks the flow table to expire flows.
    pub gc_interval_seconds: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_seconds: 7440,
            tcp_close_seconds: 10,
            tcp_syn_seconds: 60,
            udp_seconds: 120,
            gc_interval_seconds: 5,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Published ports (a range of N ports counts N).
    pub max_mappings: u32,
    /// Conntrack entries of assured flows (never evicted); each flow takes two.
    pub conntrack_entries: u32,
    /// Conntrack entries of flows not assured yet (an LRU: a flood of new flows sheds only
    /// these); each flow takes two.
    pub conntrack_new_entries: u32,
    /// Backends of mappings with several backends, all together.
    pub max_backends: u32,
    /// Mappings with several backends (each has a Maglev table of 16 KiB).
    pub max_backend_groups: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_mappings: DEFAULT_MAX_MAPPINGS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            conntrack_new_entries: DEFAULT_CONNTRACK_NEW_ENTRIES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_backend_groups: DEFAULT_MAX_BACKEND_GROUPS,
        }
    }
}

/// Docker's range for dynamically allocated host ports when the kernel's cannot be read (the
/// daemon uses `net.ipv4.ip_local_port_range` of its network namespace, as Docker does).
pub const DEFAULT_DYNAMIC_PORTS: PortRange = PortRange {
    start: 49153,
    end: 60999,
};

/// A mapping in the config: a spec string, a spec with its allow-list
/// (`{ spec = "5432:198.18.2.2:5432", allow = ["198.18.1.0/24"] }`), or the structured form
/// `portmap list --json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MappingEntry {
    Spec(String),
    WithAllow(SpecWithAllow),
    Structured(Mapping),
}

/// A spec string and the mapping's own source allow-list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecWithAllow {
    pub spec: String,
    /// As written (a bad prefix is named by `parse`, which an untagged enum's error cannot).
    #[serde(default)]
    pub allow: Vec<String>,
}

impl MappingEntry {
    fn parse(&self) -> Result<Mapping, SpecError> {
        let checked = |m: Mapping| {
            let m = m.with_allow(m.allow.clone());
            spec::check(&m, &m.to_string()).map(|()| m)
        };
        match self {
            Self::Spec(text) => spec::parse(text),
            Self::WithAllow(entry) => {
                let allow = entry
                    .allow
                    .iter()
                    .map(|p| crate::model::allow::parse_prefix(p))
                    .collect::<Result<Vec<_>, _>>()?;
                checked(spec::parse(&entry.spec)?.with_allow(allow))
            }
            Self::Structured(m) => checked(m.clone()),
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Spec(text) => text.clone(),
            Self::WithAllow(entry) => entry.spec.clone(),
            Self::Structured(m) => m.to_string(),
        }
    }
}

/// `portmap.toml`: every key is optional (see the README for an example), in two parts by when
/// it applies. A reload applies `live` and keeps `startup` as the daemon started with it (it says
/// which startup keys changed). Both are read from the same table; a key neither has is an
/// error naming it (`known_keys`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Config {
    #[serde(flatten)]
    pub startup: Startup,
    #[serde(flatten)]
    pub live: Live,
}

/// The settings that take effect when the daemon starts: where it attaches, pins, listens and
/// saves, and the sizes of its maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Startup {
    /// Client-facing interfaces (where published ports are reached).
    pub interfaces: Vec<String>,
    pub attach: AttachMode,
    /// Extra devices the XDP program may redirect to directly (a veth listed here must have GRO
    /// or an XDP program on its peer). Everything else is reached through the kernel's routing.
    pub redirect_interfaces: Vec<String>,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    /// Where the daemon saves its mappings after every change, for the next daemon that adopts
    /// the pinned datapath.
    pub state_file: PathBuf,
    /// The cgroup (v2, as /proc/PID/cgroup shows it) whose processes reach published ports as
    /// host-local clients: the socket hooks are attached there. `/`: every process of the host.
    pub cgroup: PathBuf,
    /// Where the host's cgroup v2 hierarchy is mounted (its root, as `cgroup` paths start from);
    /// default: found in /proc/self/mountinfo. For a daemon in a container, whose own cgroup
    /// mount shows only its cgroup namespace (the Kubernetes DaemonSet mounts the host's).
    pub cgroup_mount: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`GET /metrics`), `"ADDR:PORT"`; off when absent.
    pub metrics: Option<SocketAddr>,
    /// A CNI configuration directory (podman's `/etc/cni/net.d`): portmap-cni is chained into
    /// every `.conflist` there (in place of the reference `portmap` plugin), at start and
    /// whenever one appears or changes, so networks created later publish through portmap.
    pub cni_conf_dir: Option<PathBuf>,
    /// Docker Engine's API (`unix:///var/run/docker.sock`): the daemon publishes what every
    /// container's `-p`/`-P` (and Compose `ports:`) publish, and follows their lifecycle. Off
    /// when absent.
    pub docker: Option<DockerUrl>,
    pub limits: Limits,
}

/// Where dockerd's API is: `unix:///PATH`, or `tcp://HOST:PORT` / `http://HOST:PORT` (no TLS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DockerUrl(pub String);

impl std::str::FromStr for DockerUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let ok = url.strip_prefix("unix://").is_some_and(|p| p.starts_with('/'))
            || ["tcp://", "http://"]
                .iter()
                .any(|s| url.strip_prefix(s).is_some_and(|rest| rest.contains(':')));
        if ok {
            Ok(Self(url.to_owned()))
        } else {
            Err(format!(
                "docker = \"{url}\": expected unix:///PATH (e.g. unix:///var/run/docker.sock) or \
                 tcp://HOST:PORT"
            ))
        }
    }
}

impl TryFrom<String> for DockerUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, String> {
        url.parse()
    }
}

impl From<DockerUrl> for String {
    fn from(url: DockerUrl) -> Self {
        url.0
    }
}

impl Default for Startup {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            attach: AttachMode::Auto,
            redirect_interfaces: Vec::new(),
            pin_dir: DEFAULT_PIN_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            state_file: DEFAULT_STATE_FILE.into(),
            cgroup: DEFAULT_CGROUP.into(),
            cgroup_mount: None,
            metrics: None,
            cni_conf_dir: None,
            docker: None,
            limits: Limits::default(),
        }
    }
}

/// The settings a reload applies at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Live {
    /// Mappings: specs as on the command line, or structured (as `portmap list --json`).
    pub mappings: Vec<MappingEntry>,
    /// Where host ports of mappings without one are allocated from; default: the kernel's
    /// `net.ipv4.ip_local_port_range` of the daemon's network namespace, as Docker.
    pub dynamic_ports: Option<PortRange>,
    pub timeouts: Timeouts,
    /// Send packets for containers of this host straight into their veth (README, "Local
    /// backends"); off: the FIB path (the bridge and host-side veth see every packet).
    pub local_fast_path: bool,
    /// The host's source allow-list (README, "Restricting who reaches a port"): every mapping
    /// without its own `allow` admits new flows only from these prefixes (of its family; one
    /// family named alone admits nobody of the other). Empty: everyone.
    #[serde(deserialize_with = "crate::model::allow::deserialize_list")]
    pub allow: Vec<ipnet::IpNet>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            mappings: Vec::new(),
            dynamic_ports: None,
            timeouts: Timeouts::default(),
            local_fast_path: true,
            allow: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// (`error` is not a `source`: the message already includes it, once.)
    #[error("mappings[{index}] '{spec}': {error}")]
    Spec {
        index: usize,
        spec: String,
        error: SpecError,
    },
    #[error("mappings[{index}] '{spec}': port is already allocated by mappings[{other_index}] '{other}'")]
    Overlap {
        index: usize,
        spec: String,
        other_index: usize,
        other: String,
    },
    #[error("allow: {0}")]
    Allow(#[from] crate::model::allow::AllowError),
    #[error("no interface to attach to: list them in `interfaces` or pass --iface")]
    NoInterfaces,
    #[error("interface name '{0}' is not valid (1-15 characters, no '/', ':' or whitespace)")]
    Interface(String),
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("{count} published ports exceed limits.max_mappings = {max}")]
    TooManyMappings { count: u64, max: u32 },
    #[error("dynamic_ports {0} starts at port 0 or ends before it starts")]
    DynamicPorts(PortRange),
    #[error(
        "cgroup '{0}' is not an absolute cgroup path such as / or /system.slice (as /proc/PID/cgroup shows it)"
    )]
    Cgroup(String),
}

/// Command-line options of `portmap run` that replace the config file's startup values (also
/// on a reload, so that they stay what the daemon runs with).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Client-facing interface (repeatable); replaces the config's `interfaces`.
    #[arg(long = "iface")]
    pub interfaces: Vec<String>,
    /// How to attach the ingress program.
    #[arg(long, value_enum)]
    pub attach: Option<AttachMode>,
    /// Extra device XDP may redirect to (repeatable); replaces `redirect_interfaces`.
    #[arg(long = "redirect-iface")]
    pub redirect_interfaces: Vec<String>,
    /// bpffs directory for pinned maps and links.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// The control socket (the global `--socket`); replaces `socket`.
    #[arg(skip)]
    pub socket: Option<PathBuf>,
    /// Where the mappings are saved for the next daemon; replaces `state_file` (default
    /// /run/portmap/state.json).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// cgroup (v2 path as /proc/PID/cgroup shows it) whose processes reach published ports
    /// from the host; replaces `cgroup` (default `/`, the whole host).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Where the host's cgroup v2 hierarchy is mounted, for a daemon in a container that sees
    /// it through a bind mount; replaces `cgroup_mount` (default: found in mountinfo).
    #[arg(long)]
    pub cgroup_mount: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics; replaces `metrics`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Chain portmap-cni into every .conflist of DIR, now and whenever one appears or changes;
    /// replaces `cni_conf_dir`.
    #[arg(long, value_name = "DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Follow Docker Engine at URL (unix:///var/run/docker.sock): publish its containers'
    /// ports; replaces `docker`.
    #[arg(long, value_name = "URL")]
    pub docker: Option<DockerUrl>,
}

impl Overrides {
    pub fn apply(&self, cfg: &mut Startup) {
        /// A flag given on the command line replaces the file's value; one not given keeps it.
        fn set<T: Clone>(to: &mut T, from: Option<&T>) {
            if let Some(value) = from {
                to.clone_from(value);
            }
        }
        /// A repeatable flag is given when it is given at least once.
        fn list(v: &Vec<String>) -> Option<&Vec<String>> {
            Some(v).filter(|v| !v.is_empty())
        }
        set(&mut cfg.interfaces, list(&self.interfaces));
        set(&mut cfg.redirect_interfaces, list(&self.redirect_interfaces));
        set(&mut cfg.attach, self.attach.as_ref());
        set(&mut cfg.pin_dir, self.pin_dir.as_ref());
        set(&mut cfg.socket, self.socket.as_ref());
        set(&mut cfg.state_file, self.state_file.as_ref());
        set(&mut cfg.cgroup, self.cgroup.as_ref());
        set(
            &mut cfg.cgroup_mount,
            self.cgroup_mount.is_some().then_some(&self.cgroup_mount),
        );
        set(&mut cfg.metrics, self.metrics.is_some().then_some(&self.metrics));
        set(
            &mut cfg.cni_conf_dir,
            self.cni_conf_dir.is_some().then_some(&self.cni_conf_dir),
        );
        set(&mut cfg.docker, self.docker.is_some().then_some(&self.docker));
    }
}

/// A configuration that passed every check; the daemon applies it as one change.
#[derive(Clone, Debug)]
pub struct Valid {
    pub config: Config,
    /// As configured: a mapping without host ports is allocated one when applied.
    pub mappings: Vec<Mapping>,
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        keys::check(toml::Deserializer::parse(text)?)?;
        Ok(Self {
            startup: toml::from_str(text)?,
            live: toml::from_str(text)?,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        keys::check(&mut serde_json::Deserializer::from_str(text))?;
        Ok(Self {
            startup: serde_json::from_str(text)?,
            live: serde_json::from_str(text)?,
        })
    }

    /// Reads a config file: JSON if its name ends in `.json`, TOML otherwise.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        };
        parsed.with_context(|| format!("{}", path.display()))
    }

    /// Checks everything and parses the mappings; nothing is half-valid.
    pub fn validate(self) -> Result<Valid, ConfigError> {
        if self.startup.interfaces.is_empty() {
            return Err(ConfigError::NoInterfaces);
        }
        if !self.startup.cgroup.is_absolute() {
            return Err(ConfigError::Cgroup(self.startup.cgroup.display().to_string()));
        }
        for name in self
            .startup
            .interfaces
            .iter()
            .chain(&self.startup.redirect_interfaces)
        {
            let bad = name.is_empty()
                || name.len() > 15
                || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
            if bad {
                return Err(ConfigError::Interface(name.clone()));
            }
        }
        for (field, value) in [
            ("timeouts.tcp_seconds", self.live.timeouts.tcp_seconds),
            ("timeouts.tcp_close_seconds", self.live.timeouts.tcp_close_seconds),
            ("timeouts.tcp_syn_seconds", self.live.timeouts.tcp_syn_seconds),
            ("timeouts.udp_seconds", self.live.timeouts.udp_seconds),
            (
                "timeouts.gc_interval_seconds",
                self.live.timeouts.gc_interval_seconds,
            ),
            ("limits.max_mappings", u64::from(self.startup.limits.max_mappings)),
            (
                "limits.conntrack_entries",
                u64::from(self.startup.limits.conntrack_entries),
            ),
            (
                "limits.conntrack_new_entries",
                u64::from(self.startup.limits.conntrack_new_entries),
            ),
            ("limits.max_backends", u64::from(self.startup.limits.max_backends)),
            (
                "limits.max_backend_groups",
                u64::from(self.startup.limits.max_backend_groups),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if let Some(range) = self.live.dynamic_ports
            && (range.start == 0 || range.end < range.start)
        {
            return Err(ConfigError::DynamicPorts(range));
        }
        crate::model::allow::check_list(&self.live.allow)?;
        let mappings = parse_mappings(&self.live.mappings)?;
        let ports: u64 = mappings.iter().map(|m| u64::from(m.port_count())).sum();
        if ports > u64::from(self.startup.limits.max_mappings) {
            return Err(ConfigError::TooManyMappings {
                count: ports,
                max: self.startup.limits.max_mappings,
            });
        }
        Ok(Valid {
            config: self,
            mappings,
        })
    }
}

/// Parses the configured mappings and rejects two that publish the same port.
pub fn parse_mappings(entries: &[MappingEntry]) -> Result<Vec<Mapping>, ConfigError> {
    let mappings = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            entry.parse().map_err(|error| ConfigError::Spec {
                index,
                spec: entry.text(),
                error,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((a, b)) = spec::first_overlap(&mappings) {
        return Err(ConfigError::Overlap {
            index: b,
            spec: entries[b].text(),
            other_index: a,
            other: entries[a].text(),
        });
    }
    Ok(mappings)
}

impl Timeouts {
    #[must_use]
    pub fn gc_interval(&self) -> Duration {
        Duration::from_secs(self.gc_interval_seconds)
    }
}

mod keys;
#[cfg(test)]
mod tests;

pub use self::keys::{known_keys, startup_changes};
