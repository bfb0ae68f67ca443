//! What the real container engines' harnesses (`podman`, `docker`) share: the busybox image's
//! rootfs (there is no registry), and removing what an engine leaves behind (cgroups in every
//! hierarchy, mounts under its directory).

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// The image every container runs: busybox (sh, httpd, nc, ...).
pub const BUSYBOX_IMAGE: &str = "pm-busybox";

/// A tar of a rootfs with busybox-static's /bin/busybox and the tools the tests run, written
/// into `dir` (for `podman import` / `docker import`).
pub fn busybox_rootfs_tar(dir: &Path) -> anyhow::Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(rootfs.join("bin"))?;
    fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("/bin/busybox (package busybox-static; `cargo xtask setup` installs it)")?;
    for tool in ["sh", "httpd", "nc", "sleep", "cat", "echo", "timeout"] {
        symlink("busybox", rootfs.join("bin").join(tool))?;
    }
    let tar = dir.join("rootfs.tar");
    crate::sh(
        "tar",
        &[
            "-C",
            rootfs.to_str().context("utf-8")?,
            "-cf",
            tar.to_str().context("utf-8")?,
            ".",
        ],
    )?;
    Ok(tar)
}

/// Removes the cgroup directories `dirs` (paths in the hierarchy, children first) from the
/// cgroup2 tree and from each v1 hierarchy; those not empty or not there stay.
pub fn remove_cgroups(dirs: &[&str]) {
    let mut trees = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        trees.extend(hierarchies.flatten().map(|h| h.path()));
    }
    for tree in trees {
        for dir in dirs {
            let _ = fs::remove_dir(tree.join(dir.trim_start_matches('/')));
        }
    }
}

/// Unmounts whatever is still mounted under `root` (overlay layers, shm, netns files), deepest
/// first.
pub fn unmount_under(root: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let root = root.display().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}
