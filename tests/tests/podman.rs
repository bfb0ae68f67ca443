//! Real podman through portmap-cni (issue 23): the daemon chains its plugin into the network
//! `podman network create` writes (`--cni-conf-dir`), `podman run -p` publishes through it
//! (conmon's reservation of the port is not refused, and refuses other binds), host processes
//! reach the container at 127.0.0.1, [::1] and the host's address, other containers and the
//! container itself (hairpin) at the host's address, a wire client past the network's masquerade
//! rule, `list` names the container,
//! `podman stop` / `start` / `rm` follow, and a container removed while no daemon runs loses its
//! port at the next start. Needs root and podman (run through `cargo xtask test`).

use std::time::Duration;

use anyhow::{Context as _, ensure};
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, Daemon, Mode, PODMAN_IMAGE, Podman, Topology, counter, mode_args, probe, start_daemon,
    wait_for,
};
use serde_json::Value;

const EADDRINUSE: i64 = 98;

/// A TCP exchange from a host process in the daemon's cgroup reaches busybox httpd (which
/// answers the probe's line with an HTTP error: it is the container that answered).
fn reaches_httpd(reply: &Value) -> bool {
    reply["ok"] == true
        && reply["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.1 400"))
}

/// A host process in the daemon's cgroup.
fn hooked(topo: &Topology, daemon: &Daemon, args: &[&str]) -> anyhow::Result<Value> {
    probe(&topo.host, Some(&daemon.cgroup), args)
}

#[test]
fn podman_run_publishes_through_portmap_and_its_lifecycle_follows() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    // The daemon's cgroup is where podman and its conmon run (see `Podman`).
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    let podman = Podman::new(&topo.host, &daemon.cgroup)?;
    let conf_dir = podman.conf_dir.to_str().context("utf-8")?.to_owned();
    daemon.stop()?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    args.extend(["--cni-conf-dir", &conf_dir]);
    daemon.restart(&topo.host, &args)?;

    podman.ok(&["network", "create", "pmnet", "--subnet", "198.18.71.0/24"])?;
    let conflist = podman.conf_dir.join("pmnet.conflist");
    wait_for(
        "the daemon to chain the new network",
        Duration::from_secs(10),
        || Ok(std::fs::read_to_string(&conflist)?.contains("\"portmap-cni\"")),
    )?;

    let run = |name: &str| {
        podman.run(&[
            "--name",
            name,
            "--network",
            "pmnet",
            "-p",
            "9999:8000",
            PODMAN_IMAGE,
            "httpd",
            "-f",
            "-p",
            "8000",
            "-h",
            "/",
        ])
    };
    let id = run("web")?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.lines().count() == 1
            && listed.contains("-> 0.0.0.0:9999  pmnet/")
            && listed.contains(&id[..12]),
        "list after podman run: {listed}"
    );
    ensure!(
        daemon.cli_ok(&["list", "--owner", &id[..12]])? == listed,
        "list --owner ID"
    );
    for addr in ["127.0.0.1:9999", "[::1]:9999", "198.18.0.1:9999"] {
        let r = hooked(&topo, &daemon, &["tcp", addr])?;
        ensure!(reaches_httpd(&r), "host process -> {addr}: {r}");
    }
    // Other containers reach it at the host's address, and so does the container itself
    // (hairpin): the socket hooks serve them in their own network namespaces.
    let nc = ["sh", "-c", "echo GET / | timeout 10 nc 198.18.0.1 9999"];
    let other = podman.run_once(&[&["--network", "pmnet", PODMAN_IMAGE][..], &nc].concat())?;
    ensure!(
        other.starts_with("HTTP/1.1 400"),
        "another container -> 198.18.0.1:9999: {other:?}"
    );
    let itself = podman.ok(&[&["exec", "web"][..], &nc].concat())?;
    ensure!(
        itself.starts_with("HTTP/1.1 400"),
        "the container itself -> 198.18.0.1:9999: {itself:?}"
    );
    // A wire client (through TC on h0): the container's replies leave its veth for the client
    // past the masquerade rule the network's bridge plugin installed (ipMasq).
    let nat = topo.host.exec("iptables", &["-t", "nat", "-S", "POSTROUTING"])?;
    ensure!(
        nat.contains("CNI-"),
        "no masquerade chain of podman's network: {nat}"
    );
    let r = probe(&topo.client, None, &["tcp", "198.18.0.1:9999"])?;
    ensure!(reaches_httpd(&r), "wire client -> 198.18.0.1:9999: {r}");
    ensure!(
        counter(&daemon.stats()?, Stat::ReplyRedirect) > 0,
        "no reply sent from the container's veth"
    );
    // conmon holds the port (its reservation was not refused) and refuses other binds.
    let r = hooked(&topo, &daemon, &["bind", "tcp", "0.0.0.0:9999"])?;
    ensure!(r["errno"] == EADDRINUSE, "another bind of 9999: {r}");
    ensure!(
        counter(&daemon.stats()?, Stat::SockBindRefused) == 0,
        "a bind was refused: {}",
        daemon.log()
    );

    // stop unpublishes (CNI DEL), start publishes again (CNI ADD, a new address maybe).
    podman.ok(&["stop", "-t", "0", "web"])?;
    ensure!(
        daemon.cli_ok(&["list"])?.is_empty(),
        "published after podman stop"
    );
    podman.ok(&["start", "web"])?;
    let r = hooked(&topo, &daemon, &["tcp", "127.0.0.1:9999"])?;
    ensure!(reaches_httpd(&r), "after podman start: {r}");

    // Removed while no daemon runs: unpublished at the next start, and the port is free again.
    daemon.stop()?;
    podman.ok(&["rm", "-f", "-t", "0", "web"])?;
    daemon.restart(&topo.host, &args)?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.is_empty(),
        "after podman rm with no daemon and a start: {listed}"
    );
    let again = run("web2")?;
    ensure!(
        daemon.cli_ok(&["list", "--owner", &again[..12]])?.lines().count() == 1,
        "a new container takes the port"
    );
    let r = hooked(&topo, &daemon, &["tcp", "127.0.0.1:9999"])?;
    ensure!(reaches_httpd(&r), "the new container: {r}");
    podman.ok(&["rm", "-f", "-t", "0", "web2"])?;
    ensure!(daemon.cli_ok(&["list"])?.is_empty(), "after podman rm");
    drop(podman);
    daemon.stop()
}

/// The seed's example: a compose file with one service and `ports: - 9999:8000`; `podman-compose
/// up -d` creates the project's network (chained by the daemon as it appears) and publishes
/// through portmap; `podman-compose down` unpublishes.
#[test]
fn podman_compose_up_publishes_through_portmap_and_down_unpublishes() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    let podman = Podman::new(&topo.host, &daemon.cgroup)?;
    let conf_dir = podman.conf_dir.to_str().context("utf-8")?.to_owned();
    daemon.stop()?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    args.extend(["--cni-conf-dir", &conf_dir]);
    daemon.restart(&topo.host, &args)?;
    let project = podman.dir().join("web");
    std::fs::create_dir(&project)?;
    std::fs::write(
        project.join("compose.yml"),
        format!(
            "services:\n  web:\n    image: {PODMAN_IMAGE}\n    command: httpd -f -p 8000 -h /\n    ports:\n      - 9999:8000\n"
        ),
    )?;
    let compose = |args: &[&str]| -> anyhow::Result<String> {
        let out = podman
            .command("podman-compose", args)
            .current_dir(&project)
            .output()
            .context("podman-compose (package podman-compose; `cargo xtask setup` installs it)")?;
        ensure!(
            out.status.success(),
            "podman-compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    compose(&["up", "-d"])?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.lines().count() == 1 && listed.contains("-> 0.0.0.0:9999  web_default/"),
        "list after podman-compose up: {listed}\n{}",
        daemon.log()
    );
    let r = hooked(&topo, &daemon, &["tcp", "127.0.0.1:9999"])?;
    ensure!(reaches_httpd(&r), "host process -> 127.0.0.1:9999: {r}");
    compose(&["down"])?;
    ensure!(
        daemon.cli_ok(&["list"])?.is_empty(),
        "published after podman-compose down"
    );
    drop(podman);
    daemon.stop()
}

/// The network's `allow` on portmap-cni's entry (issue 27): its containers' ports admit new
/// flows only from the list — a wire client outside it is dropped, a host process judged by
/// its address — `list` shows the list, the daemon's re-chaining keeps the key, and a bad prefix
/// fails `podman run` with the network and the prefix named.
#[test]
fn podman_network_allow_restricts_its_containers_ports() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    let podman = Podman::new(&topo.host, &daemon.cgroup)?;
    let conf_dir = podman.conf_dir.to_str().context("utf-8")?.to_owned();
    daemon.stop()?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    args.extend(["--cni-conf-dir", &conf_dir]);
    daemon.restart(&topo.host, &args)?;
    podman.ok(&["network", "create", "pmallow", "--subnet", "198.18.72.0/24"])?;
    let conflist = podman.conf_dir.join("pmallow.conflist");
    wait_for(
        "the daemon to chain the new network",
        Duration::from_secs(10),
        || Ok(std::fs::read_to_string(&conflist)?.contains("\"portmap-cni\"")),
    )?;
    let set_allow = |allow: &[&str]| -> anyhow::Result<()> {
        let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&conflist)?)?;
        let plugins = value["plugins"].as_array_mut().context("plugins")?;
        let entry = plugins
            .iter_mut()
            .find(|p| p["type"] == "portmap-cni")
            .context("no portmap-cni entry")?;
        entry["allow"] = serde_json::json!(allow);
        std::fs::write(&conflist, serde_json::to_string_pretty(&value)?)?;
        Ok(())
    };
    let run = |name: &str, port: &str| {
        podman.output(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "pmallow",
            "-p",
            port,
            PODMAN_IMAGE,
            "httpd",
            "-f",
            "-p",
            "8000",
            "-h",
            "/",
        ])
    };

    set_allow(&["198.18.1.1/24"])?;
    let bad = run("bad", "9997:8000")?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        !bad.status.success() && stderr.contains("network pmallow: allow 198.18.1.1/24 has host bits set"),
        "podman run with a bad allow: {stderr}"
    );
    ensure!(
        daemon.cli_ok(&["list"])?.is_empty(),
        "published despite the bad list"
    );
    podman.ok(&["rm", "-f", "-t", "0", "bad"])?;

    // The wire client (198.18.0.2) and the host's address (a host process unbound) are outside.
    set_allow(&["198.18.9.0/24", "127.0.0.1"])?;
    let out = run("guarded", "9998:8000")?;
    ensure!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.contains("-> 0.0.0.0:9998  pmallow/") && listed.contains("allow 127.0.0.1/32,198.18.9.0/24"),
        "list: {listed}"
    );
    let r = probe(&topo.client, None, &["tcp", "198.18.0.1:9998"])?;
    ensure!(
        r["ok"] == false && r["error"] == "TimedOut",
        "wire client outside the list: {r}"
    );
    ensure!(counter(&daemon.stats()?, Stat::DropDenied) > 0, "no drop_denied");
    let r = hooked(&topo, &daemon, &["tcp", "198.18.0.1:9998"])?;
    ensure!(
        r["error"] == "PermissionDenied",
        "host process at 198.18.0.1: {r}"
    );
    let r = hooked(&topo, &daemon, &["tcp", "127.0.0.1:9998"])?;
    ensure!(reaches_httpd(&r), "host process at 127.0.0.1 (in the list): {r}");
    // The daemon's conflist follower left the key in place.
    ensure!(
        std::fs::read_to_string(&conflist)?.contains("198.18.9.0/24"),
        "the allow key was removed"
    );
    podman.ok(&["rm", "-f", "-t", "0", "guarded"])?;
    drop(podman);
    daemon.stop()
}
