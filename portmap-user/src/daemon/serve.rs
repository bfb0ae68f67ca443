//! The main loop: signals, the expiry tick, netlink address and link changes, the eBPF log, and
//! the control socket, whose clients are each served by their own task.

use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    State,
    changes::{View, dispatch, read, reload, settle},
};
use crate::{
    api::control::{self, Request, Response},
    api::metrics::Pending,
    api::notify,
    datapath::{self, Counters},
    host,
    host::local_backends,
    host::netlink,
};

pub(super) fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file nobody answers on is left over from a crash.
    let _ = fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    info!("control socket {}", path.display());
    Ok(listener)
}

/// A reload running on the blocking pool (it may take a while with many mappings): meanwhile
/// `list` and `stats` are answered from the view taken when it began, and changes wait for it.
struct Reloading {
    task: JoinHandle<(State, anyhow::Result<String>)>,
    view: View,
    /// Who asked (`None`: SIGHUP).
    reply: Option<oneshot::Sender<Response>>,
    /// Changes that arrived meanwhile, applied in order when it is done.
    queued: VecDeque<Pending>,
    /// Another SIGHUP came meanwhile: reload again when it is done.
    again: bool,
}

impl Reloading {
    /// Lends `state` to a reload on the blocking pool (between `RELOADING=1` and `READY=1`).
    fn start(state: State, reply: Option<oneshot::Sender<Response>>) -> Self {
        notify::reloading();
        let view = View::of(&state);
        let task = tokio::task::spawn_blocking(move || {
            let mut state = state;
            let result = reload(&mut state);
            (state, result)
        });
        Self {
            task,
            view,
            reply,
            queued: VecDeque::new(),
            again: false,
        }
    }

    /// Takes the state back when the reload is done: saves it, answers whoever asked, applies the
    /// changes that waited. Returns the state and whether to reload again.
    fn finish(self, done: (State, anyhow::Result<String>), counters: &Counters) -> (State, bool) {
        let (mut state, result) = done;
        notify::ready(&status_line(&state));
        let result = settle(&mut state, result);
        match self.reply {
            Some(reply) => {
                let _ = reply.send(match result {
                    Ok(message) => Response::Ok { message },
                    Err(e) => Response::Error {
                        message: format!("{e:#}"),
                    },
                });
            }
            None => match result {
                Ok(message) => info!("SIGHUP: {message}"),
                Err(e) => error!("SIGHUP: {e:#}"),
            },
        }
        for (request, reply) in self.queued {
            let _ = reply.send(dispatch(request, &mut state, counters));
        }
        (state, self.again)
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
    let mut gc = tokio::time::interval(state.config.timeouts.gc_interval());
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
    let counters = state.dp.counters()?;
    // `None` while a reload has it.
    let mut state = Some(state);
    let mut reloading: Option<Reloading> = None;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break }
            _ = int.recv() => { info!("SIGINT"); break }
            _ = hup.recv() => match (state.take(), reloading.as_mut()) {
                (Some(s), _) => reloading = Some(Reloading::start(s, None)),
                (None, Some(r)) => r.again = true,
                (None, None) => unreachable!("the state is lent only to a reload"),
            },
            done = async { (&mut reloading.as_mut().expect("guarded").task).await }, if reloading.is_some() => {
                let (mut s, again) = reloading.take().expect("guarded").finish(done?, &counters);
                if again {
                    reloading = Some(Reloading::start(s, None));
                } else {
                    // `local_fast_path` may have changed.
                    follow_local_backends(&mut s);
                    state = Some(s);
                }
            }
            _ = gc.tick(), if state.is_some() => {
                let state = state.as_mut().expect("guarded");
                let timeouts = &state.config.timeouts;
                match datapath::monotonic_ns().and_then(|now| state.dp.expire_flows(now, timeouts)) {
                    Ok(plan) => {
                        state.flows.update(&plan);
                        state.table.release_drained(&plan.slots_in_use);
                        notify::status(&status_line(state));
                    }
                    Err(e) => warn!("flow expiry pass failed: {e:#}"),
                }
            }
            () = tick(watchdog.as_mut()) => notify::watchdog(),
            guard = addresses.readable_mut(), if state.is_some() => {
                let state = state.as_mut().expect("guarded");
                let mut guard = guard?;
                if guard.get_inner_mut().drain() {
                    match host::addresses().and_then(|a| state.dp.sync_local_addrs(&a).map(|()| a.len())) {
                        Ok(n) => info!("host addresses or links changed: {n} local addresses"),
                        Err(e) => error!("syncing local addresses: {e:#}"),
                    }
                    follow_interfaces(state);
                }
                guard.clear_ready();
            }
            guard = backends.readable_mut() => {
                let mut guard = guard?;
                if guard.get_inner_mut().drain() && backends_changed.is_none() {
                    backends_changed = Some(tokio::time::Instant::now() + BACKENDS_SETTLE);
                }
                guard.clear_ready();
            }
            () = sleep_until(backends_changed), if state.is_some() => {
                backends_changed = None;
                follow_local_backends(state.as_mut().expect("guarded"));
            }
            guard = logs.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            conn = listener.accept() => {
                let (stream, _) = conn?;
                tokio::spawn(client(stream, requests_tx.clone()));
            }
            Some((request, reply)) = requests.recv() => match (state.as_mut(), reloading.as_mut()) {
                (Some(_), _) if request == Request::Reload => {
                    reloading = Some(Reloading::start(state.take().expect("matched"), Some(reply)));
                }
                (Some(s), _) => {
                    let _ = reply.send(dispatch(request, s, &counters));
                }
                (None, Some(r)) if matches!(request, Request::List | Request::Stats) => {
                    let _ = reply.send(read(&r.view, &counters, &request));
                }
                (None, Some(r)) => r.queued.push_back((request, reply)),
                (None, None) => unreachable!("the state is lent only to a reload"),
            },
        }
        // A reload (SIGHUP or `portmap reload`) may have changed the interval: the next pass
        // comes one new interval from now, not after the old one.
        if let Some(state) = state.as_ref() {
            let period = state.config.timeouts.gc_interval();
            if gc.period() != period {
                info!("flow expiry every {} s", period.as_secs());
                gc = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            }
        }
    }
    notify::stopping();
    // A running reload finishes first, so that what it changed is saved.
    if let Some(mut r) = reloading {
        let done = (&mut r.task).await?;
        r.finish(done, &counters);
    }
    Ok(())
}

/// Detaches from client-facing interfaces that disappeared and attaches to those that came back.
fn follow_interfaces(state: &mut State) {
    for change in state.dp.resync_interfaces() {
        match change {
            datapath::IfaceChange::Gone(iface) => error!(
                "interface {iface} disappeared: its published ports are unreachable through it until it \
                 comes back (it is attached again then)"
            ),
            datapath::IfaceChange::Back(iface) => info!("interface {iface} is back: attached again"),
            datapath::IfaceChange::Failed(iface, e) => {
                error!("interface {iface} is back but attaching failed (retried at its next change): {e}");
            }
        }
        notify::status(&status_line(state));
    }
}

/// How long a burst of neighbour, FDB, link and route changes may last before the local backends
/// are read again (once).
const BACKENDS_SETTLE: Duration = Duration::from_millis(20);

/// Makes `PM_LOCAL_BACKENDS` match the kernel's view of the containers on this host (or empties
/// it when `local_fast_path` is off). A failure leaves the previous entries: the datapath falls
/// back to the FIB path for any device that went.
pub(super) fn follow_local_backends(state: &mut State) {
    let read = if state.config.local_fast_path {
        local_backends::read()
    } else {
        Ok(BTreeMap::new())
    };
    let synced = read.and_then(|local| {
        let changed = state
            .dp
            .sync_local_backends(local.iter().map(|(addr, l)| (*addr, &l.backend)))?;
        Ok((local, changed))
    });
    match synced {
        Ok((local, changed)) => {
            if changed > 0 {
                info!("local backends (fast path): {}", local.len());
            }
            state.local_backends = local;
        }
        Err(e) => error!("following the local backends: {e:#}"),
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

/// What `systemctl status` shows: mappings, interfaces and how full the flow tables were at the
/// last expiry pass.
pub(super) fn status_line(state: &State) -> String {
    let (assured, new) = (&state.flows.assured, &state.flows.new);
    let ifaces: Vec<String> = state
        .dp
        .interfaces()
        .into_iter()
        .map(|(name, up)| if up { name } else { format!("{name} (missing)") })
        .collect();
    format!(
        "{} mapping(s) on {}; flows {}/{} assured, {}/{} new",
        state.table.entries().len(),
        ifaces.join(", "),
        assured.active,
        assured.capacity,
        new.active,
        new.capacity
    )
}

/// One control connection, served beside the others: one request line (at most
/// `MAX_REQUEST_BYTES`, within 5 s), applied by the main loop (changes stay serialised), the
/// answer written within 10 s. A silent, slow or never-reading client only holds its own task;
/// the daemon's shutdown drops it.
async fn client(stream: UnixStream, requests: mpsc::Sender<Pending>) {
    let (read, mut write) = stream.into_split();
    let response = match read_request(read).await {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if requests.send((request, reply)).await.is_err() {
                return;
            }
            match answer.await {
                Ok(response) => response,
                Err(_) => return,
            }
        }
        Err(message) => Response::Error { message },
    };
    let Ok(mut out) = serde_json::to_string(&response) else {
        return;
    };
    out.push('\n');
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), write.write_all(out.as_bytes())).await,
        Ok(Ok(()))
    ) {
        warn!("control connection: the client did not take its answer within 10 s");
    }
}

/// Reads one request line; what is wrong with it otherwise, as the error line to answer.
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let limit = control::MAX_REQUEST_BYTES;
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(limit as u64 + 1);
    match tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("no request within 5 s".into()),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > limit {
        return Err(format!("request larger than {limit} bytes: refused"));
    }
    let text = std::str::from_utf8(&line).map_err(|_| "bad request: not UTF-8 text".to_string())?;
    control::parse_request(text).map_err(|e| e.to_string())
}
