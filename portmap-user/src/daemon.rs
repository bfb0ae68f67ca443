//! `portmap run`: owns the datapath, applies mappings, serves the control socket, expires flows.

use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{error, info, warn};
use portmap_common::stat;
use tokio::{
    io::unix::AsyncFd,
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    config::Valid,
    control::{self, MappingStats, Request, Response, StatsReport},
    datapath::{self, Datapath},
    spec::{self, Binding, Mapping, SpecError},
};

/// Why a control request was refused. Nothing is changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("port is already allocated: {binding} already maps to {}:{}", existing.backend_ip, existing.backend_port)]
    Duplicate { binding: Binding, existing: Mapping },
    #[error("no mapping {0}")]
    NotFound(Mapping),
    #[error("{binding} maps to {}:{}, not {}:{}", existing.backend_ip, existing.backend_port, asked.backend_ip, asked.backend_port)]
    Mismatch {
        binding: Binding,
        existing: Mapping,
        asked: Mapping,
    },
    #[error("mapping table is full ({0} mappings, limits.max_mappings)")]
    Full(u32),
    #[error("kernel map update failed: {0:#}")]
    Datapath(anyhow::Error),
}

/// The daemon's mappings and their stats slots. Stats slots are reused oldest-freed first, and
/// zeroed on reuse, so that a deleted mapping's lingering flows rarely count into a new one.
pub struct Table {
    entries: BTreeMap<Binding, (Mapping, u32)>,
    free_slots: VecDeque<u32>,
    next_slot: u32,
    max: u32,
}

impl Table {
    #[must_use]
    pub fn new(max: u32) -> Self {
        Self {
            entries: BTreeMap::new(),
            free_slots: VecDeque::new(),
            next_slot: 0,
            max,
        }
    }

    /// Checks that `mapping` can be added, without changing anything.
    pub fn check_add(&self, mapping: &Mapping) -> Result<(), TableError> {
        if let Some((existing, _)) = self.entries.get(&mapping.binding()) {
            return Err(TableError::Duplicate {
                binding: mapping.binding(),
                existing: *existing,
            });
        }
        if self.entries.len() >= self.max as usize {
            return Err(TableError::Full(self.max));
        }
        Ok(())
    }

    pub fn add(&mut self, dp: &mut Datapath, mapping: Mapping) -> Result<(), TableError> {
        self.check_add(&mapping)?;
        let slot = self.free_slots.pop_front().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        });
        if let Err(e) = dp.insert_mapping(&mapping, slot) {
            self.free_slots.push_front(slot);
            return Err(TableError::Datapath(e));
        }
        self.entries.insert(mapping.binding(), (mapping, slot));
        Ok(())
    }

    pub fn del(&mut self, dp: &mut Datapath, mapping: &Mapping) -> Result<(), TableError> {
        let binding = mapping.binding();
        let Some((existing, slot)) = self.entries.get(&binding).copied() else {
            return Err(TableError::NotFound(*mapping));
        };
        if existing != *mapping {
            return Err(TableError::Mismatch {
                binding,
                existing,
                asked: *mapping,
            });
        }
        dp.remove_mapping(mapping).map_err(TableError::Datapath)?;
        self.entries.remove(&binding);
        self.free_slots.push_back(slot);
        Ok(())
    }

    /// Adds all or nothing: on a failure the ones already added are removed again.
    pub fn add_all(&mut self, dp: &mut Datapath, mappings: &[Mapping]) -> Result<(), TableError> {
        for (i, mapping) in mappings.iter().enumerate() {
            if let Err(e) = self.add(dp, *mapping) {
                for done in &mappings[..i] {
                    let _ = self.del(dp, done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn mappings(&self) -> impl Iterator<Item = (Mapping, u32)> + '_ {
        self.entries.values().copied()
    }
}

/// Runs the daemon until SIGTERM/SIGINT; detaches and unpins everything on the way out.
pub async fn run(valid: Valid) -> anyhow::Result<()> {
    let cfg = &valid.config;
    refuse_if_running(&cfg.socket)?;
    datapath::ensure_bpffs()?;
    datapath::check_pin_dir(&cfg.pin_dir)?;
    datapath::remove_stale_pins(&cfg.pin_dir)?;
    if fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        warn!("net.ipv4.ip_forward is 0: mapped traffic will not be forwarded until it is enabled");
    }

    let mut dp = Datapath::load(&cfg.pin_dir, &cfg.limits)?;
    let logger = dp.take_logger()?;
    let result = async {
        dp.attach(&cfg.interfaces, cfg.attach, &cfg.redirect_interfaces)?;
        let mut table = Table::new(cfg.limits.max_mappings);
        table
            .add_all(&mut dp, &valid.mappings)
            .context("applying the configured mappings")?;
        info!("{} mapping(s) applied", valid.mappings.len());
        let listener = bind_socket(&cfg.socket)?;
        let served = serve(&mut dp, &mut table, &valid, listener, logger).await;
        let _ = fs::remove_file(&cfg.socket);
        served
    }
    .await;
    dp.shutdown();
    info!("detached and unpinned; exiting");
    result
}

fn refuse_if_running(socket: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
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

/// What the last expiry pass saw of the flow table.
struct FlowTable {
    active: u64,
    /// Flows that fit (two conntrack entries each).
    capacity: u64,
    high: bool,
}

impl FlowTable {
    /// Records a pass; warns once when the table crosses 90 % (the LRU then starts evicting live
    /// flows) and says so again when it is back under 80 %.
    fn update(&mut self, active: u64) {
        self.active = active;
        if !self.high && active * 10 >= self.capacity * 9 {
            self.high = true;
            warn!(
                "flow table {active}/{} flows (>= 90 %): raise limits.conntrack_entries before live flows are evicted",
                self.capacity
            );
        } else if self.high && active * 10 < self.capacity * 8 {
            self.high = false;
            info!("flow table back under 80 % ({active}/{} flows)", self.capacity);
        }
    }
}

async fn serve(
    dp: &mut Datapath,
    table: &mut Table,
    valid: &Valid,
    listener: UnixListener,
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<()> {
    let timeouts = &valid.config.timeouts;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut gc = tokio::time::interval(timeouts.gc_interval());
    // SAFETY: the logger owns its ring buffer fd, and AsyncFd owns the logger until it is dropped.
    let mut logs = unsafe { AsyncFd::register(logger)? };
    let mut flows = FlowTable {
        active: 0,
        capacity: u64::from(valid.config.limits.conntrack_entries / 2),
        high: false,
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); return Ok(()) }
            _ = int.recv() => { info!("SIGINT"); return Ok(()) }
            _ = gc.tick() => {
                match datapath::monotonic_ns().and_then(|now| dp.expire_flows(now, timeouts)) {
                    Ok(n) => flows.update(n),
                    Err(e) => warn!("flow expiry pass failed: {e:#}"),
                }
            }
            guard = logs.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            conn = listener.accept() => {
                let (stream, _) = conn?;
                if let Err(e) = handle(stream, dp, table, &flows).await {
                    warn!("control connection: {e:#}");
                }
            }
        }
    }
}

async fn handle(
    stream: UnixStream,
    dp: &mut Datapath,
    table: &mut Table,
    flows: &FlowTable,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), BufReader::new(read).read_line(&mut line))
        .await
        .context("client sent no request within 5 s")??;
    let response = match control::parse_request(&line) {
        Ok(request) => dispatch(request, dp, table, flows),
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

fn dispatch(request: Request, dp: &mut Datapath, table: &mut Table, flows: &FlowTable) -> Response {
    let outcome = match request {
        Request::Add { spec } => spec::parse(&spec).map_err(TableError::from).and_then(|m| {
            table.add(dp, m)?;
            info!("added {m}");
            Ok(format!("added {}", m.docker_line()))
        }),
        Request::Del { spec } => spec::parse(&spec).map_err(TableError::from).and_then(|m| {
            table.del(dp, &m)?;
            info!("deleted {m}");
            Ok(format!("deleted {}", m.docker_line()))
        }),
        Request::List => {
            return Response::Mappings {
                mappings: table.mappings().map(|(m, _)| m).collect(),
            };
        }
        Request::Stats => {
            return match stats(dp, table, flows) {
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
    match outcome {
        Ok(message) => Response::Ok { message },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

fn stats(dp: &Datapath, table: &Table, flows: &FlowTable) -> anyhow::Result<StatsReport> {
    let mut mappings = Vec::new();
    for (mapping, slot) in table.mappings() {
        let c = dp.mapping_counters(slot)?;
        mappings.push(MappingStats {
            mapping,
            fwd_packets: c.fwd_packets,
            fwd_bytes: c.fwd_bytes,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
            flows: c.flows,
        });
    }
    let counters = stat::NAMES
        .iter()
        .zip(dp.global_counters()?)
        .map(|(name, value)| ((*name).to_string(), value))
        .collect();
    Ok(StatsReport {
        mappings,
        counters,
        active_flows: flows.active,
        flow_capacity: flows.capacity,
    })
}
