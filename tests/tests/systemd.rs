//! systemd notifications (`Type=notify`): the test is the service manager, listening on its own
//! `NOTIFY_SOCKET`.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use portmap_tests::{BackendLink, Daemon, TempDir, Topology};

/// The next datagram that contains `needle`, skipping others (watchdog pings, status updates).
fn next_with(sock: &UnixDatagram, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.lines().any(|l| l == needle || l.starts_with(needle)) {
            return Ok(message);
        }
        seen.push(message);
    }
    bail!("no notification with {needle} within 10 s; got {seen:?}")
}

/// READY=1 with a STATUS once the datapath is attached and the mappings applied; RELOADING=1
/// with MONOTONIC_USEC then READY=1 around `portmap reload` and SIGHUP; WATCHDOG=1 at half of
/// WATCHDOG_USEC; STOPPING=1 on SIGTERM.
#[test]
fn notifies_ready_reloading_watchdog_and_stopping() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("sd")?;
    let notify_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(
        &config,
        "interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [\"8080:198.18.1.2:80\", \"8081:198.18.1.2:81\"]\n",
    )?;
    let mut daemon = Daemon::start_with_env(
        &topo.host,
        &["--config", config.to_str().context("non-UTF-8 temp path")?],
        &[
            (
                "NOTIFY_SOCKET",
                notify_path.to_str().context("non-UTF-8 temp path")?,
            ),
            ("WATCHDOG_USEC", "400000"),
        ],
    )?;

    let ready = next_with(&sock, "READY=1")?;
    assert!(ready.contains("STATUS=2 mapping(s) on h0; flows 0/"), "{ready:?}");
    next_with(&sock, "WATCHDOG=1")?;

    daemon.cli_ok(&["reload"])?;
    let reloading = next_with(&sock, "RELOADING=1")?;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    next_with(&sock, "READY=1")?;

    daemon.signal(Signal::SIGHUP)?;
    next_with(&sock, "RELOADING=1")?;
    next_with(&sock, "READY=1")?;
    // Still alive after the reloads.
    next_with(&sock, "WATCHDOG=1")?;

    daemon.stop()?;
    next_with(&sock, "STOPPING=1")?;
    Ok(())
}
