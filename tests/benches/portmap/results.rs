//! What one benchmark run measured (serialised to results.json) and the machine it ran on.

use serde::Serialize;

use crate::{control, micro, setup::Variant, traffic::PacketRun};

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
    pub command: String,
}

pub fn machine(quick: bool) -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    Ok(Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: run("uname", &["-r"]),
        date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command: format!("cargo xtask bench{}", if quick { " --quick" } else { "" }),
    })
}

#[derive(Serialize)]
pub struct NewFlows {
    pub variant: Variant,
    pub mappings: u32,
    /// Median of the samples.
    pub per_second: f64,
    pub samples: Vec<f64>,
}

#[derive(Serialize)]
pub struct PerVariant {
    pub variant: Variant,
    /// The median of `tcp_gbps_runs`.
    pub tcp_gbps: f64,
    /// Each interleaved iperf3 run, sorted.
    pub tcp_gbps_runs: Vec<f64>,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// Sorted round-trip samples (µs).
    pub rtt_samples_us: Vec<f64>,
}

/// The spread of repeated samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            min: *sorted.first()?,
            median: sorted[sorted.len() / 2],
            max: *sorted.last()?,
        })
    }

    /// Whether two spreads overlap: a difference of medians inside the noise.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

#[derive(Serialize)]
pub struct Packets {
    pub variant: Variant,
    pub flows: u16,
    /// The fixed-load run with the median CPU per packet, and the spread over the repeats.
    pub fixed: PacketRun,
    pub cpu_ns: Option<Spread>,
    /// The flat-out run with the median forwarded rate, and the spread (packets/s).
    pub max: PacketRun,
    pub max_pps: Option<Spread>,
    /// Every run, in the order measured.
    pub fixed_runs: Vec<PacketRun>,
    pub max_runs: Vec<PacketRun>,
}

#[derive(Serialize)]
pub struct Results {
    pub machine: Machine,
    pub quick: bool,
    pub new_flows: Vec<NewFlows>,
    pub per_variant: Vec<PerVariant>,
    pub packets: Vec<Packets>,
    /// The reply direction (sink → client).
    pub replies: Vec<Packets>,
    pub programs: Vec<micro::ProgramCost>,
    pub control: Vec<control::ControlPlane>,
    pub memory: micro::Memory,
    pub daemon_memory: Vec<micro::DaemonMemory>,
    pub flood: Vec<crate::flood::FloodRun>,
    pub restarts: Vec<RestartRun>,
    pub seconds: f64,
}

/// A TCP stream through one attach mode across daemon restarts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestartRun {
    pub mode: String,
    pub phases: Vec<crate::restart::RestartPhase>,
}
