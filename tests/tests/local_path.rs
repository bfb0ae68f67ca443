//! The local-backend fast path end to end: backends behind a veth of the host (routed to it
//! directly, or on a bridge port as Docker and the CNI bridge plugin attach containers) are
//! learnt from the kernel's neighbour, FDB and route tables and reached without a FIB lookup
//! (`fwd_local`); a backend that moves to another veth is followed, and whatever the cache
//! cannot serve takes the FIB path; on that path, checksums the receivers check come out right.
//! Needs root (run through `cargo xtask test`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap::api::control::StatsReport;
use portmap_common::Stat;
use portmap_tests::{
    BRIDGE, BackendLink, CLIENT_IP, Daemon, HOST_BACKEND_IFACE, HOST_IP, Mode, Netns, Topology, counter,
    payload, start_daemon, tcp_exchange, tcp_server, udp_exchange, udp_server, wait_for,
};

const BACKEND: &str = "198.18.1.2";
const BACKEND6: &str = "fd00:1::2";

/// Waits until `stats` lists every address of `want` as a local backend, each passing `check`.
fn wait_local(
    daemon: &Daemon,
    want: &[&str],
    check: impl Fn(&portmap::api::control::LocalBackendReport) -> bool,
) -> anyhow::Result<StatsReport> {
    let mut stats = daemon.stats()?;
    let learnt = wait_for("local backends to be learnt", Duration::from_secs(5), || {
        stats = daemon.stats()?;
        Ok(want.iter().all(|addr| {
            stats
                .local_backends
                .iter()
                .any(|b| b.addr.to_string() == *addr && check(b))
        }))
    });
    learnt
        .map(|()| stats.clone())
        .with_context(|| format!("local backends {want:?}: {:?}", stats.local_backends))
}

/// The host resolves its containers' addresses (ARP, neighbour discovery), as any traffic to
/// them would: one datagram to each (the discard port).
fn resolve_neighbours(topo: &Topology) -> anyhow::Result<()> {
    topo.host.run(|| {
        for addr in [BACKEND, BACKEND6] {
            let dst = SocketAddr::new(addr.parse()?, 9);
            let any: SocketAddr = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse()?;
            std::net::UdpSocket::bind(any)?.send_to(b"who-has", dst)?;
        }
        Ok(())
    })
}

/// TCP both ways (IPv4 and IPv6) and 5 UDP exchanges through the published ports; the backend
/// in `backend` sees the real client.
fn traffic(topo: &Topology, backend: &Netns) -> anyhow::Result<()> {
    for dst in [
        SocketAddr::from((HOST_IP, 8080)),
        "[fd00::1]:8080".parse().expect("addr"),
    ] {
        let (up, down) = (payload(64 * 1024, 1), payload(96 * 1024, 2));
        let server = tcp_server(backend, 80, down.clone())?;
        let got = tcp_exchange(&topo.client, dst, up.clone())?;
        let served = server.join().expect("server thread")?;
        ensure!(got == down && served.received == up, "TCP via {dst} not intact");
        let client: IpAddr = if dst.is_ipv6() {
            "fd00::2".parse()?
        } else {
            CLIENT_IP.into()
        };
        ensure!(served.peer.ip() == client, "backend saw {}", served.peer);
    }
    let server = udp_server(backend, 53, 5)?;
    udp_exchange(&topo.client, (HOST_IP, 5353), 5, 200)?;
    server.join().expect("server thread")?;
    Ok(())
}

/// How the forwarded packets between two stats went out: (local, redirect, stack).
fn paths(before: &StatsReport, after: &StatsReport) -> (u64, u64, u64) {
    let d = |s| counter(after, s) - counter(before, s);
    (d(Stat::FwdLocal), d(Stat::FwdRedirect), d(Stat::FwdStack))
}

fn setup(mode: Mode, link: BackendLink, extra: &[&str]) -> anyhow::Result<(Topology, Daemon)> {
    let topo = Topology::new(link)?;
    topo.enable_ipv6()?;
    let daemon = start_daemon(&topo, mode, extra)?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.cli_ok(&["add", "[::]:8080:[fd00:1::2]:80"])?;
    daemon.cli_ok(&["add", "5353:198.18.1.2:53/udp"])?;
    resolve_neighbours(&topo)?;
    Ok((topo, daemon))
}

/// A config file's text with the mappings `traffic` uses and the local fast path on or off.
fn config_text(fast: bool) -> String {
    format!(
        "local_fast_path = {fast}\nmappings = [\"8080:198.18.1.2:80\", \"[::]:8080:[fd00:1::2]:80\", \
         \"5353:198.18.1.2:53/udp\"]\n"
    )
}

/// A TC daemon started from the config file `path`, written first with `config_text(fast)`.
fn start_from_config(topo: &Topology, path: &std::path::Path, fast: bool) -> anyhow::Result<Daemon> {
    std::fs::write(path, config_text(fast))?;
    start_daemon(
        topo,
        Mode::Tc,
        &["--config", path.to_str().context("utf-8 path")?],
    )
}

/// Every forwarded packet takes the fast path once the backend is learnt: none is looked up in
/// the FIB or handed to the kernel.
fn fast_path(mode: Mode, link: BackendLink, extra: &[&str]) -> anyhow::Result<()> {
    let (topo, mut daemon) = setup(mode, link, extra)?;
    // A bridged container is reached through its bridge port, not the bridge.
    let before = wait_local(&daemon, &[BACKEND, BACKEND6], |b| b.device == HOST_BACKEND_IFACE)?;
    traffic(&topo, &topo.backend)?;
    let after = daemon.stats()?;
    let (local, redirect, stack) = paths(&before, &after);
    ensure!(
        local > 0 && redirect == 0 && stack == 0,
        "local {local}, redirect {redirect}, stack {stack}: {after:?}"
    );
    ensure!(counter(&after, Stat::DropError) == 0);
    let text = daemon.cli_ok(&["stats"])?;
    ensure!(
        text.contains(&format!("local backend {BACKEND} via {HOST_BACKEND_IFACE} (")),
        "{text}"
    );
    daemon.stop()?;
    daemon.cleanup().map(drop)
}

#[test]
fn tc_reaches_a_routed_container_through_its_veth() -> anyhow::Result<()> {
    fast_path(Mode::Tc, BackendLink::Veth, &[])
}

#[test]
fn tc_reaches_a_bridged_container_through_its_bridge_port() -> anyhow::Result<()> {
    fast_path(Mode::Tc, BackendLink::Bridge, &[])
}

#[test]
fn xdp_reaches_a_routed_container_with_the_cached_addresses() -> anyhow::Result<()> {
    fast_path(Mode::Xdp, BackendLink::Veth, &[])
}

/// XDP cannot redirect into a bridge; into the bridge port it can, once the port is listed.
#[test]
fn xdp_reaches_a_bridged_container_through_a_listed_bridge_port() -> anyhow::Result<()> {
    fast_path(
        Mode::Xdp,
        BackendLink::Bridge,
        &["--redirect-iface", HOST_BACKEND_IFACE],
    )
}

/// What the cache cannot serve takes the FIB path: XDP and a bridge port not listed as a
/// redirect target (handed to the kernel, as before), and `local_fast_path = false`.
#[test]
fn what_the_fast_path_cannot_serve_takes_the_fib_path() -> anyhow::Result<()> {
    let (topo, mut daemon) = setup(Mode::Xdp, BackendLink::Bridge, &[])?;
    let before = wait_local(&daemon, &[BACKEND, BACKEND6], |_| true)?;
    traffic(&topo, &topo.backend)?;
    let (local, redirect, stack) = paths(&before, &daemon.stats()?);
    ensure!(
        local == 0 && redirect == 0 && stack > 0,
        "local {local}, redirect {redirect}, stack {stack}"
    );
    daemon.stop()?;
    daemon.cleanup()?;

    let topo = Topology::new(BackendLink::Veth)?;
    topo.enable_ipv6()?;
    let config = portmap_tests::TempDir::new("cfg")?;
    let path = config.path().join("portmap.toml");
    // Resolved before the daemon starts, which reads the neighbour table before it is ready:
    // what it learnt is settled when `stats` first answers.
    resolve_neighbours(&topo)?;
    let mut daemon = start_from_config(&topo, &path, false)?;
    let before = daemon.stats()?;
    ensure!(before.local_backends.is_empty(), "{:?}", before.local_backends);
    traffic(&topo, &topo.backend)?;
    let (local, redirect, _) = paths(&before, &daemon.stats()?);
    ensure!(local == 0 && redirect > 0, "local {local}, redirect {redirect}");
    // The same neighbours are local backends as soon as the fast path is on again.
    std::fs::write(&path, config_text(true))?;
    daemon.cli_ok(&["reload"])?;
    wait_local(&daemon, &[BACKEND, BACKEND6], |_| true)?;
    daemon.stop()?;
    daemon.cleanup().map(drop)
}

/// Checksums as the wire sees them. Between namespaces a veth hands a local socket's segment on
/// as CHECKSUM_PARTIAL (its field holds the pseudo-header's sum, completed by whatever transmits
/// it) and the receiver takes it unchecked, so a field the datapath got wrong would pass
/// unseen. Here the host's devices complete every checksum in software when they transmit
/// (`tx off`), and the receivers check it: the backend the client's segments (TC ingress, FIB
/// path), the client the backend's (reverse-NATed on their way back). The ends send one segment
/// per packet (no TSO or GSO), so the datapath sees each as CHECKSUM_PARTIAL and must tell it
/// from a full checksum.
#[test]
fn partial_checksums_are_completed_right_after_the_rewrite() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    topo.enable_ipv6()?;
    for iface in [portmap_tests::HOST_CLIENT_IFACE, HOST_BACKEND_IFACE] {
        topo.host.exec("ethtool", &["-K", iface, "tx", "off"])?;
    }
    for (ns, iface) in [(&topo.client, "c0"), (&topo.backend, "b0")] {
        ns.exec("ethtool", &["-K", iface, "tso", "off", "gso", "off"])?;
    }
    let config = portmap_tests::TempDir::new("cfg")?;
    let mut daemon = start_from_config(&topo, &config.path().join("portmap.toml"), false)?;
    let before = daemon.stats()?;
    traffic(&topo, &topo.backend)?;
    let after = daemon.stats()?;
    let (_, redirect, _) = paths(&before, &after);
    ensure!(redirect > 0, "no packet took the FIB path: {after:?}");
    ensure!(counter(&after, Stat::DropError) == 0);
    daemon.stop()?;
    daemon.cleanup().map(drop)
}

/// Replaces the backend's container by another with the same addresses on a new veth (a
/// redeployed container) whose host side is `NEW_HOST_END`: routed to it directly, or (bridge)
/// a new port with the old MAC, as Docker derives a container's MAC from its address.
fn replace_backend(topo: &Topology) -> anyhow::Result<Netns> {
    let mac = topo.backend.exec("cat", &["/sys/class/net/b0/address"])?;
    topo.host.ip(&["link", "del", HOST_BACKEND_IFACE])?;
    let moved = Netns::new("m")?;
    moved.add_veth("b0", NEW_HOST_END, &topo.host)?;
    match topo.link {
        BackendLink::Veth => {
            topo.host
                .ip(&["addr", "add", "198.18.1.1/24", "dev", NEW_HOST_END])?;
            topo.host
                .ip(&["addr", "add", "fd00:1::1/64", "dev", NEW_HOST_END, "nodad"])?;
        }
        BackendLink::Bridge => {
            moved.ip(&["link", "set", "b0", "address", mac.trim()])?;
            topo.host.ip(&["link", "set", NEW_HOST_END, "master", BRIDGE])?;
        }
    }
    topo.host.ip(&["link", "set", NEW_HOST_END, "up"])?;
    moved.ip(&["addr", "add", "198.18.1.2/24", "dev", "b0"])?;
    moved.ip(&["addr", "add", "fd00:1::2/64", "dev", "b0", "nodad"])?;
    moved.ip(&["link", "set", "b0", "up"])?;
    moved.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
    moved.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;
    Ok(moved)
}

const NEW_HOST_END: &str = "h1m";

/// The backend's container is replaced (`replace_backend`): traffic reaches the new one at once
/// (through the FIB path until it is learnt) and then takes the fast path into the new veth.
fn backend_moves(link: BackendLink) -> anyhow::Result<()> {
    let (topo, mut daemon) = setup(Mode::Tc, link, &[])?;
    wait_local(&daemon, &[BACKEND, BACKEND6], |_| true)?;
    traffic(&topo, &topo.backend)?;
    let moved = replace_backend(&topo)?;
    // The first exchanges: whatever path, they must reach the new container.
    traffic(&topo, &moved)?;
    resolve_neighbours(&topo)?;
    let before = wait_local(&daemon, &[BACKEND, BACKEND6], |b| b.device == NEW_HOST_END)?;
    traffic(&topo, &moved)?;
    let (local, redirect, stack) = paths(&before, &daemon.stats()?);
    ensure!(
        local > 0 && redirect == 0 && stack == 0,
        "after the move: local {local}, redirect {redirect}, stack {stack}"
    );
    daemon.stop()?;
    daemon.cleanup().map(drop)
}

/// The same while no daemon runs (stopped; the datapath keeps forwarding): the cached veth is
/// gone, the kernel removed it from `PM_LOCAL_DEVS`, so packets take the FIB path to the new
/// container instead of being sent to a device that no longer exists.
#[test]
fn a_backend_that_moves_while_no_daemon_runs_is_reached() -> anyhow::Result<()> {
    let (topo, mut daemon) = setup(Mode::Tc, BackendLink::Veth, &[])?;
    wait_local(&daemon, &[BACKEND, BACKEND6], |_| true)?;
    traffic(&topo, &topo.backend)?;
    daemon.stop()?;
    let moved = replace_backend(&topo)?;
    traffic(&topo, &moved)?;
    daemon.cleanup().map(drop)
}

#[test]
fn a_routed_backend_that_moves_is_followed() -> anyhow::Result<()> {
    backend_moves(BackendLink::Veth)
}

#[test]
fn a_bridged_backend_that_moves_is_followed() -> anyhow::Result<()> {
    backend_moves(BackendLink::Bridge)
}
