//! `portmap reload` and SIGHUP: the config file read again and its live settings applied as one
//! diff, on tokio's blocking pool (it may take a while with many mappings). Meanwhile `list` and
//! `stats` are answered from the view taken when it began, and changes (another reload
//! included) wait for it, in order.

use std::{collections::VecDeque, time::Instant};

use anyhow::Context as _;
use log::{error, info};
use tokio::{sync::oneshot, task::JoinHandle};

use super::{
    requests::{respond, settle},
    state::{State, Undo, View},
};
use crate::{
    api::{
        control::{Pending, Response},
        notify,
    },
    config::{Config, startup_changes},
    host::{self, sockets},
    model::table::TableError,
};

/// Who asked for a reload: a client, to be answered, or SIGHUP, logged.
pub(super) enum Asker {
    Client(oneshot::Sender<Response>),
    Hangup,
}

/// What waits for a running reload, in arrival order.
pub(super) enum Waiting {
    /// A change or read that could not be answered from the view.
    Request(Pending),
    /// Another reload (a client's or SIGHUP).
    Reload(Asker),
}

/// A finished reload: the state, where it is undone to if it cannot be saved, and its outcome.
pub(super) type Reloaded = (State, Undo, anyhow::Result<String>);

/// A reload running on the blocking pool, with the state lent to it.
pub(super) struct Reloading {
    task: JoinHandle<Reloaded>,
    /// What `list` and `stats` are answered from meanwhile.
    pub(super) view: View,
    asker: Asker,
    /// What arrived meanwhile.
    pub(super) waiting: VecDeque<Waiting>,
}

impl Reloading {
    /// Lends `state` to a reload (between `RELOADING=1` and `READY=1` for systemd).
    pub(super) fn start(state: State, asker: Asker, waiting: VecDeque<Waiting>) -> Self {
        notify::reloading();
        let view = View::of(&state);
        let task = tokio::task::spawn_blocking(move || {
            let mut state = state;
            let undo = state.undo_point_with_live();
            let result = reload(&mut state);
            (state, undo, result)
        });
        Self {
            task,
            view,
            asker,
            waiting,
        }
    }

    /// Waits until the reload is done.
    pub(super) async fn done(&mut self) -> anyhow::Result<Reloaded> {
        Ok((&mut self.task).await?)
    }

    /// Takes the state back once the reload is `done`: saves it, tells systemd (`READY=1` also
    /// after a failed reload: the previous configuration keeps running) and whoever asked.
    /// Returns the state and what waited.
    pub(super) fn finish(self, done: Reloaded) -> (State, VecDeque<Waiting>) {
        let (mut state, undo, result) = done;
        let result = settle(&mut state, undo, result);
        notify::ready(&state.status_line());
        match self.asker {
            Asker::Client(reply) => {
                let _ = reply.send(respond(result));
            }
            Asker::Hangup => match result {
                Ok(message) => info!("SIGHUP: {message}"),
                Err(e) => error!("SIGHUP: {e:#}"),
            },
        }
        // `local_fast_path` may have changed.
        state.follow_local_backends();
        (state, self.waiting)
    }
}

/// Reads the config file again and applies its live settings: the mappings as one diff (all or
/// nothing), timeouts, dynamic ports and the fast path. Startup settings stay as the daemon
/// started; the answer names those that changed.
fn reload(state: &mut State) -> anyhow::Result<String> {
    let source = state
        .reload
        .clone()
        .context("the daemon was started without a config file: nothing to reload")?;
    let mut config = Config::read(&source.path)?;
    source.overrides.apply(&mut config.startup);
    let valid = config
        .validate()
        .with_context(|| format!("{}", source.path.display()))?;
    let started = Instant::now();
    let apply = |state: &mut State| {
        state.table.apply_config(
            &mut state.dp,
            &valid.config.live.allow,
            &valid.mappings,
            &sockets::local_sockets(),
        )
    };
    let mut plan = apply(state);
    if state.table.is_draining()
        && matches!(
            plan,
            Err(TableError::Full {
                limit: "max_mappings",
                ..
            })
        )
    {
        // Stats slots of mappings removed a moment ago (their flows may be gone): freed now.
        state.expire_flows();
        plan = apply(state);
    }
    let (plan, relisted) = plan.with_context(|| format!("{}: nothing was changed", source.path.display()))?;
    let pending = startup_changes(&state.config.startup, &valid.config.startup);
    (state.table.dynamic, state.table.reserved) = host::dynamic_ports(valid.config.live.dynamic_ports);
    let message = format!(
        "reloaded {}: {plan}{} in {:.3} ms{}",
        source.path.display(),
        if relisted > 0 {
            format!(", {relisted} under the new host allow-list")
        } else {
            String::new()
        },
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
    state.config.live = valid.config.live;
    info!("{message}");
    Ok(message)
}
