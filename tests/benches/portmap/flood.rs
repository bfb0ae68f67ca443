//! Established connections under a flood of spoofed flows (a SYN and an ACK each, never
//! answered): how many idle connections whose server speaks next survive, and whether new
//! connections keep working meanwhile, per variant. Bounded: a fixed number of flows from one
//! raw socket.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use portmap_tests::{payload, spoofed_flood, tcp_exchange};
use serde::Serialize;

use crate::setup::{Bed, Variant, target};

#[derive(Serialize)]
pub struct FloodRun {
    pub variant: Variant,
    /// Spoofed flows sent (two packets each).
    pub flows: u32,
    pub packets_per_second: f64,
    /// Flows the variant's table of new (unassured) flows holds; for netfilter, nf_conntrack_max.
    pub table_flows: Option<u64>,
    pub idle: usize,
    pub survived: usize,
    pub new_tried: usize,
    pub new_ok: usize,
}

/// Runs the flood against `bed` (a variant installed with at least two mappings).
pub fn flood_survival(bed: &Bed, variant: Variant, idle: usize, flows: u32) -> anyhow::Result<FloodRun> {
    const NEW: usize = 10;
    let topo = &bed.topo;
    let (ip, port) = target(variant, 0, false);
    let (new_ip, new_port) = target(variant, 1, false);
    // The sink holds the first `idle` connections and speaks first on them when told; it echoes
    // on the ones after.
    let (speak_tx, speak_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let server = topo.backend.spawn(move || {
        let listener = TcpListener::bind(("::", 80))?;
        listener.set_nonblocking(true)?;
        ready_tx.send(())?;
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((c, _)) if held.len() < idle => {
                    c.set_nonblocking(false)?;
                    held.push(c);
                }
                Ok((mut c, _)) => {
                    c.set_nonblocking(false)?;
                    c.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut data = Vec::new();
                    let _ = c.read_to_end(&mut data);
                    let _ = c.write_all(&data);
                }
                Err(_) => {
                    if speak_rx.try_recv().is_ok() {
                        for c in &mut held {
                            let _ = c.write_all(b"late");
                        }
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        anyhow::bail!("the flood measurement's sink was never told to speak")
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("sink not ready")?;
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let (open_tx, open_rx) = mpsc::channel::<()>();
    let clients = topo.client.spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..idle {
            let c = TcpStream::connect(SocketAddr::from((ip, port)))?;
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
        .recv_timeout(Duration::from_secs(20))
        .context("idle connections not open")?;
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (sent, new_ok) = std::thread::scope(|scope| -> anyhow::Result<(u32, usize)> {
        let during = scope.spawn(|| {
            (0..NEW)
                .filter(|&i| {
                    let data = payload(32, i as u8);
                    tcp_exchange(&topo.client, SocketAddr::from((new_ip, new_port)), data.clone())
                        .is_ok_and(|got| got == data)
                })
                .count()
        });
        let sent = spoofed_flood(&topo.client, ip, port, flows)?;
        let ok = during.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
        Ok((sent, ok))
    })?;
    let seconds = started.elapsed().as_secs_f64();
    speak_tx.send(())?;
    read_tx.send(())?;
    server.join().map_err(|_| anyhow::anyhow!("sink panicked"))??;
    let survived = clients
        .join()
        .map_err(|_| anyhow::anyhow!("clients panicked"))??;
    let table_flows = match &bed.daemon {
        Some(daemon) => Some(daemon.stats()?.new_flow_capacity),
        None => topo
            .host
            .exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_max"])
            .ok()
            .and_then(|v| v.trim().parse().ok()),
    };
    Ok(FloodRun {
        variant,
        flows,
        packets_per_second: f64::from(sent) / seconds,
        table_flows,
        idle,
        survived,
        new_tried: NEW,
        new_ok,
    })
}
