//! The loaded eBPF object: loading with the configured capacities, pinning, attaching, and
//! typed access to its maps. One file per job:
//!
//! - `pins`: the pin directory (bpffs mount, layout, stale pins);
//! - `attach`: hooks, attaching and detaching (XDP / tcx links, pinned);
//! - `cgroup`: the socket hooks of host-local clients (cgroup links, pinned);
//! - `maps`: the map writes of the mapping table ([`crate::table::Maps`]) and counter reads;
//! - `expiry`: the flow-expiry pass (its decision is a pure function);
//! - `test_run` (cargo feature `test-run`, for the tests and the benchmark only):
//!   `BPF_PROG_TEST_RUN`, benchmark reference programs, program sizes and map memory.
//!
//! Pin layout (`PIN_DIR` defaults to /sys/fs/bpf/portmap):
//! ```text
//! PIN_DIR/maps/PM_MAPPINGS, PM_BACKENDS, PM_MAGLEV, PM_CONNTRACK, PM_MAPPING_STATS,
//!              PM_GLOBAL_STATS, PM_REDIRECT_DEVS, PM_LOCAL_ADDRS, PM_PUBLISHED_PORTS,
//!              PM_SOCK_REVERSE, PM_CT_NEW                             (map_names::ALL)
//! PIN_DIR/links/IFACE_xdp_ingress | IFACE_tc_ingress | IFACE_tc_egress   ('.' in IFACE as %2E)
//! PIN_DIR/links/cgroup_portmap_connect4 ... cgroup_portmap_bind6      (the socket hooks)
//! ```
//! A pinned link keeps its program attached even if the daemon dies; a clean shutdown unpins and
//! so detaches everything. A new daemon removes stale pins at start-up.

mod attach;
mod cgroup;
mod expiry;
mod maps;
mod pins;
#[cfg(feature = "test-run")]
mod test_run;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{SchedClassifier, Xdp},
};
use log::warn;
use portmap_common::{HOST_NETNS_COOKIE_GLOBAL, ICMP_SLOT_EGRESS, ICMP_SLOT_INGRESS, map_names, prog_names};

#[cfg(feature = "test-run")]
pub use self::test_run::{MapMemory, ProgramSize, TestRunOutput};
pub use self::{
    attach::{Hook, IfaceChange},
    expiry::{ExpiryPlan, monotonic_ns, plan_expiry, plan_udp_flush},
    pins::{check_pin_dir, cleanup, ensure_bpffs, remove_stale_pins},
};
use crate::{config::Limits, host};

/// The eBPF object built by build.rs (aya-build) from portmap-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portmap"));

pub struct Datapath {
    ebpf: Ebpf,
    /// Where maps and links are pinned; `None` for a datapath loaded only to be run through
    /// `BPF_PROG_TEST_RUN` (golden-packet tests, benchmarks), which can never be attached.
    pin_dir: Option<PathBuf>,
    attachments: Vec<attach::Attachment>,
    /// The client-facing interfaces and where they are attached (followed by
    /// `resync_interfaces`), and the mode to attach them again in.
    ifaces: Vec<attach::Iface>,
    mode: crate::config::AttachMode,
    /// `shutdown` ran: nothing attached or pinned is left.
    shut_down: bool,
    /// Capacities of `PM_CONNTRACK` and `PM_CT_NEW`, which bound one expiry pass.
    conntrack_entries: u32,
    conntrack_new_entries: u32,
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
            map.pin(pins::map_pin(pin_dir, name))
                .with_context(|| format!("pinning map {name}"))?;
        }
        Ok(dp)
    }

    /// Loads the object and its programs without pinning anything: such a datapath is only
    /// run through `BPF_PROG_TEST_RUN` (tests, benchmarks) and cannot be attached. The socket
    /// hooks take the calling thread's network namespace as the host's.
    pub fn load_unpinned(limits: &Limits) -> anyhow::Result<Self> {
        let netns_cookie = host::netns_cookie()?;
        let ebpf = EbpfLoader::new()
            .override_global(HOST_NETNS_COOKIE_GLOBAL, &netns_cookie, true)
            .map_max_entries(map_names::MAPPINGS, limits.max_mappings)
            .map_max_entries(map_names::MAPPING_STATS, limits.max_mappings)
            // At most one (protocol, port) per published port.
            .map_max_entries(map_names::PUBLISHED_PORTS, limits.max_mappings)
            .map_max_entries(map_names::BACKENDS, limits.max_backends)
            .map_max_entries(map_names::MAGLEV, limits.max_backend_groups)
            .map_max_entries(map_names::CONNTRACK, limits.conntrack_entries)
            .map_max_entries(map_names::CT_NEW, limits.conntrack_new_entries)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut dp = Self {
            ebpf,
            pin_dir: None,
            attachments: Vec::new(),
            ifaces: Vec::new(),
            mode: crate::config::AttachMode::Auto,
            shut_down: false,
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

    /// Takes the aya-log ring buffer for the daemon to drain (the datapath only logs on helper
    /// failures, which would be bugs).
    pub fn take_logger(&mut self) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("initialising aya-log")
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
            let path = pins::map_pin(pin_dir, name);
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
        self.shutdown();
    }
}
