//! End-to-end tests of the mapping model (README, "Mapping syntax"): IPv6, host-address binding,
//! port ranges, dynamic host ports, several backends, SCTP, conflicts, and configuration reload
//! and round trip. Real namespaces, the real daemon, real sockets. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, Bound, CLIENT_IP, Daemon, EchoServer, HOST_CLIENT_IFACE, HOST_IP, Mode, TempDir, Topology,
    counter, mapping_stats, payload, raw_recv, raw_sctp_socket, raw_send, sctp_crc_ok, sctp_packet, slowdown,
    start_daemon, tcp_exchange, tcp_server, tcp_server_n, udp_exchange, udp_server, wait_for,
};
use serde_json::Value;

const BACKEND: &str = "198.18.1.2";
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

fn host(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(HOST_IP, port)
}

fn host6(port: u16) -> SocketAddr {
    SocketAddrV6::new(HOST6, port, 0, 0).into()
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// The error a refused CLI command printed (it must exit 1 with one line).
fn refused(daemon: &Daemon, args: &[&str]) -> anyhow::Result<String> {
    let out = daemon.cli(args)?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(out.status.code() == Some(1), "{args:?} was not refused: {err}");
    ensure!(err.lines().count() == 1, "{args:?}: not one line: {err}");
    Ok(err)
}

fn ipv6_end_to_end(mode: Mode) -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    topo.enable_ipv6()?;
    let daemon = start_daemon(&topo, mode, &[])?;
    daemon.cli_ok(&["add", "[fd00::1]:8080:[fd00:1::2]:80"])?;
    daemon.cli_ok(&["add", "5353:[fd00:1::2]:53/udp"])?;
    // The same port number over IPv4, to another backend port: families are separate.
    daemon.cli_ok(&["add", "8080:198.18.1.2:81"])?;
    assert_eq!(
        lines(&daemon.cli_ok(&["list"])?),
        [
            "[fd00:1::2]:80/tcp -> [fd00::1]:8080  cli",
            "[fd00:1::2]:53/udp -> [::]:5353  cli",
            "198.18.1.2:81/tcp -> 0.0.0.0:8080  cli"
        ]
    );

    let (up, down) = (payload(60_000, 1), payload(80_000, 2));
    let server = tcp_server(&topo.backend, 80, down.clone())?;
    let got = tcp_exchange(&topo.client, host6(8080), up.clone())?;
    let served = server.join().expect("server thread")?;
    assert_eq!(
        served.peer.ip(),
        IpAddr::V6(CLIENT6),
        "backend sees the client's address"
    );
    assert!(served.received == up && got == down, "data intact both ways");

    let udp = udp_server(&topo.backend, 53, 4)?;
    let from = udp_exchange(&topo.client, host6(5353), 4, 200)?;
    assert_eq!(from, host6(5353), "answers come from the published address");
    assert_eq!(udp.join().expect("udp thread")?[0].ip(), IpAddr::V6(CLIENT6));

    let v4 = tcp_server(&topo.backend, 81, b"v4".to_vec())?;
    assert_eq!(tcp_exchange(&topo.client, host(8080), b"x".to_vec())?, b"v4");
    v4.join().expect("server thread")?;

    let stats = daemon.stats()?;
    let udp = mapping_stats(&stats, 5353);
    assert_eq!(udp.fwd_packets, 4, "{udp:?}");
    assert_eq!(udp.fwd_bytes, 4 * (40 + 8 + 200), "{udp:?}");
    assert_eq!(udp.reply_packets, 4, "{udp:?}");
    assert_eq!(counter(&stats, Stat::DropMalformed), 0);
    Ok(())
}

#[test]
fn ipv6_mappings_work_in_tc_mode() -> anyhow::Result<()> {
    ipv6_end_to_end(Mode::Tc)
}

#[test]
fn ipv6_mappings_work_in_xdp_mode() -> anyhow::Result<()> {
    ipv6_end_to_end(Mode::Xdp)
}

/// `8080:...` answers on every address; `198.18.0.1:8080:...` only there, and wins over it.
#[test]
fn specific_binding_wins_over_the_wildcard() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    topo.host
        .ip(&["addr", "add", "198.18.0.3/24", "dev", HOST_CLIENT_IFACE])?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.cli_ok(&["add", "198.18.0.1:8080:198.18.1.2:81"])?;
    assert_eq!(
        lines(&daemon.cli_ok(&["list"])?),
        [
            "198.18.1.2:80/tcp -> 0.0.0.0:8080  cli",
            "198.18.1.2:81/tcp -> 198.18.0.1:8080  cli"
        ]
    );
    let (wild, specific) = (
        tcp_server(&topo.backend, 80, b"wildcard".to_vec())?,
        tcp_server(&topo.backend, 81, b"specific".to_vec())?,
    );
    assert_eq!(tcp_exchange(&topo.client, host(8080), Vec::new())?, b"specific");
    let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 8080);
    assert_eq!(tcp_exchange(&topo.client, other, Vec::new())?, b"wildcard");
    wild.join().expect("thread")?;
    specific.join().expect("thread")?;
    assert_eq!(daemon.cli_ok(&["port", "198.18.1.2:81"])?, "198.18.0.1:8080\n");
    Ok(())
}

/// Ranges map port by port; a host range with one backend port publishes one free port of it
/// (Docker's `-p 8000-8004:80`); a 10,000-port range is one `add`.
#[test]
fn port_ranges_map_port_by_port() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "9000-9009:198.18.1.2:7000-7009/udp"])?;
    assert_eq!(
        daemon.cli_ok(&["add", "8000-8004:198.18.1.2:80"])?,
        "added 198.18.1.2:80/tcp -> 0.0.0.0:8000\n"
    );
    assert_eq!(
        daemon.cli_ok(&["add", "8000-8004:198.18.1.3:80"])?,
        "added 198.18.1.3:80/tcp -> 0.0.0.0:8001\n",
        "the next such spec takes the next free port"
    );
    let listed = daemon.cli_ok(&["list"])?;
    assert_eq!(listed.lines().count(), 12, "{listed}");
    assert!(
        listed.contains("198.18.1.2:7005/udp -> 0.0.0.0:9005  cli\n"),
        "{listed}"
    );

    let udp = udp_server(&topo.backend, 7005, 2)?;
    assert_eq!(
        udp_exchange(&topo.client, host(9005), 2, 64)?,
        SocketAddr::from(host(9005))
    );
    udp.join().expect("thread")?;
    let tcp = tcp_server(&topo.backend, 80, b"one backend port".to_vec())?;
    assert_eq!(
        tcp_exchange(&topo.client, host(8000), Vec::new())?,
        b"one backend port"
    );
    tcp.join().expect("thread")?;
    let stats = daemon.stats()?;
    assert_eq!(mapping_stats(&stats, 9000).fwd_packets, 2);

    let added = daemon.cli_ok(&["add", "20000-29999:198.18.1.2:20000-29999"])?;
    assert!(
        added.starts_with("added 198.18.1.2:20000/tcp -> 0.0.0.0:20000"),
        "{added}"
    );
    assert_eq!(daemon.cli_ok(&["list"])?.lines().count(), 10_012);
    let err = refused(&daemon, &["add", "29999-30001:198.18.1.3:29999-30001"])?;
    assert!(err.contains("port is already allocated"), "{err}");
    // One port of a range: a busy one is skipped, not an error.
    assert_eq!(
        daemon.cli_ok(&["add", "29999-30001:198.18.1.3:80"])?,
        "added 198.18.1.3:80/tcp -> 0.0.0.0:30000\n"
    );
    daemon.cli_ok(&["del", "20000-29999:198.18.1.2:20000-29999"])?;
    assert_eq!(daemon.cli_ok(&["list"])?.lines().count(), 13);
    Ok(())
}

/// Dynamic host ports come from the pool, skip mapped ports and bound sockets, are printed,
/// answer `portmap port`, and an empty pool is a clear error.
#[test]
fn dynamic_host_ports_are_allocated_from_the_pool() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("dyn")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(
        &config,
        "interfaces = [\"h0\"]\nattach = \"tc\"\ndynamic_ports = { start = 50000, end = 50003 }\n",
    )?;
    let daemon = Daemon::start(&topo.host, &["--config", config.to_str().context("utf-8")?])?;
    let _busy = Bound::new(&topo.host, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 50001)), true)?;
    assert_eq!(
        daemon.cli_ok(&["add", ":198.18.1.2:80"])?,
        "added 198.18.1.2:80/tcp -> 0.0.0.0:50000\n"
    );
    assert_eq!(
        daemon.cli_ok(&["add", "198.18.1.2:81"])?,
        "added 198.18.1.2:81/tcp -> 0.0.0.0:50002\n",
        "50001 has a listener"
    );
    let err = refused(&daemon, &["add", "198.18.1.2:82-83"])?;
    assert!(
        err.contains("no 2 free host port(s) in a row left in the dynamic range 50000-50003"),
        "{err}"
    );
    assert_eq!(
        daemon.cli_ok(&["add", "198.18.1.2:82"])?,
        "added 198.18.1.2:82/tcp -> 0.0.0.0:50003\n"
    );
    let err = refused(&daemon, &["add", "198.18.1.2:83"])?;
    assert!(err.contains("dynamic range 50000-50003"), "{err}");

    let server = tcp_server(&topo.backend, 80, b"dynamic".to_vec())?;
    assert_eq!(tcp_exchange(&topo.client, host(50000), Vec::new())?, b"dynamic");
    server.join().expect("thread")?;
    assert_eq!(daemon.cli_ok(&["port", "198.18.1.2:80"])?, "0.0.0.0:50000\n");
    assert_eq!(
        lines(&daemon.cli_ok(&["port", "198.18.1.2"])?),
        [
            "80/tcp -> 0.0.0.0:50000",
            "81/tcp -> 0.0.0.0:50002",
            "82/tcp -> 0.0.0.0:50003"
        ]
    );
    // As `docker port`: nothing published is no output; a port nobody publishes is an error.
    assert_eq!(daemon.cli_ok(&["port", "198.18.1.9"])?, "");
    let err = refused(&daemon, &["port", "198.18.1.9:80"])?;
    assert!(
        err.contains("No public port '80/tcp' published for 198.18.1.9"),
        "{err}"
    );
    // Deleting by the spec it was added with frees the port for the next allocation.
    daemon.cli_ok(&["del", ":198.18.1.2:80"])?;
    assert_eq!(
        daemon.cli_ok(&["add", "198.18.1.2:84"])?,
        "added 198.18.1.2:84/tcp -> 0.0.0.0:50000\n"
    );
    Ok(())
}

/// Three backends: flows spread over all of them; `update` removing one lets its established
/// flow finish while new flows avoid it.
#[test]
fn several_backends_share_flows_and_removal_lets_flows_finish() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    for addr in ["198.18.1.3/24", "198.18.1.4/24"] {
        topo.backend.ip(&["addr", "add", addr, "dev", "b0"])?;
    }
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&[
        "add",
        "8080:198.18.1.2:80",
        "--backend",
        "198.18.1.3:80",
        "--backend",
        "198.18.1.4:80",
    ])?;
    assert_eq!(
        lines(&daemon.cli_ok(&["list"])?),
        ["198.18.1.2:80,198.18.1.3:80,198.18.1.4:80/tcp -> 0.0.0.0:8080  cli"]
    );
    let served = tcp_server_n(&topo.backend, 80, 60, b"ok".to_vec())?;
    for _ in 0..60 {
        assert_eq!(tcp_exchange(&topo.client, host(8080), Vec::new())?, b"ok");
    }
    let served = served.join().expect("thread")?;
    for backend in ["198.18.1.2", "198.18.1.3", "198.18.1.4"] {
        let n = served
            .iter()
            .filter(|s| s.local.ip().to_string() == backend)
            .count();
        assert!(n >= 8, "{backend} got {n} of 60 flows");
        assert!(served.iter().all(|s| s.peer.ip() == IpAddr::V4(CLIENT_IP)));
    }
    assert_eq!(mapping_stats(&daemon.stats()?, 8080).flows, 60);

    // A long-lived connection, then the backend it reached is removed mid-flow.
    let echo = EchoServer::start(&topo.backend, 80)?;
    let (step_tx, step_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let client = topo.client.spawn(move || {
        let mut s = TcpStream::connect_timeout(&host(8080).into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 5];
        s.write_all(b"first")?;
        s.read_exact(&mut buf)?;
        done_tx.send(())?;
        step_rx.recv()?;
        s.write_all(b"again")?;
        s.read_exact(&mut buf)?;
        ensure!(&buf == b"again", "echo after the update");
        Ok(())
    })?;
    done_rx.recv_timeout(Duration::from_secs(10))?;
    let removed = echo.reached()[0].ip().to_string();
    let keep: Vec<String> = ["198.18.1.2", "198.18.1.3", "198.18.1.4"]
        .into_iter()
        .filter(|b| *b != removed)
        .map(|b| format!("{b}:80"))
        .collect();
    let updated = daemon.cli_ok(&["update", &format!("8080:{}", keep.join(","))])?;
    assert!(updated.starts_with("updated"), "{updated}");
    step_tx.send(())?;
    client
        .join()
        .expect("client thread")
        .context("the established flow did not survive")?;
    for _ in 0..20 {
        let mut ping = b"p".to_vec();
        ping.extend(payload(10, 3));
        tcp_exchange(&topo.client, host(8080), ping)?;
    }
    let reached = echo.reached();
    assert!(
        reached[1..].iter().all(|a| a.ip().to_string() != removed),
        "new flows went to the removed backend {removed}: {reached:?}"
    );
    Ok(())
}

/// SCTP without the kernel's SCTP module: raw sockets at both ends. The INIT reaches the backend
/// with only the destination address changed and a valid CRC32c; the answer comes back from the
/// published address.
#[test]
fn sctp_keeps_its_port_and_checksum() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    let err = refused(&daemon, &["add", "9999:198.18.1.2:80/sctp"])?;
    assert!(err.contains("SCTP mapping must keep the port"), "{err}");
    daemon.cli_ok(&["add", "9999:198.18.1.2:9999/sctp"])?;

    let (seen_tx, seen_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let backend = topo.backend.spawn(move || {
        let fd = raw_sctp_socket()?;
        ready_tx.send(())?;
        let (src, dst, sctp) = raw_recv(&fd)?;
        seen_tx.send(())?;
        let reply = sctp_packet(9999, u16::from_be_bytes([sctp[0], sctp[1]]), b"init-ack");
        raw_send(&fd, src, &reply)?;
        Ok((src, dst, sctp))
    })?;
    // Sent once the backend's raw socket is open (it sees every SCTP packet from then on).
    ready_rx.recv_timeout(slowdown(Duration::from_secs(5)))?;
    let client = topo.client.run(move || {
        let fd = raw_sctp_socket()?;
        let init = sctp_packet(40_000, 9999, b"hello");
        raw_send(&fd, HOST_IP, &init)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (src, _, sctp) = raw_recv(&fd)?;
            // The raw socket also sees our own INIT leave; wait for the answer.
            if src != CLIENT_IP || Instant::now() > deadline {
                return Ok((src, sctp));
            }
        }
    })?;
    seen_rx.recv_timeout(Duration::from_secs(5))?;
    let (src, dst, sctp) = backend.join().expect("backend thread")?;
    assert_eq!((src, dst.to_string()), (CLIENT_IP, BACKEND.to_string()));
    assert_eq!(&sctp[..4], &[0x9c, 0x40, 0x27, 0x0f], "ports 40000 -> 9999 kept");
    assert!(sctp_crc_ok(&sctp), "CRC32c valid after the address rewrite");
    let (reply_src, reply) = client;
    assert_eq!(reply_src, HOST_IP, "the answer comes from the published address");
    assert!(sctp_crc_ok(&reply));
    let stats = daemon.stats()?;
    let m = mapping_stats(&stats, 9999);
    assert_eq!((m.fwd_packets, m.reply_packets), (1, 1), "{m:?}");
    Ok(())
}

/// A port a local socket is bound to, or one another mapping publishes, is refused and nothing
/// changes.
#[test]
fn conflicts_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    let _tcp = Bound::new(&topo.host, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7777)), true)?;
    let _udp = Bound::new(&topo.host, SocketAddr::from((HOST_IP, 7778)), false)?;
    let err = refused(&daemon, &["add", "7777:198.18.1.2:80"])?;
    assert!(
        err.contains(
            "port is already allocated: 0.0.0.0:7777/tcp is in use by a local socket (0.0.0.0:7777/tcp)"
        ),
        "{err}"
    );
    let err = refused(&daemon, &["add", "7778:198.18.1.2:53/udp"])?;
    assert!(
        err.contains("in use by a local socket (198.18.0.1:7778/udp)"),
        "{err}"
    );
    // Other protocol, other address: no conflict.
    daemon.cli_ok(&["add", "7777:198.18.1.2:53/udp"])?;
    daemon.cli_ok(&["add", "198.18.0.9:7778:198.18.1.2:53/udp"])?;

    daemon.cli_ok(&["add", "8000-8010:198.18.1.2:8000-8010"])?;
    let before = daemon.cli_ok(&["list", "--json"])?;
    let err = refused(&daemon, &["add", "8005:198.18.1.3:80"])?;
    assert!(
        err.contains(
            "port is already allocated: '8005:198.18.1.3:80/tcp' overlaps '8000-8010:198.18.1.2:8000-8010/tcp'"
        ),
        "{err}"
    );
    let err = refused(&daemon, &["update", "8000-8011:198.18.1.3:8000-8011"])?;
    assert!(err.contains("no mapping publishes"), "{err}");
    assert_eq!(
        daemon.cli_ok(&["list", "--json"])?,
        before,
        "nothing half-applied"
    );
    Ok(())
}

/// `reload` applies the file as one diff (and SIGHUP does the same); a bad file changes
/// nothing; `list --json` is a config the next daemon starts from with the same mappings.
#[test]
fn config_reloads_as_one_diff_and_list_json_round_trips() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("reload")?;
    let config = dir.path().join("portmap.toml");
    let write = |mappings: &str| {
        std::fs::write(
            &config,
            format!("interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [{mappings}]\n"),
        )
    };
    write(r#""8080:198.18.1.2:80", "8081:198.18.1.2:81", ":198.18.1.2:90""#)?;
    let config_arg = config.to_str().context("utf-8")?.to_string();
    let mut daemon = Daemon::start(&topo.host, &["--config", &config_arg])?;
    let first = daemon.cli_ok(&["list"])?;
    let dynamic = first
        .lines()
        .find(|l| l.starts_with("198.18.1.2:90/"))
        .context("dynamic mapping listed")?
        .to_string();

    write(r#""8080:198.18.1.2:80,198.18.1.3:80", "8082:198.18.1.2:82", ":198.18.1.2:90""#)?;
    let reloaded = daemon.cli_ok(&["reload"])?;
    assert!(reloaded.contains("1 added, 1 updated, 1 removed"), "{reloaded}");
    let listed = daemon.cli_ok(&["list"])?;
    assert!(
        listed.contains("198.18.1.2:80,198.18.1.3:80/tcp -> 0.0.0.0:8080"),
        "{listed}"
    );
    assert!(listed.contains("198.18.1.2:82/tcp -> 0.0.0.0:8082"), "{listed}");
    assert!(!listed.contains(":8081"), "{listed}");
    assert!(listed.contains(&dynamic), "the dynamic port is kept: {listed}");

    write(r#""8080:198.18.1.2:80", "8083:198.18.1.300:80""#)?;
    let err = refused(&daemon, &["reload"])?;
    assert!(err.contains("mappings[1] '8083:198.18.1.300:80'"), "{err}");
    assert_eq!(daemon.cli_ok(&["list"])?, listed, "a bad file changes nothing");

    // Valid, but one new port is taken by a local listener: the whole diff is undone, the
    // mapping added before the failure included.
    let _busy = Bound::new(&topo.host, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7777)), true)?;
    write(r#""8080:198.18.1.2:80", "8085:198.18.1.2:85", "7777:198.18.1.2:77", ":198.18.1.2:90""#)?;
    let err = refused(&daemon, &["reload"])?;
    assert!(
        err.contains("in use by a local socket (0.0.0.0:7777/tcp)"),
        "{err}"
    );
    assert_eq!(daemon.cli_ok(&["list"])?, listed, "a failed diff is rolled back");

    write(r#""8080:198.18.1.2:80", "8084:198.18.1.2:84""#)?;
    daemon.signal(nix::sys::signal::Signal::SIGHUP)?;
    wait_for("SIGHUP to reload", Duration::from_secs(10), || {
        Ok(daemon.cli_ok(&["list"])?.contains(":8084"))
    })
    .with_context(|| daemon.log())?;

    daemon.cli_ok(&["add", "9000-9001:[fd00:1::2]:9000-9001/udp"])?;
    daemon.cli_ok(&["add", "198.18.0.1:7000:198.18.1.2:70,198.18.1.3:70@3"])?;
    let json = daemon.cli_ok(&["list", "--json"])?;
    let saved = dir.path().join("saved.json");
    std::fs::write(&saved, &json)?;
    daemon.stop()?;
    daemon.restart(
        &topo.host,
        &[
            "--config",
            saved.to_str().context("utf-8")?,
            "--iface",
            "h0",
            "--attach",
            "tc",
        ],
    )?;
    // The same mappings, now all the config's (it owns what it lists).
    let (mut again, mut before): (Value, Value) = (
        serde_json::from_str(&daemon.cli_ok(&["list", "--json"])?)?,
        serde_json::from_str(&json)?,
    );
    let owners = |v: &mut Value| -> Vec<Value> {
        v["mappings"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_object_mut()?.remove("owner"))
            .collect()
    };
    assert!(owners(&mut before).contains(&Value::from("cli")), "{before}");
    assert!(owners(&mut again).iter().all(|o| o == "config"), "{again}");
    assert_eq!(again, before, "list --json round-trips");
    let server = tcp_server(&topo.backend, 84, b"restored".to_vec())?;
    assert_eq!(tcp_exchange(&topo.client, host(8084), Vec::new())?, b"restored");
    server.join().expect("thread")?;
    Ok(())
}

/// More published ports than the compiled-in map sizes (65,536): every map that holds one entry
/// per published port follows `limits.max_mappings` (PM_PUBLISHED_PORTS once did not).
#[test]
fn limits_above_the_default_capacity_apply_to_every_per_port_map() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("big")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(
        &config,
        "interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [\"20000-59999:198.18.1.2:20000-59999\", \
         \"20000-59999:198.18.1.2:20000-59999/udp\"]\n[limits]\nmax_mappings = 100000\n",
    )?;
    let mut daemon = Daemon::start(&topo.host, &["--config", config.to_str().context("utf-8")?])?;
    let listed = daemon.cli_ok(&["list"])?;
    assert_eq!(listed.lines().count(), 80_000);
    daemon.stop()
}

/// Without `dynamic_ports` the pool is the kernel's `net.ipv4.ip_local_port_range` of the
/// daemon's network namespace, as Docker's allocator, and `ip_local_reserved_ports` are skipped.
#[test]
fn the_dynamic_pool_is_the_kernels_ephemeral_range() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    topo.host.sysctl("net/ipv4/ip_local_port_range", "40000 40002")?;
    topo.host.sysctl("net/ipv4/ip_local_reserved_ports", "40001")?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    assert_eq!(
        daemon.cli_ok(&["add", "198.18.1.2:80"])?,
        "added 198.18.1.2:80/tcp -> 0.0.0.0:40000\n"
    );
    assert_eq!(
        daemon.cli_ok(&["add", "198.18.1.2:81"])?,
        "added 198.18.1.2:81/tcp -> 0.0.0.0:40002\n",
        "the reserved port is skipped"
    );
    let err = refused(&daemon, &["add", "198.18.1.2:82"])?;
    assert!(err.contains("dynamic range 40000-40002"), "{err}");
    Ok(())
}
