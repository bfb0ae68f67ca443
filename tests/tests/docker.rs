//! Real Docker Engine followed by the daemon (issue 24, `--docker`): `docker run -p` and `-P`
//! published by portmap and reached by a wire client (the datapath's counters) and a host process
//! (the socket hooks' counters); `docker stop` / `start` / `rm` followed; dockerd's reservation
//! of a container's port is no conflict; a port the CLI published first stays the CLI's;
//! portmap's own dynamic ports are not handed out by dockerd's `-P`; portmap restarted while
//! containers come and go; dockerd restarted; `docker-compose up -d` / `down`; with Docker's
//! iptables rules (DNAT bypassed, masquerade of the bridge subnet present) and without any.
//! Needs root, dockerd and docker-compose (run through `cargo xtask test`).

use std::time::Duration;

use anyhow::{Context as _, ensure};
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, DOCKER_IMAGE, Daemon, Dockerd, DockerdOptions, Mode, Topology, counter, mode_args, probe,
    start_daemon, wait_for,
};
use serde_json::Value;

/// Docker's default: its NAT, firewall and masquerade rules (with `userland-proxy: false`).
const WITH_IPTABLES: DockerdOptions = DockerdOptions {
    iptables: true,
    ipv6: false,
    outside_daemon_cgroup: false,
};

/// How long the follower may take to publish or unpublish after a docker command returns.
const FOLLOW: Duration = Duration::from_secs(10);

/// A TCP exchange reached busybox httpd (which answers the probe's line with an HTTP error: it is
/// the container that answered).
fn reaches_httpd(reply: &Value) -> bool {
    reply["ok"] == true
        && reply["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.1 400"))
}

/// A daemon following a private dockerd (in the daemon's cgroup) on a veth topology.
struct Setup {
    // Dropped in this order: containers and dockerd, then the daemon, then the namespaces.
    docker: Dockerd,
    daemon: Daemon,
    topo: Topology,
    args: Vec<String>,
}

impl Setup {
    fn new(mode: Mode, options: DockerdOptions) -> anyhow::Result<Self> {
        let topo = Topology::new(BackendLink::Veth)?;
        if options.ipv6 {
            topo.enable_ipv6()?;
        }
        let mut daemon = start_daemon(&topo, mode, &[])?;
        let docker = Dockerd::start(&topo.host, &daemon.cgroup, options)?;
        daemon.stop()?;
        let mut args: Vec<String> = mode_args(&topo, mode)?.into_iter().map(String::from).collect();
        args.extend(["--docker".to_owned(), docker.url()]);
        let mut setup = Self {
            docker,
            daemon,
            topo,
            args,
        };
        setup.start_daemon()?;
        Ok(setup)
    }

    fn start_daemon(&mut self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon.restart(&self.topo.host, &args)?;
        wait_for("the daemon to connect to dockerd", FOLLOW, || {
            Ok(self.daemon.stats()?.docker.is_some_and(|d| d.connected))
        })
        .with_context(|| self.daemon.log())
    }

    /// `docker run -d ARGS` (httpd on 8000 unless ARGS say otherwise); the container's ID.
    fn run(&self, name: &str, publish: &[&str]) -> anyhow::Result<String> {
        let head = ["run", "-d", "--name", name];
        let tail = [DOCKER_IMAGE, "httpd", "-f", "-p", "8000", "-h", "/"];
        self.docker.ok(&[&head[..], publish, &tail].concat())
    }

    fn list(&self) -> anyhow::Result<String> {
        self.daemon.cli_ok(&["list"])
    }

    /// Waits until `portmap list` satisfies `check`.
    fn wait_list(&self, what: &str, check: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        wait_for(what, FOLLOW, || Ok(check(&self.list()?)))
            .with_context(|| format!("list: {}\n{}", self.list().unwrap_or_default(), self.daemon.log()))?;
        self.list()
    }

    /// A host process in the daemon's cgroup.
    fn hooked(&self, args: &[&str]) -> anyhow::Result<Value> {
        probe(&self.topo.host, Some(&self.daemon.cgroup), args)
    }

    /// A wire client reaches httpd at the host's address and port, through the datapath.
    fn wire_reaches(&self, port: u16) -> anyhow::Result<()> {
        self.wire_reaches_at("198.18.0.1", port)
    }

    fn wire_reaches_at(&self, host: &str, port: u16) -> anyhow::Result<()> {
        let before = self.forwarded(port)?;
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let r = probe(&self.topo.client, None, &["tcp", &addr])?;
        ensure!(reaches_httpd(&r), "wire client -> {addr}: {r}");
        ensure!(
            self.forwarded(port)? > before,
            "the datapath did not count the connection to {port}"
        );
        Ok(())
    }

    /// Packets forwarded by the mappings of `port` (both families).
    fn forwarded(&self, port: u16) -> anyhow::Result<u64> {
        Ok(self
            .daemon
            .stats()?
            .mappings
            .iter()
            .filter(|m| m.mapping.host_ports.is_some_and(|r| r.contains(port)))
            .map(|m| m.counters.fwd_packets)
            .sum())
    }

    /// A host process reaches httpd at `addr`, through the socket hooks.
    fn host_reaches(&self, addr: &str) -> anyhow::Result<()> {
        let before = counter(&self.daemon.stats()?, Stat::SockTranslated);
        let r = self.hooked(&["tcp", addr])?;
        ensure!(reaches_httpd(&r), "host process -> {addr}: {r}");
        ensure!(
            counter(&self.daemon.stats()?, Stat::SockTranslated) > before,
            "the socket hooks did not translate the connection to {addr}"
        );
        Ok(())
    }
}

/// The port `docker port NAME PORT` shows on 0.0.0.0.
fn docker_port(docker: &Dockerd, name: &str, port: &str) -> anyhow::Result<u16> {
    let out = docker.ok(&["port", name, port])?;
    out.lines()
        .find_map(|l| l.strip_prefix("0.0.0.0:"))
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("docker port {name} {port}: {out}"))
}

fn run_publish_follow(mode: Mode, iptables: bool) -> anyhow::Result<()> {
    let s = Setup::new(
        mode,
        DockerdOptions {
            iptables,
            ..DockerdOptions::default()
        },
    )?;
    let id = s.run("web", &["-p", "8080:8000"])?;
    let listed = s.wait_list("docker run -p published", |l| l.contains("-> 0.0.0.0:8080"))?;
    ensure!(
        listed.contains(&format!("docker/web/{}", &id[..12])) && listed.contains(":8000/tcp"),
        "list names the container: {listed}"
    );
    ensure!(
        s.daemon.cli_ok(&["list", "--owner", "web"])? == listed
            && s.daemon.cli_ok(&["list", "--owner", &id[..8]])? == listed,
        "list --owner NAME / ID"
    );
    s.wire_reaches(8080)?;
    s.host_reaches("127.0.0.1:8080")?;
    s.host_reaches("198.18.0.1:8080")?;
    ensure!(
        counter(&s.daemon.stats()?, Stat::SockBindRefused) == 0,
        "dockerd's reservation was refused: {}",
        s.daemon.log()
    );
    if iptables {
        // Docker's masquerade of its bridge subnet is there, and the replies got past it.
        let nat = s
            .topo
            .host
            .exec("iptables", &["-t", "nat", "-S", "POSTROUTING"])?;
        ensure!(
            nat.contains("198.18.60.0/24") && nat.contains("MASQUERADE"),
            "{nat}"
        );
        ensure!(
            counter(&s.daemon.stats()?, Stat::ReplyRedirect) > 0,
            "replies not sent from the veth"
        );
    }

    // stop unpublishes, start publishes again, rm unpublishes.
    s.docker.ok(&["stop", "-t", "0", "web"])?;
    s.wait_list("docker stop unpublished", |l| !l.contains(":8080"))?;
    s.docker.ok(&["start", "web"])?;
    s.wait_list("docker start published", |l| l.contains(":8080"))?;
    s.wire_reaches(8080)?;
    if iptables {
        // portmap removed (`portmap cleanup`): Docker's own rules carry the port again.
        let mut s = s;
        s.daemon.stop()?;
        s.daemon.cleanup()?;
        let r = probe(&s.topo.client, None, &["tcp", "198.18.0.1:8080"])?;
        ensure!(
            reaches_httpd(&r),
            "after portmap cleanup, through Docker's DNAT: {r}"
        );
        ensure!(
            docker_dnat_packets(&s, 8080)? > 0,
            "Docker's DNAT rule took no packet (something of portmap's still forwards): {}",
            s.topo.host.exec("iptables", &["-t", "nat", "-L", "-nvx"])?,
        );
        return Ok(());
    }
    s.docker.ok(&["rm", "-f", "web"])?;
    s.wait_list("docker rm unpublished", str::is_empty)?;
    Ok(())
}

/// Packets that took Docker's DNAT rule for `port` (its `DOCKER` chain in the nat table).
fn docker_dnat_packets(s: &Setup, port: u16) -> anyhow::Result<u64> {
    let rules = s
        .topo
        .host
        .exec("iptables", &["-t", "nat", "-L", "DOCKER", "-nvx"])?;
    rules
        .lines()
        .find(|l| l.contains("DNAT") && l.contains(&format!("dpt:{port}")))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no DNAT rule for {port} in Docker's chain:\n{rules}"))
}

#[test]
fn docker_run_p_is_published_and_followed_without_docker_iptables_tc() -> anyhow::Result<()> {
    run_publish_follow(Mode::Tc, false)
}

#[test]
fn docker_run_p_is_published_and_followed_with_docker_iptables_xdp() -> anyhow::Result<()> {
    run_publish_follow(Mode::Xdp, true)
}

/// `-P`, a loopback-only binding, UDP and a range, as `docker port` lists them; the port of a
/// mapping the CLI published first stays the CLI's; portmap's own dynamic port is not what `-P`
/// picks.
#[test]
fn docker_bindings_as_docker_means_them() -> anyhow::Result<()> {
    let s = Setup::new(Mode::Tc, WITH_IPTABLES)?;
    // The first port of the range dockerd's -P takes from, published by portmap first.
    let range = s
        .topo
        .host
        .exec("cat", &["/proc/sys/net/ipv4/ip_local_port_range"])?;
    let first: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .context("ip_local_port_range")?;
    let added = s.daemon.cli_ok(&["add", "198.18.1.2:80"])?;
    ensure!(
        added.contains(&format!(":{first}")),
        "portmap's dynamic port: {added}"
    );

    s.run("auto", &["--expose", "8000", "-P"])?;
    s.run(
        "more",
        &["-p", "127.0.0.1:9090:8000", "-p", "7000-7001:7000-7001/udp"],
    )?;
    let auto = docker_port(&s.docker, "auto", "8000/tcp")?;
    // dockerd's allocator tried portmap's port first: the bind hook refused dockerd's bind of
    // it (dockerd is in the daemon's cgroup, as every process is with `cgroup = "/"`), and
    // dockerd moved on to the next port, as it does when a port is in use.
    ensure!(auto != first, "docker -P took portmap's port {first}");
    ensure!(
        counter(&s.daemon.stats()?, Stat::SockBindRefused) > 0,
        "dockerd's bind of {first} was not refused by the bind hook"
    );
    let listed = s.wait_list("-P published", |l| l.contains(&format!("0.0.0.0:{auto}")))?;
    for line in [
        "198.18.60.3:8000/tcp -> 127.0.0.1:9090",
        "198.18.60.3:7000/udp -> 0.0.0.0:7000",
        "198.18.60.3:7001/udp -> 0.0.0.0:7001",
    ] {
        ensure!(listed.contains(line), "{line} missing: {listed}");
    }
    s.wire_reaches(auto)?;
    s.host_reaches(&format!("127.0.0.1:{auto}"))?;
    s.host_reaches("127.0.0.1:9090")?;
    // Loopback-only: not published to the wire.
    let r = probe(&s.topo.client, None, &["tcp", "198.18.0.1:9090"])?;
    ensure!(!reaches_httpd(&r), "the wire reached a 127.0.0.1 binding: {r}");

    // A port the CLI published first stays the CLI's: dockerd's bind of it is refused, so
    // `docker run` itself says the port is taken.
    s.daemon.cli_ok(&["add", "8181:198.18.1.2:80"])?;
    let refused = s.docker.output(&[
        "run",
        "-d",
        "--name",
        "late",
        "-p",
        "8181:8000",
        DOCKER_IMAGE,
        "httpd",
        "-f",
        "-p",
        "8000",
    ])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("0.0.0.0:8181: bind: operation not permitted"),
        "docker run -p 8181 beside the CLI's mapping: {stderr}"
    );
    ensure!(
        s.daemon
            .cli_ok(&["list", "--owner", "cli"])?
            .contains("-> 0.0.0.0:8181"),
        "the CLI's mapping changed"
    );
    Ok(())
}

/// With a dockerd that the socket hooks do not serve (outside the daemon's cgroup), a port the
/// CLI published first is refused to the container with both owners named, and published to it
/// once the CLI's mapping goes.
#[test]
fn docker_port_published_first_by_another_owner_stays_theirs() -> anyhow::Result<()> {
    let s = Setup::new(
        Mode::Tc,
        DockerdOptions {
            outside_daemon_cgroup: true,
            ..DockerdOptions::default()
        },
    )?;
    s.daemon.cli_ok(&["add", "8181:198.18.1.2:80"])?;
    s.run("late", &["-p", "8181:8000"])?;
    wait_for("the refusal logged", FOLLOW, || {
        let log = s.daemon.log();
        Ok(log.contains("container late (")
            && log.contains("published already by")
            && log.contains("owner cli"))
    })
    .with_context(|| s.daemon.log())?;
    ensure!(
        !s.list()?.contains("docker/late/"),
        "the container took the CLI's port: {}",
        s.list()?
    );
    s.daemon.cli_ok(&["del", "8181:198.18.1.2:80"])?;
    s.wait_list("the container takes the freed port", |l| {
        l.contains("docker/late/")
    })?;
    s.wire_reaches(8181)?;
    Ok(())
}

/// portmap restarted while containers come and go: one removed and one started meanwhile are
/// reconciled at the next start; dockerd restarted: its containers (restart policy) come back
/// published at their new addresses.
#[test]
fn docker_restarts_of_either_daemon_are_reconciled() -> anyhow::Result<()> {
    let mut s = Setup::new(Mode::Tc, DockerdOptions::default())?;
    s.run("old", &["-p", "8080:8000"])?;
    s.wait_list("old published", |l| l.contains(":8080"))?;
    s.daemon.stop()?;
    s.docker.ok(&["rm", "-f", "old"])?;
    s.run("new", &["-p", "8081:8000", "--restart", "always"])?;
    s.start_daemon()?;
    let listed = s.list()?;
    ensure!(
        !listed.contains(":8080") && listed.contains("docker/new/") && listed.contains(":8081"),
        "after the restart: {listed}"
    );
    s.wire_reaches(8081)?;

    s.docker.restart()?;
    s.wait_list("dockerd restarted: new published again", |l| l.contains(":8081"))?;
    wait_for("the follower to reconnect", FOLLOW, || {
        Ok(s.daemon.stats()?.docker.is_some_and(|d| d.connected))
    })?;
    s.wire_reaches(8081)?;
    // dockerd gone: the daemon says so and keeps forwarding what it has.
    s.docker.stop()?;
    wait_for("the follower to notice", FOLLOW, || {
        Ok(s.daemon.stats()?.docker.is_some_and(|d| !d.connected))
    })?;
    let metrics = s.daemon.cli_ok(&["stats"])?;
    ensure!(metrics.contains("DISCONNECTED"), "{metrics}");
    Ok(())
}

/// The seed's example: a compose file with one service and `ports: - 9999:8000` on its own project
/// network; `docker-compose up -d` publishes through portmap, `down` unpublishes.
#[test]
fn docker_compose_up_publishes_through_portmap_and_down_unpublishes() -> anyhow::Result<()> {
    let s = Setup::new(Mode::Tc, WITH_IPTABLES)?;
    let project = s.docker.dir().join("web");
    std::fs::create_dir(&project)?;
    std::fs::write(
        project.join("compose.yml"),
        format!(
            "services:\n  web:\n    image: {DOCKER_IMAGE}\n    command: httpd -f -p 8000 -h /\n    ports:\n      - 9999:8000\n"
        ),
    )?;
    let compose = |args: &[&str]| -> anyhow::Result<()> {
        let out = s
            .docker
            .command("docker-compose", args)
            .current_dir(&project)
            .output()
            .context("docker-compose (package docker-compose; `cargo xtask setup` installs it)")?;
        ensure!(
            out.status.success(),
            "docker-compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    compose(&["up", "-d"])?;
    s.wait_list("compose up published", |l| {
        l.contains("-> 0.0.0.0:9999  docker/web_web_1/")
    })?;
    s.wire_reaches(9999)?;
    s.host_reaches("127.0.0.1:9999")?;
    compose(&["down"])?;
    s.wait_list("compose down unpublished", str::is_empty)?;
    Ok(())
}

/// A dual-stack container: `docker port` lists 0.0.0.0 and ::, portmap publishes both, each to
/// the container's address of that family; wire clients reach it over IPv4 and IPv6.
#[test]
fn docker_dual_stack_bindings_publish_both_families() -> anyhow::Result<()> {
    let s = Setup::new(
        Mode::Tc,
        DockerdOptions {
            ipv6: true,
            ..DockerdOptions::default()
        },
    )?;
    s.run("web", &["-p", "8080:8000"])?;
    let ports = s.docker.ok(&["port", "web", "8000/tcp"])?;
    ensure!(
        ports.contains("0.0.0.0:8080") && (ports.contains("[::]:8080") || ports.contains(":::8080")),
        "docker port: {ports}"
    );
    let listed = s.wait_list("both families published", |l| {
        l.contains("-> 0.0.0.0:8080") && l.contains("-> [::]:8080")
    })?;
    ensure!(
        listed.contains("[fd00:60::"),
        "the IPv6 mapping's backend: {listed}"
    );
    s.wire_reaches_at("198.18.0.1", 8080)?;
    s.wire_reaches_at("fd00::1", 8080)?;
    s.host_reaches("[::1]:8080")?;
    Ok(())
}

/// The `portmap.allow` label (issue 27): a container's ports admit new flows only from its
/// prefixes, each family's mapping taking its own; a binding of a family the label names no
/// prefix of is not published (rather than published to everyone); `list` shows the lists.
#[test]
fn docker_allow_label_restricts_the_containers_ports() -> anyhow::Result<()> {
    let s = Setup::new(
        Mode::Tc,
        DockerdOptions {
            ipv6: true,
            ..WITH_IPTABLES
        },
    )?;
    s.run(
        "inside",
        &["-p", "8080:8000", "--label", "portmap.allow=198.18.0.0/24"],
    )?;
    s.run(
        "outside",
        &[
            "-p",
            "8081:8000",
            "--label",
            "portmap.allow=198.18.9.0/24,fd00:9::/64",
        ],
    )?;
    let listed = s.wait_list("the labelled containers published", |l| {
        l.contains("-> 0.0.0.0:8080") && l.contains("-> 0.0.0.0:8081") && l.contains("-> [::]:8081")
    })?;
    ensure!(
        !listed.contains("-> [::]:8080"),
        "a family the label does not name was published: {listed}"
    );
    ensure!(
        listed
            .lines()
            .any(|l| l.contains("-> 0.0.0.0:8080") && l.ends_with("allow 198.18.0.0/24"))
            && listed
                .lines()
                .any(|l| l.contains("-> [::]:8081") && l.ends_with("allow fd00:9::/64")),
        "list: {listed}"
    );
    ensure!(
        s.daemon
            .log()
            .contains("the allow-list names no prefix of their family"),
        "no warning about the unpublished binding: {}",
        s.daemon.log()
    );
    s.wire_reaches(8080)?;
    let r = probe(&s.topo.client, None, &["tcp", "198.18.0.1:8081"])?;
    ensure!(
        r["ok"] == false && r["error"] == "TimedOut",
        "wire client outside the label's list: {r}"
    );
    let stats = s.daemon.stats()?;
    let denied = stats
        .mapping_on_port(8081)
        .map(|m| m.drop_denied)
        .unwrap_or_default();
    ensure!(
        denied > 0 && counter(&stats, Stat::DropDenied) == denied,
        "drop_denied: {stats:?}"
    );
    Ok(())
}
