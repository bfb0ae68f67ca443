//! `portmap-cni` chained after the real `bridge` + `host-local` plugins (Debian's
//! containernetworking-plugins), invoked as a runtime invokes them, and the same case table run
//! against the reference `portmap` plugin side by side. Each case records what happened; the
//! expected tables differ exactly where docs/CNI.md says portmap differs. Needs root (run through
//! `cargo xtask test`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use portmap_tests::{
    BackendLink, CNI_PLUGIN_DIR, Daemon, HOST_IP, Mode, Netns, TempDir, Topology, cni_invoke, mode_args,
    portmap_cni_bin, udp_exchange, udp_server,
};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plugin {
    PortmapCni,
    Reference,
}

/// A TCP server in a container that answers every connection with the container's name.
struct Whoami {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Whoami {
    fn start(ns: &Netns, name: &'static str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind("0.0.0.0:80")?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(())
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Whoami {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Which container a client on the wire reaches at the host's `port`, or why none.
fn reaches(client: &Netns, port: u16) -> anyhow::Result<String> {
    client.run(move || {
        let dst = SocketAddrV4::new(HOST_IP, port).into();
        Ok(match TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut name = String::new();
                s.read_to_string(&mut name)?;
                name
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".into(),
            Err(e) => format!("{:?}", e.kind()),
        })
    })
}

/// A CNI outcome as the table shows it: `ok`, or `error CODE: MSG` (the message up to its first
/// colon: the reference plugin names random chains after it).
fn outcome(result: &Result<Value, Value>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => {
            let msg = e["msg"].as_str().unwrap_or_default();
            format!(
                "error {}: {}",
                e["code"],
                msg.split(':').next().unwrap_or_default()
            )
        }
    }
}

/// One network: the bridge plugin's configuration and the port plugin chained after it.
struct Network<'a> {
    topo: &'a Topology,
    plugin: Plugin,
    bin: PathBuf,
    dir: &'a Path,
    bridge: String,
    socket: Option<String>,
    /// bridge's ADD result of each container (what a runtime keeps and hands to later commands).
    results: std::cell::RefCell<std::collections::HashMap<String, Value>>,
}

impl Network<'_> {
    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "pmnet",
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "198.18.50.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.dir.join("ipam"),
            },
        })
    }

    fn port_conf(&self, version: &str, mappings: &Value, prev: Option<&Value>) -> Value {
        let mut conf = json!({
            "cniVersion": version,
            "name": "pmnet",
            "type": if self.plugin == Plugin::Reference { "portmap" } else { "portmap-cni" },
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings},
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        if let Some(socket) = &self.socket {
            conf["socket"] = json!(socket);
        }
        conf
    }

    /// bridge ADD, then the port plugin's ADD with bridge's result as prevResult.
    fn add(&self, id: &str, ns: &Netns, mappings: &Value) -> anyhow::Result<String> {
        let bridge = Path::new(CNI_PLUGIN_DIR).join("bridge");
        let prev = cni_invoke(&self.topo.host, &bridge, "ADD", id, ns, &self.bridge_conf())?
            .map_err(|e| anyhow!("bridge ADD {id}: {e}"))?;
        self.results.borrow_mut().insert(id.to_owned(), prev.clone());
        let result = cni_invoke(
            &self.topo.host,
            &self.bin,
            "ADD",
            id,
            ns,
            &self.port_conf("1.0.0", mappings, Some(&prev)),
        )?;
        if let Ok(out) = &result {
            // The chained result passes prevResult through.
            anyhow::ensure!(out["ips"] == prev["ips"], "ADD {id} changed the result: {out}");
        }
        Ok(outcome(&result))
    }

    fn command(
        &self,
        command: &str,
        version: &str,
        id: &str,
        ns: &Netns,
        mappings: &Value,
    ) -> anyhow::Result<String> {
        let prev = self.results.borrow().get(id).cloned();
        let result = cni_invoke(
            &self.topo.host,
            &self.bin,
            command,
            id,
            ns,
            &self.port_conf(version, mappings, prev.as_ref()),
        )?;
        Ok(outcome(&result))
    }
}

/// Runs the case table against `plugin`; returns (case, what happened) rows.
fn case_table(plugin: Plugin) -> anyhow::Result<Vec<(&'static str, String)>> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("cni")?;
    let mut daemon = match plugin {
        Plugin::PortmapCni => Some(Daemon::start(&topo.host, &mode_args(&topo, Mode::Tc)?)?),
        Plugin::Reference => None,
    };
    let net = Network {
        topo: &topo,
        plugin,
        bin: match plugin {
            Plugin::PortmapCni => portmap_cni_bin()?,
            Plugin::Reference => Path::new(CNI_PLUGIN_DIR).join("portmap"),
        },
        dir: dir.path(),
        bridge: format!("pmb{}", std::process::id() % 100_000),
        socket: daemon
            .as_ref()
            .map(|d| d.socket.to_str().map(str::to_owned).context("utf-8"))
            .transpose()?,
        results: std::cell::RefCell::default(),
    };
    let (k1, k2) = (Netns::new("k1")?, Netns::new("k2")?);
    let web = json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]);
    let both = json!([
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
    ]);
    let mut rows = Vec::new();
    let mut row = |case: &'static str, what: String| rows.push((case, what));

    row("ADD c1 8080/tcp, 5353/udp", net.add("c1", &k1, &both)?);
    if let Some(daemon) = &daemon {
        // `list` names the container (NETWORK/CONTAINER_ID/IFNAME) and filters by it.
        let owned = daemon.cli_ok(&["list", "--owner", "c1"])?;
        anyhow::ensure!(
            owned.lines().count() == 2 && owned.lines().all(|l| l.ends_with("  pmnet/c1/eth0")),
            "list --owner c1: {owned:?}"
        );
        let json: Value = serde_json::from_str(&daemon.cli_ok(&["list", "--json"])?)?;
        anyhow::ensure!(json["mappings"][0]["owner"] == "pmnet/c1/eth0", "{json}");
        let others = daemon.cli_ok(&["list", "--owner", "c2"])?;
        anyhow::ensure!(others.is_empty(), "list --owner c2: {others:?}");
    }
    let (_w1, _w2) = (Whoami::start(&k1, "c1")?, Whoami::start(&k2, "c2")?);
    row("client -> :8080", reaches(&topo.client, 8080)?);
    let udp = udp_server(&k1, 53, 1)?;
    let answered = udp_exchange(&topo.client, SocketAddrV4::new(HOST_IP, 5353), 1, 100);
    let _ = udp.join();
    row(
        "client -> :5353/udp",
        if answered.is_ok() { "answered" } else { "no answer" }.into(),
    );
    row("ADD c1 again", net.command("ADD", "1.0.0", "c1", &k1, &both)?);
    row("CHECK c1", net.command("CHECK", "1.0.0", "c1", &k1, &both)?);
    row("ADD c2 8080/tcp (taken by c1)", net.add("c2", &k2, &web)?);
    row("client -> :8080 after c2", reaches(&topo.client, 8080)?);
    row("DEL c1", net.command("DEL", "1.0.0", "c1", &k1, &both)?);
    row("client -> :8080 after DEL c1", reaches(&topo.client, 8080)?);
    row("DEL c1 again", net.command("DEL", "1.0.0", "c1", &k1, &both)?);
    row("ADD c2 again", net.command("ADD", "1.0.0", "c2", &k2, &web)?);
    row("client -> :8080", reaches(&topo.client, 8080)?);
    if let Some(daemon) = daemon.as_mut() {
        daemon.stop()?;
        daemon.restart(&topo.host, &mode_args(&topo, Mode::Tc)?)?;
    }
    row(
        "client -> :8080 after a daemon restart",
        reaches(&topo.client, 8080)?,
    );
    row(
        "CHECK c2 after a daemon restart",
        net.command("CHECK", "1.0.0", "c2", &k2, &web)?,
    );
    row("STATUS (1.1.0)", net.command("STATUS", "1.1.0", "c2", &k2, &web)?);
    let version = cni_invoke(
        &topo.host,
        &net.bin,
        "VERSION",
        "",
        &k2,
        &json!({"cniVersion": "1.0.0"}),
    )?;
    let listed = version.unwrap_or_else(|e| e)["supportedVersions"].to_string();
    row("VERSION lists 1.1.0", listed.contains("1.1.0").to_string());
    let mut gc = net.port_conf("1.1.0", &web, None);
    gc["cni.dev/valid-attachments"] = json!([]);
    row(
        "GC, no attachment valid",
        outcome(&cni_invoke(&topo.host, &net.bin, "GC", "", &k2, &gc)?),
    );
    row("client -> :8080 after GC", reaches(&topo.client, 8080)?);
    Ok(rows)
}

#[test]
fn portmap_cni_and_the_reference_plugin_side_by_side() -> anyhow::Result<()> {
    let ours = case_table(Plugin::PortmapCni)?;
    let reference = case_table(Plugin::Reference)?;
    println!("{:<42} {:<40} reference portmap", "case", "portmap-cni");
    for ((case, a), (_, b)) in ours.iter().zip(&reference) {
        println!("{case:<42} {a:<40} {b}");
    }
    let expect_ours = [
        "ok",
        "c1",
        "answered",
        "ok",
        "ok",
        "error 100: cannot publish host port(s) 8080/tcp",
        "c1",
        "ok",
        "refused",
        "ok",
        "ok",
        "c2",
        "c2",
        "ok",
        "ok",
        "true",
        "ok",
        "refused",
    ];
    let got: Vec<&str> = ours.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(got, expect_ours, "portmap-cni");
    let got: Vec<&str> = reference.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(got, EXPECT_REFERENCE, "reference portmap");
    Ok(())
}

/// What containernetworking-plugins 1.1.1's portmap does with the same cases (docs/CNI.md
/// explains each difference).
const EXPECT_REFERENCE: [&str; 18] = [
    "ok",
    "c1",
    "answered",
    "ok",
    // Its CHECK looks for an IPv6 DNAT chain it never made for an IPv4-only container.
    "error 999: could not check ipv6 dnat",
    // A host port another container holds is taken again without an error...
    "ok",
    // ...and the first container keeps it until it goes.
    "c1",
    "ok",
    "c2",
    "ok",
    "ok",
    "c2",
    "c2",
    "error 999: could not check ipv6 dnat",
    // CNI 1.1 (STATUS, GC) came after 1.1.1.
    "error 4: unknown CNI_COMMAND",
    "false",
    "error 3: missing containerID",
    "c2",
];

/// A container deleted while no daemon runs loses its ports when the next daemon starts: DEL
/// records the removal beside the control socket and succeeds; the daemon unpublishes it before
/// it answers, and another container takes the port.
#[test]
fn a_container_deleted_while_no_daemon_runs_loses_its_ports_at_start() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("cni-down")?;
    let args = mode_args(&topo, Mode::Tc)?;
    let mut daemon = Daemon::start(&topo.host, &args)?;
    let net = Network {
        topo: &topo,
        plugin: Plugin::PortmapCni,
        bin: portmap_cni_bin()?,
        dir: dir.path(),
        bridge: format!("pmd{}", std::process::id() % 100_000),
        socket: Some(daemon.socket.to_str().context("utf-8")?.to_owned()),
        results: std::cell::RefCell::default(),
    };
    let (k1, k2) = (Netns::new("k1")?, Netns::new("k2")?);
    let web = json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]);
    anyhow::ensure!(net.add("c1", &k1, &web)? == "ok", "ADD c1");
    daemon.stop()?;
    let deleted = net.command("DEL", "1.0.0", "c1", &k1, &web)?;
    anyhow::ensure!(deleted == "ok", "DEL with no daemon: {deleted}");
    daemon.restart(&topo.host, &args)?;
    let listed = daemon.cli_ok(&["list"])?;
    anyhow::ensure!(listed.is_empty(), "still published after the start: {listed}");
    anyhow::ensure!(
        daemon.log().contains("removed while no daemon ran"),
        "{}",
        daemon.log()
    );
    let added = net.add("c2", &k2, &web)?;
    anyhow::ensure!(added == "ok", "ADD c2 of the freed port: {added}");
    let _w2 = Whoami::start(&k2, "c2")?;
    let reached = reaches(&topo.client, 8080)?;
    anyhow::ensure!(reached == "c2", "client -> :8080: {reached}");
    // Applied once: a restart keeps c2's port.
    daemon.stop()?;
    daemon.restart(&topo.host, &args)?;
    anyhow::ensure!(daemon.cli_ok(&["list", "--owner", "c2"])?.lines().count() == 1);
    daemon.stop()
}

/// A malformed prevResult (its `ips` a string, an address without a prefix) is a CNI error
/// (code 7, the field named) for ADD and CHECK, and nothing is published: a plugin that
/// publishes nothing never says it succeeded.
#[test]
fn a_malformed_prev_result_is_an_error_and_publishes_nothing() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = Daemon::start(&topo.host, &mode_args(&topo, Mode::Tc)?)?;
    let k1 = Netns::new("k1")?;
    let web = json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]);
    for (prev, field) in [
        (
            json!({"cniVersion": "1.0.0", "ips": "198.18.50.2/24"}),
            "prevResult.ips",
        ),
        (
            json!({"cniVersion": "1.0.0", "ips": [{"address": "198.18.50.2"}]}),
            "prevResult.ips[0].address",
        ),
        (json!({"cniVersion": "1.0.0", "ips": []}), "no container address"),
    ] {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "pmnet",
            "type": "portmap-cni",
            "runtimeConfig": {"portMappings": web},
            "prevResult": prev,
            "socket": daemon.socket,
        });
        for command in ["ADD", "CHECK"] {
            let answer = cni_invoke(&topo.host, &portmap_cni_bin()?, command, "c1", &k1, &conf)?;
            let error = answer
                .err()
                .with_context(|| format!("{command} with {prev} succeeded"))?;
            anyhow::ensure!(
                error["code"] == 7 && error["msg"].as_str().is_some_and(|m| m.contains(field)),
                "{command} with {prev}: {error}"
            );
        }
    }
    anyhow::ensure!(
        daemon.cli_ok(&["list"])?.is_empty(),
        "published: {}",
        daemon.cli_ok(&["list"])?
    );
    daemon.stop()
}

/// `--cni-conf-dir`: the daemon chains portmap-cni into the conflists there at start and into
/// one written later (as `podman network create` writes it), keeping the rest of each file.
#[test]
fn the_daemon_chains_conflists_that_appear_in_its_cni_conf_dir() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("cni-conf")?;
    let conf = dir.path().join("net.d");
    std::fs::create_dir(&conf)?;
    let podman = |name: &str| {
        format!(
            "{{\n   \"cniVersion\": \"0.4.0\",\n   \"name\": \"{name}\",\n   \"plugins\": [\n      {{\n         \
             \"type\": \"bridge\",\n         \"bridge\": \"cni-{name}\",\n         \"ipMasq\": true\n      }},\n      \
             {{\n         \"type\": \"portmap\",\n         \"capabilities\": {{\n            \"portMappings\": true\n         \
             }}\n      }},\n      {{\n         \"type\": \"firewall\"\n      }}\n   ]\n}}"
        )
    };
    std::fs::write(conf.join("87-podman.conflist"), podman("podman"))?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    let conf_arg = conf.to_str().context("utf-8")?.to_owned();
    args.extend(["--cni-conf-dir", &conf_arg]);
    let mut daemon = Daemon::start(&topo.host, &args)?;
    let socket = daemon.socket.to_str().context("utf-8")?.to_owned();
    let chained = |name: &str| -> anyhow::Result<bool> {
        let text = std::fs::read_to_string(conf.join(name))?;
        let value: Value = serde_json::from_str(&text)?;
        Ok(value["plugins"][1]["type"] == "portmap-cni" && value["plugins"][1]["socket"] == socket.as_str())
    };
    anyhow::ensure!(chained("87-podman.conflist")?, "not chained at start");
    // A network created while the daemon runs: written to a temporary name and renamed, as
    // podman does, and one written in place.
    std::fs::write(conf.join(".tmp-net"), podman("pm1"))?;
    std::fs::rename(conf.join(".tmp-net"), conf.join("pm1.conflist"))?;
    std::fs::write(conf.join("pm2.conflist"), podman("pm2"))?;
    portmap_tests::wait_for("the new conflists to be chained", Duration::from_secs(10), || {
        Ok(chained("pm1.conflist")? && chained("pm2.conflist")?)
    })?;
    // Only the plugin list changed: the rest keeps podman's formatting, and a newline ends it.
    let text = std::fs::read_to_string(conf.join("pm1.conflist"))?;
    anyhow::ensure!(
        text.starts_with("{\n   \"cniVersion\": \"0.4.0\",\n   \"name\": \"pm1\",\n")
            && text.ends_with("   ]\n}\n"),
        "{text}"
    );
    daemon.stop()
}
