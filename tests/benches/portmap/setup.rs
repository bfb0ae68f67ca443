//! The variants under test, set up on the host (router) namespace of a fresh topology:
//! generator (client ns, 198.18.0.2) → router (host ns) → sink (backend ns, 198.18.1.2).

use std::{fmt::Write as _, net::Ipv4Addr, path::Path, time::Instant};

use anyhow::{Context as _, ensure};
use portmap::{config::Limits, datapath::Datapath};
use portmap_common::prog_names;
use portmap_tests::{
    BackendLink, Daemon, HOST_BACKEND_IFACE, HOST_CLIENT_IFACE, Mode, TempDir, Topology, start_daemon,
};

/// First host port of the N benchmark mappings (host port `BASE_PORT + i` → sink:80 / sink:9).
pub const BASE_PORT: u16 = 10_000;
pub const SINK: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Variant {
    /// No NAT: the generator addresses the sink, the router only routes.
    Routing,
    /// iptables-nft: one DNAT rule per mapping in a nat chain, as Docker installs them.
    Iptables,
    /// nftables: one DNAT rule looking the port up in a map (the kube-proxy nftables way).
    Nftables,
    /// The fastest thing netfilter can do: `notrack` and stateless payload rewrites of address
    /// and port in the raw prerouting hook (UDP; a packet-rate peer only: no conntrack, so no
    /// reply translation for more than one mapping).
    NftStateless,
    /// portmap in TC mode; the sink is a container behind a veth of the router, so packets take
    /// the local fast path (`bpf_redirect_peer` into the sink's namespace).
    PortmapTc,
    /// portmap in TC mode with `local_fast_path = false`: a FIB lookup and `bpf_redirect` per
    /// packet, as for a backend on another machine.
    PortmapTcFib,
    /// `PortmapTc` with the config's top-level `allow` set to `allow::PREFIXES` prefixes (the
    /// generator's address among them): what a source allow-list costs.
    PortmapTcAllow,
    /// portmap in XDP mode (the sink's veth is a redirect target: the fast path's cached
    /// addresses and a devmap redirect).
    PortmapXdp,
    /// XDP parse + FIB lookup + redirect, no conntrack, no rewrite (`bench_xdp_forward`).
    XdpFloor,
    /// TC ingress that only `bpf_redirect_peer`s every packet into the sink's namespace
    /// (`bench_tc_redirect_peer`): the floor of portmap TC's local fast path.
    TcFloor,
}

impl Variant {
    /// Every variant, in report order.
    pub const ALL: [Self; 10] = [
        Self::Routing,
        Self::Iptables,
        Self::Nftables,
        Self::NftStateless,
        Self::PortmapTc,
        Self::PortmapTcFib,
        Self::PortmapTcAllow,
        Self::PortmapXdp,
        Self::XdpFloor,
        Self::TcFloor,
    ];
    /// The variants measured with real connections (new flows, throughput, latency); the XDP
    /// floors are packet-rate references only.
    pub const STACK: [Self; 5] = [
        Self::Routing,
        Self::Iptables,
        Self::Nftables,
        Self::PortmapTc,
        Self::PortmapXdp,
    ];
    /// The variants whose new connections per second are measured: `STACK` and the allow-list.
    pub const NEW_FLOWS: [Self; 6] = [
        Self::Routing,
        Self::Iptables,
        Self::Nftables,
        Self::PortmapTc,
        Self::PortmapTcAllow,
        Self::PortmapXdp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Routing => "routing (no NAT)",
            Self::Iptables => "iptables-nft DNAT",
            Self::Nftables => "nftables DNAT map",
            Self::NftStateless => "nftables stateless (notrack)",
            Self::PortmapTc => "portmap TC",
            Self::PortmapTcFib => "portmap TC, FIB path",
            Self::PortmapTcAllow => "portmap TC, allow-list",
            Self::PortmapXdp => "portmap XDP",
            Self::XdpFloor => "XDP redirect, no rewrite",
            Self::TcFloor => "TC redirect_peer, no rewrite",
        }
    }

    /// The variant's name on the command line (`--variants`).
    pub fn slug(self) -> &'static str {
        match self {
            Self::Routing => "routing",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::NftStateless => "nft-stateless",
            Self::PortmapTc => "portmap-tc",
            Self::PortmapTcFib => "portmap-tc-fib",
            Self::PortmapTcAllow => "portmap-tc-allow",
            Self::PortmapXdp => "portmap-xdp",
            Self::XdpFloor => "xdp-floor",
            Self::TcFloor => "tc-floor",
        }
    }

    /// Whether the variant publishes ports (traffic goes to the router's address).
    pub fn nat(self) -> bool {
        !matches!(self, Self::Routing | Self::XdpFloor | Self::TcFloor)
    }
}

/// The destination a client of `variant` uses to reach mapping number `index` (0-based) of
/// protocol `udp` (the sink itself when there is no NAT).
pub fn target(variant: Variant, index: u32, udp: bool) -> (Ipv4Addr, u16) {
    if variant.nat() {
        (ROUTER, BASE_PORT + index as u16)
    } else {
        (SINK, if udp { 9 } else { 80 })
    }
}

/// A topology with one variant installed; everything is removed on drop.
pub struct Bed {
    pub topo: Topology,
    pub daemon: Option<Daemon>,
    /// The in-process datapath holding the XDP floor program (attached in the router ns).
    floor: Option<std::thread::JoinHandle<()>>,
    floor_stop: Option<std::sync::mpsc::Sender<()>>,
    _dir: TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        drop(self.floor_stop.take());
        if let Some(t) = self.floor.take() {
            let _ = t.join();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.stop();
        }
    }
}

/// iptables-restore input: a DOCKER-style chain with `n` DNAT rules, TCP, and UDP as well when
/// `udp`.
pub fn iptables_rules(n: u32, udp: bool) -> String {
    let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:PORTMAP - [0:0]\n-A PREROUTING -j PORTMAP\n");
    for i in 0..n {
        let port = BASE_PORT + i as u16;
        for (proto, dst) in [("tcp", 80), ("udp", 9)]
            .into_iter()
            .take(if udp { 2 } else { 1 })
        {
            let _ = writeln!(
                s,
                "-A PORTMAP -d {ROUTER}/32 -p {proto} -m {proto} --dport {port} -j DNAT --to-destination {SINK}:{dst}"
            );
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// nft -f input: one map per protocol, one DNAT rule each; `n` TCP elements, and as many UDP
/// ones when `udp`.
pub fn nft_ruleset(n: u32, udp: bool) -> String {
    let elements = |dst: u16| {
        (0..n)
            .map(|i| format!("{} : {SINK} . {dst}", BASE_PORT + i as u16))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let set = |name: &str, dst: u16| {
        let body = if n == 0 || (name == "uports" && !udp) {
            String::new()
        } else {
            format!("elements = {{ {} }}", elements(dst))
        };
        format!("  map {name} {{ type inet_service : ipv4_addr . inet_service; {body} }}\n")
    };
    format!(
        "table ip pm {{\n{}{}  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {ROUTER} meta l4proto tcp dnat ip to tcp dport map @tports\n    ip daddr {ROUTER} meta l4proto udp dnat ip to udp dport map @uports\n  }}\n}}\n",
        set("tports", 80),
        set("uports", 9)
    )
}

/// nft -f input: UDP to the router's ports BASE_PORT.. is rewritten to the sink's port 9 without
/// conntrack (`notrack`, payload statements fix the checksums) in the raw prerouting hook; the
/// sink's answers from port 9 get the first mapping's address and port back in postrouting
/// (after routing: a packet arriving with the router's own source address would be a martian).
pub fn nft_stateless_ruleset(n: u32) -> String {
    let last = BASE_PORT + (n.max(1) - 1) as u16;
    format!(
        "table ip pmsl {{\n  chain raw {{ type filter hook prerouting priority raw; policy accept;\n    \
         ip daddr {ROUTER} udp dport {BASE_PORT}-{last} notrack ip daddr set {SINK} udp dport set 9\n    \
         ip saddr {SINK} udp sport 9 notrack\n  }}\n  \
         chain post {{ type filter hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {SINK} udp sport 9 ip saddr set {ROUTER} udp sport set {BASE_PORT}\n  }}\n}}\n"
    )
}

/// portmap config with `n` mappings: TCP, and UDP as well when `udp`.
pub fn portmap_config(n: u32, attach: &str, udp: bool) -> String {
    portmap_config_with(n, attach, udp, true)
}

/// `portmap_config`, with the local fast path on or off.
pub fn portmap_config_with(n: u32, attach: &str, udp: bool, local_fast_path: bool) -> String {
    let mut s = format!(
        "interfaces = [\"{HOST_CLIENT_IFACE}\"]\nattach = \"{attach}\"\nlocal_fast_path = {local_fast_path}\nmappings = [\n"
    );
    for i in 0..n {
        let port = BASE_PORT + i as u16;
        let _ = write!(s, "  \"{port}:{SINK}:80\",");
        if udp {
            let _ = write!(s, " \"{port}:{SINK}:9/udp\",");
        }
        s.push('\n');
    }
    s.push_str("]\n[limits]\nmax_mappings = 131072\nconntrack_entries = 1048576\n");
    s
}

/// Runs a command in the router namespace and returns how long it took (failing if it fails).
pub fn timed_in(topo: &Topology, program: &str, args: &[&str], stdin: Option<&Path>) -> anyhow::Result<f64> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &topo.host.name, program]).args(args);
    if let Some(path) = stdin {
        cmd.stdin(std::fs::File::open(path)?);
    }
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("running {program}"))?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(secs)
}

/// A fresh topology with `variant` installed for `n` mappings.
pub fn bed(variant: Variant, n: u32) -> anyhow::Result<Bed> {
    let topo = Topology::new(BackendLink::Veth)?;
    // Many short connections: a wide ephemeral range and no TIME_WAIT reuse limit on the client.
    topo.client.sysctl("net/ipv4/ip_local_port_range", "1024 65000")?;
    // Permanent neighbours: no ARP in the measured path.
    let mac = |ns: &portmap_tests::Netns, dev: &str| -> anyhow::Result<String> {
        Ok(ns
            .exec("cat", &[&format!("/sys/class/net/{dev}/address")])?
            .trim()
            .to_string())
    };
    let sink_mac = mac(&topo.backend, "b0")?;
    topo.host.ip(&[
        "neigh",
        "replace",
        "198.18.1.2",
        "lladdr",
        &sink_mac,
        "nud",
        "permanent",
        "dev",
        HOST_BACKEND_IFACE,
    ])?;
    let dir = TempDir::new("bench")?;
    let mut bed = Bed {
        topo,
        daemon: None,
        floor: None,
        floor_stop: None,
        _dir: dir,
    };
    let topo = &bed.topo;
    match variant {
        Variant::Routing => {}
        Variant::Iptables => {
            let file = bed._dir.path().join("rules");
            std::fs::write(&file, iptables_rules(n, true))?;
            timed_in(topo, "iptables-restore", &[], Some(&file))?;
        }
        Variant::Nftables => {
            let file = bed._dir.path().join("rules.nft");
            std::fs::write(&file, nft_ruleset(n, true))?;
            timed_in(topo, "nft", &["-f", file.to_str().context("utf-8")?], None)?;
        }
        Variant::NftStateless => {
            let file = bed._dir.path().join("stateless.nft");
            std::fs::write(&file, nft_stateless_ruleset(n))?;
            timed_in(topo, "nft", &["-f", file.to_str().context("utf-8")?], None)?;
        }
        Variant::PortmapTc | Variant::PortmapTcFib | Variant::PortmapTcAllow | Variant::PortmapXdp => {
            let (mode, attach) = if variant == Variant::PortmapXdp {
                (Mode::Xdp, "xdp")
            } else {
                (Mode::Tc, "tc")
            };
            let file = bed._dir.path().join("portmap.toml");
            let fast = variant != Variant::PortmapTcFib;
            let mut text = portmap_config_with(n, attach, true, fast);
            if variant == Variant::PortmapTcAllow {
                text.insert_str(0, &crate::allow::config_line());
            }
            std::fs::write(&file, text)?;
            let config = file.to_str().context("utf-8")?.to_string();
            let daemon = start_daemon(topo, mode, &["--config", &config])?;
            // Its expiry passes stay off CPU 1, where the packet measurements count busy time.
            if let Some(pid) = daemon.pid() {
                let mut cpu0 = nix::sched::CpuSet::new();
                cpu0.set(0)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(i32::try_from(pid)?), &cpu0)?;
            }
            bed.daemon = Some(daemon);
        }
        Variant::XdpFloor => {
            topo.prepare_for_xdp()?;
            hold_floor(&mut bed, || {
                let mut dp = Datapath::load_unpinned(&Limits::default())?;
                dp.load_bench(prog_names::BENCH_XDP_FORWARD, Some(HOST_CLIENT_IFACE))?;
                dp.allow_xdp_redirect(nix::net::if_::if_nametoindex(HOST_BACKEND_IFACE)?)?;
                Ok(dp)
            })?;
        }
        Variant::TcFloor => hold_floor(&mut bed, || {
            let sink_veth = nix::net::if_::if_nametoindex(HOST_BACKEND_IFACE)?;
            let mut dp = Datapath::load_unpinned_bench(&Limits::default(), sink_veth)?;
            dp.load_bench(prog_names::BENCH_TC_REDIRECT_PEER, Some(HOST_CLIENT_IFACE))?;
            Ok(dp)
        })?,
    }
    Ok(bed)
}

/// Loads and attaches a floor's datapath (`load`, run in the router's namespace) on a thread
/// that holds it until the bed is dropped.
fn hold_floor(
    bed: &mut Bed,
    load: impl FnOnce() -> anyhow::Result<Datapath> + Send + 'static,
) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let netns = std::fs::File::open(bed.topo.host.path())?;
    let handle = std::thread::spawn(move || {
        let attached = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(anyhow::Error::from)
            .and_then(|()| load());
        match attached {
            Ok(dp) => {
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.recv();
                drop(dp);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("{e:#}")));
            }
        }
    });
    ready_rx.recv()?.map_err(|e| anyhow::anyhow!("floor: {e}"))?;
    bed.floor = Some(handle);
    bed.floor_stop = Some(stop_tx);
    Ok(())
}
