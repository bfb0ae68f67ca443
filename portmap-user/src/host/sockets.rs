//! The sockets bound on this host: a published port must not take traffic a local socket
//! listens for (Docker's "port is already allocated"). TCP listeners come from sock_diag, UDP
//! from /proc/net/udp{,6}, SCTP endpoints from /proc/net/sctp/eps; the parsers are pure.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::model::mapping::{Binding, Protocol};

/// A socket of this host bound to a port (from /proc/net).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSocket {
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for LocalSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Parses a /proc/net/{tcp,udp}{,6} table: the local address of every socket, TCP only when it
/// listens (state 0A). Addresses are hex words in host order.
#[must_use]
pub fn parse_proc_net(text: &str, protocol: Protocol, v6: bool) -> Vec<LocalSocket> {
    const TCP_LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if protocol == Protocol::Tcp && *state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let word = |i: usize| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok();
            let addr = if v6 {
                let mut octets = [0u8; 16];
                for i in 0..4 {
                    octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_ne_bytes());
                }
                let v6 = Ipv6Addr::from(octets);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            } else {
                IpAddr::V4(Ipv4Addr::from(word(0)?.to_ne_bytes()))
            };
            Some(LocalSocket { protocol, addr, port })
        })
        .collect()
}

/// Parses /proc/net/sctp/eps: listening SCTP endpoints (`LADDRS` may list several addresses).
#[must_use]
pub fn parse_sctp_eps(text: &str) -> Vec<LocalSocket> {
    text.lines()
        .skip(1)
        .flat_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(5).and_then(|p| p.parse::<u16>().ok());
            fields
                .iter()
                .skip(8)
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .filter_map(move |addr| {
                    Some(LocalSocket {
                        protocol: Protocol::Sctp,
                        addr,
                        port: port?,
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// TCP sockets listening in this network namespace, from the kernel's sock_diag interface
/// (which walks only the listening hash, unlike /proc/net/tcp, which walks every connection).
fn tcp_listeners() -> std::io::Result<Vec<LocalSocket>> {
    use netlink_packet_sock_diag::{
        SockDiagMessage,
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    };

    let mut netlink = crate::host::netlink::Netlink::new(netlink_sys::protocols::NETLINK_SOCK_DIAG)?;
    let mut out = Vec::new();
    for (family, id) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: id,
        });
        for answer in netlink.dump(request)? {
            let SockDiagMessage::InetResponse(r) = answer else {
                continue;
            };
            let addr = match r.header.socket_id.source_address {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            out.push(LocalSocket {
                protocol: Protocol::Tcp,
                addr,
                port: r.header.socket_id.source_port,
            });
        }
    }
    Ok(out)
}

/// The sockets bound on this host now (in the daemon's network namespace): TCP listeners
/// through sock_diag, UDP sockets from /proc/net/udp{,6}, SCTP endpoints from
/// /proc/net/sctp/eps. One snapshot serves a whole request (an add, or a config applied).
#[must_use]
pub fn local_sockets() -> Vec<LocalSocket> {
    let mut out = tcp_listeners().unwrap_or_else(|e| {
        log::warn!("listing TCP listeners: {e}; reading /proc/net/tcp instead");
        let mut all = Vec::new();
        for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            if let Ok(text) = std::fs::read_to_string(file) {
                all.extend(parse_proc_net(&text, Protocol::Tcp, v6));
            }
        }
        all
    });
    for (file, v6) in [("/proc/net/udp", false), ("/proc/net/udp6", true)] {
        if let Ok(text) = std::fs::read_to_string(file) {
            out.extend(parse_proc_net(&text, Protocol::Udp, v6));
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/sctp/eps") {
        out.extend(parse_sctp_eps(&text));
    }
    out
}

/// The local socket a binding would take traffic from, if any: same protocol and port, and the
/// same address or a wildcard on either side (a socket on `::` also takes IPv4).
#[must_use]
pub fn socket_conflict(binding: &Binding, sockets: &[LocalSocket]) -> Option<LocalSocket> {
    sockets.iter().copied().find(|s| {
        let same_family = s.addr.is_ipv6() == binding.host_ip.is_ipv6();
        let dual_stack = s.addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        s.protocol == binding.protocol
            && s.port == binding.host_port
            && (same_family || dual_stack)
            && (s.addr.is_unspecified() || binding.host_ip.is_unspecified() || s.addr == binding.host_ip)
    })
}

/// Which local socket, if any, a binding would take traffic from.
pub trait Sockets {
    fn conflict(&self, binding: &Binding) -> Option<LocalSocket>;
}

/// A fixed list of sockets (tests).
impl Sockets for Vec<LocalSocket> {
    fn conflict(&self, binding: &Binding) -> Option<LocalSocket> {
        socket_conflict(binding, self)
    }
}

/// No local sockets: for re-applying what was applied before (a rollback), and for datapaths
/// that are not the host's (tests, benchmarks).
pub struct NoSockets;

impl Sockets for NoSockets {
    fn conflict(&self, _: &Binding) -> Option<LocalSocket> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::parse;

    const PROC_TCP: &str =
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:A000 0200007F:0050 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
    const PROC_TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000
";

    #[test]
    fn proc_net_tables_parse_to_listening_sockets() {
        let tcp = parse_proc_net(PROC_TCP, Protocol::Tcp, false);
        let want = |addr: &str, port| LocalSocket {
            protocol: Protocol::Tcp,
            addr: addr.parse().unwrap(),
            port,
        };
        assert_eq!(tcp, vec![want("0.0.0.0", 8080), want("127.0.0.1", 80)]);
        let tcp6 = parse_proc_net(PROC_TCP6, Protocol::Tcp, true);
        assert_eq!(tcp6, vec![want("::", 8081), want("127.0.0.1", 8082)]);
        let udp = parse_proc_net(PROC_TCP, Protocol::Udp, false);
        assert_eq!(udp.len(), 3, "UDP sockets count in any state");
        let eps = "ENDPT SOCK STY SST HBKT LPORT UID INODE LADDRS\n\
                   0 0 2 10 5 9999 0 123 198.18.0.1 fd00::1\n";
        assert_eq!(parse_sctp_eps(eps).len(), 2);
        assert_eq!(parse_sctp_eps(eps)[1].addr, "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn sockets_conflict_on_same_port_protocol_and_overlapping_address() {
        let sock = |addr: &str, port, protocol| LocalSocket {
            protocol,
            addr: addr.parse().unwrap(),
            port,
        };
        let binding = |spec: &str| parse(spec).unwrap().bindings().next().unwrap();
        let sockets = [
            sock("0.0.0.0", 8080, Protocol::Tcp),
            sock("198.18.0.1", 9090, Protocol::Tcp),
            sock("::", 7070, Protocol::Udp),
        ];
        assert!(socket_conflict(&binding("8080:198.18.2.2:80"), &sockets).is_some());
        assert!(socket_conflict(&binding("198.18.0.5:8080:198.18.2.2:80"), &sockets).is_some());
        assert!(socket_conflict(&binding("8080:198.18.2.2:80/udp"), &sockets).is_none());
        assert!(socket_conflict(&binding("8080:[fd00::2]:80"), &sockets).is_none());
        assert!(socket_conflict(&binding("9090:198.18.2.2:80"), &sockets).is_some());
        assert!(socket_conflict(&binding("198.18.0.9:9090:198.18.2.2:80"), &sockets).is_none());
        assert!(
            socket_conflict(&binding("7070:198.18.2.2:80/udp"), &sockets).is_some(),
            "dual stack"
        );
        assert!(socket_conflict(&binding("7070:[fd00::2]:80/udp"), &sockets).is_some());
    }
}
