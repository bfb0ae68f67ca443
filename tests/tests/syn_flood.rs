//! A SYN flood against a mapped port (issue 11): spoofed sources, many times more flows than the
//! flow tables hold; each spoofed flow also sends an ACK, so that its entries are referenced like
//! live ones (a kernel LRU keeps referenced entries over unreferenced ones, which a pure SYN
//! burst would not get past in a bounded test). No established connection may break (idle ones whose server speaks next
//! included), and new legitimate connections keep working, in TC and XDP mode. Needs root (run
//! through `cargo xtask test`).

use std::net::SocketAddr;

use anyhow::{Context as _, ensure};
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, EchoServer, HOST_IP, IdleConnections, Mode, TempDir, Topology, counter,
    flood_with_new_connections, payload, start_daemon, tcp_exchange,
};

/// Idle connections that must survive the flood.
const IDLE: usize = 20;
/// Spoofed flows (SYN + ACK each): 400 times what the table of new flows holds.
const FLOOD: u32 = 51_200;
/// Flows the table of assured flows holds (two entries per flow).
const ASSURED_FLOWS: u32 = 1_024;
/// Flows the table of new flows holds: small, so that a single LRU (the design before assured
/// flows) loses the idle connections to this flood (checked: the test fails without promotion).
const NEW_FLOWS: u32 = 128;

#[test]
fn a_syn_flood_breaks_no_established_connection_and_new_ones_work() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        let topo = Topology::new(BackendLink::Veth)?;
        let dir = TempDir::new("flood")?;
        let config = dir.path().join("portmap.toml");
        std::fs::write(
            &config,
            format!(
                "[limits]\nconntrack_entries = {}\nconntrack_new_entries = {}\n",
                2 * ASSURED_FLOWS,
                2 * NEW_FLOWS
            ),
        )?;
        let mut daemon = start_daemon(&topo, mode, &["--config", config.to_str().context("utf-8")?])?;
        daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
        daemon.cli_ok(&["add", "8081:198.18.1.2:81"])?;
        let _echo = EchoServer::start(&topo.backend, 81)?;

        let idle = IdleConnections::open(
            &topo.backend,
            80,
            &topo.client,
            SocketAddr::from((HOST_IP, 8080)),
            IDLE,
        )?;
        // The flood, and new connections while it runs.
        let (sent, during_ok) = flood_with_new_connections(
            &topo.client,
            (HOST_IP, 8080),
            FLOOD,
            SocketAddr::from((HOST_IP, 8081)),
            10,
        )?;
        ensure!(sent > FLOOD, "{mode:?}: the generator sent only {sent} packets");

        let survived = idle.survivors()?;
        ensure!(
            survived == IDLE,
            "{mode:?}: {survived} of {IDLE} idle connections survived {sent} spoofed packets"
        );
        ensure!(
            during_ok == 10,
            "{mode:?}: {during_ok} of 10 new connections during the flood"
        );
        let data = payload(32, 99);
        let after = tcp_exchange(&topo.client, SocketAddr::from((HOST_IP, 8081)), data.clone())?;
        ensure!(after == data, "{mode:?}: a new connection after the flood");
        let stats = daemon.stats()?;
        ensure!(
            counter(&stats, Stat::FlowAssured) >= (IDLE + 11) as u64,
            "{stats:?}"
        );
        ensure!(counter(&stats, Stat::CtAssuredFull) == 0, "{stats:?}");
        daemon.stop()?;
    }
    Ok(())
}
