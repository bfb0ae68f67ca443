//! systemd notifications (`Type=notify`): the test is the service manager, listening on its own
//! `NOTIFY_SOCKET`.

use anyhow::Context as _;
use nix::sys::signal::Signal;
use portmap_tests::{BackendLink, Daemon, Notifications, TempDir, Topology};

/// READY=1 with a STATUS once the datapath is attached and the mappings applied; RELOADING=1
/// with MONOTONIC_USEC then READY=1 around `portmap reload` and SIGHUP; WATCHDOG=1 at half of
/// WATCHDOG_USEC; STOPPING=1 on SIGTERM.
#[test]
fn notifies_ready_reloading_watchdog_and_stopping() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("sd")?;
    let sock = Notifications::bind(dir.path())?;
    let notify_path = sock.path.clone();
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

    let ready = sock.next_with("READY=1")?;
    assert!(ready.contains("STATUS=2 mapping(s) on h0; flows 0/"), "{ready:?}");
    sock.next_with("WATCHDOG=1")?;

    daemon.cli_ok(&["reload"])?;
    let reloading = sock.next_with("RELOADING=1")?;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    sock.next_with("READY=1")?;

    daemon.signal(Signal::SIGHUP)?;
    sock.next_with("RELOADING=1")?;
    sock.next_with("READY=1")?;
    // Still alive after the reloads.
    sock.next_with("WATCHDOG=1")?;

    daemon.stop()?;
    sock.next_with("STOPPING=1")?;
    Ok(())
}
