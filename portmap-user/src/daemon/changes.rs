//! The requests that change or read the mappings (control socket, SIGHUP), applied one at a
//! time by the main loop.

use std::time::Instant;

use anyhow::Context as _;
use log::{error, info};
use portmap_common::Stat;

use super::{State, serve::status_line};
use crate::{
    api::control::{LocalBackendReport, MappingStats, Request, Response, StatsReport},
    api::notify,
    config::Config,
    datapath::Counters,
    host::sockets,
    model::mapping::Mapping,
    model::spec,
    model::table::{Origin, TableError},
};

pub(super) fn dispatch(request: Request, state: &mut State, counters: &Counters) -> Response {
    let started = Instant::now();
    let parsed = |spec: &str| spec::parse(spec).map_err(TableError::from);
    let outcome: anyhow::Result<String> = match request {
        Request::Add { spec } => changed(
            "added",
            parsed(&spec).and_then(|m| {
                state
                    .table
                    .add_as(&mut state.dp, &m, &sockets::local_sockets(), Origin::Runtime)
            }),
            started,
        ),
        Request::Del { spec } => changed(
            "deleted",
            parsed(&spec).and_then(|m| state.table.remove(&mut state.dp, &m)),
            started,
        ),
        Request::Update { spec } => changed(
            "updated",
            parsed(&spec).and_then(|m| state.table.update(&mut state.dp, &m)),
            started,
        ),
        Request::Reload => reload_notified(state),
        Request::Publish { owner, specs } => publish(state, owner, &specs),
        Request::Unpublish { owner } => publish(state, owner, &[]),
        Request::Containers => {
            return Response::Containers {
                containers: state.table.containers(),
            };
        }
        Request::List | Request::Stats => return read(&View::of(state), counters, &request),
    };
    match settle(state, outcome) {
        Ok(message) => Response::Ok { message },
        Err(e) => Response::Error {
            message: format!("{e:#}"),
        },
    }
}

/// Makes the mappings of the container `owner` exactly `specs` (none: removes them), all or
/// nothing; answers with what changed.
fn publish(state: &mut State, owner: String, specs: &[String]) -> anyhow::Result<String> {
    let mappings = specs
        .iter()
        .map(|spec| spec::parse(spec).with_context(|| format!("'{spec}'")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let origin = Origin::Container(owner.clone());
    let plan = state
        .table
        .apply_as(&mut state.dp, &origin, &mappings, &sockets::local_sockets())?;
    let message = format!(
        "container {owner}: {} added, {} updated, {} removed",
        plan.add.len(),
        plan.update.len(),
        plan.remove.len()
    );
    if !plan.is_empty() {
        info!("{message}");
    }
    Ok(message)
}

/// After a change (or a refused one): deletes the flows it made stale and saves the mappings for
/// the next daemon. A change that was applied but could not be saved says so.
pub(super) fn settle(state: &mut State, outcome: anyhow::Result<String>) -> anyhow::Result<String> {
    flush_stale_flows(state);
    let message = outcome?;
    match state.save() {
        Ok(()) => Ok(message),
        Err(e) => {
            error!("{e:#}");
            Ok(format!(
                "{message}; warning: {e:#}: a restarted daemon would not know this change"
            ))
        }
    }
}

/// Deletes the UDP flows the last changes made stale (of removed mappings and backends), so an
/// ongoing UDP stream takes the new path with its next datagram. TCP flows finish where they
/// are.
pub(super) fn flush_stale_flows(state: &mut State) {
    let flushes = state.table.take_flushes();
    match state.dp.flush_udp_flows(&flushes) {
        Ok(0) => {}
        Ok(n) => info!("removed {n} UDP flow(s) of removed mappings or backends"),
        Err(e) => error!("removing stale UDP flows: {e:#}"),
    }
}

/// Logs a change with its duration and answers with its `docker port` lines.
fn changed(verb: &str, result: Result<Mapping, TableError>, started: Instant) -> anyhow::Result<String> {
    let m = result?;
    info!("{verb} {m} in {:.1} µs", started.elapsed().as_secs_f64() * 1e6);
    let indent = format!("\n{}", " ".repeat(verb.len() + 1));
    Ok(format!("{verb} {}", m.docker_lines().join(&indent)))
}

/// `reload` between `RELOADING=1` and `READY=1` for systemd (`READY=1` also after a failed
/// reload: the previous configuration keeps running).
pub(super) fn reload_notified(state: &mut State) -> anyhow::Result<String> {
    notify::reloading();
    let result = reload(state);
    notify::ready(&status_line(state));
    result
}

/// Reads the config file again and applies its mappings as one diff (all or nothing) and its
/// timeouts. Settings that only take effect at start-up are reported, not applied.
pub(super) fn reload(state: &mut State) -> anyhow::Result<String> {
    let source = state
        .reload
        .as_ref()
        .context("the daemon was started without a config file: nothing to reload")?;
    let mut config = Config::read(&source.path)?;
    source.overrides.apply(&mut config);
    let valid = config
        .validate()
        .with_context(|| format!("{}", source.path.display()))?;
    let started = Instant::now();
    let plan = state
        .table
        .apply(&mut state.dp, &valid.mappings, &sockets::local_sockets())
        .with_context(|| format!("{}: nothing was changed", source.path.display()))?;
    let new = valid.config;
    let old = &state.config;
    let restart_only = [
        ("interfaces", old.interfaces != new.interfaces),
        ("attach", old.attach != new.attach),
        (
            "redirect_interfaces",
            old.redirect_interfaces != new.redirect_interfaces,
        ),
        ("pin_dir", old.pin_dir != new.pin_dir),
        ("cgroup", old.cgroup != new.cgroup),
        ("cgroup_mount", old.cgroup_mount != new.cgroup_mount),
        ("socket", old.socket != new.socket),
        ("state_file", old.state_file != new.state_file),
        ("metrics", old.metrics != new.metrics),
        ("limits", old.limits != new.limits),
    ];
    let pending: Vec<&str> = restart_only
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(n, _)| *n)
        .collect();
    (state.table.dynamic, state.table.reserved) = crate::host::dynamic_ports(new.dynamic_ports);
    let message = format!(
        "reloaded {}: {} added, {} updated, {} removed in {:.3} ms{}",
        source.path.display(),
        plan.add.len(),
        plan.update.len(),
        plan.remove.len(),
        started.elapsed().as_secs_f64() * 1e3,
        if pending.is_empty() {
            String::new()
        } else {
            format!(
                "; changes to {} take effect at the next start",
                pending.join(", ")
            )
        }
    );
    let keep = Config {
        interfaces: old.interfaces.clone(),
        attach: old.attach,
        redirect_interfaces: old.redirect_interfaces.clone(),
        pin_dir: old.pin_dir.clone(),
        socket: old.socket.clone(),
        state_file: old.state_file.clone(),
        cgroup: old.cgroup.clone(),
        cgroup_mount: old.cgroup_mount.clone(),
        limits: old.limits.clone(),
        ..new
    };
    state.config = keep;
    info!("{message}");
    Ok(message)
}

/// What `list` and `stats` read besides the counters: the mappings with their stats slots,
/// flow-table fill and interfaces. Taken from the state for each request, or once when a reload
/// begins, to answer from while it runs.
pub(super) struct View {
    mappings: Vec<(Mapping, u32)>,
    flows: (u64, u64, u64, u64),
    interfaces: Vec<(String, bool)>,
    local_backends: Vec<LocalBackendReport>,
}

impl View {
    pub(super) fn of(state: &State) -> Self {
        Self {
            mappings: state
                .table
                .entries()
                .into_iter()
                .map(|e| (e.mapping.clone(), e.place.stats_slot))
                .collect(),
            flows: (
                state.flows.assured.active,
                state.flows.assured.capacity,
                state.flows.new.active,
                state.flows.new.capacity,
            ),
            interfaces: state.dp.interfaces(),
            local_backends: state
                .local_backends
                .iter()
                .map(|(addr, l)| LocalBackendReport {
                    addr: *addr,
                    device: l.device.clone(),
                    mac: l.backend.dmac.map(|b| format!("{b:02x}")).join(":"),
                })
                .collect(),
        }
    }
}

/// Answers `list` or `stats` from `view` and the counter maps (`None` for other requests).
pub(super) fn read(view: &View, counters: &Counters, request: &Request) -> Response {
    match request {
        Request::List => Response::Mappings {
            mappings: view.mappings.iter().map(|(m, _)| m.clone()).collect(),
        },
        Request::Stats => match stats(view, counters) {
            Ok(stats) => Response::Stats { stats },
            Err(e) => {
                error!("reading counters: {e:#}");
                Response::Error {
                    message: format!("reading counters: {e:#}"),
                }
            }
        },
        _ => Response::Error {
            message: "not a read request".into(),
        },
    }
}

fn stats(view: &View, counters: &Counters) -> anyhow::Result<StatsReport> {
    let all = counters.all_mappings()?;
    let mappings = view
        .mappings
        .iter()
        .map(|(mapping, slot)| MappingStats {
            mapping: mapping.clone(),
            counters: all.get(*slot as usize).copied().unwrap_or_default(),
        })
        .collect();
    let counters = Stat::ALL
        .iter()
        .zip(counters.global()?)
        .map(|(stat, value)| (stat.name().to_string(), value))
        .collect();
    let (active_flows, flow_capacity, new_flows, new_flow_capacity) = view.flows;
    Ok(StatsReport {
        mappings,
        counters,
        active_flows,
        flow_capacity,
        new_flows,
        new_flow_capacity,
        interfaces: view.interfaces.clone(),
        local_backends: view.local_backends.clone(),
    })
}
