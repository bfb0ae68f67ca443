//! What keeps a program attached: a link pinned under the pin directory (attached while the pin
//! exists) or a TC filter, recorded per interface or cgroup; taking over the link an earlier
//! daemon pinned (its program replaced atomically, `BPF_LINK_UPDATE`), pinning new ones,
//! detaching, and removing the pins nobody took over. The XDP, tcx, clsact and cgroup attachers
//! (`attach`, `cgroup`) all go through here.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::links::FdLink;
use log::{info, warn};

use super::{
    Datapath, clsact,
    hooks::{self, Hook},
    sys,
};

/// One attached program: a pinned link (attached while the pin exists) or a TC filter.
pub(super) struct Attachment {
    /// What is attached where, for messages ("h0 tc_ingress", "cgroup /x portmap_connect4").
    label: String,
    /// The interface it is attached to (`None`: the cgroup).
    iface: Option<String>,
    anchor: Anchor,
}

/// What keeps an attachment attached.
enum Anchor {
    Pin(PathBuf),
    /// portmap's cls_bpf filter for this hook on the attachment's interface.
    Filter(Hook),
}

impl Datapath {
    /// Unpins (and so detaches) the links an earlier daemon pinned that this one did not take
    /// over: interfaces, hooks or a cgroup no longer configured, devices that are gone.
    pub(super) fn remove_stale_links(&mut self) {
        let Ok(pin_dir) = self.pin_dir() else { return };
        let Ok(entries) = fs::read_dir(pin_dir.join("links")) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if self
                .attachments
                .iter()
                .any(|a| matches!(&a.anchor, Anchor::Pin(p) if *p == path))
            {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => info!("detached {} (not configured any more)", path.display()),
                Err(e) => warn!("removing stale link {}: {e}", path.display()),
            }
        }
    }

    /// Unpins the links of one interface.
    pub(super) fn detach_iface(&mut self, iface: &str) {
        let (gone, kept) = self
            .attachments
            .drain(..)
            .partition(|a| a.iface.as_deref() == Some(iface));
        self.attachments = kept;
        Self::unpin(gone);
    }

    /// Gives the link pinned at `path` by an earlier daemon this load's `program`; false when
    /// there is none, or it is defunct (its device or cgroup is gone: its pin is removed), and a
    /// new link is needed.
    pub(super) fn take_over(&mut self, path: &Path, program: &str, label: &str, iface: Option<&str>) -> bool {
        if !path.exists() {
            return false;
        }
        let replaced = self
            .program_mut(program)
            .and_then(|p| Ok(p.fd()?.as_fd().try_clone_to_owned()?))
            .and_then(|fd| Ok(sys::link_update_pinned(path, &fd)?));
        match replaced {
            Ok(()) => {
                info!("{label}: took over the attached link");
                self.attachments.push(Attachment {
                    label: label.to_owned(),
                    iface: iface.map(str::to_owned),
                    anchor: Anchor::Pin(path.to_path_buf()),
                });
                true
            }
            Err(e) => {
                info!("{label}: the pinned link cannot be taken over ({e:#}): attaching anew");
                let _ = fs::remove_file(path);
                false
            }
        }
    }

    pub(super) fn pin_link(&mut self, iface: &str, hook: Hook, fd: FdLink) -> anyhow::Result<()> {
        let pin_dir = self.pin_dir()?;
        let path = hooks::link_pin(&pin_dir, iface, hook);
        self.pin_link_at(&path, format!("{iface} {}", hook.as_str()), Some(iface), fd)
    }

    /// Records portmap's TC filter for `hook` on `iface` (attached by `clsact`) as attached.
    pub(super) fn record_filter(&mut self, label: String, iface: &str, hook: Hook) {
        self.attachments.push(Attachment {
            label,
            iface: Some(iface.to_owned()),
            anchor: Anchor::Filter(hook),
        });
    }

    /// Pins `fd` at `path` and records it as attached.
    pub(super) fn pin_link_at(
        &mut self,
        path: &Path,
        label: String,
        iface: Option<&str>,
        fd: FdLink,
    ) -> anyhow::Result<()> {
        fd.pin(path)
            .with_context(|| format!("pinning link {}", path.display()))?;
        self.attachments.push(Attachment {
            label,
            iface: iface.map(str::to_owned),
            anchor: Anchor::Pin(path.to_path_buf()),
        });
        Ok(())
    }

    pub(super) fn pin_dir(&self) -> anyhow::Result<PathBuf> {
        self.pin_dir
            .clone()
            .context("a datapath loaded without a pin directory cannot be attached")
    }

    pub(super) fn detach_all(&mut self) {
        let all = std::mem::take(&mut self.attachments);
        Self::unpin(all);
        self.ifaces.clear();
        self.backend_veths.clear();
    }

    fn unpin(attachments: Vec<Attachment>) {
        for a in attachments {
            let detached = match (&a.anchor, &a.iface) {
                // The pin holds the last reference: removing it detaches the link.
                (Anchor::Pin(pin), _) => fs::remove_file(pin).map_err(anyhow::Error::from),
                (Anchor::Filter(hook), Some(iface)) => clsact::detach(iface, *hook),
                (Anchor::Filter(_), None) => Ok(()),
            };
            if let Err(e) = detached {
                warn!("{}: detaching failed: {e:#}", a.label);
            }
        }
    }
}
