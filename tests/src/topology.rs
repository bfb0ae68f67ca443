//! The client → host → backend topologies the end-to-end tests and the demo use.

use std::net::Ipv4Addr;

use crate::{Daemon, Netns};

/// Client side of the host (the published address) and the rest of the addressing plan.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const HOST_BACKEND_SIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// A machine behind the host (`Topology::add_routed_machine`).
pub const ROUTED_MACHINE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// Interface names inside the namespaces (they only need to be unique per namespace).
pub const HOST_CLIENT_IFACE: &str = "h0";
pub const HOST_BACKEND_IFACE: &str = "h1";
pub const BRIDGE: &str = "br0";

/// How the backend is attached to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendLink {
    /// A veth pair straight into the backend namespace (`h1` ↔ `b0`).
    Veth,
    /// docker0 style: the backend's veth is a port of bridge `br0`, which holds the address.
    Bridge,
}

/// client (c0 198.18.0.2) ── (h0 198.18.0.1) host (h1|br0 198.18.1.1) ── (b0 198.18.1.2) backend
pub struct Topology {
    pub client: Netns,
    pub host: Netns,
    pub backend: Netns,
    pub link: BackendLink,
}

impl Topology {
    pub fn new(link: BackendLink) -> anyhow::Result<Self> {
        let topo = Self {
            client: Netns::new("c")?,
            host: Netns::new("h")?,
            backend: Netns::new("b")?,
            link,
        };
        topo.connect_client()?;
        let (h, b) = (&topo.host, &topo.backend);
        b.add_veth("b0", HOST_BACKEND_IFACE, h)?;
        let backend_side = match link {
            BackendLink::Veth => HOST_BACKEND_IFACE,
            BackendLink::Bridge => {
                h.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
                h.ip(&["link", "set", HOST_BACKEND_IFACE, "master", BRIDGE])?;
                h.ip(&["link", "set", BRIDGE, "up"])?;
                BRIDGE
            }
        };
        h.ip(&["addr", "add", "198.18.1.1/24", "dev", backend_side])?;
        h.ip(&["link", "set", HOST_BACKEND_IFACE, "up"])?;
        b.ip(&["addr", "add", "198.18.1.2/24", "dev", "b0"])?;
        b.ip(&["link", "set", "b0", "up"])?;
        b.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        h.sysctl("net/ipv4/ip_forward", "1")?;
        Ok(topo)
    }

    /// The client's link: veth c0 (198.18.0.2, default route via the host) ↔ h0 (198.18.0.1).
    /// Tests that delete h0 call it again to bring the client back.
    pub fn connect_client(&self) -> anyhow::Result<()> {
        let (c, h) = (&self.client, &self.host);
        c.add_veth("c0", HOST_CLIENT_IFACE, h)?;
        c.ip(&["addr", "add", "198.18.0.2/24", "dev", "c0"])?;
        c.ip(&["link", "set", "c0", "up"])?;
        c.ip(&["route", "add", "default", "via", "198.18.0.1"])?;
        h.ip(&["addr", "add", "198.18.0.1/24", "dev", HOST_CLIENT_IFACE])?;
        h.ip(&["link", "set", HOST_CLIENT_IFACE, "up"])?;
        Ok(())
    }

    /// Adds IPv6 to the topology: client fd00::2, host fd00::1 and fd00:1::1, backend
    /// fd00:1::2 (no duplicate address detection), default routes, and forwarding on the host.
    pub fn enable_ipv6(&self) -> anyhow::Result<()> {
        let backend_side = if self.link == BackendLink::Bridge {
            BRIDGE
        } else {
            HOST_BACKEND_IFACE
        };
        self.client
            .ip(&["addr", "add", "fd00::2/64", "dev", "c0", "nodad"])?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "fd00::1"])?;
        self.host
            .ip(&["addr", "add", "fd00::1/64", "dev", HOST_CLIENT_IFACE, "nodad"])?;
        self.host
            .ip(&["addr", "add", "fd00:1::1/64", "dev", backend_side, "nodad"])?;
        self.backend
            .ip(&["addr", "add", "fd00:1::2/64", "dev", "b0", "nodad"])?;
        self.backend
            .ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;
        self.host.sysctl("net/ipv6/conf/all/forwarding", "1")
    }

    /// Another container on the bridge (`BackendLink::Bridge` only): a namespace whose veth is a
    /// port of `br0`, with `ip`/24 and a default route via the bridge address.
    pub fn add_container(&self, ip: Ipv4Addr) -> anyhow::Result<Netns> {
        anyhow::ensure!(self.link == BackendLink::Bridge, "containers sit on the bridge");
        let ns = Netns::new("k")?;
        let host_end = format!("hk{}", ip.octets()[3]);
        ns.add_veth("k0", &host_end, &self.host)?;
        self.host.ip(&["link", "set", &host_end, "master", BRIDGE])?;
        self.host.ip(&["link", "set", &host_end, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "k0"])?;
        ns.ip(&["link", "set", "k0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &HOST_BACKEND_SIDE_IP.to_string(),
        ])?;
        Ok(ns)
    }

    /// A machine the host routes to for the client (198.18.3.2, on the host's `h2`
    /// 198.18.3.1/24): traffic to it crosses the host as transit, never as a published port.
    pub fn add_routed_machine(&self) -> anyhow::Result<Netns> {
        let ns = Netns::new("r")?;
        ns.add_veth("r0", "h2", &self.host)?;
        self.host.ip(&["addr", "add", "198.18.3.1/24", "dev", "h2"])?;
        self.host.ip(&["link", "set", "h2", "up"])?;
        ns.ip(&["addr", "add", &format!("{ROUTED_MACHINE_IP}/24"), "dev", "r0"])?;
        ns.ip(&["link", "set", "r0", "up"])?;
        ns.ip(&["route", "add", "default", "via", "198.18.3.1"])?;
        Ok(ns)
    }

    /// Sets the MTU of every link of the topology (veth ends and the bridge).
    pub fn set_mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        self.client.ip(&["link", "set", "c0", "mtu", &mtu])?;
        self.backend.ip(&["link", "set", "b0", "mtu", &mtu])?;
        let mut host_links = vec![HOST_CLIENT_IFACE, HOST_BACKEND_IFACE];
        if self.link == BackendLink::Bridge {
            host_links.push(BRIDGE);
        }
        for link in host_links {
            self.host.ip(&["link", "set", link, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// What XDP on the client-facing veth needs (see README, "XDP on a veth"): frames redirected
    /// into a veth are only received if the peer has GRO on, and an XDP program cannot see that a
    /// frame from a veth peer carries a partial (offloaded) checksum, so the client sends full ones.
    pub fn prepare_for_xdp(&self) -> anyhow::Result<()> {
        self.client.exec("ethtool", &["-K", "c0", "tx", "off"])?;
        self.backend.exec("ethtool", &["-K", "b0", "gro", "on"])?;
        Ok(())
    }
}

/// How the daemon attaches its ingress program.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Tc,
    Xdp,
}

/// `portmap run` on the host's client-facing interface of `topo`, in `mode` (XDP mode also
/// prepares the veths and lists the backend veth as a redirect target), plus `extra` options.
pub fn start_daemon(topo: &Topology, mode: Mode, extra: &[&str]) -> anyhow::Result<Daemon> {
    let mut args = mode_args(topo, mode)?;
    args.extend_from_slice(extra);
    Daemon::start(&topo.host, &args)
}

/// The `portmap run` options of `start_daemon` for `mode` (also to restart the daemon with).
pub fn mode_args(topo: &Topology, mode: Mode) -> anyhow::Result<Vec<&'static str>> {
    let mut args = vec!["--iface", HOST_CLIENT_IFACE];
    match mode {
        Mode::Tc => args.extend(["--attach", "tc"]),
        Mode::Xdp => {
            topo.prepare_for_xdp()?;
            args.extend(["--attach", "xdp"]);
            if topo.link == BackendLink::Veth {
                args.extend(["--redirect-iface", HOST_BACKEND_IFACE]);
            }
        }
    }
    Ok(args)
}

/// The ids of the tcx programs on `iface` at `kind`, queried from the calling thread's network
/// namespace. A failed query is an error — except on a kernel without tcx, where there are none
/// (a query that fails otherwise must not read as "nothing attached").
pub fn tcx_program_ids(iface: &str, kind: aya::programs::TcAttachType) -> anyhow::Result<Vec<u32>> {
    use portmap::datapath::kernel;
    match aya::programs::SchedClassifier::query_tcx(iface, kind) {
        Ok((_, programs)) => Ok(programs.iter().map(aya::programs::ProgramInfo::id).collect()),
        Err(_) if kernel::detect().is_ok_and(|k| k.version < (kernel::TCX.0, kernel::TCX.1, 0)) => {
            Ok(Vec::new())
        }
        Err(e) => Err(anyhow::anyhow!("querying the tcx programs of {iface}: {e}")),
    }
}

/// Programs on an interface of `ns`: TC (ingress, egress: tcx links, or cls_bpf filters on a
/// kernel without tcx or with the fallback forced) and whether XDP is attached. Every query
/// that fails is an error.
pub fn attached(ns: &Netns, iface: &'static str) -> anyhow::Result<(usize, usize, bool)> {
    use aya::programs::TcAttachType;
    let (tcx_ingress, tcx_egress) = ns.run(move || {
        Ok((
            tcx_program_ids(iface, TcAttachType::Ingress)?.len(),
            tcx_program_ids(iface, TcAttachType::Egress)?.len(),
        ))
    })?;
    let filters = |direction: &str| -> anyhow::Result<usize> {
        let out = ns.exec("tc", &["filter", "show", "dev", iface, direction])?;
        Ok(out.matches("direct-action").count())
    };
    let link = ns.ip(&["-d", "link", "show", iface])?;
    Ok((
        tcx_ingress + filters("ingress")?,
        tcx_egress + filters("egress")?,
        link.contains("xdp"),
    ))
}
