//! Backends on this host: addresses that live behind a veth of the daemon's namespace (containers,
//! routed to their veth directly or attached to a bridge port, as Docker and the CNI bridge
//! plugin set them up), and how to reach them. The datapath sends packets for them straight into
//! the veth (`PM_LOCAL_BACKENDS`) instead of a FIB lookup.
//!
//! The truth is the kernel's: an address is local when it has a usable neighbour entry on a veth,
//! or on a bridge whose forwarding database places its MAC behind exactly one veth port, and the
//! route to it leaves through that device without a gateway. `read` takes that from rtnetlink;
//! `resolve` is the pure decision (unit-tested); `watch` reports changes to follow.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Context as _;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::protocols::NETLINK_ROUTE;
use portmap_common::LocalBackend;

use crate::host::netlink::{Netlink, Watch};

/// What kind of device a link is, as far as local backends go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Veth,
    Bridge,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub kind: LinkKind,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// The bridge (or other controller) this link is a port of.
    pub master: Option<u32>,
}

/// A usable neighbour entry: `addr` is at `mac` on `ifindex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// A bridge forwarding entry learnt or configured for a port (not the port's own address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub port: u32,
    pub bridge: u32,
}

/// The part of the namespace's network state that decides which backends are local.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostNet {
    pub links: BTreeMap<u32, Link>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
}

/// A local backend: how the datapath reaches it, and the name of the veth (for `portmap stats`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub backend: LocalBackend,
    pub device: String,
}

/// The local backends of `net`. `route_oif(addr)` is the device the kernel routes `addr` to when
/// it is directly connected (no gateway), `None` otherwise: a neighbour entry left on a device
/// that no longer leads to the address is not followed.
pub fn resolve(net: &HostNet, route_oif: impl Fn(IpAddr) -> Option<u32>) -> BTreeMap<IpAddr, Local> {
    let mut out = BTreeMap::new();
    for n in &net.neighbours {
        let Some(dev) = net.links.get(&n.ifindex) else {
            continue;
        };
        let Some(smac) = dev.mac else {
            continue;
        };
        let (ifindex, mtu, device) = match dev.kind {
            LinkKind::Veth => (n.ifindex, dev.mtu, &dev.name),
            LinkKind::Bridge => {
                let ports: BTreeSet<u32> = net
                    .fdb
                    .iter()
                    .filter(|f| f.bridge == n.ifindex && f.mac == n.mac)
                    .map(|f| f.port)
                    .collect();
                // Unknown to the bridge, or behind several ports (VLANs): the bridge decides.
                let [port] = ports.into_iter().collect::<Vec<_>>()[..] else {
                    continue;
                };
                match net.links.get(&port) {
                    Some(p) if p.kind == LinkKind::Veth && p.master == Some(n.ifindex) => {
                        (port, dev.mtu.min(p.mtu), &p.name)
                    }
                    _ => continue,
                }
            }
            LinkKind::Other => continue,
        };
        if route_oif(n.addr) != Some(n.ifindex) {
            continue;
        }
        let backend = LocalBackend {
            ifindex,
            mtu,
            dmac: n.mac,
            smac,
        };
        out.insert(
            n.addr,
            Local {
                backend,
                device: device.clone(),
            },
        );
    }
    out
}

/// A neighbour entry the kernel would send to now (or after a quick confirmation).
fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    )
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

/// Addresses that can be a backend on a link (not multicast, link-local or unspecified).
fn unicast(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_link_local() || a.is_unspecified() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unicast_link_local() || a.is_unspecified()),
    }
}

fn link(message: &LinkMessage) -> Link {
    let mut link = Link {
        name: String::new(),
        kind: LinkKind::Other,
        mac: None,
        mtu: 0,
        master: None,
    };
    for attr in &message.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Address(a) => link.mac = mac_of(a),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(m) => link.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Veth) => link.kind = LinkKind::Veth,
                        LinkInfo::Kind(InfoKind::Bridge) => link.kind = LinkKind::Bridge,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn neighbour(message: &NeighbourMessage) -> Option<Neighbour> {
    if !usable(message.header.state) {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for attr in &message.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => addr = Some(IpAddr::V6(*a)),
            NeighbourAttribute::LinkLayerAddress(l) => mac = mac_of(l),
            _ => {}
        }
    }
    let addr = addr.filter(|a| unicast(*a))?;
    Some(Neighbour {
        addr,
        ifindex: message.header.ifindex,
        mac: mac?,
    })
}

fn fdb_entry(message: &NeighbourMessage) -> Option<FdbEntry> {
    // The port's own address (permanent "local" entry) and the device's own table (`self`).
    if message.header.state == NeighbourState::Permanent || message.header.flags.contains(NeighbourFlags::Own)
    {
        return None;
    }
    let mut mac = None;
    let mut bridge = None;
    for attr in &message.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(l) => mac = mac_of(l),
            NeighbourAttribute::Controller(b) => bridge = Some(*b),
            _ => {}
        }
    }
    Some(FdbEntry {
        mac: mac?,
        port: message.header.ifindex,
        bridge: bridge?,
    })
}

/// Reads links, neighbours and bridge forwarding entries of the calling thread's namespace.
fn read_net(netlink: &mut Netlink) -> anyhow::Result<HostNet> {
    let mut net = HostNet::default();
    for answer in netlink.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        if let RouteNetlinkMessage::NewLink(l) = answer {
            net.links.insert(l.header.index, link(&l));
        }
    }
    for family in [AddressFamily::Inet, AddressFamily::Inet6, AddressFamily::Bridge] {
        let mut request = NeighbourMessage::default();
        request.header.family = family;
        for answer in netlink.dump(RouteNetlinkMessage::GetNeighbour(request))? {
            let RouteNetlinkMessage::NewNeighbour(n) = answer else {
                continue;
            };
            if family == AddressFamily::Bridge {
                net.fdb.extend(fdb_entry(&n));
            } else {
                net.neighbours.extend(neighbour(&n));
            }
        }
    }
    Ok(net)
}

/// The device the kernel routes `addr` to, if it is directly connected (RTM_GETROUTE).
fn route_oif(netlink: &mut Netlink, addr: IpAddr) -> Option<u32> {
    let mut request = RouteMessage::default();
    let (family, len, dst) = match addr {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    request.header.address_family = family;
    request.header.destination_prefix_length = len;
    request.attributes.push(RouteAttribute::Destination(dst));
    let Ok(Some(RouteNetlinkMessage::NewRoute(route))) = netlink.get(RouteNetlinkMessage::GetRoute(request))
    else {
        return None;
    };
    let mut oif = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => return None,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    oif
}

/// Every veth of `net` (name → ifindex): the host sides of containers, where the reply hook
/// goes. Not only those of backends known now: a container's neighbour entry may come late or
/// expire while its flows last, and its replies must never take the host's path.
pub fn veths(net: &HostNet) -> BTreeMap<String, u32> {
    net.links
        .iter()
        .filter(|(_, l)| l.kind == LinkKind::Veth)
        .map(|(index, l)| (l.name.clone(), *index))
        .collect()
}

/// What `read` found: the local backends (for the fast path) and the veths (for replies).
#[derive(Clone, Debug, Default)]
pub struct HostBackends {
    pub local: BTreeMap<IpAddr, Local>,
    pub veths: BTreeMap<String, u32>,
}

/// The local backends and the veths of the calling thread's network namespace now.
pub fn read() -> anyhow::Result<HostBackends> {
    let mut netlink = Netlink::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    let net = read_net(&mut netlink).context("reading links, neighbours and bridge entries")?;
    let veths = veths(&net);
    let netlink = std::cell::RefCell::new(netlink);
    let mut local = resolve(&net, |addr| route_oif(&mut netlink.borrow_mut(), addr));
    let max = portmap_common::MAX_LOCAL_BACKENDS as usize;
    if local.len() > max {
        log::warn!(
            "{} local backends, the fast path holds {max}: the others take the FIB path",
            local.len()
        );
        local = local.into_iter().take(max).collect();
    }
    Ok(HostBackends { local, veths })
}

/// Becomes readable when links, neighbours (bridge forwarding entries included), routes or policy
/// rules (`ip rule`: they choose the table a flow's cached route came from) change.
pub fn watch() -> anyhow::Result<Watch> {
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_NEIGH: u32 = 0x4;
    const RTMGRP_IPV4_ROUTE: u32 = 0x40;
    const RTMGRP_IPV6_ROUTE: u32 = 0x400;
    // The legacy bind mask has bit `group - 1` for each multicast group below 32.
    const RTMGRP_IPV4_RULE: u32 = 1 << (libc::RTNLGRP_IPV4_RULE - 1);
    const RTMGRP_IPV6_RULE: u32 = 1 << (libc::RTNLGRP_IPV6_RULE - 1);
    Watch::new(
        NETLINK_ROUTE,
        RTMGRP_LINK
            | RTMGRP_NEIGH
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE
            | RTMGRP_IPV4_RULE
            | RTMGRP_IPV6_RULE,
    )
    .context("subscribing to link, neighbour, route and rule changes (netlink)")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const BR: u32 = 3;
    const VETH_A: u32 = 4;
    const VETH_B: u32 = 5;
    const ROUTED: u32 = 6;
    const NIC: u32 = 2;

    fn mac(last: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, last]
    }

    fn net() -> HostNet {
        let l = |kind, mac: u8, mtu, master| Link {
            name: format!("if{mac:x}"),
            kind,
            mac: Some(self::mac(mac)),
            mtu,
            master,
        };
        HostNet {
            links: BTreeMap::from([
                (NIC, l(LinkKind::Other, 0x10, 1500, None)),
                (BR, l(LinkKind::Bridge, 0x11, 1500, None)),
                (VETH_A, l(LinkKind::Veth, 0x12, 9000, Some(BR))),
                (VETH_B, l(LinkKind::Veth, 0x13, 1400, Some(BR))),
                (ROUTED, l(LinkKind::Veth, 0x14, 1500, None)),
            ]),
            neighbours: vec![
                // Bridged containers.
                Neighbour {
                    addr: Ipv4Addr::new(10, 0, 0, 2).into(),
                    ifindex: BR,
                    mac: mac(0xa2),
                },
                Neighbour {
                    addr: Ipv4Addr::new(10, 0, 0, 3).into(),
                    ifindex: BR,
                    mac: mac(0xa3),
                },
                // Not (yet) learnt by the bridge.
                Neighbour {
                    addr: Ipv4Addr::new(10, 0, 0, 4).into(),
                    ifindex: BR,
                    mac: mac(0xa4),
                },
                // A routed container.
                Neighbour {
                    addr: Ipv4Addr::new(10, 1, 0, 2).into(),
                    ifindex: ROUTED,
                    mac: mac(0xb2),
                },
                // A host on the physical network.
                Neighbour {
                    addr: Ipv4Addr::new(192, 0, 2, 1).into(),
                    ifindex: NIC,
                    mac: mac(0xc1),
                },
            ],
            fdb: vec![
                FdbEntry {
                    mac: mac(0xa2),
                    port: VETH_A,
                    bridge: BR,
                },
                FdbEntry {
                    mac: mac(0xa3),
                    port: VETH_B,
                    bridge: BR,
                },
            ],
        }
    }

    /// Routes as the neighbours imply: each address through the device it has its entry on.
    fn direct(net: &HostNet) -> impl Fn(IpAddr) -> Option<u32> + '_ {
        |addr| net.neighbours.iter().find(|n| n.addr == addr).map(|n| n.ifindex)
    }

    #[test]
    fn bridged_and_routed_containers_are_local_other_neighbours_not() {
        let net = net();
        let local = resolve(&net, direct(&net));
        let a = Ipv4Addr::new(10, 0, 0, 2).into();
        let b = Ipv4Addr::new(10, 0, 0, 3).into();
        let r = Ipv4Addr::new(10, 1, 0, 2).into();
        assert_eq!(local.keys().copied().collect::<Vec<IpAddr>>(), vec![a, b, r]);
        // Bridged: the port, the bridge's MAC as source, the smaller MTU.
        assert_eq!(
            local[&a],
            Local {
                backend: LocalBackend {
                    ifindex: VETH_A,
                    mtu: 1500,
                    dmac: mac(0xa2),
                    smac: mac(0x11)
                },
                device: "if12".into()
            }
        );
        assert_eq!(local[&b].backend.mtu, 1400);
        assert_eq!(local[&b].backend.ifindex, VETH_B);
        // Routed: the veth itself.
        assert_eq!(
            local[&r].backend,
            LocalBackend {
                ifindex: ROUTED,
                mtu: 1500,
                dmac: mac(0xb2),
                smac: mac(0x14)
            }
        );
        assert_eq!(local[&r].device, "if14");
    }

    #[test]
    fn a_neighbour_the_route_does_not_lead_to_is_not_followed() {
        let net = net();
        let routed = Ipv4Addr::new(10, 1, 0, 2).into();
        let local = resolve(&net, |addr| {
            if addr == routed {
                Some(NIC)
            } else {
                direct(&net)(addr)
            }
        });
        assert!(!local.contains_key(&routed));
        let local = resolve(&net, |_| None);
        assert!(local.is_empty(), "through a gateway: {local:?}");
    }

    #[test]
    fn a_mac_behind_two_ports_or_a_port_that_is_no_veth_is_left_to_the_bridge() {
        let mut net = net();
        net.fdb.push(FdbEntry {
            mac: mac(0xa2),
            port: VETH_B,
            bridge: BR,
        });
        net.links.get_mut(&VETH_B).expect("veth").kind = LinkKind::Other;
        let local = resolve(&net, direct(&net));
        assert!(!local.contains_key(&IpAddr::from(Ipv4Addr::new(10, 0, 0, 2))));
        assert!(!local.contains_key(&IpAddr::from(Ipv4Addr::new(10, 0, 0, 3))));
        // A port that left the bridge.
        let mut net = self::net();
        net.links.get_mut(&VETH_A).expect("veth").master = None;
        assert!(!resolve(&net, direct(&net)).contains_key(&IpAddr::from(Ipv4Addr::new(10, 0, 0, 2))));
    }

    #[test]
    fn only_usable_unicast_neighbours_count() {
        assert!(usable(NeighbourState::Stale));
        assert!(!usable(NeighbourState::Failed));
        assert!(!usable(NeighbourState::Incomplete));
        assert!(!unicast("224.0.0.1".parse().expect("addr")));
        assert!(!unicast("fe80::1".parse().expect("addr")));
        assert!(unicast("fd00::5".parse().expect("addr")));
    }

    #[test]
    fn every_veth_gets_the_reply_hook_whether_or_not_a_backend_is_known_behind_it() {
        let mut net = net();
        // No neighbour at all: a container whose entry expired, or that never answered yet.
        net.neighbours.clear();
        let veths = veths(&net);
        assert_eq!(
            veths,
            BTreeMap::from([
                ("if12".to_string(), VETH_A),
                ("if13".to_string(), VETH_B),
                ("if14".to_string(), ROUTED),
            ])
        );
    }
}
