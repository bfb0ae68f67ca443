//! What one benchmark run measured (serialised to results.json) and the machine it ran on.

use serde::Serialize;

use crate::{micro, setup::Variant, traffic::PacketRun};

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
    pub tcp_gbps: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// Sorted round-trip samples (µs).
    pub rtt_samples_us: Vec<f64>,
}

#[derive(Serialize)]
pub struct Packets {
    pub variant: Variant,
    pub flows: u16,
    pub fixed: PacketRun,
    pub max: PacketRun,
}

#[derive(Serialize)]
pub struct Results {
    pub machine: Machine,
    pub quick: bool,
    pub new_flows: Vec<NewFlows>,
    pub per_variant: Vec<PerVariant>,
    pub packets: Vec<Packets>,
    pub programs: Vec<micro::ProgramCost>,
    pub control: Vec<micro::ControlPlane>,
    pub memory: micro::Memory,
    pub flood: Vec<crate::flood::FloodRun>,
    pub seconds: f64,
}
