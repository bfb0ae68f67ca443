//! Host-local clients, containers, hairpin and Docker's address semantics (issue 10): the
//! socket hooks in the daemon's own child cgroup, real processes (`pm-probe`) in it, backends
//! behind a bridge as Docker sets them up. Needs root (run through `cargo xtask test`).

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, Daemon, EchoServer, HOST_IP, Mode, Netns, ROUTED_MACHINE_IP, TempDir, Topology, counter,
    mapping_stats, payload, probe, start_daemon, tcp_connect_result, tcp_exchange, tcp_server, tcp_server_n,
    udp_server, wait_for,
};
use serde_json::Value;

/// A probe in the daemon's cgroup (subject to the socket hooks).
fn hooked(ns: &Netns, daemon: &Daemon, args: &[&str]) -> anyhow::Result<Value> {
    probe(ns, Some(&daemon.cgroup), args)
}

/// A TCP exchange through `addr` must reach a server answering `reply`, and getpeername() must
/// report `addr` itself, not the backend.
fn tcp_reaches(ns: &Netns, daemon: &Daemon, addr: &str, reply: &str) -> anyhow::Result<()> {
    let r = hooked(ns, daemon, &["tcp", addr])?;
    ensure!(
        r["ok"] == true && r["reply"] == reply,
        "tcp {addr}: expected {reply:?}, got {r}"
    );
    let peer: SocketAddr = r["peer"].as_str().unwrap_or_default().parse()?;
    ensure!(peer == addr.parse()?, "tcp {addr}: getpeername() reported {peer}");
    Ok(())
}

fn refused(r: &Value) -> bool {
    r["ok"] == false && r["error"] == "ConnectionRefused"
}

#[test]
fn host_processes_reach_published_ports_at_every_local_address() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Bridge)?;
    topo.enable_ipv6()?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    for spec in [
        "8080:198.18.1.2:80",
        "5353:198.18.1.2:53/udp",
        "8090:[fd00:1::2]:80",
        "5354:[fd00:1::2]:53/udp",
    ] {
        daemon.cli_ok(&["add", spec])?;
    }
    let echo = EchoServer::start(&topo.backend, 80)?;
    // Loopback, the client-facing address, the bridge address; IPv4 wildcard also at [::1] and
    // v4-mapped, as docker-proxy listens on both families.
    let tcp4 = [
        "127.0.0.1:8080",
        "127.0.0.2:8080",
        "198.18.0.1:8080",
        "198.18.1.1:8080",
        "[::1]:8080",
        "[::ffff:198.18.0.1]:8080",
    ];
    let tcp6 = ["[::1]:8090", "[fd00::1]:8090", "[fd00:1::1]:8090"];
    for addr in tcp4.iter().chain(&tcp6) {
        tcp_reaches(&topo.host, &daemon, addr, "hello\n")?;
    }
    let reached = echo.reached().len();
    ensure!(
        reached == tcp4.len() + tcp6.len(),
        "backend saw {:?}",
        echo.reached()
    );

    let both: &[&str] = &["connected", "unconnected"];
    let udp = [
        ("127.0.0.1:5353", both),
        ("198.18.0.1:5353", both),
        ("198.18.1.1:5353", both),
        // An IPv4 mapping over IPv6 only for connected sockets (README: the kernel refuses an
        // unconnected datagram rewritten to a v4-mapped address).
        ("[::1]:5353", &["connected"]),
        ("[::1]:5354", both),
        ("[fd00::1]:5354", both),
    ];
    let datagrams: usize = udp.iter().map(|(_, modes)| modes.len()).sum();
    let server = udp_server(&topo.backend, 53, datagrams)?;
    for (addr, modes) in udp {
        for &mode in modes {
            let r = hooked(&topo.host, &daemon, &["udp", addr, mode])?;
            ensure!(
                r["ok"] == true && r["reply"] == "\nolleh",
                "udp {addr} {mode}: {r}"
            );
            // The reply appears to come from the address the client sent to.
            let from: SocketAddr = r["from"].as_str().unwrap_or_default().parse()?;
            ensure!(from == addr.parse()?, "udp {addr} {mode}: reply from {from}");
        }
    }
    let peers = server
        .join()
        .map_err(|_| anyhow::anyhow!("udp server panicked"))??;
    ensure!(peers.len() == datagrams, "udp server saw {peers:?}");

    // An address added while the daemon runs is local at once (netlink), for host processes and
    // for clients on the wire; removed, it no longer is.
    topo.host.ip(&["addr", "add", "198.18.0.9/32", "dev", "h0"])?;
    wait_for(
        "a new host address to become a published address",
        Duration::from_secs(5),
        || Ok(hooked(&topo.host, &daemon, &["tcp", "198.18.0.9:8080"])?["ok"] == true),
    )?;
    let data = payload(64, 3);
    let echoed = tcp_exchange(
        &topo.client,
        SocketAddrV4::new("198.18.0.9".parse()?, 8080),
        data.clone(),
    )?;
    ensure!(echoed == data, "wire client to the new address");
    topo.host.ip(&["addr", "del", "198.18.0.9/32", "dev", "h0"])?;
    wait_for(
        "a removed host address to be unpublished",
        Duration::from_secs(5),
        || Ok(hooked(&topo.host, &daemon, &["tcp", "198.18.0.9:8080"])?["ok"] == false),
    )?;

    // Scope: a process outside the cgroup is not translated (nothing listens on the host).
    let outside = probe(&topo.host, None, &["tcp", "127.0.0.1:8080"])?;
    ensure!(refused(&outside), "outside the cgroup: {outside}");

    let stats = daemon.stats()?;
    ensure!(counter(&stats, Stat::SockTranslated) >= (reached + datagrams) as u64);
    ensure!(
        mapping_stats(&stats, 8080).flows >= tcp4.len() as u64,
        "{stats:?}"
    );
    daemon.stop()
}

#[test]
fn containers_reach_published_ports_and_hairpin_and_keep_their_loopback() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Bridge)?;
    let container = topo.add_container("198.18.1.3".parse()?)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.cli_ok(&["add", "127.0.0.1:8081:198.18.1.2:80"])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;

    // Another container reaches the host's published addresses (bridge gateway, client side).
    for addr in ["198.18.1.1:8080", "198.18.0.1:8080"] {
        tcp_reaches(&container, &daemon, addr, "hello\n")?;
    }
    // Hairpin: the backend reaches its own published port.
    tcp_reaches(&topo.backend, &daemon, "198.18.0.1:8080", "hello\n")?;

    // Inside a container, 127.0.0.1 stays its own: its own server answers, and the host-only
    // mapping on 127.0.0.1:8081 is not reachable from there.
    let own = tcp_server(&container, 8080, b"own".to_vec())?;
    tcp_reaches(&container, &daemon, "127.0.0.1:8080", "own")?;
    own.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    let r = hooked(&container, &daemon, &["tcp", "127.0.0.1:8081"])?;
    ensure!(refused(&r), "container to the host-only mapping: {r}");
    // ... which the host itself reaches.
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8081", "hello\n")?;
    daemon.stop()
}

/// A wildcard mapping matches only the host's own addresses: a client reaching a machine behind
/// the host on the mapped port gets that machine (iptables' `--dst-type LOCAL`).
#[test]
fn wildcard_mappings_do_not_take_transit_traffic() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        let topo = Topology::new(BackendLink::Veth)?;
        let routed = topo.add_routed_machine()?;
        let mut daemon = start_daemon(&topo, mode, &[])?;
        daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
        let behind = tcp_server(&routed, 8080, b"behind".to_vec())?;
        let got = tcp_exchange(
            &topo.client,
            SocketAddrV4::new(ROUTED_MACHINE_IP, 8080),
            payload(100, 1),
        )?;
        ensure!(got == b"behind", "{mode:?}: transit reached {got:?}");
        behind.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        // The published address still maps.
        let _echo = EchoServer::start(&topo.backend, 80)?;
        let data = payload(100, 2);
        let echoed = tcp_exchange(&topo.client, SocketAddrV4::new(HOST_IP, 8080), data.clone())?;
        ensure!(echoed == data, "{mode:?}: published port");
        daemon.stop()?;
    }
    Ok(())
}

#[test]
fn published_ports_cannot_be_bound_on_the_host() -> anyhow::Result<()> {
    const EPERM: i64 = 1;
    let topo = Topology::new(BackendLink::Bridge)?;
    let container = topo.add_container("198.18.1.3".parse()?)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    for spec in [
        "8080:198.18.1.2:80",
        "5353:198.18.1.2:53/udp",
        "198.18.0.1:8081:198.18.1.2:80",
    ] {
        daemon.cli_ok(&["add", spec])?;
    }
    let bind = |ns: &Netns, proto: &str, addr: &str| hooked(ns, &daemon, &["bind", proto, addr]);
    for (proto, addr) in [
        ("tcp", "0.0.0.0:8080"),
        ("tcp", "[::]:8080"),
        ("tcp", "198.18.0.1:8080"),
        ("tcp", "127.0.0.1:8080"),
        ("udp", "0.0.0.0:5353"),
        ("tcp", "0.0.0.0:8081"),
        ("tcp", "198.18.0.1:8081"),
    ] {
        let r = bind(&topo.host, proto, addr)?;
        ensure!(
            r["ok"] == false && r["errno"] == EPERM,
            "bind {proto} {addr}: {r}"
        );
    }
    for (proto, addr) in [
        ("tcp", "0.0.0.0:5353"),
        ("tcp", "198.18.1.1:8081"),
        ("tcp", "0.0.0.0:8082"),
        ("udp", "0.0.0.0:8080"),
    ] {
        let r = bind(&topo.host, proto, addr)?;
        ensure!(r["ok"] == true, "bind {proto} {addr}: {r}");
    }
    // A container has ports of its own.
    let r = bind(&container, "tcp", "0.0.0.0:8080")?;
    ensure!(r["ok"] == true, "container bind: {r}");
    ensure!(counter(&daemon.stats()?, Stat::SockBindRefused) >= 7);
    // Unpublished, the port binds again.
    daemon.cli_ok(&["del", "8080:198.18.1.2:80"])?;
    let r = bind(&topo.host, "tcp", "0.0.0.0:8080")?;
    ensure!(r["ok"] == true, "after del: {r}");

    // A container's port (published as the CNI plugin does): its runtime's reservation binds,
    // and it refuses every other bind (EADDRINUSE), at the wildcard and at a host address.
    const EADDRINUSE: i64 = 98;
    let published = portmap::api::control::call(
        &daemon.socket,
        &portmap::api::control::Request::Publish {
            owner: "pmnet/c1/eth0".into(),
            specs: vec![
                "9999:198.18.1.2:80".into(),
                "198.18.0.1:9998:198.18.1.2:81".into(),
            ],
            allow: vec![],
        },
    )?;
    ensure!(
        matches!(published, portmap::api::control::Response::Ok { .. }),
        "{published:?}"
    );
    for addr in ["0.0.0.0:9999", "198.18.0.1:9999", "198.18.0.1:9998"] {
        let r = hooked(&topo.host, &daemon, &["reserve", addr])?;
        ensure!(
            r["ok"] == true && r["second"]["errno"] == EADDRINUSE,
            "a runtime's reservation of {addr}: {r}"
        );
    }
    // A wildcard bind of a port the container publishes on one address only is refused: it would
    // take that address too (the runtime binds the address itself).
    let r = bind(&topo.host, "tcp", "0.0.0.0:9998")?;
    ensure!(r["ok"] == false && r["errno"] == EPERM, "bind 0.0.0.0:9998: {r}");
    daemon.stop()
}

#[test]
fn changes_apply_to_host_local_clients_at_once_and_stop_keeps_the_hooks() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Bridge)?;
    let container = topo.add_container("198.18.1.3".parse()?)?;
    let dir = TempDir::new("hl")?;
    let config = dir.path().join("portmap.toml");
    let write = |backend: &str| {
        std::fs::write(
            &config,
            format!("interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [\"8080:{backend}:80\"]\n"),
        )
    };
    write("198.18.1.2")?;
    let mut daemon = Daemon::start(&topo.host, &["--config", config.to_str().context("utf-8")?])?;
    let first = tcp_server_n(&topo.backend, 80, 2, b"first".to_vec())?;
    let second = tcp_server_n(&container, 80, 2, b"second".to_vec())?;
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8080", "first")?;
    daemon.cli_ok(&["update", "8080:198.18.1.3:80"])?;
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8080", "second")?;
    // A reload (the file still names the first backend) applies at once too.
    daemon.cli_ok(&["reload"])?;
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8080", "first")?;
    write("198.18.1.3")?;
    daemon.cli_ok(&["reload"])?;
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8080", "second")?;
    for served in [first, second] {
        served.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    }
    daemon.cli_ok(&["del", "8080:198.18.1.3:80"])?;
    let r = hooked(&topo.host, &daemon, &["tcp", "127.0.0.1:8080"])?;
    ensure!(refused(&r), "after del: {r}");

    // A stopped daemon leaves its socket hooks for the next one: localhost still reaches the
    // backend. After `portmap cleanup` nothing is translated, nothing refused.
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.stop()?;
    let again = tcp_server_n(&topo.backend, 80, 1, b"first".to_vec())?;
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8080", "first")?;
    again.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    daemon.cleanup()?;
    let r = hooked(&topo.host, &daemon, &["tcp", "127.0.0.1:8080"])?;
    ensure!(refused(&r), "after cleanup: {r}");
    let r = hooked(&topo.host, &daemon, &["bind", "tcp", "0.0.0.0:8080"])?;
    ensure!(r["ok"] == true, "bind after cleanup: {r}");
    ensure!(
        !daemon.pin_dir.exists(),
        "pins left in {}",
        daemon.pin_dir.display()
    );
    Ok(())
}

/// iptables' `REDIRECT --to-port 9080`: `8082:0.0.0.0:9080` and `8082:[::]:9080` publish a port of
/// the host itself. A client on the wire (TC and XDP) reaches the host's service at the very
/// address it addressed, a host process too (at loopback as well); a service that listens on
/// loopback only serves host processes, and the wire gets the kernel's refusal, as with REDIRECT.
#[test]
fn a_port_of_the_host_itself_is_reached_at_the_address_each_packet_came_to() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        redirect_to_the_host(mode).with_context(|| format!("{mode:?}"))?;
    }
    Ok(())
}

fn redirect_to_the_host(mode: Mode) -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    topo.enable_ipv6()?;
    topo.host.ip(&["addr", "add", "198.18.0.9/32", "dev", "h0"])?;
    let mut daemon = start_daemon(&topo, mode, &[])?;
    for spec in ["8082:0.0.0.0:9080", "8082:[::]:9080", "8083:0.0.0.0:9081"] {
        daemon.cli_ok(&["add", spec])?;
    }
    ensure!(
        daemon.cli_ok(&["list"])?
            == "0.0.0.0:9080/tcp -> 0.0.0.0:8082  cli\n[::]:9080/tcp -> [::]:8082  cli\n\
                0.0.0.0:9081/tcp -> 0.0.0.0:8083  cli\n",
        "list"
    );
    let service = EchoServer::start(&topo.host, 9080)?;
    let wire: [SocketAddr; 3] = [
        "198.18.0.1:8082".parse()?,
        "198.18.0.9:8082".parse()?,
        "[fd00::1]:8082".parse()?,
    ];
    for (i, addr) in wire.iter().enumerate() {
        let data = payload(2048, i as u8);
        let echoed =
            tcp_exchange(&topo.client, *addr, data.clone()).with_context(|| format!("wire {addr}"))?;
        ensure!(echoed == data, "wire client to {addr}: echo differs");
    }
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8082", "hello\n")?;
    tcp_reaches(&topo.host, &daemon, "198.18.0.9:8082", "hello\n")?;
    let reached: Vec<String> = service.reached().iter().map(ToString::to_string).collect();
    ensure!(
        reached
            == [
                "198.18.0.1:9080",
                "198.18.0.9:9080",
                "[fd00::1]:9080",
                "127.0.0.1:9080",
                "198.18.0.9:9080"
            ],
        "the host's service was reached at {reached:?}"
    );

    // A loopback-only service: host processes reach it; from the wire, the kernel refuses.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let loopback_only = topo.host.spawn(move || {
        let listener = std::net::TcpListener::bind("127.0.0.1:9081");
        let _ = ready_tx.send(listener.as_ref().map(drop).map_err(ToString::to_string));
        let (mut stream, _) = listener?.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut request)?;
        std::io::Write::write_all(&mut stream, b"loopback only\n")?;
        anyhow::Ok(request)
    })?;
    ready_rx
        .recv()?
        .map_err(|e| anyhow::anyhow!("binding 127.0.0.1:9081: {e}"))?;
    let from_wire = tcp_connect_result(&topo.client, SocketAddrV4::new(HOST_IP, 8083))?;
    ensure!(
        from_wire == Err(std::io::ErrorKind::ConnectionRefused),
        "wire to a loopback-only service: {from_wire:?}"
    );
    tcp_reaches(&topo.host, &daemon, "127.0.0.1:8083", "loopback only\n")?;
    let request = loopback_only
        .join()
        .map_err(|_| anyhow::anyhow!("loopback server panicked"))??;
    ensure!(request == b"hello\n", "loopback-only service got {request:?}");

    // Four flows on the wire (the refused one included), four sockets translated.
    let stats = daemon.stats()?;
    ensure!(
        counter(&stats, Stat::FlowNew) >= 4 && counter(&stats, Stat::SockTranslated) >= 3,
        "{stats:?}"
    );
    daemon.stop()
}
