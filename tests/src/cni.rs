//! CNI plugins run as a container runtime runs them: in the host's network namespace, with
//! CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_PATH set and the network
//! configuration on stdin (containernetworking-plugins from Debian in /usr/lib/cni, and
//! `portmap-cni` from the target directory).

use std::{
    fs::File,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};
use serde_json::Value;

use crate::{Netns, daemon::built_binary};

/// Where Debian's containernetworking-plugins are (bridge, host-local, portmap, ...).
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The `portmap-cni` binary beside the test binary.
pub fn portmap_cni_bin() -> anyhow::Result<PathBuf> {
    built_binary("portmap-cni", "cargo build -p portmap-user")
}

/// Runs `plugin` for `command` on the container `id` whose network namespace is `netns`
/// (interface eth0), from the network namespace `host`. `Ok` holds the result printed on
/// success (`Null` when none), `Err` the CNI error JSON of a failure.
pub fn cni_invoke(
    host: &Netns,
    plugin: &Path,
    command: &str,
    id: &str,
    netns: &Netns,
    conf: &Value,
) -> anyhow::Result<Result<Value, Value>> {
    let host_ns = File::open(host.path())?;
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PLUGIN_DIR)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(move || setns(&host_ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "{} {command}: not JSON: {stdout} (stderr: {})",
                plugin.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?
    };
    Ok(if out.status.success() {
        Ok(parsed)
    } else {
        Err(parsed)
    })
}
