//! Mapping specs in Docker's `-p` syntax: `[HOST_IP:]HOST_PORT:BACKEND_IP:BACKEND_PORT[/tcp|udp]`.
//!
//! Parsing is a pure function with typed errors that name the bad part.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use portmap_common::{MappingKey, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One published port: traffic to `host_ip:host_port` (0.0.0.0 = every address of the host) goes
/// to `backend_ip:backend_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mapping {
    pub protocol: Protocol,
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub backend_ip: Ipv4Addr,
    pub backend_port: u16,
}

/// What identifies a mapping: two mappings with the same binding conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding {
    pub protocol: Protocol,
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host_ip, self.host_port, self.protocol)
    }
}

impl Mapping {
    #[must_use]
    pub fn binding(&self) -> Binding {
        Binding {
            protocol: self.protocol,
            host_ip: self.host_ip,
            host_port: self.host_port,
        }
    }

    /// The key of this mapping in `PM_MAPPINGS`.
    #[must_use]
    pub fn map_key(&self) -> MappingKey {
        MappingKey {
            addr_be: u32::from_ne_bytes(self.host_ip.octets()),
            port_be: self.host_port.to_be(),
            proto: self.protocol.number(),
            _pad: 0,
        }
    }

    /// `docker port` style: `BACKEND_IP:BACKEND_PORT/PROTO -> HOST_IP:HOST_PORT`.
    #[must_use]
    pub fn docker_line(&self) -> String {
        format!(
            "{}:{}/{} -> {}:{}",
            self.backend_ip, self.backend_port, self.protocol, self.host_ip, self.host_port
        )
    }
}

/// The canonical spec, which parses back to the same mapping.
impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.host_ip.is_unspecified() {
            write!(f, "{}:", self.host_ip)?;
        }
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_port, self.backend_ip, self.backend_port, self.protocol
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("empty mapping spec: expected [HOST_IP:]HOST_PORT:BACKEND_IP:BACKEND_PORT[/tcp|udp]")]
    Empty,
    #[error("'{0}' does not match [HOST_IP:]HOST_PORT:BACKEND_IP:BACKEND_PORT[/tcp|udp]")]
    Shape(String),
    #[error("unknown protocol '{0}' (expected tcp or udp)")]
    Protocol(String),
    #[error("'{0}' has no protocol after '/' (expected tcp or udp)")]
    MissingProtocol(String),
    #[error("protocol '{0}' is not supported yet (tcp and udp are)")]
    ProtocolUnsupported(String),
    #[error("{what} is missing")]
    Missing { what: &'static str },
    #[error("{what} '{value}' is not a port number (1-65535)")]
    Port { what: &'static str, value: String },
    #[error("{what} {value} is out of range (1-65535)")]
    PortRange { what: &'static str, value: u32 },
    #[error("{what} '{value}' is a port range; ranges are not supported yet")]
    RangeUnsupported { what: &'static str, value: String },
    #[error("{what} '{value}' is not an IPv4 address")]
    Address { what: &'static str, value: String },
    #[error("{what} '{value}' is IPv6; IPv6 mappings are not supported yet")]
    Ipv6Unsupported { what: &'static str, value: String },
    #[error("backend address {0} cannot be a destination (unspecified, broadcast or multicast)")]
    BackendAddress(Ipv4Addr),
    #[error("host address {0} cannot be published (broadcast or multicast)")]
    HostAddress(Ipv4Addr),
}

fn parse_port(what: &'static str, s: &str) -> Result<u16, SpecError> {
    if s.is_empty() {
        return Err(SpecError::Missing { what });
    }
    if s.contains('-') && !s.starts_with('-') {
        return Err(SpecError::RangeUnsupported {
            what,
            value: s.to_string(),
        });
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 6 {
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

fn parse_addr(what: &'static str, s: &str) -> Result<Ipv4Addr, SpecError> {
    if s.is_empty() {
        return Err(SpecError::Missing { what });
    }
    if s.starts_with('[') || s.contains("::") {
        return Err(SpecError::Ipv6Unsupported {
            what,
            value: s.to_string(),
        });
    }
    s.parse().map_err(|_| SpecError::Address {
        what,
        value: s.to_string(),
    })
}

fn parse_protocol(s: &str) -> Result<Protocol, SpecError> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Err(SpecError::ProtocolUnsupported(s.to_string())),
        _ => Err(SpecError::Protocol(s.to_string())),
    }
}

/// Parses a spec. Pure: no I/O, no knowledge of what is already mapped.
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
    if body.starts_with('[') || body.matches(':').count() > 3 {
        return Err(SpecError::Ipv6Unsupported {
            what: "address",
            value: body.to_string(),
        });
    }
    let parts: Vec<&str> = body.split(':').collect();
    let (host_ip, host_port, backend_ip, backend_port) = match parts.as_slice() {
        [hp, bip, bp] => (Ipv4Addr::UNSPECIFIED, *hp, *bip, *bp),
        [hip, hp, bip, bp] => (parse_addr("host address", hip)?, *hp, *bip, *bp),
        _ => return Err(SpecError::Shape(spec.to_string())),
    };
    let host_port = parse_port("host port", host_port)?;
    let backend_ip = parse_addr("backend address", backend_ip)?;
    let backend_port = parse_port("backend port", backend_port)?;
    if backend_ip.is_unspecified() || backend_ip.is_broadcast() || backend_ip.is_multicast() {
        return Err(SpecError::BackendAddress(backend_ip));
    }
    if host_ip.is_broadcast() || host_ip.is_multicast() {
        return Err(SpecError::HostAddress(host_ip));
    }
    Ok(Mapping {
        protocol,
        host_ip,
        host_port,
        backend_ip,
        backend_port,
    })
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

    fn m(proto: Protocol, hip: [u8; 4], hp: u16, bip: [u8; 4], bp: u16) -> Mapping {
        Mapping {
            protocol: proto,
            host_ip: Ipv4Addr::from(hip),
            host_port: hp,
            backend_ip: Ipv4Addr::from(bip),
            backend_port: bp,
        }
    }

    #[test]
    fn good_specs() {
        let cases = [
            (
                "8080:198.18.2.2:80",
                m(Protocol::Tcp, [0; 4], 8080, [198, 18, 2, 2], 80),
            ),
            (
                "8080:198.18.2.2:80/tcp",
                m(Protocol::Tcp, [0; 4], 8080, [198, 18, 2, 2], 80),
            ),
            (
                "53:198.18.2.2:5353/udp",
                m(Protocol::Udp, [0; 4], 53, [198, 18, 2, 2], 5353),
            ),
            (
                "53:198.18.2.2:5353/UDP",
                m(Protocol::Udp, [0; 4], 53, [198, 18, 2, 2], 5353),
            ),
            (
                "198.18.1.1:65535:198.18.2.2:1",
                m(Protocol::Tcp, [198, 18, 1, 1], 65535, [198, 18, 2, 2], 1),
            ),
            (
                "  0.0.0.0:1:198.18.2.2:2 ",
                m(Protocol::Tcp, [0; 4], 1, [198, 18, 2, 2], 2),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(parse(spec), Ok(want), "{spec}");
        }
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let cases: [(&str, &str); 19] = [
            ("", "empty"),
            ("8080", "does not match"),
            ("8080:198.18.2.2", "does not match"),
            ("1:2:3:4:5", "IPv6"),
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
                "backend address '198.18.2' is not an IPv4 address",
            ),
            ("1.2.3.400:8080:198.18.2.2:80", "host address '1.2.3.400'"),
            ("8080:198.18.2.2:80/icmp", "unknown protocol 'icmp'"),
            ("8080:198.18.2.2:80/sctp", "'sctp' is not supported yet"),
            (
                "8080:198.18.2.2:80/",
                "'8080:198.18.2.2:80/' has no protocol after '/'",
            ),
            ("8080::80", "backend address is missing"),
            ("8000-8010:198.18.2.2:80", "host port '8000-8010' is a port range"),
            (
                "8080:0.0.0.0:80",
                "backend address 0.0.0.0 cannot be a destination",
            ),
            ("8080:[fd00::2]:80", "IPv6"),
            (
                "224.0.0.1:8080:198.18.2.2:80",
                "host address 224.0.0.1 cannot be published",
            ),
        ];
        for (spec, want) in cases {
            let err = parse(spec).expect_err(spec).to_string();
            assert!(err.contains(want), "{spec:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn display_round_trips_and_docker_line() {
        for spec in ["8080:198.18.2.2:80/tcp", "198.18.1.1:53:198.18.2.2:5353/udp"] {
            let mapping = parse(spec).unwrap();
            assert_eq!(mapping.to_string(), spec);
            assert_eq!(parse(&mapping.to_string()), Ok(mapping));
        }
        assert_eq!(
            parse("8080:198.18.2.2:80").unwrap().docker_line(),
            "198.18.2.2:80/tcp -> 0.0.0.0:8080"
        );
    }

    #[test]
    fn map_key_is_wire_order() {
        let key = parse("198.18.1.1:8080:198.18.2.2:80/udp").unwrap().map_key();
        assert_eq!(key.addr_be.to_ne_bytes(), [198, 18, 1, 1]);
        assert_eq!(key.port_be.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(key.proto, PROTO_UDP);
    }

    /// Spec-shaped input: fields drawn from valid and invalid addresses, ports, ranges and
    /// protocols, joined by ':' with an optional '/proto', so most inputs get deep into the parser.
    fn spec_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let field = prop_oneof![
            "[0-9]{1,6}",
            "[0-9]{1,5}-[0-9]{1,5}",
            (0u8..=255, 0u8..=255, 0u8..=255, 0u8..=255).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
            "[0-9a-f.\\[\\]]{0,12}",
            Just(String::new()),
            Just("::".to_string()),
            "\\PC{0,6}",
        ];
        let proto = prop_oneof![
            Just(String::new()),
            Just("/tcp".to_string()),
            Just("/UDP".to_string()),
            Just("/sctp".to_string()),
            "/\\PC{0,5}",
        ];
        (proptest::collection::vec(field, 1..6), proto).prop_map(|(fields, proto)| fields.join(":") + &proto)
    }

    /// An error names the problem: the piece of input it is about appears in the input and in
    /// the message, or it says which field is missing (and one is), or that all of it is.
    /// (Exhaustive: a new variant must say what it names.)
    fn names_the_problem(input: &str, err: &SpecError) -> bool {
        let piece = match err {
            SpecError::Empty => return input.trim().is_empty(),
            SpecError::Missing { .. } => {
                return input
                    .split('/')
                    .next()
                    .is_some_and(|b| b.split(':').any(str::is_empty));
            }
            SpecError::Shape(s)
            | SpecError::Protocol(s)
            | SpecError::ProtocolUnsupported(s)
            | SpecError::MissingProtocol(s) => s.clone(),
            SpecError::Port { value, .. }
            | SpecError::RangeUnsupported { value, .. }
            | SpecError::Address { value, .. }
            | SpecError::Ipv6Unsupported { value, .. } => value.clone(),
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
                host_ip: if bind { Ipv4Addr::new(198, 18, 0, a) } else { Ipv4Addr::UNSPECIFIED },
                host_port: hp,
                backend_ip: Ipv4Addr::new(a, 18, 2, 2),
                backend_port: bp,
            };
            proptest::prop_assert_eq!(parse(&mapping.to_string()), Ok(mapping));
        }
    }
}
