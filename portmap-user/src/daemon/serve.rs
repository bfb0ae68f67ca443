//! The main loop: it waits for signals, the expiry tick, netlink address/link and
//! local-backend changes, the eBPF log and control connections, and hands each to the owner of
//! the state (`Owner`), whose methods do the work. Control connections are served by tasks of
//! their own (`control_socket`) and queue their requests here.

use std::{collections::VecDeque, time::Duration};

use log::info;
use tokio::{
    io::unix::AsyncFd,
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{
    control_socket,
    reload::{Asker, Reloaded, Reloading, Waiting},
    requests::{dispatch, read},
    state::State,
};
use crate::{
    api::{
        control::{Pending, Request},
        notify,
    },
    datapath::Counters,
    host::netlink,
};

/// How long a burst of neighbour, FDB, link and route changes may last before the local backends
/// are read again (once).
const BACKENDS_SETTLE: Duration = Duration::from_millis(20);

/// The state's owner: the loop, or a reload it is lent to (exactly one of them has it).
struct Owner {
    state: Option<State>,
    reloading: Option<Reloading>,
    counters: Counters,
}

impl Owner {
    /// Runs `work` on the state, unless a reload has it.
    fn with_state(&mut self, work: impl FnOnce(&mut State)) {
        if let Some(state) = self.state.as_mut() {
            work(state);
        }
    }

    /// A request from a control connection or a scrape: applied, answered from the view of a
    /// running reload, or queued behind it.
    fn request(&mut self, (request, reply): Pending) {
        if let Some(r) = self.reloading.as_mut() {
            if matches!(request, Request::List | Request::Stats) {
                let _ = reply.send(read(&r.view, &self.counters, &request));
            } else if request == Request::Reload {
                r.waiting.push_back(Waiting::Reload(Asker::Client(reply)));
            } else {
                r.waiting.push_back(Waiting::Request((request, reply)));
            }
        } else if request == Request::Reload {
            self.start_reload(Asker::Client(reply), VecDeque::new());
        } else if let Some(state) = self.state.as_mut() {
            let _ = reply.send(dispatch(request, state, &self.counters));
        }
    }

    /// SIGHUP: a reload now, or once the running one is done (several SIGHUPs meanwhile are one).
    fn hangup(&mut self) {
        match self.reloading.as_mut() {
            Some(r) if matches!(r.waiting.back(), Some(Waiting::Reload(Asker::Hangup))) => {}
            Some(r) => r.waiting.push_back(Waiting::Reload(Asker::Hangup)),
            None => self.start_reload(Asker::Hangup, VecDeque::new()),
        }
    }

    fn start_reload(&mut self, asker: Asker, waiting: VecDeque<Waiting>) {
        if let Some(state) = self.state.take() {
            self.reloading = Some(Reloading::start(state, asker, waiting));
        }
    }

    /// The running reload is done: the state comes back, and what waited is applied in order
    /// until the next reload among it.
    fn reload_done(&mut self, done: anyhow::Result<Reloaded>) -> anyhow::Result<()> {
        let Some(reloading) = self.reloading.take() else {
            return Ok(());
        };
        let (state, mut waiting) = reloading.finish(done?);
        self.state = Some(state);
        while let Some(next) = waiting.pop_front() {
            match next {
                Waiting::Request(pending) => self.request(pending),
                Waiting::Reload(asker) => {
                    self.start_reload(asker, waiting);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Waits for the running reload (forever without one).
    async fn reloaded(&mut self) -> anyhow::Result<Reloaded> {
        match self.reloading.as_mut() {
            Some(r) => r.done().await,
            None => std::future::pending().await,
        }
    }
}

pub(super) async fn serve(
    state: State,
    listener: UnixListener,
    metrics: Option<tokio::net::TcpListener>,
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    [watch, backends_watch]: [netlink::Watch; 2],
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut gc = tokio::time::interval(state.config.live.timeouts.gc_interval());
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
    // SAFETY: the logger owns its ring buffer fd, and AsyncFd owns the logger until it is dropped.
    let mut logs = unsafe { AsyncFd::register(logger)? };
    // SAFETY: the watch owns its netlink socket, and AsyncFd owns the watch until it is dropped.
    let mut addresses = unsafe { AsyncFd::register(watch)? };
    // SAFETY: as above.
    let mut backends = unsafe { AsyncFd::register(backends_watch)? };
    // Neighbour and FDB changes come in bursts: they are followed once the burst is over.
    let mut backends_changed: Option<tokio::time::Instant> = None;
    let (requests_tx, mut requests) = mpsc::channel::<Pending>(64);
    // Scrapes go through the same queue as control requests; the task ends with the runtime.
    if let Some(metrics) = metrics {
        tokio::spawn(crate::api::metrics::serve(metrics, requests_tx.clone()));
    }
    if let Some(url) = &state.config.startup.docker {
        tokio::spawn(crate::docker::follow(url.0.clone(), requests_tx.clone()));
    }
    let counters = state.dp.counters()?;
    let mut owner = Owner {
        state: Some(state),
        reloading: None,
        counters,
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break }
            _ = int.recv() => { info!("SIGINT"); break }
            _ = hup.recv() => owner.hangup(),
            done = owner.reloaded() => owner.reload_done(done)?,
            _ = gc.tick(), if owner.state.is_some() => owner.with_state(State::expire_flows),
            () = tick(watchdog.as_mut()) => notify::watchdog(),
            guard = addresses.readable_mut(), if owner.state.is_some() => {
                let mut guard = guard?;
                if guard.get_inner_mut().drain() {
                    owner.with_state(State::follow_addresses);
                }
                guard.clear_ready();
            }
            guard = backends.readable_mut() => {
                let mut guard = guard?;
                if guard.get_inner_mut().drain() {
                    owner.with_state(State::routes_changed);
                    if backends_changed.is_none() {
                        backends_changed = Some(tokio::time::Instant::now() + BACKENDS_SETTLE);
                    }
                }
                guard.clear_ready();
            }
            () = sleep_until(backends_changed), if owner.state.is_some() => {
                backends_changed = None;
                owner.with_state(State::follow_local_backends);
            }
            guard = logs.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            conn = listener.accept() => {
                tokio::spawn(control_socket::client(conn?.0, requests_tx.clone()));
            }
            Some(pending) = requests.recv() => owner.request(pending),
        }
        follow_gc_interval(&mut gc, owner.state.as_ref());
    }
    notify::stopping();
    // A running reload finishes first (and what waited for it), so that what it changed is saved.
    while owner.reloading.is_some() {
        let done = owner.reloaded().await;
        owner.reload_done(done)?;
    }
    Ok(())
}

/// A reload may have changed the expiry interval: the next pass comes one new interval from
/// now, not after the old one.
fn follow_gc_interval(gc: &mut tokio::time::Interval, state: Option<&State>) {
    let Some(state) = state else { return };
    let period = state.config.live.timeouts.gc_interval();
    if gc.period() != period {
        info!("flow expiry every {} s", period.as_secs());
        *gc = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    }
}

/// Waits until `at`, or forever without it.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for the next tick of `interval`, or forever without one.
async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
