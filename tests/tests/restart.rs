//! Restarts, crashes and upgrades of the daemon are invisible to traffic (issue 12): while a TCP
//! stream exchanges a message every 10 ms through a config mapping and a new connection is made
//! every 20 ms through a mapping added at run time (with a dynamic host port), the daemon is
//! stopped and started, killed and started, replaced by another binary, and started with a
//! changed config. The stream never breaks, no new connection fails, both keep going while no
//! daemon runs (each phase waits for messages and connections made in it), `list --json` is the
//! same after each restart, counters keep counting. TC and XDP mode. How long the stream waits
//! across a restart is measured by `cargo xtask bench`. Needs root (run through `cargo xtask
//! test`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use portmap_tests::{
    BackendLink, Daemon, EchoServer, HOST_CLIENT_IFACE, HOST_IP, Mode, Netns, TempDir, Topology, attached,
    mapping_stats, mode_args, portmap_bin, slowdown, wait_for,
};

/// What the stream saw: messages echoed and the longest wait for one (reported, not judged).
struct StreamReport {
    messages: u64,
    longest: Duration,
}

/// Messages the stream exchanged and connections that succeeded so far.
#[derive(Default)]
struct Progress {
    messages: AtomicU64,
    connected: AtomicU64,
}

/// New connections made and those that failed (with why).
struct ConnectReport {
    made: u64,
    failed: Vec<String>,
}

/// Traffic running while the daemon restarts.
struct Load {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    stream: JoinHandle<anyhow::Result<StreamReport>>,
    connects: JoinHandle<anyhow::Result<ConnectReport>>,
}

impl Load {
    fn start(client: &Netns, stream_to: SocketAddr, connect_to: SocketAddr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let (halt, seen) = (stop.clone(), progress.clone());
        let stream = client.spawn(move || {
            let mut s = TcpStream::connect_timeout(&stream_to, slowdown(Duration::from_secs(5)))?;
            s.set_read_timeout(Some(slowdown(Duration::from_secs(5))))?;
            s.set_nodelay(true)?;
            let (mut messages, mut longest) = (0u64, Duration::ZERO);
            let mut buf = [0u8; 64];
            while !halt.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let message = [(messages % 251) as u8; 64];
                s.write_all(&message)
                    .with_context(|| format!("stream: sending message {messages}"))?;
                s.read_exact(&mut buf)
                    .with_context(|| format!("stream: echo of message {messages}"))?;
                ensure!(buf == message, "stream: message {messages} came back changed");
                longest = longest.max(sent.elapsed());
                messages += 1;
                seen.messages.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
            Ok(StreamReport { messages, longest })
        })?;
        let (halt, seen) = (stop.clone(), progress.clone());
        let connects = client.spawn(move || {
            let (mut made, mut failed) = (0u64, Vec::new());
            while !halt.load(Ordering::Relaxed) {
                let attempt = || -> anyhow::Result<()> {
                    let mut s = TcpStream::connect_timeout(&connect_to, slowdown(Duration::from_secs(2)))?;
                    s.set_read_timeout(Some(slowdown(Duration::from_secs(2))))?;
                    s.write_all(b"new")?;
                    let mut buf = [0u8; 3];
                    s.read_exact(&mut buf)?;
                    ensure!(&buf == b"new", "echo changed");
                    Ok(())
                };
                made += 1;
                match attempt() {
                    Ok(()) => _ = seen.connected.fetch_add(1, Ordering::Relaxed),
                    Err(e) => failed.push(format!("connection {made}: {e:#}")),
                }
                thread::sleep(Duration::from_millis(20));
            }
            Ok(ConnectReport { made, failed })
        })?;
        Ok(Self {
            stop,
            progress,
            stream,
            connects,
        })
    }

    /// Waits until the stream has exchanged and the connector has made a few more (the traffic
    /// goes on now, e.g. while no daemon runs).
    fn flowing(&self, now: &str) -> anyhow::Result<()> {
        let count = || {
            (
                self.progress.messages.load(Ordering::Relaxed),
                self.progress.connected.load(Ordering::Relaxed),
            )
        };
        let (messages, connected) = count();
        wait_for(&format!("traffic {now}"), Duration::from_secs(10), || {
            let (m, c) = count();
            Ok(m >= messages + 5 && c >= connected + 3)
        })
    }

    fn finish(self) -> anyhow::Result<(StreamReport, ConnectReport)> {
        self.stop.store(true, Ordering::Relaxed);
        let join = |what: &str| anyhow::anyhow!("{what} thread panicked");
        let stream = self.stream.join().map_err(|_| join("stream"))?;
        let connects = self.connects.join().map_err(|_| join("connect"))?;
        Ok((stream?, connects?))
    }
}

/// The ids of the programs on the client-facing interface's TC egress (both modes have one):
/// tcx links, or cls_bpf filters (`id N` in `tc filter show`).
fn egress_program(ns: &Netns) -> anyhow::Result<Vec<u32>> {
    let mut ids: Vec<u32> =
        ns.run(|| portmap_tests::tcx_program_ids(HOST_CLIENT_IFACE, aya::programs::TcAttachType::Egress))?;
    let filters = ns.exec("tc", &["filter", "show", "dev", HOST_CLIENT_IFACE, "egress"])?;
    let mut words = filters.split_whitespace();
    while let Some(word) = words.next() {
        if word == "id" {
            ids.extend(words.next().and_then(|id| id.parse::<u32>().ok()));
        }
    }
    Ok(ids)
}

/// One exchange with the echo server behind host port 8080.
fn echo_8080(topo: &Topology) -> anyhow::Result<Vec<u8>> {
    portmap_tests::tcp_exchange(&topo.client, SocketAddrV4::new(HOST_IP, 8080), b"x".to_vec())
}

fn restarts_are_invisible(mode: Mode, env: &[(&str, &str)]) -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("restart")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(&config, "mappings = [\"8080:198.18.1.2:80\"]\n")?;
    let mut args = mode_args(&topo, mode)?;
    let config_arg = config.to_str().context("utf-8")?.to_owned();
    args.extend(["--config", &config_arg]);
    let mut daemon = Daemon::start_with_env(&topo.host, &args, env)?;
    if !env.is_empty() {
        let filters = topo
            .host
            .exec("tc", &["filter", "show", "dev", HOST_CLIENT_IFACE, "ingress"])?;
        ensure!(
            filters.contains("portmap_tc_ingress")
                && daemon.log().contains("cls_bpf filters on a clsact qdisc"),
            "not attached as a cls_bpf filter: {filters}"
        );
    }
    // Added at run time, host port from the dynamic range.
    let added = daemon.cli_ok(&["add", "198.18.1.2:81"])?;
    let dynamic: u16 = added
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("dynamic port in {added:?}"))?;
    let _echo80 = EchoServer::start(&topo.backend, 80)?;
    let _echo81 = EchoServer::start(&topo.backend, 81)?;
    let load = Load::start(
        &topo.client,
        SocketAddrV4::new(HOST_IP, 8080).into(),
        SocketAddrV4::new(HOST_IP, dynamic).into(),
    )?;
    load.flowing("through both mappings")?;
    let listed = daemon.cli_ok(&["list", "--json"])?;
    let counted = mapping_stats(&daemon.stats()?, 8080).fwd_packets;
    let programs = egress_program(&topo.host)?;

    // SIGTERM, traffic without a daemon, start.
    daemon.stop()?;
    load.flowing("after SIGTERM, with no daemon")?;
    daemon.restart(&topo.host, &args)?;
    ensure!(
        daemon.cli_ok(&["list", "--json"])? == listed,
        "list --json changed across SIGTERM + start"
    );
    let after = mapping_stats(&daemon.stats()?, 8080).fwd_packets;
    ensure!(
        after > counted,
        "counters restarted: {after} after, {counted} before"
    );
    let replaced = egress_program(&topo.host)?;
    ensure!(
        replaced.len() == 1 && replaced != programs,
        "the new daemon's program replaces the old one in the link: {programs:?} then {replaced:?}"
    );

    // A crash.
    daemon.kill()?;
    load.flowing("after SIGKILL, with no daemon")?;
    daemon.restart(&topo.host, &args)?;
    ensure!(
        daemon.cli_ok(&["list", "--json"])? == listed,
        "list --json changed across kill -9 + start"
    );

    // An upgrade: another binary file (a copy of this build) adopts the datapath.
    daemon.stop()?;
    let upgraded = dir.path().join("portmap-upgraded");
    std::fs::copy(portmap_bin()?, &upgraded)?;
    daemon.upgrade(&topo.host, upgraded, &args)?;
    ensure!(
        daemon.cli_ok(&["list", "--json"])? == listed,
        "list --json changed across an upgrade"
    );

    // The config changed while no daemon ran: applied as one diff at start, the runtime
    // mapping stays.
    daemon.stop()?;
    std::fs::write(
        &config,
        "mappings = [\"8080:198.18.1.2:80\", \"8081:198.18.1.2:81\"]\n",
    )?;
    daemon.restart(&topo.host, &args)?;
    let list = daemon.cli_ok(&["list"])?;
    ensure!(
        list == format!(
            "198.18.1.2:80/tcp -> 0.0.0.0:8080  config\n198.18.1.2:81/tcp -> 0.0.0.0:{dynamic}  cli\n198.18.1.2:81/tcp -> 0.0.0.0:8081  config\n"
        ),
        "after a changed config: {list}"
    );
    ensure!(
        daemon
            .log()
            .contains("config: 1 mapping(s) added, 0 updated, 0 removed"),
        "{}",
        daemon.log()
    );
    let via_new = portmap_tests::tcp_connect_result(&topo.client, SocketAddrV4::new(HOST_IP, 8081))?;
    ensure!(
        via_new.is_ok(),
        "the mapping added by the changed config: {via_new:?}; counters {:?}",
        daemon.stats()?.counters
    );

    load.flowing("after the last start")?;
    let (stream, connects) = load.finish()?;
    ensure!(
        connects.failed.is_empty(),
        "{} of {} new connections failed: {:?}",
        connects.failed.len(),
        connects.made,
        connects.failed
    );
    println!(
        "{mode:?}: {} messages (longest wait {:?}), {} new connections, none failed",
        stream.messages, stream.longest, connects.made
    );
    daemon.stop()?;
    let cleaned = daemon.cleanup()?;
    ensure!(
        portmap_tests::attached(&topo.host, HOST_CLIENT_IFACE)? == (0, 0, false),
        "programs left after cleanup ({cleaned})"
    );
    Ok(())
}

#[test]
fn restart_crash_and_upgrade_are_invisible_in_tc_mode() -> anyhow::Result<()> {
    restarts_are_invisible(Mode::Tc, &[])
}

/// Kernels without tcx (< 6.6): TC programs are cls_bpf filters on a clsact qdisc, which a new
/// daemon finds by priority and handle and gives its program in place (forced here on a newer
/// kernel; `cargo xtask vmtest` runs the lifecycle on 6.1, where it is the only way).
#[test]
fn restart_crash_and_upgrade_are_invisible_with_clsact_filters() -> anyhow::Result<()> {
    restarts_are_invisible(Mode::Tc, &[(portmap::datapath::kernel::FORCE_NETLINK_ENV, "1")])
}

#[test]
fn restart_crash_and_upgrade_are_invisible_in_xdp_mode() -> anyhow::Result<()> {
    restarts_are_invisible(Mode::Xdp, &[])
}

/// Pinned maps of another layout are refused at start with a message that names `portmap
/// cleanup`, and the datapath they belong to keeps forwarding: a stamp of another layout
/// version, and a map of another size (a changed `[limits]` value). After `portmap cleanup` the
/// daemon starts afresh.
#[test]
fn another_map_layout_is_refused_naming_cleanup() -> anyhow::Result<()> {
    use aya::maps::{Array, Map, MapData};
    use portmap_common::{DatapathStamp, LAYOUT_VERSION, map_names};

    let topo = Topology::new(BackendLink::Veth)?;
    let args = mode_args(&topo, Mode::Tc)?;
    let mut daemon = Daemon::start(&topo.host, &args)?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let reaches = || echo_8080(&topo);
    daemon.stop()?;

    // A daemon started with a bigger flow table: PM_CONNTRACK has another size.
    let mut bigger = args.clone();
    let dir = TempDir::new("layout")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(&config, "[limits]\nconntrack_entries = 524288\n")?;
    let config_arg = config.to_str().context("utf-8")?.to_owned();
    bigger.extend(["--config", &config_arg]);
    let err = format!(
        "{:#}",
        daemon.restart(&topo.host, &bigger).err().context("started")?
    );
    ensure!(
        err.contains("PM_CONNTRACK") && err.contains("[limits]") && err.contains("portmap cleanup"),
        "{err}"
    );
    ensure!(reaches()? == b"x", "the old datapath keeps forwarding");

    // Maps stamped with another layout version.
    let stamp_pin = daemon.pin_dir.join("maps").join(map_names::META);
    let mut stamp: Array<_, DatapathStamp> = Array::try_from(Map::Array(MapData::from_pin(&stamp_pin)?))?;
    let old = stamp.get(&0, 0)?;
    stamp.set(
        0,
        DatapathStamp {
            layout_version: LAYOUT_VERSION + 1,
            ..old
        },
        0,
    )?;
    drop(stamp);
    let err = format!(
        "{:#}",
        daemon.restart(&topo.host, &args).err().context("started")?
    );
    ensure!(
        err.contains(&format!("layout version {}", LAYOUT_VERSION + 1)) && err.contains("portmap cleanup"),
        "{err}"
    );
    ensure!(reaches()? == b"x", "the old datapath keeps forwarding");

    daemon.cleanup()?;
    daemon.restart(&topo.host, &args)?;
    ensure!(
        daemon.cli_ok(&["list"])?.is_empty(),
        "a fresh start has no mappings"
    );
    daemon.stop()
}

/// What changed while no daemon ran is followed at start: a client-facing interface deleted and
/// created again (its old links are defunct: attached anew) and another attach mode (the old
/// ingress link is removed, the new one attached): one program per hook, traffic flows.
#[test]
fn a_restart_follows_interfaces_and_modes_changed_meanwhile() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let tc = mode_args(&topo, Mode::Tc)?;
    let mut daemon = Daemon::start(&topo.host, &tc)?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let reaches = || echo_8080(&topo);

    // The interface goes and comes back while no daemon runs.
    daemon.stop()?;
    topo.host.ip(&["link", "del", HOST_CLIENT_IFACE])?;
    topo.connect_client()?;
    ensure!(
        attached(&topo.host, HOST_CLIENT_IFACE)? == (0, 0, false),
        "a new device has no program"
    );
    daemon.restart(&topo.host, &tc)?;
    ensure!(
        attached(&topo.host, HOST_CLIENT_IFACE)? == (1, 1, false),
        "attached anew"
    );
    ensure!(reaches()? == b"x", "through the new device");

    // Another attach mode: XDP ingress replaces TC ingress.
    daemon.stop()?;
    let xdp = mode_args(&topo, Mode::Xdp)?;
    daemon.restart(&topo.host, &xdp)?;
    ensure!(
        attached(&topo.host, HOST_CLIENT_IFACE)? == (0, 1, true),
        "XDP ingress, TC egress only"
    );
    ensure!(reaches()? == b"x", "in XDP mode");
    ensure!(
        daemon.cli_ok(&["list"])? == "198.18.1.2:80/tcp -> 0.0.0.0:8080  cli\n",
        "the mapping was kept"
    );
    daemon.stop()
}
