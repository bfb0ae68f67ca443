//! End-to-end tests: real namespaces, the real `portmap run` daemon, real sockets.
//! Needs root (run through `cargo xtask test`).

use std::{
    io::ErrorKind,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap::api::control::StatsReport;
use portmap_common::{MappingCounters, Stat};
use portmap_tests::{
    BackendLink, CLIENT_IP, Daemon, HOST_CLIENT_IFACE, HOST_IP, Mode, TempDir, Topology, attached, counter,
    mapping_stats, payload, start_daemon, tcp_connect_result, tcp_exchange, tcp_server, tcp_server_n,
    udp_exchange, udp_server,
};

fn start(topo: &Topology, mode: Mode, extra: &[&str]) -> anyhow::Result<Daemon> {
    start_daemon(topo, mode, extra)
}

fn host(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(HOST_IP, port)
}

fn mapping(stats: &StatsReport, host_port: u16) -> MappingCounters {
    mapping_stats(stats, host_port)
}

/// The whole life of a daemon: TCP both ways with the client's real address at the backend, UDP
/// with exact counters, untouched unmapped traffic, `del`, and a SIGTERM that leaves nothing.
fn lifecycle(mode: Mode, link: BackendLink) -> anyhow::Result<()> {
    let topo = Topology::new(link)?;
    let mut daemon = start(&topo, mode, &[])?;
    let added = daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    assert_eq!(added.trim(), "added 198.18.1.2:80/tcp -> 0.0.0.0:8080");
    daemon.cli_ok(&["add", "198.18.0.1:5353:198.18.1.2:53/udp"])?;
    assert_eq!(
        daemon.cli_ok(&["list"])?,
        "198.18.1.2:80/tcp -> 0.0.0.0:8080  cli\n198.18.1.2:53/udp -> 198.18.0.1:5353  cli\n"
    );
    assert!(
        attached(&topo.host, HOST_CLIENT_IFACE)?.1 == 1,
        "tc egress attached"
    );

    // TCP: 80 KiB up, 100 KiB down, both intact; the backend sees the real client.
    let (up, down) = (payload(80 * 1024, 1), payload(100 * 1024, 2));
    let server = tcp_server(&topo.backend, 80, down.clone())?;
    let got = tcp_exchange(&topo.client, host(8080), up.clone())?;
    let served = server.join().unwrap()?;
    assert_eq!(
        served.peer.ip(),
        std::net::IpAddr::V4(CLIENT_IP),
        "backend sees the client's address"
    );
    assert!(served.received == up, "request arrived intact");
    assert!(got == down, "response arrived intact");

    // UDP: 5 request/response pairs; the answers come from the published address.
    let server = udp_server(&topo.backend, 53, 5)?;
    let from = udp_exchange(&topo.client, host(5353), 5, 100)?;
    assert_eq!(from, SocketAddr::V4(host(5353)));
    assert!(
        server
            .join()
            .unwrap()?
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(CLIENT_IP))
    );

    // A port without a mapping reaches the host itself, untouched.
    let before = counter(&daemon.stats()?, Stat::PassNoMapping);
    let server = tcp_server(&topo.host, 9090, b"host itself".to_vec())?;
    assert_eq!(
        tcp_exchange(&topo.client, host(9090), b"hi".to_vec())?,
        b"host itself"
    );
    assert_eq!(server.join().unwrap()?.peer.ip(), std::net::IpAddr::V4(CLIENT_IP));

    let stats = daemon.stats()?;
    assert!(counter(&stats, Stat::PassNoMapping) > before);
    let tcp = mapping(&stats, 8080);
    assert_eq!(tcp.flows, 1);
    assert!(tcp.fwd_bytes >= up.len() as u64, "{tcp:?}");
    assert!(tcp.reply_bytes >= down.len() as u64, "{tcp:?}");
    let udp = mapping(&stats, 5353);
    assert_eq!(udp.flows, 1, "{udp:?}");
    assert_eq!(udp.fwd_packets, 5, "{udp:?}");
    assert_eq!(udp.reply_packets, 5, "{udp:?}");
    assert_eq!(udp.fwd_bytes, 5 * (20 + 8 + 100), "{udp:?}");
    assert_eq!(udp.reply_bytes, 5 * (20 + 8 + 100), "{udp:?}");
    assert_eq!(counter(&stats, Stat::DropError), 0);
    assert_eq!(counter(&stats, Stat::FlowNew), 2);
    // Redirected after a FIB lookup, or (once the daemon learnt the backend from its
    // neighbour entry) sent straight into its veth: tests/local_path.rs separates the two.
    let (redirected, via_stack) = (
        counter(&stats, Stat::FwdRedirect) + counter(&stats, Stat::FwdLocal),
        counter(&stats, Stat::FwdStack),
    );
    match (mode, link) {
        // XDP cannot redirect into a bridge (nor into its port, unless listed): rewritten, then
        // routed by the kernel.
        (Mode::Xdp, BackendLink::Bridge) => assert!(redirected == 0 && via_stack > 0, "{stats:?}"),
        // Only the first packet waits for ARP in the kernel; the rest (GRO super-packets in
        // TC mode included) is redirected.
        _ => assert!(redirected > 0 && via_stack <= 2, "{stats:?}"),
    }

    // No netfilter involvement: portmap installed no rule of any table in the host's namespace
    // (`nft` lists iptables-nft's rules too; a missing nft is an error, not an empty list).
    let rules = topo.host.exec("nft", &["list", "ruleset"])?;
    assert_eq!(rules.trim(), "", "netfilter rules appeared in the host namespace");

    // del stops new flows: the host has no listener on 8080, so the connection is refused.
    daemon.cli_ok(&["del", "8080:198.18.1.2:80"])?;
    assert_eq!(
        tcp_connect_result(&topo.client, host(8080))?,
        Err(ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        daemon.cli_ok(&["list"])?,
        "198.18.1.2:53/udp -> 198.18.0.1:5353  cli\n"
    );

    // SIGTERM: clean exit; the datapath stays attached for the next daemon, and `portmap
    // cleanup` removes it: nothing attached, no pins, no saved state.
    let running = attached(&topo.host, HOST_CLIENT_IFACE)?;
    daemon.stop()?;
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, running);
    assert!(daemon.state_file.exists(), "mappings saved");
    daemon.cleanup()?;
    assert!(
        !daemon.pin_dir.exists(),
        "pin dir {} left behind",
        daemon.pin_dir.display()
    );
    assert!(!daemon.state_file.exists(), "state file left behind");
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (0, 0, false));
    Ok(())
}

#[test]
fn lifecycle_tc_veth_backend() -> anyhow::Result<()> {
    lifecycle(Mode::Tc, BackendLink::Veth)
}

#[test]
fn lifecycle_tc_bridge_backend() -> anyhow::Result<()> {
    lifecycle(Mode::Tc, BackendLink::Bridge)
}

#[test]
fn lifecycle_xdp_veth_backend() -> anyhow::Result<()> {
    lifecycle(Mode::Xdp, BackendLink::Veth)
}

#[test]
fn lifecycle_xdp_bridge_backend() -> anyhow::Result<()> {
    lifecycle(Mode::Xdp, BackendLink::Bridge)
}

/// `portmap_tests::wait_for` with the 20 s an expiry pass may take.
fn wait_for(what: &str, cond: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    portmap_tests::wait_for(what, Duration::from_secs(20), cond)
}

/// Closed TCP flows and idle UDP flows leave the table (both entries), and come back as new
/// flows when traffic resumes.
#[test]
fn flows_expire_and_are_recreated() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start_with_config(
        &topo,
        "interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [\"8080:198.18.1.2:80\", \"5353:198.18.1.2:53/udp\"]\n\
         [timeouts]\ntcp_close_seconds = 3\nudp_seconds = 4\ngc_interval_seconds = 1\n",
    )?;
    let server = tcp_server(&topo.backend, 80, b"bye".to_vec())?;
    tcp_exchange(&topo.client, host(8080), b"hello".to_vec())?;
    server.join().unwrap()?;
    let server = udp_server(&topo.backend, 53, 2)?;
    udp_exchange(&topo.client, host(5353), 1, 10)?;
    // The TCP flow completed its handshake (assured); the UDP one saw one request and its reply
    // (not assured until the client sends again).
    let tracked = |s: portmap::api::control::StatsReport| (s.active_flows, s.new_flows);
    wait_for("both flows to be counted", || {
        Ok(tracked(daemon.stats()?) == (1, 1))
    })?;
    wait_for("both flows to expire", || Ok(tracked(daemon.stats()?) == (0, 0)))?;
    // The UDP flow is recreated from the mapping.
    udp_exchange(&topo.client, host(5353), 1, 10)?;
    server.join().unwrap()?;
    let stats = daemon.stats()?;
    assert_eq!(mapping(&stats, 5353).flows, 2, "{stats:?}");
    Ok(())
}

/// A reloaded `gc_interval_seconds` applies at once: started with an hour between expiry passes
/// (which also count the flows `stats` shows), a reload to 1 s brings the next pass within
/// seconds, not after the old hour.
#[test]
fn reloaded_gc_interval_applies_at_once() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("cfg")?;
    let config = dir.path().join("portmap.toml");
    let toml = |gc: u32| {
        format!(
            "interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [\"5353:198.18.1.2:53/udp\"]\n\
             [timeouts]\ngc_interval_seconds = {gc}\n"
        )
    };
    std::fs::write(&config, toml(3600))?;
    let daemon = Daemon::start(
        &topo.host,
        &["--config", config.to_str().context("non-UTF-8 temp path")?],
    )?;
    // The first pass ran at start, before this flow existed.
    let server = udp_server(&topo.backend, 53, 1)?;
    udp_exchange(&topo.client, host(5353), 1, 10)?;
    server.join().unwrap()?;

    std::fs::write(&config, toml(1))?;
    daemon.cli_ok(&["reload"])?;
    wait_for("an expiry pass to count the flow", || {
        Ok(daemon.stats()?.new_flows == 1)
    })?;
    assert!(daemon.log().contains("flow expiry every 1 s"), "{}", daemon.log());
    Ok(())
}

/// `stats --watch --json` prints one line of per-second rates per refresh; traffic during the
/// watch shows up as packet and flow rates of its mapping.
#[test]
fn stats_watch_shows_rates() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "5353:198.18.1.2:53/udp"])?;
    let server = udp_server(&topo.backend, 53, 20)?;
    let out = thread::scope(|s| {
        let traffic = s.spawn(|| -> anyhow::Result<()> {
            for _ in 0..20 {
                udp_exchange(&topo.client, host(5353), 1, 10)?;
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        let out = daemon.cli_ok(&["stats", "--watch", "--interval", "0.5", "--count", "3", "--json"]);
        traffic.join().unwrap()?;
        out
    })?;
    server.join().unwrap()?;
    let lines: Vec<serde_json::Value> = out.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3, "{out}");
    let rate = |line: &serde_json::Value, field: &str| line["mappings"][0][field].as_f64().unwrap_or(0.0);
    assert!(
        lines
            .iter()
            .all(|l| l["mappings"][0]["mapping"] == "5353:198.18.1.2:53/udp"),
        "{out}"
    );
    assert!(lines.iter().any(|l| rate(l, "fwd_packets_per_s") > 0.0), "{out}");
    assert!(lines.iter().any(|l| rate(l, "new_flows_per_s") > 0.0), "{out}");

    let table = daemon.cli_ok(&["stats", "--watch", "--interval", "0.1", "--count", "1"])?;
    assert!(
        table.starts_with("MAPPING (spec)") && table.contains("FWD_PPS"),
        "{table}"
    );
    let err = daemon.cli(&["stats", "--watch", "--interval", "0"])?;
    assert!(stderr_of(&err).contains("out of range"), "{}", stderr_of(&err));
    Ok(())
}

/// Writes `toml` to a fresh config file and starts the daemon with it (the daemon reads the
/// file once, at start).
fn start_with_config(topo: &Topology, toml: &str) -> anyhow::Result<Daemon> {
    let dir = TempDir::new("cfg")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(&config, toml)?;
    Daemon::start(
        &topo.host,
        &["--config", config.to_str().context("non-UTF-8 temp path")?],
    )
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Every bad request gets a one-line error naming the problem, exit 1, and changes nothing.
#[test]
fn bad_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let cases = [
        (vec!["add", "0-10:198.18.1.2:80"], "host port 0 is out of range"),
        (
            vec!["add", "8080:198.18.1.2:70000"],
            "backend port 70000 is out of range",
        ),
        (
            vec!["add", "8080:198.18.1:80"],
            "backend address '198.18.1' is not an IP address",
        ),
        (vec!["add", "8081:198.18.1.2:80/icmp"], "unknown protocol 'icmp'"),
        (vec!["add", "garbage"], "'garbage' does not match"),
        (
            vec!["add", "8080:198.18.1.3:81"],
            "port is already allocated: '8080:198.18.1.3:81/tcp' overlaps '8080:198.18.1.2:80/tcp'",
        ),
        (
            vec!["del", "9999:198.18.1.2:80"],
            "no mapping '9999:198.18.1.2:80/tcp'",
        ),
        (
            vec!["del", "8080:198.18.1.9:80"],
            "no mapping '8080:198.18.1.9:80/tcp'; its host port is published as '8080:198.18.1.2:80/tcp'",
        ),
    ];
    for (args, want) in cases {
        let out = daemon.cli(&args)?;
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{args:?}: {err:?} lacks {want:?}"
        );
    }
    assert_eq!(
        daemon.cli_ok(&["list"])?,
        "198.18.1.2:80/tcp -> 0.0.0.0:8080  cli\n"
    );
    let json: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["list", "--json"])?)?;
    assert_eq!(json["mappings"][0]["backends"][0]["ip"], "198.18.1.2");
    Ok(())
}

#[test]
fn cli_without_daemon_says_so() -> anyhow::Result<()> {
    let bin = portmap_tests::portmap_bin()?;
    let out = std::process::Command::new(bin)
        .args(["--socket", "/nonexistent/portmap.sock", "list"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("the portmap daemon is not running"),
        "{}",
        stderr_of(&out)
    );
    Ok(())
}

/// A bad config is rejected as a whole before anything is loaded or attached.
#[test]
fn bad_config_is_rejected_whole() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let err = start_with_config(
        &topo,
        "interfaces = [\"h0\"]\nmappings = [\"8080:198.18.1.2:80\", \"8080:198.18.1.3:80\"]\n",
    )
    .err()
    .context("daemon started")?;
    let err = format!("{err:#}");
    assert!(
        err.contains(
            "mappings[1] '8080:198.18.1.3:80': port is already allocated by mappings[0] '8080:198.18.1.2:80'"
        ),
        "{err}"
    );
    assert_eq!(
        err.matches("already allocated").count(),
        1,
        "cause printed once: {err}"
    );
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (0, 0, false));
    Ok(())
}

#[test]
fn config_file_mappings_are_applied() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Bridge)?;
    let daemon = start_with_config(
        &topo,
        "interfaces = [\"h0\"]\nmappings = [\"8080:198.18.1.2:80\", \"198.18.0.1:53:198.18.1.2:5353/udp\"]\n",
    )?;
    assert_eq!(
        daemon.cli_ok(&["list"])?,
        "198.18.1.2:80/tcp -> 0.0.0.0:8080  config\n198.18.1.2:5353/udp -> 198.18.0.1:53  config\n"
    );
    // auto mode on a veth is TC: ingress and egress tcx programs, no XDP.
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (1, 1, false));
    let server = tcp_server(&topo.backend, 80, payload(4096, 9))?;
    assert_eq!(
        tcp_exchange(&topo.client, host(8080), b"x".to_vec())?,
        payload(4096, 9)
    );
    assert_eq!(server.join().unwrap()?.peer.ip(), std::net::IpAddr::V4(CLIENT_IP));
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> anyhow::Result<()> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/portmap.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .context("systemd-analyze (package systemd; `cargo xtask setup` installs it)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The unit names /usr/local/bin/portmap, which need not exist on a build machine.
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("/usr/local/bin/portmap"))
        .collect();
    ensure!(
        out.status.success() || problems.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    ensure!(
        problems.is_empty(),
        "systemd-analyze verify: {}",
        problems.join("\n")
    );
    Ok(())
}

/// A crashed daemon (SIGKILL) leaves its pinned links attached, so published ports keep working;
/// the next daemon adopts them: one program per hook (the links got the new programs), the
/// mapping added at run time is still there, and `del` of it works.
#[test]
fn crash_keeps_traffic_flowing_and_restart_adopts() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.kill()?;
    assert!(daemon.pin_dir.join("maps/PM_MAPPINGS").exists());
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (1, 1, false));
    let server = tcp_server_n(&topo.backend, 80, 2, b"still here".to_vec())?;
    assert_eq!(
        tcp_exchange(&topo.client, host(8080), b"?".to_vec())?,
        b"still here"
    );

    daemon.restart(&topo.host, &["--iface", HOST_CLIENT_IFACE, "--attach", "tc"])?;
    assert!(
        daemon.log().contains("took over the attached link"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        attached(&topo.host, HOST_CLIENT_IFACE)?,
        (1, 1, false),
        "one program per hook"
    );
    assert_eq!(
        daemon.cli_ok(&["list"])?,
        "198.18.1.2:80/tcp -> 0.0.0.0:8080  cli\n"
    );
    assert_eq!(
        tcp_exchange(&topo.client, host(8080), b"?".to_vec())?,
        b"still here"
    );
    server.join().unwrap()?;
    daemon.cli_ok(&["del", "8080:198.18.1.2:80"])?;
    assert_eq!(
        tcp_connect_result(&topo.client, host(8080))?,
        Err(ErrorKind::ConnectionRefused)
    );
    daemon.stop()
}

/// `portmap cleanup` refuses while the daemon runs; after a crash it removes the pins the daemon
/// left, which detaches its programs, so the published port closes without starting a new daemon.
#[test]
fn cleanup_removes_what_a_crashed_daemon_left() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let pin_dir = daemon.pin_dir.to_str().context("pin dir")?.to_owned();

    let refused = daemon.cli(&["cleanup", "--pin-dir", &pin_dir])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("daemon is running"),
        "{stderr}"
    );
    assert!(
        daemon.pin_dir.join("maps/PM_MAPPINGS").exists(),
        "nothing removed"
    );

    daemon.kill()?;
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (1, 1, false));
    let out = daemon.cli_ok(&["cleanup", "--pin-dir", &pin_dir])?;
    assert!(
        out.contains("links/") && out.contains("maps/PM_MAPPINGS"),
        "{out}"
    );
    assert!(!daemon.pin_dir.exists(), "pin dir removed");
    assert!(!daemon.socket.exists(), "stale socket removed");
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (0, 0, false));
    assert_eq!(
        tcp_connect_result(&topo.client, host(8080))?,
        Err(ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        daemon.cli_ok(&["cleanup", "--pin-dir", &pin_dir])?.trim(),
        format!("nothing to clean up in {pin_dir}")
    );
    Ok(())
}

/// A client-facing interface that is deleted is reported (log, `stats`), and when it is created
/// again the daemon attaches to it by itself: the published port works again, no restart.
#[test]
fn deleted_interface_is_reported_and_reattached() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = start(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let up = |daemon: &Daemon| -> anyhow::Result<Vec<(String, bool)>> { Ok(daemon.stats()?.interfaces) };
    assert_eq!(up(&daemon)?, vec![(HOST_CLIENT_IFACE.to_string(), true)]);

    topo.host.ip(&["link", "del", HOST_CLIENT_IFACE])?;
    wait_for("the daemon to notice", || {
        Ok(up(&daemon)? == vec![(HOST_CLIENT_IFACE.to_string(), false)])
    })?;
    assert!(
        daemon.log().contains("interface h0 disappeared"),
        "{}",
        daemon.log()
    );
    assert!(daemon.cli_ok(&["stats"])?.contains("MISSING"));

    topo.connect_client()?;
    wait_for("the daemon to attach again", || {
        Ok(up(&daemon)? == vec![(HOST_CLIENT_IFACE.to_string(), true)])
    })?;
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (1, 1, false));
    let server = tcp_server(&topo.backend, 80, b"back".to_vec())?;
    assert_eq!(tcp_exchange(&topo.client, host(8080), b"?".to_vec())?, b"back");
    server.join().unwrap()?;
    Ok(())
}

/// An interface that does not exist is named in the error, and what was attached before it is
/// detached again.
#[test]
fn missing_interface_is_named_and_rolled_back() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let args = [
        "--iface",
        HOST_CLIENT_IFACE,
        "--iface",
        "nosuch0",
        "--attach",
        "tc",
    ];
    let err = format!(
        "{:#}",
        Daemon::start(&topo.host, &args).err().context("daemon started")?
    );
    assert!(err.contains("interface 'nosuch0' not found"), "{err}");
    assert!(err.contains("detached and unpinned"), "{err}");
    assert_eq!(attached(&topo.host, HOST_CLIENT_IFACE)?, (0, 0, false));
    Ok(())
}

/// 9000-byte MTU everywhere: full-size UDP datagrams and TCP segments are NATed (TC mode; a
/// single-buffer XDP program cannot run at this MTU, see docs/TESTING.md), counted exactly, and
/// redirected rather than handed to the stack.
#[test]
fn jumbo_frames_are_forwarded_in_tc_mode() -> anyhow::Result<()> {
    const MTU: usize = 9000;
    let topo = Topology::new(BackendLink::Veth)?;
    topo.set_mtu(MTU as u32)?;
    let mut daemon = start(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "5353:198.18.1.2:53/udp"])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;

    let server = udp_server(&topo.backend, 53, 3)?;
    let datagram = MTU - 20 - 8;
    udp_exchange(&topo.client, host(5353), 3, datagram)?;
    server.join().expect("udp server thread")?;
    let (up, down) = (payload(300_000, 9), payload(300_000, 10));
    let server = tcp_server(&topo.backend, 80, down.clone())?;
    let got = tcp_exchange(&topo.client, host(8080), up.clone())?;
    let served = server.join().expect("tcp server thread")?;
    assert!(
        served.received == up && got == down,
        "TCP data arrived intact both ways"
    );

    let stats = daemon.stats()?;
    let udp = mapping(&stats, 5353);
    assert_eq!(udp.fwd_packets, 3, "{udp:?}");
    assert_eq!(udp.fwd_bytes, 3 * MTU as u64, "{udp:?}");
    assert_eq!(udp.reply_bytes, 3 * MTU as u64, "{udp:?}");
    assert!(
        counter(&stats, Stat::FwdStack) <= 2,
        "jumbo frames went through the stack: {stats:?}"
    );
    daemon.stop()
}
