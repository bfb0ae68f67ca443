//! Source allow-lists (issue 27) end to end: two client namespaces, one inside a mapping's list
//! and one outside it, on TC and XDP; `update` and a reload that narrow the list while a flow
//! from the left-out client is open; lists across a killed daemon and a restart; host processes
//! and containers through the socket hooks.
//! Needs root (run through `cargo xtask test`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap::api::control::StatsReport;
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, Daemon, EchoServer, HOST_IP, Mode, Netns, TempDir, Topology, counter, probe, start_daemon,
    tcp_connect_result,
};
use serde_json::Value;

/// The second client's side of the host: h3 198.18.4.1/24 ↔ o0 198.18.4.2 (the "outside" client).
const OUTSIDE_IFACE: &str = "h3";
const OUTSIDE_HOST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 4, 1);

/// A second client namespace on its own link to the host (also a client-facing interface).
fn outside_client(topo: &Topology, mode: Mode) -> anyhow::Result<Netns> {
    let ns = Netns::new("o")?;
    ns.add_veth("o0", OUTSIDE_IFACE, &topo.host)?;
    topo.host
        .ip(&["addr", "add", "198.18.4.1/24", "dev", OUTSIDE_IFACE])?;
    topo.host.ip(&["link", "set", OUTSIDE_IFACE, "up"])?;
    ns.ip(&["addr", "add", "198.18.4.2/24", "dev", "o0"])?;
    ns.ip(&["link", "set", "o0", "up"])?;
    ns.ip(&["route", "add", "default", "via", "198.18.4.1"])?;
    if mode == Mode::Xdp {
        // As `Topology::prepare_for_xdp` does for the first client.
        ns.exec("ethtool", &["-K", "o0", "tx", "off"])?;
    }
    Ok(ns)
}

/// An open TCP connection from a namespace through the echo server, for checking whether its
/// packets still pass after a change.
struct Open(TcpStream);

impl Open {
    fn connect(ns: &Netns, to: SocketAddrV4) -> anyhow::Result<Self> {
        let stream = ns.run(move || {
            TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))
                .with_context(|| format!("connect {to}"))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut open = Self(stream);
        ensure!(open.echoes("first\n"), "a new connection to {to} does not echo");
        Ok(open)
    }

    /// Whether `text` comes back (false: no answer within the timeout, or the connection broke).
    fn echoes(&mut self, text: &str) -> bool {
        let mut back = vec![0u8; text.len()];
        self.0.write_all(text.as_bytes()).is_ok()
            && self.0.read_exact(&mut back).is_ok()
            && back == text.as_bytes()
    }
}

fn published(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(HOST_IP, port)
}

/// The port's refusals: the mapping's own counter.
fn denied(stats: &StatsReport, port: u16) -> anyhow::Result<u64> {
    Ok(stats
        .mapping_on_port(port)
        .with_context(|| format!("no mapping on {port}"))?
        .drop_denied)
}

/// A connection attempt the datapath drops: the SYNs go unanswered.
fn dropped(ns: &Netns, to: SocketAddrV4) -> anyhow::Result<bool> {
    Ok(tcp_connect_result(ns, to)? == Err(std::io::ErrorKind::TimedOut))
}

/// One client inside the list, one outside: the outside one's SYNs are dropped and counted (on
/// the mapping and globally), `update` moves the list (an open flow of a client it leaves out
/// gets no further packet through), `--allow-all` removes it.
fn inside_and_outside(mode: Mode) -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let outside = outside_client(&topo, mode)?;
    let daemon = start_daemon(&topo, mode, &["--iface", OUTSIDE_IFACE])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80", "--allow", "198.18.0.0/24"])?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed == "198.18.1.2:80/tcp -> 0.0.0.0:8080  cli  allow 198.18.0.0/24\n",
        "{listed:?}"
    );
    let json: Value = serde_json::from_str(&daemon.cli_ok(&["list", "--json"])?)?;
    ensure!(
        json["mappings"][0]["allow"] == serde_json::json!(["198.18.0.0/24"]),
        "{json}"
    );

    let mut inside = Open::connect(&topo.client, published(8080))?;
    let to_outside_side = SocketAddrV4::new(OUTSIDE_HOST_IP, 8080);
    ensure!(
        dropped(&outside, to_outside_side)?,
        "the outside client connected"
    );
    let stats = daemon.stats()?;
    let refused = counter(&stats, Stat::DropDenied);
    ensure!(refused >= 1, "drop_denied {refused}");
    ensure!(
        denied(&stats, 8080)? == refused,
        "per mapping {} of {refused}",
        denied(&stats, 8080)?
    );
    ensure!(
        stats.mapping_on_port(8080).map(|m| m.counters.flows) == Some(1),
        "flows: {stats:?}"
    );

    // The list now holds only the outside client's network: the inside one's open flow goes.
    daemon.cli_ok(&["update", "8080:198.18.1.2:80", "--allow", "198.18.4.0/24"])?;
    ensure!(
        !inside.echoes("after\n"),
        "the left-out client's open flow still passes"
    );
    ensure!(
        dropped(&topo.client, published(8080))?,
        "the left-out client connected anew"
    );
    Open::connect(&outside, to_outside_side).context("the newly admitted client")?;
    // Without a backend change `update` keeps the list; --allow-all removes it.
    daemon.cli_ok(&["update", "8080:198.18.1.2:80"])?;
    ensure!(
        dropped(&topo.client, published(8080))?,
        "update without --allow kept no list"
    );
    daemon.cli_ok(&["update", "8080:198.18.1.2:80", "--allow-all"])?;
    Open::connect(&topo.client, published(8080)).context("after --allow-all")?;
    Ok(())
}

#[test]
fn allow_list_admits_inside_and_drops_outside_tc() -> anyhow::Result<()> {
    inside_and_outside(Mode::Tc)
}

#[test]
fn allow_list_admits_inside_and_drops_outside_xdp() -> anyhow::Result<()> {
    inside_and_outside(Mode::Xdp)
}

/// A list of the wrong family, host bits, or a bad prefix: refused whole, nothing added.
#[test]
fn bad_allow_lists_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    for (args, want) in [
        (
            &["add", "8080:198.18.1.2:80", "--allow", "fd00:1::/64"][..],
            "allow fd00:1::/64 is IPv6, the mapping is IPv4",
        ),
        (
            &["add", "8080:198.18.1.2:80", "--allow", "198.18.0.1/24"],
            "allow 198.18.0.1/24 has host bits set: write 198.18.0.0/24",
        ),
        (
            &["add", "8080:198.18.1.2:80", "--allow", "lan"],
            "allow 'lan' is not an address prefix",
        ),
    ] {
        let out = daemon.cli(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
    ensure!(daemon.cli_ok(&["list"])?.is_empty(), "something was added");
    Ok(())
}

/// The config's top-level `allow` applies to every mapping without its own; a reload that
/// narrows it takes the open flows of the clients it leaves out and refuses them anew.
#[test]
fn a_reload_narrowing_the_host_list_drops_the_left_out_flows() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let outside = outside_client(&topo, Mode::Tc)?;
    let dir = TempDir::new("cfg")?;
    let config = dir.path().join("portmap.toml");
    let write = |allow: &str| {
        std::fs::write(
            &config,
            format!(
                "interfaces = [\"h0\", \"{OUTSIDE_IFACE}\"]\nallow = [{allow}]\nmappings = [\"8080:198.18.1.2:80\"]\n"
            ),
        )
    };
    write("\"198.18.0.0/24\", \"198.18.4.0/24\"")?;
    let daemon = Daemon::start(
        &topo.host,
        &["--config", config.to_str().context("non-UTF-8 temp path")?],
    )?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let to_outside_side = SocketAddrV4::new(OUTSIDE_HOST_IP, 8080);
    let mut left_out = Open::connect(&outside, to_outside_side)?;
    let mut kept = Open::connect(&topo.client, published(8080))?;

    write("\"198.18.0.0/24\"")?;
    let reloaded = daemon.cli_ok(&["reload"])?;
    ensure!(
        reloaded.contains("1 under the new host allow-list"),
        "{reloaded:?}"
    );
    ensure!(
        !left_out.echoes("after\n"),
        "the left-out client's open flow still passes"
    );
    ensure!(kept.echoes("after\n"), "the admitted client's open flow broke");
    ensure!(
        dropped(&outside, to_outside_side)?,
        "the left-out client connected anew"
    );
    ensure!(denied(&daemon.stats()?, 8080)? >= 1, "no refusal counted");
    Ok(())
}

/// The lists survive restarts: the host's list (from the config) and a mapping's own one added
/// at run time (saved in the journal, as its own record before the mapping's) after the daemon
/// is killed, then both from the snapshot the next start writes; each port admits and refuses
/// the same clients as before.
#[test]
fn lists_survive_a_killed_daemon_and_a_restart() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let outside = outside_client(&topo, Mode::Tc)?;
    let dir = TempDir::new("cfg")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"h0\", \"{OUTSIDE_IFACE}\"]\nallow = [\"198.18.0.0/24\"]\nmappings = [\"8080:198.18.1.2:80\"]\n"
        ),
    )?;
    let args = ["--config", config.to_str().context("non-UTF-8 temp path")?];
    let mut daemon = Daemon::start(&topo.host, &args)?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    daemon.cli_ok(&["add", "8081:198.18.1.2:80", "--allow", "198.18.4.0/24"])?;
    daemon.cli_ok(&["add", "8082:198.18.1.2:80"])?;
    let before = daemon.cli_ok(&["list", "--json"])?;
    let from_outside = |port| SocketAddrV4::new(OUTSIDE_HOST_IP, port);
    let check = |when: &str| -> anyhow::Result<()> {
        Open::connect(&topo.client, published(8080)).with_context(|| format!("{when}: inside -> 8080"))?;
        ensure!(
            dropped(&outside, from_outside(8080))?,
            "{when}: outside reached 8080"
        );
        Open::connect(&outside, from_outside(8081)).with_context(|| format!("{when}: outside -> 8081"))?;
        ensure!(
            dropped(&topo.client, published(8081))?,
            "{when}: inside reached 8081"
        );
        ensure!(
            dropped(&outside, from_outside(8082))?,
            "{when}: outside reached 8082"
        );
        Ok(())
    };
    check("before")?;
    daemon.kill()?;
    daemon.restart(&topo.host, &args)?;
    ensure!(
        daemon.cli_ok(&["list", "--json"])? == before,
        "after the kill: {}",
        daemon.log()
    );
    check("after the kill")?;
    daemon.stop()?;
    daemon.restart(&topo.host, &args)?;
    ensure!(
        daemon.cli_ok(&["list", "--json"])? == before,
        "after the restart: {}",
        daemon.log()
    );
    check("after the restart")?;
    daemon.stop()
}

/// A probe in the daemon's cgroup (subject to the socket hooks).
fn hooked(ns: &Netns, daemon: &Daemon, args: &[&str]) -> anyhow::Result<Value> {
    probe(ns, Some(&daemon.cgroup), args)
}

fn reached(r: &Value) -> bool {
    r["ok"] == true && r["reply"] == "hello\n"
}

fn refused_by_list(r: &Value) -> bool {
    r["ok"] == false && r["error"] == "PermissionDenied"
}

/// Host processes are judged by the address they connect from (127.0.0.1 for loopback, else
/// the host address they connect to), containers by the address their socket is bound to; a
/// container's unbound socket has no address the hook can know and is refused.
#[test]
fn host_processes_and_containers_meet_the_list_by_their_address() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Bridge)?;
    let daemon = start_daemon(&topo, Mode::Tc, &[])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80", "--allow", "198.18.1.0/24,127.0.0.1"])?;
    daemon.cli_ok(&["add", "8081:198.18.1.2:80", "--allow", "198.18.0.0/24"])?;
    let container = topo.add_container(std::net::Ipv4Addr::new(198, 18, 1, 9))?;
    let from_container = ["from", "198.18.1.9:0"];
    let cases: [(&Netns, Vec<&str>, bool); 8] = [
        (&topo.host, vec!["tcp", "127.0.0.1:8080"], true),
        (&topo.host, vec!["tcp", "198.18.1.1:8080"], true),
        (&topo.host, vec!["tcp", "198.18.0.1:8080"], false),
        (&topo.host, vec!["tcp", "127.0.0.1:8081"], false),
        (&topo.host, vec!["tcp", "198.18.0.1:8081"], true),
        (&container, vec!["tcp", "198.18.1.1:8080"], false),
        (
            &container,
            [&["tcp", "198.18.1.1:8080"][..], &from_container].concat(),
            true,
        ),
        (
            &container,
            [&["tcp", "198.18.0.1:8081"][..], &from_container].concat(),
            false,
        ),
    ];
    let mut refusals = [0u64; 2];
    for (ns, args, admitted) in &cases {
        let r = hooked(ns, &daemon, args)?;
        let ok = if *admitted {
            reached(&r)
        } else {
            refused_by_list(&r)
        };
        ensure!(
            ok,
            "{args:?} from {}: {r}",
            if std::ptr::eq(*ns, &topo.host) {
                "the host"
            } else {
                "a container"
            }
        );
        if !admitted {
            let addr: SocketAddr = args[1].parse()?;
            refusals[usize::from(addr.port() == 8081)] += 1;
        }
    }
    let stats = daemon.stats()?;
    ensure!(
        counter(&stats, Stat::SockDenied) == refusals.iter().sum::<u64>(),
        "sock_denied {} of {refusals:?}",
        counter(&stats, Stat::SockDenied)
    );
    ensure!(
        [denied(&stats, 8080)?, denied(&stats, 8081)?] == refusals,
        "per mapping {:?} of {refusals:?}",
        [denied(&stats, 8080)?, denied(&stats, 8081)?]
    );
    Ok(())
}
