//! Established connections under a flood of spoofed flows (a SYN and an ACK each, never
//! answered): how many idle connections whose server speaks next survive, and whether new
//! connections keep working meanwhile, per variant. Bounded: a fixed number of flows from one
//! raw socket.

use std::{net::SocketAddr, time::Instant};

use portmap_tests::{IdleConnections, flood_with_new_connections};
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
    const NEW: u8 = 10;
    let topo = &bed.topo;
    let (ip, port) = target(variant, 0, false);
    let (new_ip, new_port) = target(variant, 1, false);
    let idle_conns = IdleConnections::open(
        &topo.backend,
        80,
        &topo.client,
        SocketAddr::from((ip, port)),
        idle,
    )?;
    let started = Instant::now();
    let (sent, new_ok) = flood_with_new_connections(
        &topo.client,
        (ip, port),
        flows,
        SocketAddr::from((new_ip, new_port)),
        NEW,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let survived = idle_conns.survivors()?;
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
        new_tried: usize::from(NEW),
        new_ok,
    })
}
