//! The requests that change or read the mappings (control socket, metrics scrapes), applied one
//! at a time to the state by its owner. A reload is not among them: it runs beside the loop
//! (`reload`).

use std::{path::Path, time::Instant};

use anyhow::Context as _;
use log::{error, info, warn};
use portmap_common::Stat;

use super::{
    docker,
    state::{State, Undo, View},
};
use crate::{
    api::{
        control::{DockerChange, Listed, MappingStats, Request, Response, StatsReport},
        pending,
    },
    datapath::Counters,
    host::sockets,
    model::{
        allow,
        mapping::Mapping,
        spec,
        table::{Origin, TableError},
    },
};

/// Applies a change or answers a read. `Reload` never comes here: its owner runs it beside the
/// loop (`Reloading`), so it is refused as a programming error, not applied twice.
pub(super) fn dispatch(request: Request, state: &mut State, counters: &Counters) -> Response {
    match request {
        Request::Containers => Response::Containers {
            containers: state.table.containers(),
        },
        Request::List | Request::Stats => read(&View::of(state), counters, &request),
        Request::Reload => Response::Error {
            message: "internal error: a reload is run by the main loop".into(),
        },
        Request::Docker(DockerChange::Status(status)) => {
            state.docker = Some(status);
            respond(Ok(String::new()))
        }
        change => {
            let undo = state.undo_point();
            let mut outcome = apply(&change, state);
            if needs_drained_slots(&outcome, state) {
                state.expire_flows();
                outcome = apply(&change, state);
            }
            respond(settle(state, undo, outcome))
        }
    }
}

/// A change refused because every stats slot is taken while some belong to removed mappings
/// whose flows may be gone: an expiry pass now (instead of at its interval) gives those back,
/// and the change is tried once more. Removed mappings never make the table look full.
fn needs_drained_slots(outcome: &anyhow::Result<String>, state: &State) -> bool {
    state.table.is_draining()
        && outcome.as_ref().is_err_and(|e| {
            e.chain().any(|cause| {
                matches!(
                    cause.downcast_ref::<TableError>(),
                    Some(TableError::Full {
                        limit: "max_mappings",
                        ..
                    })
                )
            })
        })
}

/// Applies one change to the state (the table and the maps); what it changed, or why not.
fn apply(change: &Request, state: &mut State) -> anyhow::Result<String> {
    let started = Instant::now();
    let parsed = |spec: &str| spec::parse(spec).map_err(TableError::from);
    match change {
        Request::Add { spec, allow } => changed(
            "added",
            own_listed(spec, allow.clone()).and_then(|m| {
                state
                    .table
                    .add_as(&mut state.dp, &m, &sockets::local_sockets(), Origin::Runtime)
            }),
            started,
        ),
        Request::Del { spec } => changed(
            "deleted",
            parsed(spec).and_then(|m| state.table.remove(&mut state.dp, &m)),
            started,
        ),
        Request::Update { spec, allow } => changed(
            "updated",
            parsed(spec).and_then(|m| {
                // No list in the request: the mapping keeps its own.
                let allow = allow
                    .clone()
                    .unwrap_or_else(|| state.table.own_allow(&m).unwrap_or_default());
                let m = own_listed(spec, allow)?;
                state.table.update(&mut state.dp, &m)
            }),
            started,
        ),
        Request::Publish { owner, specs, allow } => publish(state, owner.clone(), specs, allow),
        Request::Unpublish { owner } => publish(state, owner.clone(), &[], &[]),
        Request::Docker(DockerChange::Running(ids)) => docker::unpublish_gone(state, ids),
        Request::Docker(DockerChange::Container(container, mappings)) => {
            docker::publish(state, container.clone(), mappings)
        }
        Request::Docker(DockerChange::Status(_))
        | Request::Containers
        | Request::List
        | Request::Stats
        | Request::Reload => anyhow::bail!("internal error: not a change"),
    }
}

/// The answer to a change.
pub(super) fn respond(result: anyhow::Result<String>) -> Response {
    match result {
        Ok(message) => Response::Ok { message },
        Err(e) => Response::Error {
            message: format!("{e:#}"),
        },
    }
}

/// The spec with `allow` as its own list, checked (prefixes of its family).
fn own_listed(spec: &str, allow: Vec<ipnet::IpNet>) -> Result<Mapping, TableError> {
    let mapping = spec::parse(spec)?.with_allow(allow);
    spec::check(&mapping, spec)?;
    Ok(mapping)
}

/// Makes the mappings of the container `owner` exactly `specs` (none: removes them) under its
/// allow-list `allow` (`allow::for_container`), all or nothing; answers with what changed.
fn publish(
    state: &mut State,
    owner: String,
    specs: &[String],
    allow: &[ipnet::IpNet],
) -> anyhow::Result<String> {
    allow::check_list(allow).context("the container's allow-list")?;
    let mappings = specs
        .iter()
        .map(|spec| spec::parse(spec).with_context(|| format!("'{spec}'")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mappings, left_out) = allow::for_container(mappings, allow);
    let origin = Origin::Container(owner.clone());
    let plan = state
        .table
        .apply_as(&mut state.dp, &origin, &mappings, &sockets::local_sockets())?;
    let mut message = format!("container {owner}: {plan}");
    if let Some(why) = allow::left_out_message(&left_out) {
        warn!("container {owner}: {why}");
        message = format!("{message}; {why}");
    }
    if !plan.is_empty() {
        info!("{message}");
    }
    Ok(message)
}

/// Unpublishes the containers the CNI plugin recorded as removed while no daemon ran
/// (`api::pending`), then saves the state; the record is emptied only once that is saved, so a
/// crash in between applies it again at the next start (removing nothing twice).
pub(super) fn apply_pending_removals(state: &mut State, socket: &Path) -> anyhow::Result<()> {
    let path = pending::path_for(socket);
    let pending = pending::Pending::take(socket).with_context(|| format!("reading {}", path.display()))?;
    if pending.owners.is_empty() {
        return Ok(());
    }
    let undo = state.undo_point();
    let removed = pending.owners.iter().try_for_each(|owner| {
        let message = publish(state, owner.clone(), &[], &[])?;
        info!("{message} (the container was removed while no daemon ran)");
        Ok::<_, anyhow::Error>(())
    });
    if let Err(e) = removed.and_then(|()| state.save()) {
        // The record stays: the next start applies it again.
        state.undo(undo);
        error!(
            "{:#}",
            e.context(format!(
                "unpublishing the containers {} records: undone, tried again at the next start",
                path.display()
            ))
        );
        return Ok(());
    }
    state.flush_stale_flows();
    pending
        .done()
        .with_context(|| format!("emptying {}", path.display()))
}

/// After a change (or a refused one): saves the mappings for the next daemon, then deletes the
/// flows the change made stale. Nothing is answered as done that a restarted daemon would not
/// know: a change that cannot be saved (a full disk) is undone, in the table and the kernel, to
/// `undo`, and refused with the reason; so is a refused change of several steps (a Docker
/// reconnect's removals) whose first steps were applied.
pub(super) fn settle(
    state: &mut State,
    undo: Undo,
    outcome: anyhow::Result<String>,
) -> anyhow::Result<String> {
    let message = match outcome {
        Ok(message) => message,
        Err(e) => {
            state.undo(undo);
            return Err(e);
        }
    };
    if let Err(e) = state.save() {
        state.undo(undo);
        let e = e.context("not changed: the change could not be saved for the next daemon, so it was undone");
        error!("{e:#}");
        return Err(e);
    }
    state.flush_stale_flows();
    Ok(message)
}

/// Logs a change with its duration and answers with its `docker port` lines.
fn changed(verb: &str, result: Result<Mapping, TableError>, started: Instant) -> anyhow::Result<String> {
    let m = result?;
    info!("{verb} {m} in {:.1} µs", started.elapsed().as_secs_f64() * 1e6);
    let indent = format!("\n{}", " ".repeat(verb.len() + 1));
    Ok(format!("{verb} {}", m.docker_lines().join(&indent)))
}

/// Answers `list` or `stats` from `view` and the counter maps (an error for other requests).
pub(super) fn read(view: &View, counters: &Counters, request: &Request) -> Response {
    match request {
        Request::List => Response::Mappings {
            mappings: view
                .mappings
                .iter()
                .map(|(mapping, _, owner)| Listed {
                    mapping: mapping.clone(),
                    owner: owner.clone(),
                })
                .collect(),
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
    let denied = counters.all_denied()?;
    let mappings = view
        .mappings
        .iter()
        .map(|(mapping, slot, _)| MappingStats {
            mapping: mapping.clone(),
            counters: all.get(*slot as usize).copied().unwrap_or_default(),
            drop_denied: denied.get(*slot as usize).copied().unwrap_or_default(),
        })
        .collect();
    let counters = Stat::ALL
        .iter()
        .zip(counters.global()?)
        .map(|(stat, value)| (stat.name().to_string(), value))
        .collect();
    Ok(StatsReport {
        mappings,
        counters,
        active_flows: view.flows.assured,
        flow_capacity: view.flows.assured_capacity,
        new_flows: view.flows.new,
        new_flow_capacity: view.flows.new_capacity,
        interfaces: view.interfaces.clone(),
        local_backends: view.local_backends.clone(),
        docker: view.docker.clone(),
    })
}
