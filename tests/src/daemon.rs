//! `portmap run` as a real process inside a namespace, its CLI, and its counters.

use std::{
    fs::{self, File},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nix::sched::{CloneFlags, setns};
use portmap::api::control::StatsReport;
use portmap_common::{MappingCounters, Stat};

use crate::{Cgroup, Netns, TempDir};

/// Path of the `portmap` binary: $PORTMAP_BIN, or target/debug/portmap beside the test binary.
pub fn portmap_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PORTMAP_BIN") {
        return Ok(p.into());
    }
    built_binary("portmap", "cargo build -p portmap-user")
}

/// A binary of the workspace in the target directory the running test binary lives in.
pub(crate) fn built_binary(name: &str, build: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} binary not found near {}: build it with `{build}` (cargo xtask test does)",
        exe.display()
    )
}

/// A `portmap run` process inside a namespace, stopped (SIGKILL if needed) and cleaned up on drop.
/// Its socket hooks go to a child cgroup of its own (`--cgroup`), never the machine's root.
pub struct Daemon {
    child: Option<Child>,
    bin: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    /// Where the daemon saves its mappings for the next one (`--state-file`).
    pub state_file: PathBuf,
    /// Where the daemon attaches its socket hooks: put client processes here (`probe`).
    pub cgroup: Cgroup,
    /// Environment variables the daemon starts with (e.g. `NOTIFY_SOCKET`).
    env: Vec<(String, String)>,
    /// The network namespace it last ran in (`portmap cleanup` runs there too).
    netns: Option<PathBuf>,
    work_dir: TempDir,
}

impl Daemon {
    /// Starts `portmap run` in `ns` with a unique socket and pin directory, and waits until its
    /// control socket answers.
    pub fn start(ns: &Netns, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(ns, args, &[])
    }

    /// `start`, with these environment variables set for the daemon (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let work_dir = TempDir::new("d")?;
        let socket = work_dir.path().join("portmap.sock");
        let pin_dir = Path::new("/sys/fs/bpf").join(work_dir.path().file_name().context("temp dir name")?);
        let mut daemon = Self {
            child: None,
            bin: portmap_bin()?,
            socket,
            state_file: work_dir.path().join("state.json"),
            pin_dir,
            cgroup: Cgroup::new()?,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            netns: None,
            work_dir,
        };
        daemon.spawn(ns, args)?;
        Ok(daemon)
    }

    /// Starts a new `portmap run` with the same socket, pin directory and state file (after
    /// `stop` or `kill`): it adopts the datapath the previous one left.
    pub fn restart(&mut self, ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "the daemon is still running");
        self.spawn(ns, args)
    }

    /// `restart` with another `portmap` binary (an upgrade); the CLI uses it from then on.
    pub fn upgrade(&mut self, ns: &Netns, bin: PathBuf, args: &[&str]) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "the daemon is still running");
        self.bin = bin;
        self.spawn(ns, args)
    }

    fn spawn(&mut self, ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.path().join("daemon.log"))?;
        self.netns = Some(ns.path());
        let netns = File::open(ns.path())?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("run")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-file")
            .arg(&self.state_file)
            .arg("--cgroup")
            .arg(self.cgroup.arg())
            .args(args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: setns is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?,
        );
        self.wait_ready()
    }

    /// `portmap cleanup` of this daemon's pins and state (after `stop` or `kill`), in the
    /// daemon's network namespace as an operator runs it (TC filters of kernels without tcx are
    /// found on that namespace's interfaces); returns its output.
    pub fn cleanup(&self) -> anyhow::Result<String> {
        let pin_dir = self.pin_dir.to_str().context("pin dir")?;
        let state_file = self.state_file.to_str().context("state file")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(["cleanup", "--pin-dir", pin_dir, "--state-file", state_file])
            .stdin(Stdio::null());
        if let Some(path) = &self.netns {
            let netns = File::open(path)?;
            // SAFETY: setns is async-signal-safe; the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
            }
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "portmap cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL, as a crash: the daemon gets no chance to do anything (its datapath stays).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let wait = crate::slowdown(Duration::from_secs(20));
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                self.child = None;
                bail!(
                    "portmap run exited ({}) during start-up:\n{}",
                    status?,
                    self.log()
                );
            }
            if self.socket.exists() && self.cli(&["list"])?.status.success() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "portmap run did not answer within {} s:\n{}",
            wait.as_secs(),
            self.log()
        )
    }

    /// The daemon's output so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.work_dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs `portmap --socket SOCKET ARGS...`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        ensure!(
            out.status.success(),
            "portmap {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The running daemon's process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal to the running daemon (e.g. SIGHUP: reload).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the daemon is not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    /// `portmap stats --json`, read into the daemon's own report type.
    pub fn stats(&self) -> anyhow::Result<StatsReport> {
        let json = self.cli_ok(&["stats", "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("reading `portmap stats --json`: {json}"))
    }

    /// Sends SIGTERM and waits for a clean exit (at most 15 s).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + crate::slowdown(Duration::from_secs(15));
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "portmap run exited with {status}:\n{}",
                    self.log()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("portmap run ignored SIGTERM for 15 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Unpinning whatever a killed daemon left detaches it.
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// A global counter of a stats report.
///
/// # Panics
/// If the report lacks it (the daemon and the tests disagree on the counters).
#[must_use]
pub fn counter(stats: &StatsReport, stat: Stat) -> u64 {
    stats
        .counter(stat.name())
        .unwrap_or_else(|| panic!("no counter {} in {stats:?}", stat.name()))
}

/// The counters of the mapping that publishes `host_port`.
///
/// # Panics
/// If no mapping publishes it.
#[must_use]
pub fn mapping_stats(stats: &StatsReport, host_port: u16) -> MappingCounters {
    stats
        .mapping_on_port(host_port)
        .unwrap_or_else(|| panic!("no mapping publishes port {host_port}: {stats:?}"))
        .counters
}

/// A `NOTIFY_SOCKET` of a test playing the service manager.
pub struct Notifications {
    sock: std::os::unix::net::UnixDatagram,
    pub path: PathBuf,
}

impl Notifications {
    pub fn bind(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self { sock, path })
    }

    /// The next datagram that contains `needle`, skipping others (watchdog pings, status
    /// updates); at most `wait` (times `slowdown`).
    pub fn next_with_in(&self, needle: &str, wait: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + crate::slowdown(wait);
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let Ok(n) = self.sock.recv(&mut buf) else { continue };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(|l| l == needle || l.starts_with(needle)) {
                return Ok(message);
            }
            seen.push(message);
        }
        bail!(
            "no notification with {needle} within {:?}; got {seen:?}",
            crate::slowdown(wait)
        )
    }

    /// `next_with_in` 10 s.
    pub fn next_with(&self, needle: &str) -> anyhow::Result<String> {
        self.next_with_in(needle, Duration::from_secs(10))
    }
}
