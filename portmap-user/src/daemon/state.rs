//! The daemon's running state and what it does on its own (not asked by a client): saving,
//! following the host's addresses, interfaces and local backends, expiring flows, the status
//! line systemd shows, and the read-only view `list` and `stats` answer from.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Context as _;
use log::{error, info, warn};

use super::{ReloadSource, flows::FlowTable, saved};
use crate::{
    api::{
        control::{DockerStatus, LocalBackendReport},
        notify,
    },
    config::{Config, Live},
    datapath::{self, Datapath},
    host::{self, local_backends},
    model::{mapping::Mapping, table::Table},
};

/// The daemon's running state, owned by the main loop (or lent to a reload).
pub(super) struct State {
    pub(super) dp: Datapath,
    pub(super) table: Table,
    pub(super) config: Config,
    pub(super) reload: Option<ReloadSource>,
    pub(super) flows: FlowTable,
    pub(super) saver: saved::Saver,
    /// What `PM_LOCAL_BACKENDS` holds (for `stats`).
    pub(super) local_backends: BTreeMap<IpAddr, local_backends::Local>,
    /// The Docker follower's connection (None unless `docker` is set).
    pub(super) docker: Option<DockerStatus>,
}

/// What a change is undone to when it cannot be saved for the next daemon: the table (with the
/// dynamic port range; a persistent structure, so taking it costs O(1)) and, for a reload, the
/// live settings as they were before it.
pub(super) struct Undo {
    table: Table,
    live: Option<Live>,
}

impl State {
    /// Where a change of the mappings about to be made can be undone to (`undo`).
    pub(super) fn undo_point(&self) -> Undo {
        Undo {
            table: self.table.clone(),
            live: None,
        }
    }

    /// `undo_point` for a reload, which also changes the live settings (the config's mappings
    /// among them: a clone as large as the config).
    pub(super) fn undo_point_with_live(&self) -> Undo {
        Undo {
            table: self.table.clone(),
            live: Some(self.config.live.clone()),
        }
    }

    /// Undoes everything changed since `to` was taken, in the table and the maps.
    pub(super) fn undo(&mut self, to: Undo) {
        self.table.roll_back(&mut self.dp, to.table);
        if let Some(live) = to.live {
            self.config.live = live;
        }
    }

    /// Saves the changes to the mappings for the next daemon (after every change).
    pub(super) fn save(&mut self) -> anyhow::Result<()> {
        let file = &self.config.startup.state_file;
        self.saver
            .append(&mut self.table)
            .with_context(|| format!("saving the mappings to {}", file.display()))
    }

    /// Writes a whole snapshot of the mappings (at start and after a reload).
    pub(super) fn save_snapshot(&mut self) -> anyhow::Result<()> {
        let file = &self.config.startup.state_file;
        self.saver
            .snapshot(&mut self.table)
            .with_context(|| format!("saving the mappings to {}", file.display()))
    }

    /// Deletes the flows the last changes made stale: UDP flows of removed mappings and backends,
    /// so an ongoing UDP stream takes the new path with its next datagram (TCP flows finish
    /// where they are), and flows of every protocol from clients a narrowed allow-list no
    /// longer admits.
    pub(super) fn flush_stale_flows(&mut self) {
        let flushes = self.table.take_flushes();
        match self.dp.flush_flows(&flushes) {
            Ok(0) => {}
            Ok(n) => info!("removed {n} flow(s) of removed mappings or backends, or no longer allowed"),
            Err(e) => error!("removing stale flows: {e:#}"),
        }
    }

    /// One expiry pass over the flow tables; frees the stats slots whose flows are all gone.
    pub(super) fn expire_flows(&mut self) {
        let timeouts = &self.config.live.timeouts;
        match datapath::monotonic_ns().and_then(|now| self.dp.expire_flows(now, timeouts)) {
            Ok(plan) => {
                self.flows.update(&plan);
                self.table.release_drained(&plan.slots_in_use);
                notify::status(&self.status_line());
            }
            Err(e) => warn!("flow expiry pass failed: {e:#}"),
        }
    }

    /// The host's addresses or links changed: wildcard mappings follow the addresses, the
    /// client-facing interfaces are attached again where they came back.
    pub(super) fn follow_addresses(&mut self) {
        self.routes_changed();
        match host::addresses().and_then(|a| self.dp.sync_local_addrs(&a).map(|()| a.len())) {
            Ok(n) => info!("host addresses or links changed: {n} local addresses"),
            Err(e) => error!("syncing local addresses: {e:#}"),
        }
        self.follow_interfaces();
    }

    /// A link, address, neighbour or route changed: flows look their route up again (at once,
    /// not after the local backends' settle delay).
    pub(super) fn routes_changed(&mut self) {
        if let Err(e) = self.dp.invalidate_routes() {
            error!("{e:#}");
        }
    }

    /// Detaches from client-facing interfaces that disappeared and attaches to those that came
    /// back.
    fn follow_interfaces(&mut self) {
        for change in self.dp.resync_interfaces() {
            match change {
                datapath::IfaceChange::Gone(iface) => error!(
                    "interface {iface} disappeared: its published ports are unreachable through it \
                     until it comes back (it is attached again then)"
                ),
                datapath::IfaceChange::Back(iface) => info!("interface {iface} is back: attached again"),
                datapath::IfaceChange::Failed(iface, e) => {
                    error!(
                        "interface {iface} is back but attaching failed (retried at its next change): {e}"
                    );
                }
            }
            notify::status(&self.status_line());
        }
    }

    /// Makes `PM_LOCAL_BACKENDS` match the kernel's view of the containers on this host (or
    /// empties it when `local_fast_path` is off), and puts the reply hook on every veth but the
    /// client-facing interfaces. A failure leaves the previous entries: the datapath falls back
    /// to the FIB path for any device that went.
    pub(super) fn follow_local_backends(&mut self) {
        let found = match local_backends::read() {
            Ok(found) => found,
            Err(e) => {
                error!("following the local backends: {e:#}");
                return;
            }
        };
        let configured = &self.config.startup.interfaces;
        let veths = found
            .veths
            .into_iter()
            .filter(|(name, _)| !configured.contains(name))
            .collect();
        if self.dp.sync_backend_veths(&veths) > 0 {
            info!("reply hook on {} veth(s)", veths.len());
        }
        let local = if self.config.live.local_fast_path {
            found.local
        } else {
            BTreeMap::new()
        };
        match self
            .dp
            .sync_local_backends(local.iter().map(|(addr, l)| (*addr, &l.backend)))
        {
            Ok(changed) => {
                if changed > 0 {
                    info!("local backends (fast path): {}", local.len());
                }
                self.local_backends = local;
            }
            Err(e) => error!("following the local backends: {e:#}"),
        }
    }

    /// What `systemctl status` shows: mappings, interfaces and how full the flow tables were at
    /// the last expiry pass.
    pub(super) fn status_line(&self) -> String {
        let (assured, new) = (&self.flows.assured, &self.flows.new);
        let ifaces: Vec<String> = self
            .dp
            .interfaces()
            .into_iter()
            .map(|(name, up)| if up { name } else { format!("{name} (missing)") })
            .collect();
        let docker = match &self.docker {
            Some(d) if d.connected => "; docker connected",
            Some(_) => "; docker disconnected",
            None => "",
        };
        format!(
            "{} mapping(s) on {}; flows {}/{} assured, {}/{} new{docker}",
            self.table.len(),
            ifaces.join(", "),
            assured.active,
            assured.capacity,
            new.active,
            new.capacity
        )
    }
}

/// How full the two flow tables were at the last expiry pass.
#[derive(Clone, Copy)]
pub(super) struct FlowFill {
    pub(super) assured: u64,
    pub(super) assured_capacity: u64,
    pub(super) new: u64,
    pub(super) new_capacity: u64,
}

/// What `list` and `stats` read besides the counters: the mappings with their stats slots,
/// flow-table fill and interfaces. Taken from the state for each request, or once when a reload
/// begins, to answer from while it runs.
pub(super) struct View {
    /// Each mapping with its stats slot and owner.
    pub(super) mappings: Vec<(Mapping, u32, String)>,
    pub(super) flows: FlowFill,
    pub(super) interfaces: Vec<(String, bool)>,
    pub(super) local_backends: Vec<LocalBackendReport>,
    pub(super) docker: Option<DockerStatus>,
}

impl View {
    pub(super) fn of(state: &State) -> Self {
        Self {
            mappings: state
                .table
                .entries()
                .into_iter()
                .map(|e| {
                    (
                        e.mapping.clone(),
                        e.place.stats_slot,
                        e.origin.owner().to_string(),
                    )
                })
                .collect(),
            flows: FlowFill {
                assured: state.flows.assured.active,
                assured_capacity: state.flows.assured.capacity,
                new: state.flows.new.active,
                new_capacity: state.flows.new.capacity,
            },
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
            docker: state.docker.clone(),
        }
    }
}
