//! The pin directory (names: `hooks`): bpffs mounted, one directory for maps and one for links;
//! `portmap cleanup`, which removes them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use log::info;

/// Removes every pin under `pin_dir` (links first, each detached from its interface or cgroup
/// before its pin goes; then maps) and returns what it removed.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            if sub == "links" {
                // Detached now: removing the pin alone detaches the link a moment later (its
                // program would still see the next packets after `cleanup` returned).
                // Detaching a link whose device is gone fails; the pin goes all the same.
                if let Ok(link) = super::sys::obj_get(&path) {
                    let _ = super::sys::link_detach(std::os::fd::AsFd::as_fd(&link));
                }
            }
            fs::remove_file(&path).with_context(|| format!("removing pin {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// `portmap cleanup`: removes everything portmap left attached while no daemon runs — the links
/// under `pin_dir` (so its XDP, TC and cgroup programs detach), its maps, the directories, the
/// saved state `state_files` — and returns what it removed. Refuses while a daemon answers on
/// `socket`: it would put everything back at its next change.
pub fn cleanup(pin_dir: &Path, socket: &Path, state_files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    if crate::api::control::daemon_answers(socket) {
        bail!(
            "a portmap daemon is running (control socket {} answers): stop it first (`systemctl stop \
             portmap`, or SIGTERM; stopping leaves the datapath attached), then run `portmap cleanup` again",
            socket.display()
        );
    }
    let mut removed = remove_pins(pin_dir)?;
    // TC filters (kernels without tcx) are no pins: found by program name on every interface.
    for iface in super::clsact::remove_except(&[]) {
        removed.push(PathBuf::from(format!("TC filters on {iface}")));
    }
    remove_dirs(pin_dir);
    for file in state_files {
        if fs::remove_file(file).is_ok() {
            removed.push(file.clone());
        }
    }
    // A socket file nobody answers on is a stopped daemon's too.
    let _ = fs::remove_file(socket);
    Ok(removed)
}

/// Removes the pin directory's subdirectories and itself where they are empty.
pub(super) fn remove_dirs(pin_dir: &Path) {
    for dir in ["links", "maps", ""] {
        let _ = fs::remove_dir(pin_dir.join(dir));
    }
}

fn is_bpffs(path: &Path) -> bool {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted there yet.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).context("creating /sys/fs/bpf")?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Fails when `pin_dir` is not on bpffs (pinning would fail later with a less clear error).
pub fn check_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        bail!("pin directory {} is not on a bpffs mount", pin_dir.display());
    }
    Ok(())
}
