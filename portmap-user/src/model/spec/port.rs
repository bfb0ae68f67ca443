//! `portmap port BACKEND[:PORT][/PROTO]`, answering as `docker port` does: with a port, the
//! bindings that lead to it (TCP when no protocol is given); without one, every
//! `PORT/PROTO -> BINDING` line; sorted in Docker's natural order (numbers by value).

use std::{cmp::Ordering, net::IpAddr};

use super::{SpecError, fields, parse_addr, parse_port, parse_protocol};
use crate::model::mapping::{Mapping, Protocol, SpecAddr};

/// What `portmap port` was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortQuery {
    pub ip: IpAddr,
    /// The backend port and its protocol (tcp unless given), if one was asked for.
    pub port: Option<(u16, Protocol)>,
}

impl PortQuery {
    pub fn parse(query: &str) -> Result<Self, SpecError> {
        let query = query.trim();
        let (body, protocol) = match query.rsplit_once('/') {
            Some((body, "")) => (body, None),
            Some((body, proto)) => (body, Some(parse_protocol(proto)?)),
            None => (query, None),
        };
        match fields(body).as_slice() {
            [ip] => Ok(Self {
                ip: parse_addr("backend address", ip)?,
                port: None,
            }),
            [ip, port] => Ok(Self {
                ip: parse_addr("backend address", ip)?,
                port: Some((
                    parse_port("backend port", port)?,
                    protocol.unwrap_or(Protocol::Tcp),
                )),
            }),
            _ => Err(SpecError::Shape(query.to_string())),
        }
    }
}

/// The lines `docker port` would print for `query`, in its order.
pub fn port_lines(mappings: &[Mapping], query: &PortQuery) -> Vec<String> {
    let mut lines = Vec::new();
    for m in mappings {
        let Some(host_ports) = m.host_ports else { continue };
        for backend in m.backends.iter().filter(|b| b.ip == query.ip) {
            for (offset, host_port) in host_ports.ports().enumerate() {
                let backend_port = backend.port_at(offset as u16);
                let binding = format!("{}:{host_port}", SpecAddr(m.host_ip));
                match query.port {
                    Some((port, protocol)) if port == backend_port && protocol == m.protocol => {
                        lines.push(binding)
                    }
                    Some(_) => {}
                    None => lines.push(format!("{backend_port}/{} -> {binding}", m.protocol)),
                }
            }
        }
    }
    lines.sort_by(|a, b| natural_cmp(a, b));
    lines
}

/// Natural order, as Docker sorts `docker port` (Go's sortorder.NaturalLess): runs of digits
/// compare by value (then fewer leading zeros first), and before any other character; other
/// bytes compare as bytes; a prefix comes first.
#[must_use]
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (da, db) = (a[i].is_ascii_digit(), b[j].is_ascii_digit());
        if da != db {
            return if da { Ordering::Less } else { Ordering::Greater };
        }
        if !da {
            if a[i] != b[j] {
                return a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
            continue;
        }
        let run = |s: &[u8], mut k: usize| {
            while k < s.len() && s[k] == b'0' {
                k += 1;
            }
            let digits = k;
            while k < s.len() && s[k].is_ascii_digit() {
                k += 1;
            }
            (digits, k)
        };
        let ((za, ea), (zb, eb)) = (run(a, i), run(b, j));
        let by_value = (ea - za)
            .cmp(&(eb - zb))
            .then_with(|| a[za..ea].cmp(&b[zb..eb]))
            .then_with(|| (za - i).cmp(&(zb - j)));
        if by_value != Ordering::Equal {
            return by_value;
        }
        (i, j) = (ea, eb);
    }
    (a.len() - i).cmp(&(b.len() - j))
}
