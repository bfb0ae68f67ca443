//! Names, commands, temporary directories and network namespaces, each removed by a guard.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
};

use anyhow::{Context as _, anyhow, ensure};
use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `pm<pid>-<n><suffix>`.
#[must_use]
pub fn unique(suffix: &str) -> String {
    format!(
        "pm{}-{}{suffix}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and fails with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A directory under the system temp dir, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("portmap-test-{}", unique(tag)));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let name = unique(role);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// A veth pair: `name` here, its peer `peer` in `peer_ns`.
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: &Netns) -> anyhow::Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &peer_ns.name,
        ])
        .map(drop)
    }

    /// `ip netns exec NAME PROGRAM ARGS...`
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Writes a sysctl of this namespace (`/proc/sys/...` path relative to /proc/sys).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sh", &["-c", &format!("echo {value} > /proc/sys/{key}")])
            .map(drop)
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that entered this namespace; sockets it opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
        let fd = File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        Ok(thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        }))
    }

    /// `spawn` and wait.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow!("thread in netns {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
