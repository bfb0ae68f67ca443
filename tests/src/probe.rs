//! Client processes for the socket hooks: `pm-probe` (src/bin) run in a network namespace and,
//! optionally, a cgroup. A thread cannot join a cgroup on its own, so these are processes.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};
use nix::sched::{CloneFlags, setns};
use serde_json::Value;

use crate::{Cgroup, Netns, daemon::built_binary};

/// Runs `pm-probe ARGS` in `ns` (and in `cgroup`, if given) and returns its JSON answer.
pub fn probe(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> anyhow::Result<Value> {
    let bin = built_binary("pm-probe", "cargo build -p portmap-tests --bin pm-probe")?;
    let netns = File::open(ns.path())?;
    let procs = cgroup
        .map(|c| OpenOptions::new().write(true).open(c.procs()))
        .transpose()
        .context("opening cgroup.procs")?;
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setns and write are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            if let Some(mut procs) = procs.as_ref() {
                procs.write_all(b"0")?;
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "pm-probe {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("pm-probe {}: {text}", args.join(" ")))
}
