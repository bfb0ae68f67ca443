//! `portmap run`: owns the datapath, applies mappings, serves the control socket, expires flows.
//! One file per job: `serve` (the main loop, and the owner of the state it hands events to),
//! `state` (the running state and what it does on its own), `requests` (the changes and reads
//! clients ask for), `reload` (the config file applied again), `control_socket` (connections),
//! `flows` (flow-table fill), `saved` (the state file), `docker` (the Docker follower's changes).
//!
//! Stopping (SIGTERM, or a crash) leaves the datapath attached and forwarding; the next daemon
//! adopts it: the pinned maps (flows, counters, mappings) as they are, the programs replaced in
//! the same links, the mappings restored from the state file and the config applied as one diff.

mod conflists;
mod control_socket;
mod docker;
mod flows;
mod reload;
mod requests;
mod saved;
mod serve;
mod state;

pub use self::saved::files as state_files;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use log::{info, warn};

use self::{flows::FlowTable, state::State};
use crate::{
    api::{
        control::{self, DockerStatus},
        notify,
    },
    config::{Config, Overrides, Valid},
    datapath::{self, Datapath},
    host::{self, local_backends, sockets},
    model::{
        mapping::PortRange,
        table::{Capacity, Table},
    },
};

/// Where `reload` (and SIGHUP) read the configuration again from.
#[derive(Clone, Debug)]
pub struct ReloadSource {
    pub path: PathBuf,
    /// The command-line options that replace the file's values, applied again on every reload.
    pub overrides: Overrides,
}

/// Runs the daemon until SIGTERM/SIGINT. The datapath stays attached when it exits.
pub async fn run(valid: Valid, reload: Option<ReloadSource>) -> anyhow::Result<()> {
    let cfg = valid.config.startup.clone();
    refuse_if_running(&cfg.socket)?;
    datapath::ensure_bpffs()?;
    datapath::check_pin_dir(&cfg.pin_dir)?;
    warn_if_not_forwarding(&valid);
    let cgroup_dir = host::cgroup_dir(&cfg.cgroup, cfg.cgroup_mount.as_deref())?;
    // A daemon that fails from here on removes what it created, or leaves the datapath it
    // adopted as it found it (forwarding).
    let mut dp = Datapath::load(&cfg.pin_dir, &cfg.limits)?;
    let logger = dp.take_logger()?;
    let mut state = load_state(dp, &valid.config, reload)?;
    // Local addresses first: wildcard mappings match only them, from the first packet on.
    let watch = host::address_watch()?;
    state.dp.sync_local_addrs(&host::addresses()?)?;
    let backends_watch = local_backends::watch()?;
    state.follow_local_backends();
    state
        .dp
        .attach(&cfg.interfaces, cfg.attach, &cfg.redirect_interfaces, &cgroup_dir)?;
    apply_config(&mut state, &valid)?;
    let listener = control_socket::bind_socket(&cfg.socket)?;
    // After the socket exists: a plugin that found no daemon recorded its removal before this
    // reads it, or finds the socket when it tries again (its request waits in the backlog).
    requests::apply_pending_removals(&mut state, &cfg.socket)?;
    if let Some(dir) = &cfg.cni_conf_dir {
        conflists::follow(dir.clone(), &cfg.socket)?;
    }
    let metrics = match cfg.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics: listening on {addr}"))?;
            info!("serving Prometheus metrics at http://{addr}/metrics");
            Some(listener)
        }
        None => None,
    };
    state.dp.keep_attached();
    notify::ready(&state.status_line());
    let served = serve::serve(state, listener, metrics, logger, [watch, backends_watch]).await;
    let _ = fs::remove_file(&cfg.socket);
    info!(
        "exiting; the datapath stays attached in {} for the next daemon (`portmap cleanup` removes it)",
        cfg.pin_dir.display()
    );
    served
}

/// The state around a loaded datapath: a new table, or the one an adopted datapath had.
fn load_state(mut dp: Datapath, config: &Config, reload: Option<ReloadSource>) -> anyhow::Result<State> {
    let limits = &config.startup.limits;
    let capacity = Capacity {
        ports: limits.max_mappings,
        groups: limits.max_backend_groups,
        backends: limits.max_backends,
    };
    let (dynamic, reserved) = host::dynamic_ports(config.live.dynamic_ports);
    let (mut table, generation) = if dp.adopted() {
        restore_table(&mut dp, config, capacity, dynamic)?
    } else {
        (Table::new(capacity, dynamic), 0)
    };
    table.reserved = reserved;
    Ok(State {
        table,
        flows: FlowTable::new(limits),
        config: config.clone(),
        reload,
        saver: saved::Saver::new(&config.startup.state_file, dp.id(), generation),
        local_backends: BTreeMap::new(),
        docker: config.startup.docker.as_ref().map(|url| DockerStatus {
            url: url.0.clone(),
            connected: false,
            error: Some("not connected yet".into()),
        }),
        dp,
    })
}

/// Applies the config's mappings as one diff, saves a snapshot, and then removes what an adopted
/// datapath has beyond the table. A snapshot that cannot be written (a full disk) undoes the
/// diff: the start fails with the datapath as it was found.
fn apply_config(state: &mut State, valid: &Valid) -> anyhow::Result<()> {
    let started = Instant::now();
    let undo = state.undo_point();
    let (plan, relisted) = state
        .table
        .apply_config(
            &mut state.dp,
            &valid.config.live.allow,
            &valid.mappings,
            &sockets::local_sockets(),
        )
        .context("applying the configured mappings")?;
    info!(
        "config: {} mapping(s) added, {} updated, {} removed, {relisted} under a new host allow-list in {:.3} ms",
        plan.add.len(),
        plan.update.len(),
        plan.remove.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    if let Err(e) = state.save_snapshot() {
        state.undo(undo);
        return Err(e.context("the datapath was left as it was found"));
    }
    if state.dp.adopted() {
        // Only now, so that no mapping is missing in between: what the maps have beyond the
        // table (a change the previous daemon did not live to save).
        let removed = state.dp.retain_mappings(
            &state.table.mapping_keys(),
            &state.table.published_ports(),
            &state.table.allow_entries(),
        )?;
        if removed > 0 {
            info!("removed {removed} map entries the saved state does not have");
        }
    }
    state.flush_stale_flows();
    Ok(())
}

/// The mappings of an adopted datapath, from the state file the previous daemon saved, written
/// to the maps again (a no-op unless it died between a map write and saving).
/// Returns it with the generation of the saved state it reached.
fn restore_table(
    dp: &mut Datapath,
    cfg: &Config,
    capacity: Capacity,
    dynamic: PortRange,
) -> anyhow::Result<(Table, u64)> {
    let file = &cfg.startup.state_file;
    let saved = saved::load(file, dp.id()).with_context(|| {
        format!(
            "the saved mappings in {} cannot be read: move the file away (the daemon then rebuilds the \
             mappings from the pinned maps, their owners unknown), or run `portmap cleanup`",
            file.display()
        )
    })?;
    let Some((snapshot, records, generation)) = saved else {
        let contents = dp.mapping_contents().context("reading the pinned mappings")?;
        let (table, skipped) = Table::recover(capacity, dynamic, &contents)
            .context("rebuilding the mappings from the pinned maps")?;
        for entry in &skipped {
            warn!("not rebuilt from the pinned maps (removed): {entry}");
        }
        warn!(
            "adopting the datapath in {} without saved mappings ({} is missing or belongs to another \
             datapath): {} mapping(s) rebuilt from the pinned maps keep forwarding, listed as owned by \
             'unknown' (the config, a CNI container or a Docker container that asks for the same \
             mapping takes it over; `portmap del` removes one)",
            cfg.startup.pin_dir.display(),
            file.display(),
            table.len()
        );
        return Ok((table, 0));
    };
    let table = Table::from_snapshot(capacity, dynamic, snapshot, records)
        .with_context(|| format!("restoring the mappings saved in {}", file.display()))?;
    table.rewrite(dp).context("writing the restored mappings")?;
    info!(
        "adopted the datapath in {}: {} mapping(s) restored from {}",
        cfg.startup.pin_dir.display(),
        table.len(),
        file.display()
    );
    Ok((table, generation))
}

fn warn_if_not_forwarding(valid: &Valid) {
    if fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        warn!("net.ipv4.ip_forward is 0: mapped IPv4 traffic will not be forwarded until it is enabled");
    }
    if valid
        .mappings
        .iter()
        .any(|m| m.family() == portmap_common::FAMILY_V6)
        && fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").is_ok_and(|v| v.trim() == "0")
    {
        warn!(
            "net.ipv6.conf.all.forwarding is 0: mapped IPv6 traffic will not be forwarded until it is enabled"
        );
    }
}

fn refuse_if_running(socket: &Path) -> anyhow::Result<()> {
    if control::daemon_answers(socket) {
        bail!(
            "another portmap daemon is already running (control socket {} answers)",
            socket.display()
        );
    }
    Ok(())
}
