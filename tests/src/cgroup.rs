//! A child cgroup of the machine's cgroup v2 hierarchy, created per test and removed on drop:
//! the daemon attaches its socket hooks there (never to the root, which would change every
//! process of the machine), and only the test's client processes are moved in.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use portmap::host::find_cgroup2;

use crate::unique;

pub struct Cgroup {
    /// The directory on the cgroup2 mount.
    pub dir: PathBuf,
    /// The cgroup's path in the hierarchy, as `portmap run --cgroup` takes it.
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> anyhow::Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mount = find_cgroup2(&mountinfo).context("no cgroup2 mount (needed for the socket hooks)")?;
        let name = unique("cg");
        let dir = mount.mount_point.join(&name);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self {
            path: mount.root.join(&name),
            dir,
        })
    }

    /// `cgroup.procs`, where a process writes "0" to move itself in.
    #[must_use]
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    #[must_use]
    pub fn arg(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes have exited; a dying process may take a moment to leave.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
