//! For the tests and the benchmark only (cargo feature `test-run`): running the programs through
//! `BPF_PROG_TEST_RUN` as if a packet arrived on a device, the benchmark reference programs, the
//! conntrack table as a whole, program sizes and map memory.

use std::fs;

use anyhow::{Context as _, bail};
use aya::{
    maps::{HashMap, MapData},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp, XdpMode},
};
use portmap_common::{FlowKey, FlowValue, map_names, prog_names};

use super::{Datapath, Hook, cgroup::SOCK_PROGRAMS};

impl Datapath {
    /// Every conntrack entry (both directions of every flow), and whether it is in the table of
    /// assured flows.
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue, bool)>> {
        let mut all = Vec::new();
        for (name, capacity, assured) in self.flow_tables() {
            let entries = self.table_entries(name, capacity)?;
            all.extend(entries.into_iter().map(|(k, v)| (k, v, assured)));
        }
        Ok(all)
    }

    /// Empties both flow tables.
    pub fn clear_flows(&mut self) -> anyhow::Result<()> {
        for (name, _, _) in self.flow_tables() {
            self.clear_table(name)?;
        }
        Ok(())
    }

    /// Empties `PM_CT_NEW` only, as if the LRU shed every entry: new flows, and the cached
    /// copies of the assured ones.
    pub fn clear_flow_cache(&mut self) -> anyhow::Result<()> {
        self.clear_table(map_names::CT_NEW)
    }

    fn clear_table(&mut self, name: &str) -> anyhow::Result<()> {
        let mut ct: HashMap<&mut MapData, FlowKey, FlowValue> = HashMap::try_from(self.map_mut(name)?)?;
        let keys: Vec<FlowKey> = ct.keys().collect::<Result<_, _>>()?;
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

    /// Loads the datapath unpinned, with the benchmark's TC redirect floor
    /// (`prog_names::BENCH_TC_REDIRECT_PEER`) sending every packet into the peer of `ifindex`.
    pub fn load_unpinned_bench(
        limits: &crate::config::Limits,
        redirect_ifindex: u32,
    ) -> anyhow::Result<Self> {
        Self::load_with(limits, None, redirect_ifindex)
    }

    /// Loads a benchmark program (`prog_names::BENCH_*`, XDP or TC) and, with `iface`, attaches
    /// it there (XDP in driver mode, TC at ingress; in the calling thread's network namespace;
    /// detached when the datapath is dropped). Never used by the daemon.
    pub fn load_bench(&mut self, name: &str, iface: Option<&str>) -> anyhow::Result<()> {
        let program = self.program_mut(name)?;
        if let Ok(prog) = <&mut Xdp>::try_from(&mut *program) {
            if prog.info().is_err() {
                prog.load().with_context(|| format!("verifier rejected {name}"))?;
            }
            if let Some(iface) = iface {
                prog.attach(iface, XdpMode::Driver)
                    .with_context(|| format!("{iface}: attaching {name}"))?;
            }
            return Ok(());
        }
        let prog: &mut SchedClassifier = program.try_into()?;
        if prog.info().is_err() {
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        if let Some(iface) = iface {
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            prog.attach(iface, aya::programs::TcAttachType::Ingress)
                .with_context(|| format!("{iface}: attaching {name}"))?;
        }
        Ok(())
    }

    /// Runs a loaded benchmark program like `test_run` (`xdp`: an XDP program, else TC).
    pub fn test_run_bench(
        &self,
        name: &str,
        xdp: bool,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, ProgramError> {
        self.run_program(name, xdp, packet, ifindex, repeat)
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
                    | aya::maps::Map::DevMapHash(d)
                    | aya::maps::Map::ProgramArray(d)
                    | aya::maps::Map::LpmTrie(d) => d,
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
        [Hook::XdpIngress]
            .into_iter()
            .chain(Hook::TC)
            .map(Hook::program_name)
            .chain([
                prog_names::XDP_ICMP,
                prog_names::TC_ICMP_INGRESS,
                prog_names::TC_ICMP_EGRESS,
            ])
            .chain(SOCK_PROGRAMS)
            .map(|name| {
                let program = self.ebpf.program(name).context("program missing")?;
                let info = match program {
                    aya::programs::Program::Xdp(p) => p.info()?,
                    aya::programs::Program::SchedClassifier(p) => p.info()?,
                    aya::programs::Program::CgroupSockAddr(p) => p.info()?,
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
