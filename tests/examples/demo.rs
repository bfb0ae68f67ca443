//! `cargo xtask demo`: namespaces client → host (portmap) → backend, a real mapping, 1 MiB of TCP
//! each way through it, a process on the host reaching it at 127.0.0.1 and [::1], and
//! `portmap stats`, then a restart that traffic does not notice and `portmap cleanup`. xtask runs it (as root, after `setup`) so that xtask
//! itself builds without the eBPF toolchain.

use std::{net::SocketAddrV4, time::Instant};

use anyhow::{bail, ensure};
use clap::Parser;
use portmap_tests::{
    BackendLink, Daemon, EchoServer, HOST_BACKEND_IFACE, HOST_CLIENT_IFACE, HOST_IP, Topology, payload, probe,
};

#[derive(Parser)]
struct Args {
    /// Ingress attach mode: tc or xdp.
    #[arg(long, default_value = "tc")]
    attach: String,
}

fn say(text: &str) {
    println!("\n== {text}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    say("building namespaces: client 198.18.0.2 -> host 198.18.0.1 (portmap) -> backend 198.18.1.2");
    let topo = Topology::new(BackendLink::Veth)?;
    let mut run_args = vec!["--iface", HOST_CLIENT_IFACE, "--attach", &args.attach];
    if args.attach == "xdp" {
        topo.prepare_for_xdp()?;
        run_args.extend(["--redirect-iface", HOST_BACKEND_IFACE]);
    }
    let mut daemon = Daemon::start(&topo.host, &run_args)?;
    println!("$ portmap add 8080:198.18.1.2:80");
    print!("{}", daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?);
    println!("$ portmap list");
    print!("{}", daemon.cli_ok(&["list"])?);

    let (up, down) = (payload(1 << 20, 1), payload(1 << 20, 2));
    let started = Instant::now();
    let server = portmap_tests::tcp_server(&topo.backend, 80, down.clone())?;
    let got = portmap_tests::tcp_exchange(&topo.client, SocketAddrV4::new(HOST_IP, 8080), up.clone())?;
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    ensure!(
        served.received == up && got == down,
        "payload corrupted in transit"
    );
    println!(
        "\nTCP 198.18.0.2 -> 198.18.0.1:8080: sent 1 MiB, received 1 MiB back, both intact ({:.0} ms); \
         the backend saw the connection come from {}",
        started.elapsed().as_secs_f64() * 1000.0,
        served.peer
    );

    // `curl localhost:8080` on the host: the socket hooks send it straight to the backend.
    let _echo = EchoServer::start(&topo.backend, 80)?;
    for addr in ["127.0.0.1:8080", "[::1]:8080"] {
        let r = probe(&topo.host, Some(&daemon.cgroup), &["tcp", addr])?;
        ensure!(r["ok"] == true, "host process to {addr}: {r}");
        println!(
            "host process -> {addr}: the backend echoed {} (getpeername says {})",
            r["reply"], r["peer"]
        );
    }
    println!("\n$ portmap stats");
    print!("{}", daemon.cli_ok(&["stats"])?);

    // A restart is invisible: the datapath keeps forwarding while no daemon runs, and the next
    // daemon adopts it with its mappings.
    daemon.stop()?;
    say("daemon stopped (SIGTERM): the datapath stays attached");
    let r = probe(&topo.host, Some(&daemon.cgroup), &["tcp", "127.0.0.1:8080"])?;
    ensure!(r["ok"] == true, "127.0.0.1:8080 with no daemon running: {r}");
    println!(
        "host process -> 127.0.0.1:8080 with no daemon running: the backend echoed {}",
        r["reply"]
    );
    daemon.restart(&topo.host, &run_args)?;
    say("daemon started again: it adopted the pinned datapath and the saved mappings");
    println!("$ portmap list");
    print!("{}", daemon.cli_ok(&["list"])?);
    daemon.stop()?;
    println!("\n$ portmap cleanup");
    let removed = daemon.cleanup()?;
    let lines: Vec<&str> = removed.lines().collect();
    for line in lines.iter().take(3) {
        println!("{line}");
    }
    println!("... ({} pins and files removed)", lines.len());
    if daemon.pin_dir.exists() {
        bail!("pins left in {}", daemon.pin_dir.display());
    }
    say("cleanup detached the programs and removed the pins; namespaces are removed on exit");
    Ok(())
}
