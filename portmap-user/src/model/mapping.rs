//! What a mapping is: published host address and ports, protocol, and backends. The types the
//! parser (`spec`) produces, the config and control protocol carry (serde), and the table
//! applies; their `Display` is the canonical spec, which parses back to the same value.

use std::{fmt, net::IpAddr};

use portmap_common::{FAMILY_V4, FAMILY_V6, MappingKey, PROTO_SCTP, PROTO_TCP, PROTO_UDP, addr_words};
use serde::{Deserialize, Serialize};

/// Most backends one mapping may have: Maglev spreads flows evenly while its table has about
/// 100 slots per backend (`MAGLEV_SIZE` = 4099).
pub const MAX_BACKENDS: usize = 40;
/// Highest backend weight.
pub const MAX_WEIGHT: u16 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Sctp => PROTO_SCTP,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; a single port is `start == end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    #[must_use]
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    /// Number of ports (at least 1: a range is never empty).
    #[must_use]
    pub fn count(self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    #[must_use]
    pub fn is_single(self) -> bool {
        self.start == self.end
    }

    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    #[must_use]
    pub fn overlaps(self, other: Self) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// One destination of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    pub ip: IpAddr,
    /// One port, or as many as the mapping's host ports.
    pub ports: PortRange,
    /// Share of new flows relative to the other backends (0: none, existing flows finish).
    #[serde(default = "default_weight")]
    pub weight: u16,
}

fn default_weight() -> u16 {
    1
}

impl Backend {
    /// The backend port that host port number `offset` (0-based) of the mapping leads to.
    #[must_use]
    pub fn port_at(&self, offset: u16) -> u16 {
        if self.ports.is_single() {
            self.ports.start
        } else {
            self.ports.start + offset
        }
    }
}

/// `addr` as a spec writes it: IPv6 in brackets.
pub struct SpecAddr(pub IpAddr);

impl fmt::Display for SpecAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "[{a}]"),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", SpecAddr(self.ip), self.ports)?;
        if self.weight != 1 {
            write!(f, "@{}", self.weight)?;
        }
        Ok(())
    }
}

/// Published ports: traffic to `host_ip:host_ports` (unspecified = every address of the
/// backends' family) goes to the backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mapping {
    pub protocol: Protocol,
    pub host_ip: IpAddr,
    /// `None`: to be allocated by the daemon from its dynamic port pool.
    pub host_ports: Option<PortRange>,
    pub backends: Vec<Backend>,
    /// The mapping's own source allow-list (`model::allow`: prefixes of its family); empty: the
    /// host's list applies (the config's `allow`), or none, and everyone may reach it.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::model::allow::deserialize_list"
    )]
    pub allow: Vec<ipnet::IpNet>,
}

/// What identifies a published port: two mappings must not share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding {
    pub protocol: Protocol,
    pub host_ip: IpAddr,
    pub host_port: u16,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            SpecAddr(self.host_ip),
            self.host_port,
            self.protocol
        )
    }
}

impl Mapping {
    /// `FAMILY_V4` or `FAMILY_V6` (all of a mapping's addresses share one family).
    #[must_use]
    pub fn family(&self) -> u8 {
        if self.host_ip.is_ipv6() {
            FAMILY_V6
        } else {
            FAMILY_V4
        }
    }

    /// How many host ports the mapping publishes (known even before a dynamic allocation).
    #[must_use]
    pub fn port_count(&self) -> u32 {
        if self.picks_one() {
            return 1;
        }
        match self.host_ports {
            Some(r) => r.count(),
            None => self.backends.iter().map(|b| b.ports.count()).max().unwrap_or(1),
        }
    }

    /// A host range with single-port backends: one free port of the range is published (as
    /// Docker does with `-p 8000-8010:80`), chosen when the mapping is added.
    #[must_use]
    pub fn picks_one(&self) -> bool {
        self.host_ports.is_some_and(|r| !r.is_single()) && self.backends.iter().all(|b| b.ports.is_single())
    }

    /// Every binding of the mapping (none while its host ports are unallocated).
    pub fn bindings(&self) -> impl Iterator<Item = Binding> + '_ {
        self.host_ports
            .into_iter()
            .flat_map(PortRange::ports)
            .map(|host_port| Binding {
                protocol: self.protocol,
                host_ip: self.host_ip,
                host_port,
            })
    }

    /// Whether two mappings would publish the same port on the same address.
    #[must_use]
    pub fn overlaps(&self, other: &Self) -> bool {
        self.protocol == other.protocol
            && self.host_ip == other.host_ip
            && matches!((self.host_ports, other.host_ports), (Some(a), Some(b)) if a.overlaps(b))
    }

    /// The key of host port `port` in `PM_MAPPINGS`.
    #[must_use]
    pub fn map_key(&self, port: u16) -> MappingKey {
        MappingKey {
            addr: addr_words(self.host_ip),
            port_be: port.to_be(),
            proto: self.protocol.number(),
            family: self.family(),
        }
    }

    /// The same mapping, its own allow-list aside: `del` and `update` name a mapping by its
    /// spec, which has no list.
    #[must_use]
    pub fn same_as(&self, other: &Self) -> bool {
        self.protocol == other.protocol
            && self.host_ip == other.host_ip
            && self.host_ports == other.host_ports
            && self.backends == other.backends
    }

    /// The mapping with its own allow-list replaced, sorted and without duplicates (the form
    /// the table compares, shares and reads back from the maps).
    #[must_use]
    pub fn with_allow(&self, mut allow: Vec<ipnet::IpNet>) -> Self {
        allow.sort_unstable();
        allow.dedup();
        Self {
            allow,
            ..self.clone()
        }
    }

    /// The mapping with its host ports set (a dynamic one once allocated).
    #[must_use]
    pub fn with_host_ports(&self, ports: PortRange) -> Self {
        Self {
            host_ports: Some(ports),
            ..self.clone()
        }
    }

    /// `docker port` style, one line per host port: `BACKENDS/PROTO -> HOST_IP:HOST_PORT`, the
    /// right side exactly as Docker prints it (`0.0.0.0:8080`, `[::]:8080`).
    #[must_use]
    pub fn docker_lines(&self) -> Vec<String> {
        let Some(ports) = self.host_ports else {
            return vec![format!(
                "{}/{} -> (unallocated)",
                self.backends_text(None),
                self.protocol
            )];
        };
        ports
            .ports()
            .enumerate()
            .map(|(offset, port)| {
                format!(
                    "{}/{} -> {}:{port}",
                    self.backends_text(Some(offset as u16)),
                    self.protocol,
                    SpecAddr(self.host_ip)
                )
            })
            .collect()
    }

    /// The backends of host port number `offset` (or all their ports), comma-separated.
    fn backends_text(&self, offset: Option<u16>) -> String {
        let list: Vec<String> = self
            .backends
            .iter()
            .map(|b| match offset {
                Some(o) => format!("{}:{}", SpecAddr(b.ip), b.port_at(o)),
                None => format!("{}:{}", SpecAddr(b.ip), b.ports),
            })
            .collect();
        list.join(",")
    }
}

/// The canonical spec, which parses back to the same mapping.
impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.host_ip.is_unspecified() {
            write!(f, "{}:", SpecAddr(self.host_ip))?;
        }
        if let Some(ports) = self.host_ports {
            write!(f, "{ports}")?;
        }
        let backends: Vec<String> = self.backends.iter().map(ToString::to_string).collect();
        write!(f, ":{}/{}", backends.join(","), self.protocol)
    }
}
