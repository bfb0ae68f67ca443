//! A SYN flood against a mapped port (issue 11): spoofed sources, many times more flows than the
//! flow tables hold; each spoofed flow also sends an ACK, so that its entries are referenced like
//! live ones (a kernel LRU keeps referenced entries over unreferenced ones, which a pure SYN
//! burst would not get past in a bounded test). No established connection may break (idle ones whose server speaks next
//! included), and new legitimate connections keep working, in TC and XDP mode. Needs root (run
//! through `cargo xtask test`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, EchoServer, HOST_IP, Mode, TempDir, Topology, counter, payload, spoofed_flood, start_daemon,
    tcp_exchange,
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

        // The backend holds IDLE connections and speaks first once told to.
        let (speak_tx, speak_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let server = topo.backend.spawn(move || {
            let listener = TcpListener::bind(("::", 80))?;
            ready_tx.send(())?;
            let mut conns = Vec::new();
            for _ in 0..IDLE {
                conns.push(listener.accept()?.0);
            }
            speak_rx.recv()?;
            for c in &mut conns {
                c.write_all(b"late")?;
            }
            Ok(())
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("server not ready")?;
        let (read_tx, read_rx) = mpsc::channel::<()>();
        let (open_tx, open_rx) = mpsc::channel::<()>();
        let clients = topo.client.spawn(move || {
            let mut conns = Vec::new();
            for _ in 0..IDLE {
                let c = TcpStream::connect(SocketAddr::from((HOST_IP, 8080)))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                conns.push(c);
            }
            open_tx.send(())?;
            read_rx.recv()?;
            let mut survived = 0;
            for c in &mut conns {
                let mut buf = [0u8; 4];
                if c.read_exact(&mut buf).is_ok() && &buf == b"late" {
                    survived += 1;
                }
            }
            Ok(survived)
        })?;
        open_rx
            .recv_timeout(Duration::from_secs(10))
            .context("connections not open")?;
        // Let the handshakes' last ACKs arrive before the flood (they make the flows assured).
        std::thread::sleep(Duration::from_millis(200));

        // The flood, and new connections while it runs.
        let (sent, during_ok) = std::thread::scope(|scope| -> anyhow::Result<(u32, usize)> {
            let during = scope.spawn(|| -> anyhow::Result<usize> {
                let mut ok = 0;
                for i in 0..10u8 {
                    let data = payload(32, i);
                    if tcp_exchange(&topo.client, SocketAddr::from((HOST_IP, 8081)), data.clone())? == data {
                        ok += 1;
                    }
                }
                Ok(ok)
            });
            let sent = spoofed_flood(&topo.client, HOST_IP, 8080, FLOOD)?;
            let ok = during.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
            Ok((sent, ok))
        })?;
        ensure!(sent > FLOOD, "{mode:?}: the generator sent only {sent} packets");

        speak_tx.send(())?;
        read_tx.send(())?;
        server.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        let survived = clients
            .join()
            .map_err(|_| anyhow::anyhow!("clients panicked"))??;
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
