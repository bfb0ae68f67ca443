//! The socket hooks of host-local clients, attached to one cgroup v2 directory (and so to every
//! process in it and below) as bpf_links pinned at `links/cgroup_ID_PROGRAM` (ID: the cgroup's
//! inode number, so a daemon configured with another cgroup does not take over these links). A cgroup bpf_link is
//! always attached in the kernel's multi mode (link_create takes no attach flags, so aya's
//! `CgroupAttachMode::Single` is the one that works): portmap coexists with systemd's and
//! others' programs on the same cgroup.

use std::{fs::File, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, anyhow};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use log::info;
use portmap_common::prog_names;

use super::{Datapath, hooks};

/// Every socket hook program.
pub const SOCK_PROGRAMS: [&str; 10] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::SENDMSG4,
    prog_names::SENDMSG6,
    prog_names::RECVMSG4,
    prog_names::RECVMSG6,
    prog_names::GETPEERNAME4,
    prog_names::GETPEERNAME6,
    prog_names::BIND4,
    prog_names::BIND6,
];

impl Datapath {
    pub(super) fn load_sock_programs(&mut self) -> anyhow::Result<()> {
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = self.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        Ok(())
    }

    /// Attaches every socket hook to the cgroup directory `dir`.
    pub(super) fn attach_cgroup(&mut self, dir: &Path) -> anyhow::Result<()> {
        let cgroup = File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
        let cgroup_id = cgroup.metadata()?.ino();
        let pin_dir = self.pin_dir()?;
        for name in SOCK_PROGRAMS {
            let path = hooks::cgroup_link_pin(&pin_dir, cgroup_id, name);
            let label = format!("cgroup {} {name}", dir.display());
            if self.take_over(&path, name, &label, None) {
                continue;
            }
            let prog: &mut CgroupSockAddr = self.program_mut(name)?.try_into()?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", dir.display()))?;
            let fd: FdLink = prog
                .take_link(id)?
                .try_into()
                .map_err(|e| anyhow!("{name}: cgroup link is not a bpf_link: {e}"))?;
            self.pin_link_at(&path, label, None, fd)?;
        }
        info!("cgroup {}: attached the socket hooks", dir.display());
        Ok(())
    }
}
