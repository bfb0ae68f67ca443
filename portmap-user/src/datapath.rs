//! Loads the eBPF object, pins its maps and links under one bpffs directory, attaches the
//! programs, and gives typed access to the maps.
//!
//! Pin layout (`PIN_DIR` defaults to /sys/fs/bpf/portmap):
//! ```text
//! PIN_DIR/maps/PM_MAPPINGS, PM_CONNTRACK, PM_MAPPING_STATS, PM_GLOBAL_STATS, PM_REDIRECT_DEVS
//! PIN_DIR/links/IFACE_xdp_ingress | IFACE_tc_ingress | IFACE_tc_egress   ('.' in IFACE as %2E)
//! ```
//! A pinned link keeps its program attached even if the daemon dies; a clean shutdown unpins and
//! so detaches everything. A later version can re-open these pins to restart without dropping
//! traffic; this one removes stale pins at start-up.

use std::{
    collections::HashMap as StdHashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
    util::nr_cpus,
};
use log::{info, warn};
use portmap_common::{
    Backend as BackendEntry, DIR_FORWARD, DIR_REPLY, FLOW_F_CLOSING, FlowKey, FlowValue, MAGLEV_SIZE,
    MaglevTable, MappingCounters, MappingKey, MappingValue, NO_GROUP, PROTO_UDP, addr_words, map_names,
    prog_names, stat,
};

use crate::{
    config::{AttachMode, Limits, Timeouts},
    maglev,
    spec::Mapping,
};

/// Where the daemon placed a mapping in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Its `PM_MAPPING_STATS` slot (shared by all its host ports).
    pub stats_slot: u32,
    /// The slot belonged to an earlier mapping: zero its counters first (fresh slots are zero).
    pub reset_stats: bool,
    /// For a mapping with several backends: its Maglev table and backend slots.
    pub group: Option<GroupPlacement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlacement {
    /// Its `PM_MAGLEV` slot.
    pub group: u32,
    /// The `PM_BACKENDS` slot of each of its backends, in the mapping's order.
    pub backend_slots: Vec<u32>,
}

/// The eBPF object built by build.rs (aya-build) from portmap-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portmap"));

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    XdpIngress,
    TcIngress,
    TcEgress,
}

impl Hook {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XdpIngress => "xdp_ingress",
            Self::TcIngress => "tc_ingress",
            Self::TcEgress => "tc_egress",
        }
    }

    /// The program that runs at this hook.
    #[must_use]
    pub fn program_name(self) -> &'static str {
        match self {
            Self::XdpIngress => prog_names::XDP_INGRESS,
            Self::TcIngress => prog_names::TC_INGRESS,
            Self::TcEgress => prog_names::TC_EGRESS,
        }
    }
}

struct Attachment {
    iface: String,
    hook: Hook,
    link: PinnedLink,
}

pub struct Datapath {
    ebpf: Ebpf,
    /// Where maps and links are pinned; `None` for a datapath loaded only to be run through
    /// `BPF_PROG_TEST_RUN` (golden-packet tests, benchmarks), which can never be attached.
    pin_dir: Option<PathBuf>,
    attachments: Vec<Attachment>,
    /// `shutdown` ran: nothing attached or pinned is left.
    shut_down: bool,
    /// Capacity of `PM_CONNTRACK`, which bounds one expiry pass.
    conntrack_entries: u32,
    /// `PM_MAPPINGS` entries waiting for `flush_mapping_writes`.
    pending: Vec<(MappingKey, MappingValue)>,
    /// `insert_mapping` only collects (see `defer_mapping_writes`).
    deferring: bool,
}

fn map_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("maps").join(name)
}

/// bpffs refuses names containing '.', which interface names may have (eth0.100): those are
/// percent-encoded, as is '%' itself.
fn link_pin(pin_dir: &Path, iface: &str, hook: Hook) -> PathBuf {
    let iface = iface.replace('%', "%25").replace('.', "%2E");
    pin_dir.join("links").join(format!("{iface}_{}", hook.as_str()))
}

/// Removes pins a previous run left behind (a crash, or SIGKILL): unpinning detaches its links.
pub fn remove_stale_pins(pin_dir: &Path) -> anyhow::Result<()> {
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            warn!("removing stale pin {} left by an earlier run", path.display());
            fs::remove_file(&path).with_context(|| format!("removing stale pin {}", path.display()))?;
        }
    }
    Ok(())
}

/// Physical NICs have a `device` link in sysfs; veth, bridges, tunnels and loopback do not.
fn is_physical(iface: &str) -> bool {
    Path::new("/sys/class/net").join(iface).join("device").exists()
}

fn ifindex(iface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(iface).map_err(|e| anyhow!("interface '{iface}' not found: {e}"))
}

impl Datapath {
    /// Loads the object with the configured capacities and pins its maps.
    pub fn load(pin_dir: &Path, limits: &Limits) -> anyhow::Result<Self> {
        let mut dp = Self::load_unpinned(limits)?;
        for dir in ["maps", "links"] {
            fs::create_dir_all(pin_dir.join(dir))
                .with_context(|| format!("creating pin directory {}", pin_dir.join(dir).display()))?;
        }
        dp.pin_dir = Some(pin_dir.to_path_buf());
        for name in map_names::ALL {
            let map = dp
                .ebpf
                .map(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            // On error `dp` is dropped, and its Drop removes the pins made so far.
            map.pin(map_pin(pin_dir, name))
                .with_context(|| format!("pinning map {name}"))?;
        }
        Ok(dp)
    }

    /// Loads the object and its programs without pinning anything: such a datapath is only
    /// run through [`Datapath::test_run`] and cannot be attached.
    pub fn load_unpinned(limits: &Limits) -> anyhow::Result<Self> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(map_names::MAPPINGS, limits.max_mappings)
            .map_max_entries(map_names::MAPPING_STATS, limits.max_mappings)
            .map_max_entries(map_names::BACKENDS, limits.max_backends)
            .map_max_entries(map_names::MAGLEV, limits.max_backend_groups)
            .map_max_entries(map_names::CONNTRACK, limits.conntrack_entries)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut dp = Self {
            ebpf,
            pin_dir: None,
            attachments: Vec::new(),
            shut_down: false,
            conntrack_entries: limits.conntrack_entries,
            pending: Vec::new(),
            deferring: false,
        };
        let xdp: &mut Xdp = dp.program_mut(prog_names::XDP_INGRESS)?.try_into()?;
        xdp.load()
            .with_context(|| format!("verifier rejected {}", prog_names::XDP_INGRESS))?;
        for name in [prog_names::TC_INGRESS, prog_names::TC_EGRESS] {
            let prog: &mut SchedClassifier = dp.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        Ok(dp)
    }

    fn program_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))
    }

    /// Takes the aya-log ring buffer for the daemon to drain (the datapath only logs on helper
    /// failures, which would be bugs).
    pub fn take_logger(&mut self) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("initialising aya-log")
    }

    /// Attaches ingress (XDP or TC) and TC egress to every interface. On any failure everything
    /// attached so far is detached again and the error names the interface.
    pub fn attach(
        &mut self,
        ifaces: &[String],
        mode: AttachMode,
        redirect_ifaces: &[String],
    ) -> anyhow::Result<()> {
        let result = self.attach_all(ifaces, mode, redirect_ifaces);
        if result.is_err() {
            self.detach_all();
        }
        result
    }

    fn attach_all(
        &mut self,
        ifaces: &[String],
        mode: AttachMode,
        redirect_ifaces: &[String],
    ) -> anyhow::Result<()> {
        let mut xdp_ifaces = Vec::new();
        for iface in ifaces {
            ifindex(iface)?;
            let use_xdp = match mode {
                AttachMode::Xdp => true,
                AttachMode::Tc => false,
                AttachMode::Auto => is_physical(iface),
            };
            let ingress = if use_xdp {
                match self.attach_xdp(iface) {
                    Ok(()) => Some(Hook::XdpIngress),
                    Err(e) if mode == AttachMode::Auto => {
                        info!("{iface}: no native XDP ({e:#}); using TC");
                        None
                    }
                    Err(e) => return Err(e.context(format!("{iface}: XDP attach failed; try --attach tc"))),
                }
            } else {
                None
            };
            if ingress.is_some() {
                xdp_ifaces.push(iface.clone());
            } else {
                self.attach_tc(iface, Hook::TcIngress)?;
            }
            self.attach_tc(iface, Hook::TcEgress)?;
            info!(
                "{iface}: attached {} ingress and tc egress",
                if ingress.is_some() { "xdp" } else { "tc" }
            );
        }
        if !xdp_ifaces.is_empty() {
            for iface in xdp_ifaces.iter().chain(redirect_ifaces) {
                self.allow_xdp_redirect(ifindex(iface)?)
                    .with_context(|| format!("adding {iface} to the XDP redirect devices"))?;
            }
        }
        Ok(())
    }

    /// Lets the XDP program redirect into the device `ifindex` (`PM_REDIRECT_DEVS`).
    pub fn allow_xdp_redirect(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let mut devs: DevMapHash<_> = DevMapHash::try_from(self.map_mut(map_names::REDIRECT_DEVS)?)?;
        devs.insert(ifindex, ifindex, None, 0)?;
        Ok(())
    }

    fn attach_xdp(&mut self, iface: &str) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.program_mut(prog_names::XDP_INGRESS)?.try_into()?;
        let id = prog.attach(iface, XdpMode::Driver)?;
        let link = prog.take_link(id)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e| anyhow!("XDP link is not a bpf_link: {e}"))?;
        self.pin_link(iface, Hook::XdpIngress, fd)
    }

    fn attach_tc(&mut self, iface: &str, hook: Hook) -> anyhow::Result<()> {
        let name = hook.program_name();
        let kind = if hook == Hook::TcIngress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let prog: &mut SchedClassifier = self.program_mut(name)?.try_into()?;
        // Kernel >= 6.6: a tcx bpf_link (no clsact qdisc, coexists with other tcx programs).
        let id = prog
            .attach(iface, kind)
            .with_context(|| format!("{iface}: attaching {name}"))?;
        let link = prog.take_link(id)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e| anyhow!("{iface}: TC link is not a bpf_link (kernel < 6.6?): {e}"))?;
        self.pin_link(iface, hook, fd)
    }

    fn pin_link(&mut self, iface: &str, hook: Hook, fd: FdLink) -> anyhow::Result<()> {
        let pin_dir = self
            .pin_dir
            .as_deref()
            .context("a datapath loaded without a pin directory cannot be attached")?;
        let path = link_pin(pin_dir, iface, hook);
        let link = fd
            .pin(&path)
            .with_context(|| format!("pinning link {}", path.display()))?;
        self.attachments.push(Attachment {
            iface: iface.to_string(),
            hook,
            link,
        });
        Ok(())
    }

    /// (interface, hook) of every attachment.
    #[must_use]
    pub fn attachments(&self) -> Vec<(String, Hook)> {
        self.attachments
            .iter()
            .map(|a| (a.iface.clone(), a.hook))
            .collect()
    }

    fn detach_all(&mut self) {
        for a in self.attachments.drain(..) {
            // Unpinning removes the bpffs entry; dropping the last fd detaches the link.
            if let Err(e) = a.link.unpin() {
                warn!("{}: unpinning {} failed: {e}", a.iface, a.hook.as_str());
            }
        }
    }

    /// Detaches every program and removes every pin this daemon created. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        self.detach_all();
        let Some(pin_dir) = &self.pin_dir else { return };
        for name in map_names::ALL {
            let path = map_pin(pin_dir, name);
            if path.exists()
                && let Err(e) = fs::remove_file(&path)
            {
                warn!("removing {}: {e}", path.display());
            }
        }
        for dir in ["links", "maps", ""] {
            let _ = fs::remove_dir(pin_dir.join(dir));
        }
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))
    }

    fn map(&self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf.map(name).with_context(|| format!("map {name} missing"))
    }

    /// Writes a mapping's entries: its backends and Maglev table when it has several, then one
    /// `PM_MAPPINGS` entry per host port. Entries that exist are replaced (each atomically), so
    /// this also updates a mapping in place. On an error, what was written stays: the caller
    /// removes it or writes the previous version back.
    pub fn insert_mapping(&mut self, mapping: &Mapping, place: &Placement) -> anyhow::Result<()> {
        let ports = mapping
            .host_ports
            .with_context(|| format!("mapping {mapping} has no host port allocated"))?;
        if place.reset_stats {
            self.reset_slot(place.stats_slot)?;
        }
        let group = match (&place.group, mapping.backends.as_slice()) {
            (None, [_]) => NO_GROUP,
            (Some(group), backends) if group.backend_slots.len() == backends.len() => {
                self.write_group(mapping, group)?;
                group.group
            }
            _ => bail!("mapping {mapping}: backend placement does not match its backends"),
        };
        let first = &mapping.backends[0];
        for (offset, port) in ports.ports().enumerate() {
            let offset = offset as u16;
            let value = MappingValue {
                backend_addr: addr_words(first.ip),
                backend_port_be: first.port_at(offset).to_be(),
                port_offset: if first.ports.is_single() { 0 } else { offset },
                group,
                stats_slot: place.stats_slot,
                family: mapping.family(),
                _pad: [0; 3],
            };
            self.pending.push((mapping.map_key(port), value));
        }
        if self.deferring {
            return Ok(());
        }
        self.flush_mapping_writes()
            .with_context(|| format!("inserting mapping {mapping}"))
    }

    /// Collects the `PM_MAPPINGS` entries of the next `insert_mapping` calls instead of writing
    /// each; `flush_mapping_writes` writes them all at once (one batched update per few thousand
    /// entries), so that a config of many mappings is applied with few system calls and becomes
    /// visible to the datapath together.
    pub fn defer_mapping_writes(&mut self) {
        self.deferring = true;
    }

    /// Writes the entries collected since `defer_mapping_writes` (and stops deferring). On an
    /// error some of them may be written: the caller removes the mappings again.
    pub fn flush_mapping_writes(&mut self) -> anyhow::Result<()> {
        self.deferring = false;
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        let fd = self.map_fd(map_names::MAPPINGS)?;
        let (keys, values): (Vec<MappingKey>, Vec<MappingValue>) = pending.into_iter().unzip();
        update_batch(fd, &keys, &values).context("writing mapping entries (BPF_MAP_UPDATE_BATCH)")
    }

    fn map_fd(&self, name: &str) -> anyhow::Result<std::os::fd::RawFd> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        match self.map(name)? {
            aya::maps::Map::HashMap(d) => Ok(d.fd().as_fd().as_raw_fd()),
            _ => bail!("{name} is not a hash map"),
        }
    }

    /// Writes a mapping's backends to their `PM_BACKENDS` slots and its Maglev table to its
    /// `PM_MAGLEV` slot (backends first: the table must only name written backends).
    fn write_group(&mut self, mapping: &Mapping, group: &GroupPlacement) -> anyhow::Result<()> {
        let mut backends: Array<_, BackendEntry> = Array::try_from(self.map_mut(map_names::BACKENDS)?)?;
        for (b, &slot) in mapping.backends.iter().zip(&group.backend_slots) {
            let entry = BackendEntry {
                addr: addr_words(b.ip),
                port_be: b.ports.start.to_be(),
                family: mapping.family(),
                _pad: 0,
            };
            backends
                .set(slot, entry, 0)
                .with_context(|| format!("writing backend {b} to slot {slot}"))?;
        }
        let members: Vec<maglev::Member> = mapping
            .backends
            .iter()
            .map(|b| maglev::Member {
                ip: b.ip,
                port: b.ports.start,
                weight: b.weight,
            })
            .collect();
        let slots =
            maglev::table(&members).with_context(|| format!("mapping {mapping}: every weight is 0"))?;
        let mut table = MaglevTable {
            backends: [0; MAGLEV_SIZE + 1],
        };
        for (dst, member) in table.backends.iter_mut().zip(slots) {
            *dst = group.backend_slots[member as usize];
        }
        table.backends[MAGLEV_SIZE] = table.backends[0];
        let mut tables: Array<_, MaglevTable> = Array::try_from(self.map_mut(map_names::MAGLEV)?)?;
        tables
            .set(group.group, table, 0)
            .with_context(|| format!("writing the Maglev table of {mapping}"))
    }

    /// Removes every host port of a mapping (one not there is fine); keeps going past a failure
    /// and reports the first.
    pub fn remove_mapping(&mut self, mapping: &Mapping) -> anyhow::Result<()> {
        let Some(ports) = mapping.host_ports else {
            return Ok(());
        };
        let mut map: HashMap<_, MappingKey, MappingValue> =
            HashMap::try_from(self.map_mut(map_names::MAPPINGS)?)?;
        let mut first_error = None;
        for port in ports.ports() {
            match map.remove(&mapping.map_key(port)) {
                // Never written (a rollback of a batch that failed) is as good as removed.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if first_error.is_none() => {
                    first_error = Some(anyhow!("removing port {port} of mapping {mapping}: {e}"));
                }
                _ => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn reset_slot(&mut self, slot: u32) -> anyhow::Result<()> {
        let mut stats: PerCpuArray<_, MappingCounters> =
            PerCpuArray::try_from(self.map_mut(map_names::MAPPING_STATS)?)?;
        let cpus = nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        stats.set(
            slot,
            PerCpuValues::try_from(vec![MappingCounters::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    /// A mapping's counters summed over CPUs.
    pub fn mapping_counters(&self, slot: u32) -> anyhow::Result<MappingCounters> {
        let stats: PerCpuArray<_, MappingCounters> =
            PerCpuArray::try_from(self.map(map_names::MAPPING_STATS)?)?;
        let per_cpu = stats.get(&slot, 0)?;
        Ok(per_cpu
            .iter()
            .fold(MappingCounters::default(), |acc, c| MappingCounters {
                fwd_packets: acc.fwd_packets + c.fwd_packets,
                fwd_bytes: acc.fwd_bytes + c.fwd_bytes,
                reply_packets: acc.reply_packets + c.reply_packets,
                reply_bytes: acc.reply_bytes + c.reply_bytes,
                flows: acc.flows + c.flows,
            }))
    }

    /// Global counters summed over CPUs, in `stat` code order.
    pub fn global_counters(&self) -> anyhow::Result<Vec<u64>> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(map_names::GLOBAL_STATS)?)?;
        (0..stat::COUNT)
            .map(|code| Ok(stats.get(&code, 0)?.iter().sum()))
            .collect()
    }

    /// Deletes expired flows (both entries); returns how many flows remain.
    pub fn expire_flows(&mut self, now_ns: u64, timeouts: &Timeouts) -> anyhow::Result<u64> {
        let capacity = self.conntrack_entries as usize;
        let mut ct: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(self.map_mut(map_names::CONNTRACK)?)?;
        // Iterating while the datapath inserts and deletes can revisit keys (the next key of a
        // deleted one is the first one): a pass reads at most the table's capacity.
        let entries: Vec<(FlowKey, FlowValue)> = ct.iter().filter_map(Result::ok).take(capacity).collect();
        let plan = plan_expiry(&entries, now_ns, timeouts);
        for key in &plan.delete {
            // Already gone (LRU eviction or a concurrent re-creation) is fine.
            let _ = ct.remove(key);
        }
        Ok(plan.live_flows)
    }

    /// Every conntrack entry (both directions of every flow).
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let ct: HashMap<&MapData, FlowKey, FlowValue> = HashMap::try_from(self.map(map_names::CONNTRACK)?)?;
        let entries = ct.iter().take(self.conntrack_entries as usize);
        Ok(entries.collect::<Result<_, _>>()?)
    }

    /// Empties the conntrack table.
    pub fn clear_flows(&mut self) -> anyhow::Result<()> {
        let keys: Vec<FlowKey> = self.flows()?.into_iter().map(|(k, _)| k).collect();
        let mut ct: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(self.map_mut(map_names::CONNTRACK)?)?;
        for key in keys {
            ct.remove(&key)?;
        }
        Ok(())
    }

    /// Runs one program on `packet` with `BPF_PROG_TEST_RUN`, as if it arrived on (or, for TC
    /// egress, left through) the device `ifindex` of the calling thread's network namespace,
    /// `repeat` times. Returns the last run's verdict and packet, and the mean time per run.
    pub fn test_run(
        &self,
        hook: Hook,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, ProgramError> {
        self.run_program(
            hook.program_name(),
            hook == Hook::XdpIngress,
            packet,
            ifindex,
            repeat,
        )
    }

    fn run_program(
        &self,
        name: &str,
        xdp: bool,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, ProgramError> {
        let program = self.ebpf.program(name).ok_or_else(|| ProgramError::InvalidName {
            name: name.to_string(),
        })?;
        // Room for programs that grow the packet (none do today).
        let mut out = vec![0u8; packet.len() + 256];
        let len = u32::try_from(packet.len()).unwrap_or(u32::MAX);
        let result = if xdp {
            // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
            let ctx = words_to_bytes(&[0, len, 0, ifindex, 0, 0]);
            let prog: &Xdp = program.try_into()?;
            prog.test_run(test_run_options(packet, &mut out, &ctx, repeat))?
        } else {
            // struct __sk_buff up to `ifindex`: everything before it must be zero except
            // ingress_ifindex (word 9); ifindex is word 10.
            let mut words = [0u32; 11];
            words[9] = ifindex;
            words[10] = ifindex;
            let ctx = words_to_bytes(&words);
            let prog: &SchedClassifier = program.try_into()?;
            prog.test_run(test_run_options(packet, &mut out, &ctx, repeat))?
        };
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            return_value: result.return_value,
            packet: out,
            duration: result.duration,
        })
    }

    /// Loads a benchmark reference XDP program (`prog_names::BENCH_*`) and, with `iface`,
    /// attaches it there (in the calling thread's network namespace; detached when the datapath
    /// is dropped). Never used by the daemon.
    pub fn load_bench_xdp(&mut self, name: &str, iface: Option<&str>) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.program_mut(name)?.try_into()?;
        if prog.info().is_err() {
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        if let Some(iface) = iface {
            prog.attach(iface, XdpMode::Driver)
                .with_context(|| format!("{iface}: attaching {name}"))?;
        }
        Ok(())
    }

    /// Runs a loaded benchmark reference XDP program like `test_run`.
    pub fn test_run_bench_xdp(
        &self,
        name: &str,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, ProgramError> {
        self.run_program(name, true, packet, ifindex, repeat)
    }

    /// Kernel memory of each map (its `memlock` in fdinfo) and its capacity.
    pub fn map_memory(&self) -> anyhow::Result<Vec<MapMemory>> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        map_names::ALL
            .iter()
            .map(|&name| {
                let data = match self.map(name)? {
                    aya::maps::Map::HashMap(d)
                    | aya::maps::Map::LruHashMap(d)
                    | aya::maps::Map::Array(d)
                    | aya::maps::Map::PerCpuArray(d)
                    | aya::maps::Map::DevMapHash(d) => d,
                    _ => bail!("{name}: unexpected map type"),
                };
                let fd = data.fd().as_fd().as_raw_fd();
                let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
                let bytes = fdinfo
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())
                    .with_context(|| format!("{name}: no memlock in fdinfo"))?;
                Ok(MapMemory {
                    name,
                    max_entries: data.info()?.max_entries(),
                    bytes,
                })
            })
            .collect()
    }

    /// Instruction counts of every loaded program, as the kernel reports them.
    pub fn program_sizes(&self) -> anyhow::Result<Vec<ProgramSize>> {
        [Hook::XdpIngress, Hook::TcIngress, Hook::TcEgress]
            .into_iter()
            .map(|hook| {
                let name = hook.program_name();
                let program = self.ebpf.program(name).context("program missing")?;
                let info = match program {
                    aya::programs::Program::Xdp(p) => p.info()?,
                    aya::programs::Program::SchedClassifier(p) => p.info()?,
                    _ => bail!("{name}: unexpected program type"),
                };
                Ok(ProgramSize {
                    name,
                    xlated_insns: info.size_translated().unwrap_or(0) / 8,
                    verified_insns: info.verified_instruction_count().unwrap_or(0),
                    jited_bytes: info.size_jitted(),
                })
            })
            .collect()
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel ≥ 5.6): writes `keys[i]` → `values[i]` in as few system calls
/// as the kernel allows (aya 0.14 has no batch API).
fn update_batch<K: Copy, V: Copy>(
    map_fd: std::os::fd::RawFd,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: map_fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at `count` keys and values that live for the call; the kernel
        // reads them and writes back only `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if attr.count == 0 {
            return Err(std::io::Error::other("the kernel wrote no entry"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

fn test_run_options<'a>(
    packet: &'a [u8],
    out: &'a mut [u8],
    ctx: &'a [u8],
    repeat: u32,
) -> TestRunOptions<'a> {
    TestRunOptions {
        data_in: Some(packet),
        data_out: Some(out),
        ctx_in: Some(ctx),
        repeat,
        ..TestRunOptions::default()
    }
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// What one `Datapath::test_run` returned.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    /// The program's return code (`XDP_*` or `TC_ACT_*`).
    pub return_value: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Mean run time per repetition, as measured by the kernel.
    pub duration: std::time::Duration,
}

/// A map's kernel memory.
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub name: &'static str,
    pub max_entries: u32,
    /// `memlock` of the map (preallocated maps: their whole capacity).
    pub bytes: u64,
}

/// A loaded program's size: what it translates to and how much work the verifier did.
#[derive(Clone, Debug)]
pub struct ProgramSize {
    pub name: &'static str,
    /// Instructions after the verifier's rewrites (`xlated_prog_len / 8`).
    pub xlated_insns: u32,
    /// Instructions the verifier processed (all paths; the kernel's limit is 1M).
    pub verified_insns: u32,
    pub jited_bytes: u32,
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What an expiry pass deletes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExpiryPlan {
    pub delete: Vec<FlowKey>,
    pub live_flows: u64,
}

/// The reply entry's key for a forward entry (backend → client).
#[must_use]
pub fn reply_key(forward: &FlowKey, value: &FlowValue) -> FlowKey {
    FlowKey {
        src: value.nat_addr,
        dst: forward.src,
        src_port_be: value.nat_port_be,
        dst_port_be: forward.src_port_be,
        proto: forward.proto,
        family: forward.family,
        _pad: [0; 2],
    }
}

/// Pure expiry decision. A flow's age is that of its most recent entry; its limit is the UDP or
/// TCP idle timeout, or the close grace once either direction saw FIN/RST. A lone entry (its
/// partner was evicted, or is being created this instant) goes after the close grace.
#[must_use]
pub fn plan_expiry(entries: &[(FlowKey, FlowValue)], now_ns: u64, t: &Timeouts) -> ExpiryPlan {
    const NS: u64 = 1_000_000_000;
    let by_key: StdHashMap<FlowKey, FlowValue> = entries.iter().copied().collect();
    let mut plan = ExpiryPlan::default();
    let mut paired_replies = std::collections::HashSet::new();
    let idle = |v: &FlowValue| now_ns.saturating_sub(v.last_seen_ns);
    let close_grace = t.tcp_close_seconds.saturating_mul(NS);
    for (key, value) in entries.iter().filter(|(_, v)| v.direction == DIR_FORWARD) {
        let rkey = reply_key(key, value);
        let reply = by_key.get(&rkey).filter(|r| r.direction == DIR_REPLY);
        let Some(reply) = reply else {
            if idle(value) > close_grace {
                plan.delete.push(*key);
            }
            continue;
        };
        paired_replies.insert(rkey);
        let age = idle(value).min(idle(reply));
        let limit = if key.proto == PROTO_UDP {
            t.udp_seconds.saturating_mul(NS)
        } else if (value.flags | reply.flags) & FLOW_F_CLOSING != 0 {
            close_grace
        } else {
            t.tcp_seconds.saturating_mul(NS)
        };
        if age > limit {
            plan.delete.push(*key);
            plan.delete.push(rkey);
        } else {
            plan.live_flows += 1;
        }
    }
    for (key, value) in entries
        .iter()
        .filter(|(k, v)| v.direction == DIR_REPLY && !paired_replies.contains(k))
    {
        if idle(value) > close_grace {
            plan.delete.push(*key);
        }
    }
    plan
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(ts.tv_sec())? * 1_000_000_000 + u64::try_from(ts.tv_nsec())?)
}

fn is_bpffs(path: &Path) -> bool {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted there yet.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).context("creating /sys/fs/bpf")?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Fails when `pin_dir` is not on bpffs (pinning would fail later with a less clear error).
pub fn check_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        bail!("pin directory {} is not on a bpffs mount", pin_dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use portmap_common::PROTO_TCP;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(
        proto: u8,
        client_port: u16,
        fwd_seen: u64,
        reply_seen: u64,
        flags: u8,
    ) -> [(FlowKey, FlowValue); 2] {
        let fkey = FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            src_port_be: client_port,
            dst_port_be: 8080,
            proto,
            family: portmap_common::FAMILY_V4,
            _pad: [0; 2],
        };
        let fval = FlowValue {
            last_seen_ns: fwd_seen,
            nat_addr: [3, 0, 0, 0],
            nat_port_be: 80,
            direction: DIR_FORWARD,
            flags,
            stats_slot: 0,
        };
        let rkey = reply_key(&fkey, &fval);
        let rval = FlowValue {
            last_seen_ns: reply_seen,
            nat_addr: [2, 0, 0, 0],
            nat_port_be: 8080,
            direction: DIR_REPLY,
            flags: 0,
            ..fval
        };
        [(fkey, fval), (rkey, rval)]
    }

    #[test]
    fn expiry_uses_the_fresher_direction_and_protocol_timeouts() {
        let t = Timeouts {
            tcp_seconds: 100,
            tcp_close_seconds: 10,
            udp_seconds: 30,
            gc_interval_seconds: 1,
        };
        let now = 1000 * S;
        let mut entries = Vec::new();
        let live_tcp = flow(PROTO_TCP, 1, now - 500 * S, now - 50 * S, 0); // reply fresh: live
        let idle_tcp = flow(PROTO_TCP, 2, now - 101 * S, now - 150 * S, 0); // both idle > 100 s
        let closing = flow(PROTO_TCP, 3, now - 11 * S, now - 11 * S, FLOW_F_CLOSING); // past grace
        let closing_young = flow(PROTO_TCP, 4, now - 5 * S, now - 5 * S, FLOW_F_CLOSING);
        let udp_idle = flow(PROTO_UDP, 5, now - 31 * S, now - 40 * S, 0);
        let udp_live = flow(PROTO_UDP, 6, now - 29 * S, now - 40 * S, 0);
        for f in [live_tcp, idle_tcp, closing, closing_young, udp_idle, udp_live] {
            entries.extend(f);
        }
        let orphan_reply = flow(PROTO_TCP, 7, 0, now - 11 * S, 0)[1];
        let young_orphan = flow(PROTO_TCP, 8, 0, now - S, 0)[1];
        entries.push(orphan_reply);
        entries.push(young_orphan);

        let plan = plan_expiry(&entries, now, &t);
        let mut want = vec![
            idle_tcp[0].0,
            idle_tcp[1].0,
            closing[0].0,
            closing[1].0,
            udp_idle[0].0,
            udp_idle[1].0,
            orphan_reply.0,
        ];
        let mut got = plan.delete.clone();
        let order = |k: &FlowKey| (k.src, k.src_port_be, k.dst_port_be, k.proto);
        want.sort_by_key(order);
        got.sort_by_key(order);
        assert_eq!(got, want);
        assert_eq!(plan.live_flows, 3);
    }
}
