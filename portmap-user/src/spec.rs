//! Mapping specs in Docker's `-p` syntax, extended to several backends:
//!
//! ```text
//! [HOST_IP:][HOST_PORT[-END]]:BACKEND[,BACKEND...][/tcp|udp|sctp]
//! BACKEND = BACKEND_IP:PORT[-END][@WEIGHT]        IPv6 addresses in brackets: [fd00::2]:80
//! ```
//!
//! - no `HOST_IP`: every address of the backends' family (0.0.0.0 or [::]);
//! - an empty `HOST_PORT` (`:198.18.2.2:80`, `198.18.1.1::198.18.2.2:80`) or none at all
//!   (`198.18.2.2:80`): the daemon allocates a free host port (range);
//! - ranges: `8000-8099:198.18.2.2:9000-9099` maps port by port; a backend with a single port
//!   takes every port of the range (`8000-8099:198.18.2.2:80`);
//! - several backends are balanced per flow with Maglev, in proportion to their weights.
//!
//! Parsing is a pure function with typed errors that name the bad part.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

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
struct SpecAddr(IpAddr);

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
        match self.host_ports {
            Some(r) => r.count(),
            None => self.backends.iter().map(|b| b.ports.count()).max().unwrap_or(1),
        }
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "empty mapping spec: expected [HOST_IP:][HOST_PORT[-END]]:BACKEND_IP:PORT[-END][,BACKEND...][/tcp|udp|sctp]"
    )]
    Empty,
    #[error(
        "'{0}' does not match [HOST_IP:][HOST_PORT[-END]]:BACKEND_IP:PORT[-END][,BACKEND...][/tcp|udp|sctp]"
    )]
    Shape(String),
    #[error("unknown protocol '{0}' (expected tcp, udp or sctp)")]
    Protocol(String),
    #[error("'{0}' has no protocol after '/' (expected tcp, udp or sctp)")]
    MissingProtocol(String),
    #[error("{what} is missing")]
    Missing { what: &'static str },
    #[error("{what} '{value}' is not a port number (1-65535)")]
    Port { what: &'static str, value: String },
    #[error("{what} {value} is out of range (1-65535)")]
    PortRange { what: &'static str, value: u32 },
    #[error("{what} '{value}' is a range that ends before it starts")]
    ReversedRange { what: &'static str, value: String },
    #[error(
        "backend '{backend}' has {backend_ports} ports for {host_ports} host ports: give it as many, or one"
    )]
    RangeLength {
        backend: String,
        backend_ports: u32,
        host_ports: u32,
    },
    #[error("{what} '{value}' is not an IP address")]
    Address { what: &'static str, value: String },
    #[error("{what} '{value}' looks like IPv6: write IPv6 addresses in brackets, e.g. [fd00::2]")]
    Ipv6Brackets { what: &'static str, value: String },
    #[error("backend address {0} cannot be a destination (unspecified, broadcast or multicast)")]
    BackendAddress(IpAddr),
    #[error("host address {0} cannot be published (broadcast or multicast)")]
    HostAddress(IpAddr),
    #[error("'{0}' mixes IPv4 and IPv6 addresses; a mapping stays within one family")]
    MixedFamilies(String),
    #[error("weight '{0}' is not a number from 0 to 1000")]
    Weight(String),
    #[error("'{0}': every backend has weight 0, so no flow could go anywhere")]
    AllWeightsZero(String),
    #[error("'{0}' lists the same backend twice")]
    DuplicateBackend(String),
    #[error("'{spec}' has {count} backends; at most 40 are balanced evenly")]
    TooManyBackends { spec: String, count: usize },
    #[error(
        "'{0}': an SCTP mapping must keep the port (give HOST_PORT equal to every backend port): \
         SCTP's CRC32c covers the ports, so changing one would mean recomputing it over the whole packet"
    )]
    SctpPortChange(String),
}

fn parse_port(what: &'static str, s: &str) -> Result<u16, SpecError> {
    if s.is_empty() {
        return Err(SpecError::Missing { what });
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 6 {
        return Err(SpecError::Port {
            what,
            value: s.to_string(),
        });
    }
    let n: u32 = s.parse().map_err(|_| SpecError::Port {
        what,
        value: s.to_string(),
    })?;
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(SpecError::PortRange { what, value: n }),
    }
}

fn parse_ports(what: &'static str, s: &str) -> Result<PortRange, SpecError> {
    let Some((start, end)) = s.split_once('-') else {
        return parse_port(what, s).map(PortRange::single);
    };
    if start.is_empty() || end.is_empty() {
        return Err(SpecError::Port {
            what,
            value: s.to_string(),
        });
    }
    let range = PortRange {
        start: parse_port(what, start)?,
        end: parse_port(what, end)?,
    };
    if range.end < range.start {
        return Err(SpecError::ReversedRange {
            what,
            value: s.to_string(),
        });
    }
    Ok(range)
}

fn parse_addr(what: &'static str, s: &str) -> Result<IpAddr, SpecError> {
    if s.is_empty() {
        return Err(SpecError::Missing { what });
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| SpecError::Address {
                what,
                value: s.to_string(),
            });
    }
    s.parse::<Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| SpecError::Address {
            what,
            value: s.to_string(),
        })
}

fn parse_protocol(s: &str) -> Result<Protocol, SpecError> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        _ => Err(SpecError::Protocol(s.to_string())),
    }
}

/// Splits at ':' outside brackets.
fn fields(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `IP:PORT[-END][@WEIGHT]`.
fn parse_backend(ip: &str, ports: &str) -> Result<Backend, SpecError> {
    let (ports, weight) = ports.split_once('@').map_or((ports, None), |(p, w)| (p, Some(w)));
    let ip = parse_addr("backend address", ip)?;
    let ports = parse_ports("backend port", ports)?;
    let weight = match weight {
        None => 1,
        Some("") => {
            return Err(SpecError::Missing {
                what: "weight after '@'",
            });
        }
        Some(w) => w
            .parse::<u16>()
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| SpecError::Weight(w.to_string()))?,
    };
    Ok(Backend { ip, ports, weight })
}

fn looks_like_bare_ipv6(field: &str) -> bool {
    !field.starts_with('[') && field.contains(|c: char| c.is_ascii_hexdigit() && c.is_ascii_alphabetic())
}

/// Parses a spec. Pure: no I/O, no knowledge of what is already mapped or bound.
pub fn parse(spec: &str) -> Result<Mapping, SpecError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(SpecError::Empty);
    }
    let (body, protocol) = match spec.rsplit_once('/') {
        Some((_, "")) => return Err(SpecError::MissingProtocol(spec.to_string())),
        Some((body, proto)) => (body, parse_protocol(proto)?),
        None => (spec, Protocol::Tcp),
    };
    let mut segments = body.split(',');
    let first = fields(segments.next().unwrap_or_default());
    let bare_v6 = |parts: &[&str]| {
        parts.len() > 4 || (parts.len() > 2 && parts.iter().all(|p| p.is_empty() || looks_like_bare_ipv6(p)))
    };
    if bare_v6(&first) {
        return Err(SpecError::Ipv6Brackets {
            what: "address",
            value: body.to_string(),
        });
    }
    let (host_ip, host_ports, first_backend) = match first.as_slice() {
        [bip, bp] => (None, None, (*bip, *bp)),
        [hp, bip, bp] => (None, Some(*hp), (*bip, *bp)),
        [hip, hp, bip, bp] => (Some(parse_addr("host address", hip)?), Some(*hp), (*bip, *bp)),
        _ => return Err(SpecError::Shape(spec.to_string())),
    };
    let host_ports = match host_ports {
        Some("") | None => None,
        Some(p) => Some(parse_ports("host port", p)?),
    };
    let mut backends = vec![parse_backend(first_backend.0, first_backend.1)?];
    for segment in segments {
        match fields(segment).as_slice() {
            [ip, ports] => backends.push(parse_backend(ip, ports)?),
            _ => return Err(SpecError::Shape(spec.to_string())),
        }
    }
    let family_v6 = backends[0].ip.is_ipv6();
    if backends.iter().any(|b| b.ip.is_ipv6() != family_v6)
        || host_ip.is_some_and(|h| h.is_ipv6() != family_v6)
    {
        return Err(SpecError::MixedFamilies(spec.to_string()));
    }
    let host_ip = host_ip.unwrap_or(if family_v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let mapping = Mapping {
        protocol,
        host_ip,
        host_ports,
        backends,
    };
    check(&mapping, spec)?;
    Ok(mapping)
}

/// The rules a parsed mapping must keep (also applied to mappings from structured config).
pub fn check(mapping: &Mapping, spec: &str) -> Result<(), SpecError> {
    let backends = &mapping.backends;
    if backends.is_empty() {
        return Err(SpecError::Missing { what: "backend" });
    }
    if backends.len() > MAX_BACKENDS {
        return Err(SpecError::TooManyBackends {
            spec: spec.to_string(),
            count: backends.len(),
        });
    }
    let v6 = mapping.host_ip.is_ipv6();
    if backends.iter().any(|b| b.ip.is_ipv6() != v6) {
        return Err(SpecError::MixedFamilies(spec.to_string()));
    }
    for b in backends {
        let bad = match b.ip {
            IpAddr::V4(a) => a.is_unspecified() || a.is_broadcast() || a.is_multicast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if bad {
            return Err(SpecError::BackendAddress(b.ip));
        }
    }
    let bad_host = match mapping.host_ip {
        IpAddr::V4(a) => a.is_broadcast() || a.is_multicast(),
        IpAddr::V6(a) => a.is_multicast(),
    };
    if bad_host {
        return Err(SpecError::HostAddress(mapping.host_ip));
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(SpecError::AllWeightsZero(spec.to_string()));
    }
    let mut ids: Vec<(IpAddr, u16)> = backends.iter().map(|b| (b.ip, b.ports.start)).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(SpecError::DuplicateBackend(spec.to_string()));
    }
    let host_len = mapping.port_count();
    for b in backends {
        if !b.ports.is_single() && b.ports.count() != host_len {
            return Err(SpecError::RangeLength {
                backend: b.to_string(),
                backend_ports: b.ports.count(),
                host_ports: host_len,
            });
        }
    }
    if mapping.protocol == Protocol::Sctp {
        let keeps_ports = mapping
            .host_ports
            .is_some_and(|h| backends.iter().all(|b| b.ports == h));
        if !keeps_ports {
            return Err(SpecError::SctpPortChange(spec.to_string()));
        }
    }
    Ok(())
}

/// The first two mappings (by index, the later one second) that publish a common port.
/// A sweep over the mappings sorted by binding: O(n log n) for any number of ranges.
#[must_use]
pub fn first_overlap(mappings: &[Mapping]) -> Option<(usize, usize)> {
    let mut order: Vec<(Protocol, IpAddr, PortRange, usize)> = mappings
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.host_ports.map(|r| (m.protocol, m.host_ip, r, i)))
        .collect();
    order.sort_unstable();
    let mut found: Option<(usize, usize)> = None;
    // The mapping reaching furthest so far within the current (protocol, address).
    let mut reach: Option<(Protocol, IpAddr, u16, usize)> = None;
    for &(protocol, ip, range, i) in &order {
        if let Some((p, a, end, j)) = reach
            && p == protocol
            && a == ip
        {
            if range.start <= end {
                let pair = (i.min(j), i.max(j));
                if found.is_none_or(|f| pair.1 < f.1 || (pair.1 == f.1 && pair.0 < f.0)) {
                    found = Some(pair);
                }
            }
            if range.end > end {
                reach = Some((protocol, ip, range.end, i));
            }
            continue;
        }
        reach = Some((protocol, ip, range.end, i));
    }
    found
}

/// Parses one backend as `--backend` takes it: `IP:PORT[-END][@WEIGHT]`.
pub fn parse_backend_arg(text: &str) -> Result<Backend, SpecError> {
    match fields(text.trim()).as_slice() {
        [ip, ports] => parse_backend(ip, ports),
        _ => Err(SpecError::Shape(text.to_string())),
    }
}

/// `docker port` for a backend: which host ports lead to `query` (`IP[:PORT][/PROTO]`).
/// Without a port: `PORT/PROTO -> HOST_IP:HOST_PORT` lines; with one: `HOST_IP:HOST_PORT` lines.
pub fn port_lines(mappings: &[Mapping], query: &str) -> Result<Vec<String>, SpecError> {
    let query = query.trim();
    let (body, protocol) = match query.rsplit_once('/') {
        Some((body, proto)) => (body, Some(parse_protocol(proto)?)),
        None => (query, None),
    };
    let (ip, port) = match fields(body).as_slice() {
        [ip] => (parse_addr("backend address", ip)?, None),
        [ip, port] => (
            parse_addr("backend address", ip)?,
            Some(parse_port("backend port", port)?),
        ),
        _ => return Err(SpecError::Shape(query.to_string())),
    };
    let mut lines = Vec::new();
    for m in mappings {
        if protocol.is_some_and(|p| p != m.protocol) {
            continue;
        }
        let Some(host_ports) = m.host_ports else { continue };
        for backend in m.backends.iter().filter(|b| b.ip == ip) {
            for (offset, host_port) in host_ports.ports().enumerate() {
                let backend_port = backend.port_at(offset as u16);
                let binding = format!("{}:{host_port}", SpecAddr(m.host_ip));
                match port {
                    Some(p) if p == backend_port => lines.push(binding),
                    Some(_) => {}
                    None => lines.push(format!("{backend_port}/{} -> {binding}", m.protocol)),
                }
            }
        }
    }
    Ok(lines)
}

impl FromStr for Mapping {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn backend(addr: &str, start: u16, end: u16, weight: u16) -> Backend {
        Backend {
            ip: ip(addr),
            ports: PortRange { start, end },
            weight,
        }
    }

    fn m(proto: Protocol, host: &str, ports: Option<(u16, u16)>, backends: Vec<Backend>) -> Mapping {
        Mapping {
            protocol: proto,
            host_ip: ip(host),
            host_ports: ports.map(|(start, end)| PortRange { start, end }),
            backends,
        }
    }

    #[test]
    fn good_specs() {
        let web = || vec![backend("198.18.2.2", 80, 80, 1)];
        let cases = [
            (
                "8080:198.18.2.2:80",
                m(Protocol::Tcp, "0.0.0.0", Some((8080, 8080)), web()),
            ),
            (
                "8080:198.18.2.2:80/tcp",
                m(Protocol::Tcp, "0.0.0.0", Some((8080, 8080)), web()),
            ),
            (
                "53:198.18.2.2:5353/UDP",
                m(
                    Protocol::Udp,
                    "0.0.0.0",
                    Some((53, 53)),
                    vec![backend("198.18.2.2", 5353, 5353, 1)],
                ),
            ),
            (
                "198.18.1.1:8080:198.18.2.2:80",
                m(Protocol::Tcp, "198.18.1.1", Some((8080, 8080)), web()),
            ),
            (
                "8000-8099:198.18.2.2:9000-9099",
                m(
                    Protocol::Tcp,
                    "0.0.0.0",
                    Some((8000, 8099)),
                    vec![backend("198.18.2.2", 9000, 9099, 1)],
                ),
            ),
            (
                "8000-8099:198.18.2.2:80",
                m(Protocol::Tcp, "0.0.0.0", Some((8000, 8099)), web()),
            ),
            (":198.18.2.2:80", m(Protocol::Tcp, "0.0.0.0", None, web())),
            ("198.18.2.2:80", m(Protocol::Tcp, "0.0.0.0", None, web())),
            (
                "198.18.1.1::198.18.2.2:80",
                m(Protocol::Tcp, "198.18.1.1", None, web()),
            ),
            (
                "[fd00::1]:8080:[fd00::2]:80",
                m(
                    Protocol::Tcp,
                    "fd00::1",
                    Some((8080, 8080)),
                    vec![backend("fd00::2", 80, 80, 1)],
                ),
            ),
            (
                "8080:[fd00::2]:80",
                m(
                    Protocol::Tcp,
                    "::",
                    Some((8080, 8080)),
                    vec![backend("fd00::2", 80, 80, 1)],
                ),
            ),
            (
                "8080:198.18.2.2:80,198.18.2.3:80@3,198.18.2.4:8080@0",
                m(
                    Protocol::Tcp,
                    "0.0.0.0",
                    Some((8080, 8080)),
                    vec![
                        backend("198.18.2.2", 80, 80, 1),
                        backend("198.18.2.3", 80, 80, 3),
                        backend("198.18.2.4", 8080, 8080, 0),
                    ],
                ),
            ),
            (
                "9999:198.18.2.2:9999/sctp",
                m(
                    Protocol::Sctp,
                    "0.0.0.0",
                    Some((9999, 9999)),
                    vec![backend("198.18.2.2", 9999, 9999, 1)],
                ),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(parse(spec), Ok(want), "{spec}");
        }
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("8080", "does not match"),
            ("1:2:3:4:5", "brackets"),
            ("fd00::1:8080:fd00::2:80", "brackets"),
            ("0:198.18.2.2:80", "host port 0 is out of range"),
            ("8080:198.18.2.2:0", "backend port 0 is out of range"),
            ("65536:198.18.2.2:80", "host port 65536 is out of range"),
            (
                "8080:198.18.2.2:99999999",
                "backend port '99999999' is not a port number",
            ),
            ("http:198.18.2.2:80", "host port 'http' is not a port number"),
            (
                "8080:198.18.2:80",
                "backend address '198.18.2' is not an IP address",
            ),
            ("1.2.3.400:8080:198.18.2.2:80", "host address '1.2.3.400'"),
            ("8080:198.18.2.2:80/icmp", "unknown protocol 'icmp'"),
            (
                "8080:198.18.2.2:80/",
                "'8080:198.18.2.2:80/' has no protocol after '/'",
            ),
            ("8080::80", "backend address is missing"),
            ("8099-8000:198.18.2.2:80", "ends before it starts"),
            ("8000-8009:198.18.2.2:90-91", "has 2 ports for 10 host ports"),
            (
                "8080:0.0.0.0:80",
                "backend address 0.0.0.0 cannot be a destination",
            ),
            (
                "224.0.0.1:8080:198.18.2.2:80",
                "host address 224.0.0.1 cannot be published",
            ),
            ("8080:198.18.2.2:80,[fd00::2]:80", "mixes IPv4 and IPv6"),
            ("[fd00::1]:8080:198.18.2.2:80", "mixes IPv4 and IPv6"),
            ("8080:198.18.2.2:80@x", "weight 'x'"),
            ("8080:198.18.2.2:80@1001", "weight '1001'"),
            ("8080:198.18.2.2:80@0", "every backend has weight 0"),
            ("8080:198.18.2.2:80,198.18.2.2:80", "same backend twice"),
            ("8080:198.18.2.2:80/sctp", "SCTP mapping must keep the port"),
            (":198.18.2.2:80/sctp", "SCTP mapping must keep the port"),
        ];
        for (spec, want) in cases {
            let err = parse(spec).expect_err(spec).to_string();
            assert!(err.contains(want), "{spec:?}: {err:?} lacks {want:?}");
        }
        let many: Vec<String> = (1..=41).map(|i| format!("198.18.3.{i}:80")).collect();
        let err = parse(&format!("8080:{}", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("41 backends"), "{err}");
    }

    #[test]
    fn display_round_trips_and_docker_lines() {
        for spec in [
            "8080:198.18.2.2:80/tcp",
            "198.18.1.1:53:198.18.2.2:5353/udp",
            "[fd00::1]:8080:[fd00::2]:80/tcp",
            "8000-8002:198.18.2.2:9000-9002/udp",
            ":198.18.2.2:80/tcp",
            "8080:198.18.2.2:80,198.18.2.3:81@5/tcp",
        ] {
            let mapping = parse(spec).unwrap();
            assert_eq!(mapping.to_string(), spec);
        }
        assert_eq!(
            parse("8080:198.18.2.2:80").unwrap().docker_lines(),
            ["198.18.2.2:80/tcp -> 0.0.0.0:8080"]
        );
        assert_eq!(
            parse("8080:[fd00::2]:80").unwrap().docker_lines(),
            ["[fd00::2]:80/tcp -> [::]:8080"]
        );
        assert_eq!(
            parse("8000-8001:198.18.2.2:9000-9001,198.18.2.3:80/udp")
                .unwrap()
                .docker_lines(),
            [
                "198.18.2.2:9000,198.18.2.3:80/udp -> 0.0.0.0:8000",
                "198.18.2.2:9001,198.18.2.3:80/udp -> 0.0.0.0:8001"
            ]
        );
    }

    #[test]
    fn port_lines_answer_like_docker_port() {
        let ms: Vec<Mapping> = [
            "8080:198.18.2.2:80",
            "198.18.1.1:8443:198.18.2.2:443,198.18.2.3:443",
            "53:198.18.2.2:5353/udp",
            "9000-9001:198.18.2.2:7000-7001",
            "8080:[fd00::2]:80",
        ]
        .iter()
        .map(|s| parse(s).unwrap())
        .collect();
        assert_eq!(port_lines(&ms, "198.18.2.2:80").unwrap(), ["0.0.0.0:8080"]);
        assert_eq!(port_lines(&ms, "198.18.2.2:7001/tcp").unwrap(), ["0.0.0.0:9001"]);
        assert_eq!(
            port_lines(&ms, "198.18.2.2:5353/tcp").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            port_lines(&ms, "198.18.2.2").unwrap(),
            [
                "80/tcp -> 0.0.0.0:8080",
                "443/tcp -> 198.18.1.1:8443",
                "5353/udp -> 0.0.0.0:53",
                "7000/tcp -> 0.0.0.0:9000",
                "7001/tcp -> 0.0.0.0:9001"
            ]
        );
        assert_eq!(port_lines(&ms, "198.18.2.3:443").unwrap(), ["198.18.1.1:8443"]);
        assert_eq!(port_lines(&ms, "[fd00::2]:80").unwrap(), ["[::]:8080"]);
        assert!(
            port_lines(&ms, "nope")
                .unwrap_err()
                .to_string()
                .contains("'nope'")
        );
    }

    #[test]
    fn overlap_needs_same_protocol_address_and_ports() {
        let a = parse("8000-8010:198.18.2.2:80").unwrap();
        assert!(a.overlaps(&parse("8010:198.18.2.3:80").unwrap()));
        assert!(!a.overlaps(&parse("8011:198.18.2.3:80").unwrap()));
        assert!(!a.overlaps(&parse("8005:198.18.2.3:80/udp").unwrap()));
        assert!(!a.overlaps(&parse("198.18.1.1:8005:198.18.2.3:80").unwrap()));
    }

    #[test]
    fn first_overlap_finds_ranges_that_share_a_port() {
        let parse_all = |specs: &[&str]| specs.iter().map(|s| parse(s).unwrap()).collect::<Vec<_>>();
        let ms = parse_all(&[
            "8000-8100:198.18.2.2:80",
            "9000:198.18.2.2:80",
            "8050:198.18.2.3:80",
        ]);
        assert_eq!(first_overlap(&ms), Some((0, 2)));
        let ms = parse_all(&[
            "8000:198.18.2.2:80",
            "8000:198.18.2.2:80/udp",
            "198.18.1.1:8000:198.18.2.2:80",
        ]);
        assert_eq!(first_overlap(&ms), None);
        let ms = parse_all(&[
            "1-100:198.18.2.2:80",
            "200-300:198.18.2.2:80",
            "50:198.18.2.3:80",
            "250:198.18.2.3:80",
        ]);
        assert_eq!(first_overlap(&ms), Some((0, 2)));
    }

    #[test]
    fn map_key_is_wire_order() {
        let key = parse("198.18.1.1:8080:198.18.2.2:80/udp").unwrap().map_key(8080);
        assert_eq!(key.addr[0].to_ne_bytes(), [198, 18, 1, 1]);
        assert_eq!(key.addr[1..], [0, 0, 0]);
        assert_eq!(key.port_be.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!((key.proto, key.family), (PROTO_UDP, FAMILY_V4));
        let v6 = parse("[fd00::1]:8080:[fd00::2]:80").unwrap().map_key(8080);
        assert_eq!(v6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(v6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(v6.family, FAMILY_V6);
    }

    /// Spec-shaped input: fields drawn from valid and invalid addresses, ports, ranges, weights
    /// and protocols, joined by ':' and ',' with an optional '/proto', so most inputs get deep
    /// into the parser.
    fn spec_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let field = prop_oneof![
            "[0-9]{1,6}",
            "[0-9]{1,5}-[0-9]{1,5}",
            "[0-9]{1,5}@[0-9]{1,4}",
            (0u8..=255, 0u8..=255, 0u8..=255, 0u8..=255).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
            Just("[fd00::2]".to_string()),
            Just("[::]".to_string()),
            "[0-9a-f.\\[\\]]{0,12}",
            Just(String::new()),
            "\\PC{0,6}",
        ];
        let proto = prop_oneof![
            Just(String::new()),
            Just("/tcp".to_string()),
            Just("/UDP".to_string()),
            Just("/sctp".to_string()),
            "/\\PC{0,5}",
        ];
        let sep = prop_oneof![Just(":"), Just(":"), Just(",")];
        (proptest::collection::vec((field, sep), 1..8), proto).prop_map(|(fields, proto)| {
            let mut s: String = fields
                .into_iter()
                .flat_map(|(f, sep)| [f, sep.to_string()])
                .collect();
            s.pop();
            s + &proto
        })
    }

    /// An error names the problem: the piece of input it is about appears in the input and in
    /// the message, or it says which part is missing (and one is), or that all of it is.
    /// (Exhaustive: a new variant must say what it names.)
    fn names_the_problem(input: &str, err: &SpecError) -> bool {
        let piece = match err {
            SpecError::Empty => return input.trim().is_empty(),
            SpecError::Missing { .. } => {
                return input
                    .split('/')
                    .next()
                    .is_some_and(|b| b.split([':', ',', '@']).any(str::is_empty));
            }
            SpecError::Shape(s)
            | SpecError::Protocol(s)
            | SpecError::MissingProtocol(s)
            | SpecError::MixedFamilies(s)
            | SpecError::Weight(s)
            | SpecError::AllWeightsZero(s)
            | SpecError::DuplicateBackend(s)
            | SpecError::SctpPortChange(s)
            | SpecError::TooManyBackends { spec: s, .. } => s.clone(),
            SpecError::Port { value, .. }
            | SpecError::ReversedRange { value, .. }
            | SpecError::Address { value, .. }
            | SpecError::Ipv6Brackets { value, .. } => value.clone(),
            SpecError::RangeLength { backend, .. } => return err.to_string().contains(backend.as_str()),
            SpecError::PortRange { value, .. } => value.to_string(),
            SpecError::BackendAddress(a) | SpecError::HostAddress(a) => a.to_string(),
        };
        !piece.is_empty() && input.contains(&piece) && err.to_string().contains(&piece)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn parse_never_panics_and_errors_name_the_problem(s in "\\PC{0,40}") {
            match parse(&s) {
                Ok(m) => proptest::prop_assert_eq!(parse(&m.to_string()), Ok(m)),
                Err(e) => proptest::prop_assert!(names_the_problem(&s, &e), "{s:?}: {e}"),
            }
        }

        #[test]
        fn spec_shaped_input_parses_or_names_the_problem(s in spec_like()) {
            match parse(&s) {
                Ok(m) => proptest::prop_assert_eq!(parse(&m.to_string()), Ok(m)),
                Err(e) => proptest::prop_assert!(names_the_problem(&s, &e), "{s:?}: {e}"),
            }
        }

        #[test]
        fn parse_round_trips_any_valid(hp in 1u16.., bp in 1u16.., a in 1u8..=223, udp: bool, bind: bool) {
            let mapping = Mapping {
                protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                host_ip: if bind { IpAddr::from([198, 18, 1, a]) } else { IpAddr::from([0, 0, 0, 0]) },
                host_ports: Some(PortRange::single(hp)),
                backends: vec![Backend { ip: IpAddr::from([198, 18, 2, a]), ports: PortRange::single(bp), weight: 1 }],
            };
            proptest::prop_assert_eq!(parse(&mapping.to_string()), Ok(mapping));
        }
    }
}
