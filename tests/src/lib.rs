//! Test harness shared by the end-to-end tests, the demo (`cargo xtask demo` runs
//! `examples/demo.rs`) and the benchmark: network namespaces with drop guards, the
//! client/host/backend topologies, the `portmap` daemon as a real process, and sockets opened
//! inside namespaces (a thread that `setns(CLONE_NEWNET)`s).
//!
//! Sandbox rule: everything happens in namespaces this harness creates (names unique per process
//! and call, so tests run in parallel); the root network namespace is never changed. Addresses
//! come from 198.18.0.0/15.
//!
//! - `netns`: names, commands, temporary directories, namespaces;
//! - `topology`: the client → host → backend topologies and the addressing plan;
//! - `daemon`: `portmap run` as a process, its CLI, and its stats read into `StatsReport`;
//! - `cgroup`: a child cgroup per daemon, where its socket hooks attach;
//! - `probe`: client processes (`pm-probe`) in a namespace and a cgroup;
//! - `servers`: TCP/UDP servers and clients inside namespaces;
//! - `sctp`: raw SCTP packets (the kernel here has no SCTP module);
//! - `flood`: spoofed TCP flows from a raw socket;
//! - `cni`: CNI plugins invoked as a container runtime invokes them;
//! - `podman`: real podman with a private configuration, its conmon in the daemon's cgroup.

mod cgroup;
mod cni;
mod daemon;
mod docker;
mod engine;
mod flood;
mod netns;
mod podman;
mod probe;
mod sctp;
mod servers;
mod topology;

use std::time::Duration;

pub use self::{
    cgroup::*, cni::*, daemon::*, docker::*, engine::*, flood::*, netns::*, podman::*, probe::*, sctp::*,
    servers::*, topology::*,
};

/// How long a socket operation of a test may block (10 s, times `slowdown`).
fn io_timeout() -> Duration {
    slowdown(Duration::from_secs(10))
}

/// `PORTMAP_TEST_SLOWDOWN` (a factor, default 1): how much slower than this machine the tests
/// run, for the waits that bound start-up and stop (`cargo xtask vmtest` sets it: an emulated
/// CPU verifies programs about 20 times slower). No test asserts how fast anything is.
#[must_use]
pub fn slowdown(base: Duration) -> Duration {
    let factor = std::env::var("PORTMAP_TEST_SLOWDOWN")
        .ok()
        .and_then(|f| f.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    base * factor
}

/// Polls `cond` (every 20 ms) until it holds, for at most `base` times `slowdown`; the error
/// names `what` was waited for. For events, never for how fast anything is.
pub fn wait_for(
    what: &str,
    base: Duration,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + slowdown(base);
    loop {
        if cond()? {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out after {:?} waiting for {what}",
            slowdown(base)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
