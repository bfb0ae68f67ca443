//! The loaded eBPF object: loading with the configured capacities, pinning, attaching, and
//! typed access to its maps. One file per job:
//!
//! - `hooks`: where programs attach and what their pins are named (a leaf);
//! - `links`: what keeps a program attached (pinned links, TC filters): take-over of an earlier
//!   daemon's link, pinning, detaching, stale pins;
//! - `attach`: the client-facing interfaces (XDP, tcx, or `clsact` filters on kernels without
//!   tcx), followed when they disappear and come back;
//! - `backend_veths`: the reply hook on the host's veths (containers' replies sent to the client
//!   past the host's netfilter), following the veths as they come and go;
//! - `cgroup`: the socket hooks of host-local clients (cgroup links, pinned);
//! - `pins`: the pin directory (bpffs mount, `portmap cleanup`);
//! - `adopt`: checking what an earlier daemon pinned (map shapes, layout stamp);
//! - `kernel`: what the running kernel must offer (checked at start; tcx or not);
//! - `maps`: the map writes of the mapping table ([`crate::model::table::Maps`]) and counter reads;
//! - `expiry`: the flow-expiry pass (its decision is a pure function);
//! - `sys`: every `bpf(2)` call aya lacks (batch map operations, link update, object get), typed;
//! - `test_run` (cargo feature `test-run`, for the tests and the benchmark only):
//!   `BPF_PROG_TEST_RUN`, benchmark reference programs, program sizes and map memory.
//!
//! Pin layout (`PIN_DIR` defaults to /sys/fs/bpf/portmap):
//! ```text
//! PIN_DIR/maps/PM_MAPPINGS, PM_BACKENDS, PM_MAGLEV, PM_CONNTRACK, PM_MAPPING_STATS,
//!              PM_GLOBAL_STATS, PM_REDIRECT_DEVS, PM_LOCAL_ADDRS, PM_PUBLISHED_PORTS,
//!              PM_SOCK_REVERSE, PM_CT_NEW, PM_FRAGMENTS, PM_ICMP_XDP, PM_ICMP_TC,
//!              PM_META (the layout stamp), PM_LOCAL_BACKENDS, PM_LOCAL_DEVS
//!                                                                        (map_names::ALL)
//! PIN_DIR/links/IFACE_xdp_ingress | IFACE_tc_ingress | IFACE_tc_egress   ('.' in IFACE as %2E)
//! PIN_DIR/links/VETH_tc_from_backend     (the reply hook on each veth but the client-facing ones)
//! PIN_DIR/links/cgroup_ID_portmap_connect4 ... _portmap_bind6  (socket hooks; ID: the cgroup's)
//! ```
//! A pinned link keeps its program attached while no daemon runs (stopped, crashed, upgraded):
//! the next daemon adopts the maps and replaces the programs in the links (`adopt`, `links`). Only
//! `portmap cleanup` detaches and removes everything.

mod adopt;
mod attach;
mod backend_veths;
mod cgroup;
mod clsact;
mod expiry;
mod hooks;
pub mod kernel;
mod links;
mod maps;
#[cfg(test)]
mod object_tests;
mod pins;
mod sys;
#[cfg(feature = "test-run")]
mod test_run;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{SchedClassifier, Xdp},
};
use log::{info, warn};
use portmap_common::{
    BENCH_REDIRECT_IFINDEX_GLOBAL, DatapathStamp, HOST_NETNS_COOKIE_GLOBAL, ICMP_SLOT_EGRESS,
    ICMP_SLOT_INGRESS, map_names, prog_names,
};

#[cfg(feature = "test-run")]
pub use self::test_run::{MapMemory, ProgramSize, TestRunOutput};
pub use self::{
    attach::IfaceChange,
    expiry::{ExpiryPlan, monotonic_ns, plan_expiry, plan_flush},
    hooks::Hook,
    maps::Counters,
    pins::{check_pin_dir, cleanup, ensure_bpffs},
};
use crate::{config::Limits, host};

/// The eBPF object built by build.rs (aya-build) from portmap-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portmap"));

pub struct Datapath {
    ebpf: Ebpf,
    /// Where maps and links are pinned; `None` for a datapath loaded only to be run through
    /// `BPF_PROG_TEST_RUN` (golden-packet tests, benchmarks), which can never be attached.
    pin_dir: Option<PathBuf>,
    attachments: Vec<links::Attachment>,
    /// The client-facing interfaces and where they are attached (followed by
    /// `resync_interfaces`), and the mode to attach them again in.
    ifaces: Vec<attach::Iface>,
    mode: crate::config::AttachMode,
    /// The veths with the reply hook (`backend_veths`): name → ifindex.
    backend_veths: BTreeMap<String, u32>,
    /// The stamp of the pinned maps (`PM_META`).
    stamp: DatapathStamp,
    /// The maps were pinned by an earlier daemon and adopted.
    adopted: bool,
    /// TC programs attach as tcx links (else as clsact filters: kernel < 6.6).
    tcx: bool,
    /// Leave everything attached and pinned when dropped: set once the daemon is up, and from
    /// the start for an adopted datapath (a daemon that fails to start must not take down the
    /// datapath it found). Otherwise dropping removes what this load created.
    keep: bool,
    /// Capacities of `PM_CONNTRACK` and `PM_CT_NEW`, which bound one expiry pass.
    conntrack_entries: u32,
    conntrack_new_entries: u32,
}

impl Datapath {
    /// Loads the object with the configured capacities, its maps pinned under `pin_dir`: the
    /// maps an earlier daemon pinned there are adopted (after [`adopt::check_pinned`]), missing
    /// ones created and pinned.
    pub fn load(pin_dir: &Path, limits: &Limits) -> anyhow::Result<Self> {
        let kernel = kernel::detect()?;
        for dir in ["maps", "links"] {
            fs::create_dir_all(pin_dir.join(dir))
                .with_context(|| format!("creating pin directory {}", pin_dir.join(dir).display()))?;
        }
        let found = adopt::check_pinned(pin_dir, limits)?;
        let mut dp = Self::load_with(limits, Some(pin_dir), 0)?;
        dp.tcx = kernel.tcx;
        if let Some(stamp) = found {
            dp.stamp = stamp;
            dp.adopted = true;
            dp.keep = true;
        } else {
            // On error `dp` is dropped, and its Drop removes the pins made.
            let stamp = dp.stamp;
            adopt::write_stamp(dp.map_mut(map_names::META)?, stamp)?;
        }
        Ok(dp)
    }

    /// Loads the object and its programs without pinning anything: such a datapath is only
    /// run through `BPF_PROG_TEST_RUN` (tests, benchmarks) and cannot be attached. The socket
    /// hooks take the calling thread's network namespace as the host's.
    pub fn load_unpinned(limits: &Limits) -> anyhow::Result<Self> {
        Self::load_with(limits, None, 0)
    }

    /// `bench_redirect_ifindex`: the device of the benchmark's TC redirect floor (0 otherwise).
    pub(super) fn load_with(
        limits: &Limits,
        pin_dir: Option<&Path>,
        bench_redirect_ifindex: u32,
    ) -> anyhow::Result<Self> {
        let netns_cookie = host::netns_cookie()?;
        let mut loader = EbpfLoader::new();
        loader.override_global(HOST_NETNS_COOKIE_GLOBAL, &netns_cookie, true);
        loader.override_global(BENCH_REDIRECT_IFINDEX_GLOBAL, &bench_redirect_ifindex, true);
        for name in map_names::ALL {
            if let Some(entries) = adopt::configured_capacity(name, limits) {
                loader.map_max_entries(name, entries);
            }
            if let Some(dir) = pin_dir {
                // aya opens the pinned map when there is one, else creates and pins it.
                loader.map_pin_path(name, hooks::map_pin(dir, name));
            }
        }
        let ebpf = loader.load(EBPF_OBJECT).context("loading the eBPF object")?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attachments: Vec::new(),
            ifaces: Vec::new(),
            backend_veths: BTreeMap::new(),
            mode: crate::config::AttachMode::Auto,
            stamp: adopt::new_stamp(),
            adopted: false,
            tcx: true,
            keep: false,
            conntrack_entries: limits.conntrack_entries,
            conntrack_new_entries: limits.conntrack_new_entries,
        };
        for name in [prog_names::XDP_INGRESS, prog_names::XDP_ICMP] {
            let xdp: &mut Xdp = dp.program_mut(name)?.try_into()?;
            xdp.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        for name in [
            prog_names::TC_INGRESS,
            prog_names::TC_EGRESS,
            prog_names::TC_FROM_BACKEND,
            prog_names::TC_ICMP_INGRESS,
            prog_names::TC_ICMP_EGRESS,
        ] {
            let prog: &mut SchedClassifier = dp.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        dp.fill_icmp_slots()?;
        dp.load_sock_programs()?;
        Ok(dp)
    }

    /// Whether the maps were adopted from an earlier daemon.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The identity of the pinned maps (saved state of another datapath is not applied).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.stamp.id
    }

    /// From now on everything stays attached and pinned when the daemon exits or dies, for the
    /// next daemon to adopt (`portmap cleanup` removes it).
    pub fn keep_attached(&mut self) {
        self.keep = true;
    }

    /// Puts each hook's ICMP-error program in its program array slot (the datapath tail-calls
    /// it).
    fn fill_icmp_slots(&mut self) -> anyhow::Result<()> {
        for (array, slot, name) in [
            (map_names::ICMP_PROGS_XDP, ICMP_SLOT_INGRESS, prog_names::XDP_ICMP),
            (
                map_names::ICMP_PROGS_TC,
                ICMP_SLOT_INGRESS,
                prog_names::TC_ICMP_INGRESS,
            ),
            (
                map_names::ICMP_PROGS_TC,
                ICMP_SLOT_EGRESS,
                prog_names::TC_ICMP_EGRESS,
            ),
        ] {
            let program = self
                .ebpf
                .program(name)
                .with_context(|| format!("program {name} missing"))?;
            let fd = program.fd()?.try_clone()?;
            let mut slots: ProgramArray<_> = ProgramArray::try_from(self.map_mut(array)?)?;
            slots
                .set(slot, &fd, 0)
                .with_context(|| format!("putting {name} in {array}[{slot}]"))?;
        }
        Ok(())
    }

    pub(crate) fn program_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))
    }

    /// Takes the aya-log ring buffer for the daemon to drain. The packet programs never log
    /// (they count); the socket hooks log one slow path beside its counter (a mapping whose
    /// Maglev table is being replaced).
    pub fn take_logger(&mut self) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("initialising aya-log")
    }

    /// Detaches every program and removes every pin this load created (a daemon that failed to
    /// start on a fresh pin directory).
    fn remove_created(&mut self) {
        self.detach_all();
        let Some(pin_dir) = &self.pin_dir else { return };
        info!(
            "detached and unpinned what this daemon created in {}",
            pin_dir.display()
        );
        for name in map_names::ALL {
            let path = hooks::map_pin(pin_dir, name);
            if path.exists()
                && let Err(e) = fs::remove_file(&path)
            {
                warn!("removing {}: {e}", path.display());
            }
        }
        pins::remove_dirs(pin_dir);
    }

    pub(crate) fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))
    }

    pub(crate) fn map(&self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf.map(name).with_context(|| format!("map {name} missing"))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if !self.keep {
            self.remove_created();
        }
    }
}
