//! Mapping specs in Docker's `-p` syntax, extended to several backends:
//!
//! ```text
//! [HOST_IP:][HOST_PORT[-END]]:BACKEND[,BACKEND...][/tcp|udp|sctp]
//! BACKEND = BACKEND_IP:PORT[-END][@WEIGHT]        IPv6 addresses in brackets: [fd00::2]:80
//! ```
//!
//! - no `HOST_IP` or an empty one (`:8080:198.18.2.2:80`): every address of the backends'
//!   family (0.0.0.0 or [::]); an IPv4-mapped one (`[::ffff:198.18.1.1]`) is the IPv4 address;
//! - an empty `HOST_PORT` (`:198.18.2.2:80`, `198.18.1.1::198.18.2.2:80`), `0`, or none at all
//!   (`198.18.2.2:80`): the daemon allocates a free host port (range);
//! - ranges: `8000-8099:198.18.2.2:9000-9099` maps port by port; a host range with single-port
//!   backends (`8000-8010:198.18.2.2:80`) publishes ONE free port of the range, as Docker does;
//! - an empty protocol (`80/`) is tcp;
//! - several backends are balanced per flow with Maglev, in proportion to their weights;
//! - the backend address `0.0.0.0` / `[::]` is the host itself at the address each packet came to
//!   (`8082:0.0.0.0:8080`, iptables' `REDIRECT --to-port 8080`): only the port changes.
//!
//! Parsing is a pure function with typed errors that name the bad part.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use crate::model::mapping::{Backend, MAX_BACKENDS, MAX_WEIGHT, Mapping, PortRange, Protocol};

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
    #[error("backend address {0} cannot be a destination (broadcast or multicast)")]
    BackendAddress(IpAddr),
    #[error(
        "'{0}': the backend {unspecified} (the host itself, at the address each packet came to) \
         cannot be balanced with other backends",
        unspecified = if *.1 { "[::]" } else { "0.0.0.0" }
    )]
    DestinationWithOthers(String, bool),
    #[error(
        "'{spec}' has no backend address: for a port of this host itself (iptables' REDIRECT \
         --to-port {port}) write '{host}:0.0.0.0:{port}' (IPv4) or '{host}:[::]:{port}' (IPv6)"
    )]
    NoBackendAddress {
        spec: String,
        host: String,
        port: String,
    },
    #[error("host address {0} cannot be published (broadcast or multicast)")]
    HostAddress(IpAddr),
    #[error(
        "backend {backend} is a loopback address, which packets from the wire never reach (the kernel \
         drops a loopback destination arriving on an interface): publish it on {loopback} for host \
         processes only ('{loopback}:{port}:{backend}'), or publish a port of this host itself at \
         the address each packet came to, as iptables' REDIRECT does ('{port}:{any}:{backend_port}')",
        loopback = if backend.ip.is_ipv6() { "[::1]" } else { "127.0.0.1" },
        any = if backend.ip.is_ipv6() { "[::]" } else { "0.0.0.0" },
        port = host_ports.map_or_else(String::new, |p| p.to_string()),
        backend_port = backend.ports,
    )]
    LoopbackBackend {
        backend: crate::model::mapping::Backend,
        host_ports: Option<PortRange>,
    },
    #[error(transparent)]
    Allow(#[from] crate::model::allow::AllowError),
    #[error("'{0}' mixes IPv4 and IPv6 addresses; a mapping stays within one family")]
    MixedFamilies(String),
    #[error("weight '{0}' is not a number from 0 to {max}", max = MAX_WEIGHT)]
    Weight(String),
    #[error("'{0}': every backend has weight 0, so no flow could go anywhere")]
    AllWeightsZero(String),
    #[error("'{0}' lists the same backend twice")]
    DuplicateBackend(String),
    #[error("'{spec}' has {count} backends; at most {max} are balanced evenly", max = MAX_BACKENDS)]
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

/// A host address: empty means every address (Docker's `:8080:...`), an IPv4-mapped IPv6
/// address is the IPv4 address.
fn parse_host_addr(s: &str) -> Result<Option<IpAddr>, SpecError> {
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(match parse_addr("host address", s)? {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }))
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

/// A port or a port range, as written (`8080`, `8000-8010`).
fn is_ports(field: &str) -> bool {
    !field.is_empty() && field.bytes().all(|b| b.is_ascii_digit() || b == b'-')
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
        // Docker reads an empty protocol as tcp.
        Some((body, "")) => (body, Protocol::Tcp),
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
        // Docker's HOST_PORT:CONTAINER_PORT, without a container to give the address.
        [hp, bp] if is_ports(hp) && is_ports(bp.split_once('@').map_or(bp, |(p, _)| p)) => {
            return Err(SpecError::NoBackendAddress {
                spec: spec.to_string(),
                host: (*hp).to_string(),
                port: (*bp).to_string(),
            });
        }
        [bip, bp] => (None, None, (*bip, *bp)),
        [hp, bip, bp] => (None, Some(*hp), (*bip, *bp)),
        [hip, hp, bip, bp] => (parse_host_addr(hip)?, Some(*hp), (*bip, *bp)),
        _ => return Err(SpecError::Shape(spec.to_string())),
    };
    let host_ports = match host_ports {
        // Docker: host port 0 (or the range 0-0) means "any free port".
        Some("" | "0" | "0-0") | None => None,
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
        allow: Vec::new(),
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
    crate::model::allow::check_own(&mapping.allow, mapping.family())?;
    for b in backends {
        let bad = match b.ip {
            IpAddr::V4(a) => a.is_broadcast() || a.is_multicast(),
            IpAddr::V6(a) => a.is_multicast(),
        };
        if bad {
            return Err(SpecError::BackendAddress(b.ip));
        }
    }
    if backends.len() > 1 && backends.iter().any(|b| b.ip.is_unspecified()) {
        return Err(SpecError::DestinationWithOthers(spec.to_string(), v6));
    }
    let bad_host = match mapping.host_ip {
        IpAddr::V4(a) => a.is_broadcast() || a.is_multicast(),
        IpAddr::V6(a) => a.is_multicast(),
    };
    if bad_host {
        return Err(SpecError::HostAddress(mapping.host_ip));
    }
    if let Some(b) = backends.iter().find(|b| b.ip.is_loopback())
        && !mapping.host_ip.is_loopback()
    {
        return Err(SpecError::LoopbackBackend {
            backend: *b,
            host_ports: mapping.host_ports,
        });
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(SpecError::AllWeightsZero(spec.to_string()));
    }
    let mut ids: Vec<(IpAddr, u16)> = backends.iter().map(|b| (b.ip, b.ports.start)).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(SpecError::DuplicateBackend(spec.to_string()));
    }
    // A host range with single-port backends publishes one port of the range; with ranged
    // backends, port by port: then every backend has as many ports as the host range (or as
    // the first ranged backend, for a dynamic one).
    let ranged = backends.iter().find(|b| !b.ports.is_single());
    let host_len = mapping
        .host_ports
        .map_or_else(|| ranged.map_or(1, |b| b.ports.count()), PortRange::count);
    for b in backends {
        if ranged.is_some() && b.ports.count() != host_len {
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
        // One port of a range is chosen when it is added: never an overlap here.
        .filter(|(_, m)| !m.picks_one())
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

impl FromStr for Mapping {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

mod port;
#[cfg(test)]
mod tests;

pub use self::port::{PortQuery, natural_cmp, port_lines};
