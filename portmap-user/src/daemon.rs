//! `portmap run`: owns the datapath, applies mappings, serves the control socket, expires flows.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use log::{error, info, warn};
use portmap_common::Stat;
use tokio::{
    io::unix::AsyncFd,
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    config::{Config, Overrides, Valid},
    control::{self, MappingStats, Request, Response, StatsReport},
    datapath::{self, Datapath},
    host,
    mapping::Mapping,
    metrics::Pending,
    notify, sockets, spec,
    table::{Capacity, Table, TableError},
};

/// Where `reload` (and SIGHUP) read the configuration again from.
#[derive(Clone, Debug)]
pub struct ReloadSource {
    pub path: PathBuf,
    /// The command-line options that replace the file's values, applied again on every reload.
    pub overrides: Overrides,
}

/// The daemon's running state, shared by the control socket, signals and the GC tick.
struct State {
    dp: Datapath,
    table: Table,
    config: Config,
    reload: Option<ReloadSource>,
    flows: FlowTable,
}

/// Runs the daemon until SIGTERM/SIGINT; detaches and unpins everything on the way out.
pub async fn run(valid: Valid, reload: Option<ReloadSource>) -> anyhow::Result<()> {
    let cfg = valid.config.clone();
    refuse_if_running(&cfg.socket)?;
    datapath::ensure_bpffs()?;
    datapath::check_pin_dir(&cfg.pin_dir)?;
    datapath::remove_stale_pins(&cfg.pin_dir)?;
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

    let cgroup_dir = host::cgroup_dir(&cfg.cgroup)?;
    let mut dp = Datapath::load(&cfg.pin_dir, &cfg.limits)?;
    let logger = dp.take_logger()?;
    let capacity = Capacity {
        ports: cfg.limits.max_mappings,
        groups: cfg.limits.max_backend_groups,
        backends: cfg.limits.max_backends,
    };
    let mut state = State {
        table: Table::new(capacity, cfg.dynamic_ports),
        flows: FlowTable::new(&cfg.limits),
        config: cfg.clone(),
        reload,
        dp,
    };
    let result = async {
        // Local addresses first: wildcard mappings match only them, from the first packet on.
        let watch = host::AddressWatch::new()?;
        state.dp.sync_local_addrs(&host::addresses()?)?;
        state
            .dp
            .attach(&cfg.interfaces, cfg.attach, &cfg.redirect_interfaces, &cgroup_dir)?;
        let started = Instant::now();
        state
            .table
            .apply(&mut state.dp, &valid.mappings, &sockets::local_sockets())
            .context("applying the configured mappings")?;
        info!(
            "{} mapping(s) applied in {:.3} ms",
            valid.mappings.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let listener = bind_socket(&cfg.socket)?;
        let metrics = match cfg.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("metrics: listening on {addr}"))?,
            ),
            None => None,
        };
        if let Some(addr) = cfg.metrics {
            info!("serving Prometheus metrics at http://{addr}/metrics");
        }
        notify::ready(&status_line(&state));
        let served = serve(&mut state, listener, metrics, logger, watch).await;
        let _ = fs::remove_file(&cfg.socket);
        served
    }
    .await;
    state.dp.shutdown();
    info!("detached and unpinned; exiting");
    result
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

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
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

/// What the last expiry pass saw of one flow table, with a warning when it crosses 90 % (said
/// again when it is back under 80 %).
struct Fill {
    active: u64,
    /// Flows that fit (two conntrack entries each).
    capacity: u64,
    high: bool,
    /// What reaching the top means, and what to do.
    full: &'static str,
}

impl Fill {
    fn new(entries: u32, full: &'static str) -> Self {
        Self {
            active: 0,
            capacity: u64::from(entries / 2),
            high: false,
            full,
        }
    }

    fn update(&mut self, table: &str, active: u64) {
        self.active = active;
        if !self.high && active * 10 >= self.capacity * 9 {
            self.high = true;
            warn!(
                "{table} {active}/{} flows (>= 90 %): {}",
                self.capacity, self.full
            );
        } else if self.high && active * 10 < self.capacity * 8 {
            self.high = false;
            info!("{table} back under 80 % ({active}/{} flows)", self.capacity);
        }
    }
}

/// The two flow tables: assured flows (never evicted) and flows not assured yet (shed first).
struct FlowTable {
    assured: Fill,
    new: Fill,
}

impl FlowTable {
    fn new(limits: &crate::config::Limits) -> Self {
        Self {
            assured: Fill::new(
                limits.conntrack_entries,
                "when full, new flows stay unassured and may be shed; raise limits.conntrack_entries",
            ),
            new: Fill::new(
                limits.conntrack_new_entries,
                "flows that have not completed a handshake are being shed (a SYN flood?); \
                 established flows are not affected; raise limits.conntrack_new_entries if this is normal load",
            ),
        }
    }

    fn update(&mut self, plan: &datapath::ExpiryPlan) {
        self.assured.update("flow table", plan.live_flows);
        self.new.update("table of new flows", plan.new_flows);
    }
}

async fn serve(
    state: &mut State,
    listener: UnixListener,
    metrics: Option<tokio::net::TcpListener>,
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    watch: host::AddressWatch,
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
    let (requests_tx, mut requests) = mpsc::channel::<Pending>(64);
    // Scrapes go through the same queue as control requests; the task ends with the runtime.
    if let Some(metrics) = metrics {
        tokio::spawn(crate::metrics::serve(metrics, requests_tx.clone()));
    }
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); notify::stopping(); return Ok(()) }
            _ = int.recv() => { info!("SIGINT"); notify::stopping(); return Ok(()) }
            _ = hup.recv() => {
                match reload_notified(state) {
                    Ok(message) => info!("SIGHUP: {message}"),
                    Err(e) => error!("SIGHUP: {e:#}"),
                }
                flush_stale_flows(state);
            }
            _ = gc.tick() => {
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
            guard = addresses.readable_mut() => {
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
            guard = logs.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            conn = listener.accept() => {
                let (stream, _) = conn?;
                tokio::spawn(client(stream, requests_tx.clone()));
            }
            Some((request, reply)) = requests.recv() => {
                let _ = reply.send(dispatch(request, state));
            }
        }
        // A reload (SIGHUP or `portmap reload`) may have changed the interval: the next pass
        // comes one new interval from now, not after the old one.
        let period = state.config.timeouts.gc_interval();
        if gc.period() != period {
            info!("flow expiry every {} s", period.as_secs());
            gc = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        }
    }
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
fn status_line(state: &State) -> String {
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

fn dispatch(request: Request, state: &mut State) -> Response {
    let started = Instant::now();
    let parsed = |spec: &str| spec::parse(spec).map_err(TableError::from);
    let outcome: anyhow::Result<String> = match request {
        Request::Add { spec } => changed(
            "added",
            parsed(&spec).and_then(|m| state.table.add(&mut state.dp, &m, &sockets::local_sockets())),
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
        Request::List => {
            return Response::Mappings {
                mappings: state.table.mappings(),
            };
        }
        Request::Stats => {
            return match stats(state) {
                Ok(stats) => Response::Stats { stats },
                Err(e) => {
                    error!("reading counters: {e:#}");
                    Response::Error {
                        message: format!("reading counters: {e:#}"),
                    }
                }
            };
        }
    };
    flush_stale_flows(state);
    match outcome {
        Ok(message) => Response::Ok { message },
        Err(e) => Response::Error {
            message: format!("{e:#}"),
        },
    }
}

/// Deletes the UDP flows the last changes made stale (of removed mappings and backends), so an
/// ongoing UDP stream takes the new path with its next datagram. TCP flows finish where they
/// are.
fn flush_stale_flows(state: &mut State) {
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
fn reload_notified(state: &mut State) -> anyhow::Result<String> {
    notify::reloading();
    let result = reload(state);
    notify::ready(&status_line(state));
    result
}

/// Reads the config file again and applies its mappings as one diff (all or nothing) and its
/// timeouts. Settings that only take effect at start-up are reported, not applied.
fn reload(state: &mut State) -> anyhow::Result<String> {
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
        ("socket", old.socket != new.socket),
        ("metrics", old.metrics != new.metrics),
        ("limits", old.limits != new.limits),
    ];
    let pending: Vec<&str> = restart_only
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(n, _)| *n)
        .collect();
    state.table.dynamic = new.dynamic_ports;
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
        cgroup: old.cgroup.clone(),
        limits: old.limits.clone(),
        ..new
    };
    state.config = keep;
    info!("{message}");
    Ok(message)
}

fn stats(state: &State) -> anyhow::Result<StatsReport> {
    let mut mappings = Vec::new();
    for entry in state.table.entries() {
        mappings.push(MappingStats {
            mapping: entry.mapping.clone(),
            counters: state.dp.mapping_counters(entry.place.stats_slot)?,
        });
    }
    let counters = Stat::ALL
        .iter()
        .zip(state.dp.global_counters()?)
        .map(|(stat, value)| (stat.name().to_string(), value))
        .collect();
    Ok(StatsReport {
        mappings,
        counters,
        active_flows: state.flows.assured.active,
        flow_capacity: state.flows.assured.capacity,
        new_flows: state.flows.new.active,
        new_flow_capacity: state.flows.new.capacity,
        interfaces: state.dp.interfaces(),
    })
}
