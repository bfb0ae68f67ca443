//! Attaching the programs to the client-facing interfaces: ingress (XDP or TC) and TC egress on
//! each, as a bpf_link pinned under the pin directory (XDP links; tcx links, kernel >= 6.6), or on
//! older kernels as a cls_bpf filter on a clsact qdisc (`clsact`). A link an earlier daemon pinned
//! (or a filter it left) for the same hook gets the new program in place (`links`), so traffic
//! never sees the hook empty. Interfaces that disappear and come back are followed here too.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    maps::DevMapHash,
    programs::{SchedClassifier, Xdp, XdpMode, links::FdLink},
};
use log::info;
use portmap_common::{map_names, prog_names};

use super::{
    Datapath, clsact,
    hooks::{self, Hook},
};
use crate::config::AttachMode;

/// A client-facing interface and the device its programs are attached to.
#[derive(Clone, Debug)]
pub(super) struct Iface {
    name: String,
    /// `None` while the interface does not exist (deleted; its links went with the device).
    ifindex: Option<u32>,
}

/// What `resync_interfaces` changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceChange {
    /// The interface disappeared: its published ports are unreachable through it.
    Gone(String),
    /// It is back (a new device of the same name) and attached again.
    Back(String),
    /// It is back but attaching failed (the message says why); retried at the next change.
    Failed(String, String),
}

/// Physical NICs have a `device` link in sysfs; veth, bridges, tunnels and loopback do not.
fn is_physical(iface: &str) -> bool {
    Path::new("/sys/class/net").join(iface).join("device").exists()
}

fn ifindex(iface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(iface).map_err(|e| anyhow!("interface '{iface}' not found: {e}"))
}

impl Datapath {
    /// Attaches ingress (XDP or TC) and TC egress to every interface, and the socket hooks to the
    /// cgroup directory `cgroup_dir`. On any failure everything attached so far is detached again
    /// and the error names the interface or cgroup.
    pub fn attach(
        &mut self,
        ifaces: &[String],
        mode: AttachMode,
        redirect_ifaces: &[String],
        cgroup_dir: &Path,
    ) -> anyhow::Result<()> {
        self.mode = mode;
        let result = self
            .attach_all(ifaces, mode, redirect_ifaces)
            .and_then(|()| self.attach_cgroup(cgroup_dir));
        match &result {
            Ok(()) => {
                self.remove_stale_links();
                self.remove_stale_filters();
            }
            // What an earlier daemon attached stays: it works with the adopted maps.
            Err(_) if self.adopted => {}
            Err(_) => self.detach_all(),
        }
        result
    }

    fn attach_all(
        &mut self,
        ifaces: &[String],
        mode: AttachMode,
        redirect_ifaces: &[String],
    ) -> anyhow::Result<()> {
        let mut xdp_ifaces = Vec::new();
        for iface in ifaces {
            let index = ifindex(iface)?;
            if self.attach_iface(iface, mode)? {
                xdp_ifaces.push(iface.clone());
            }
            self.ifaces.push(Iface {
                name: iface.clone(),
                ifindex: Some(index),
            });
        }
        if !xdp_ifaces.is_empty() {
            for iface in xdp_ifaces.iter().chain(redirect_ifaces) {
                self.allow_xdp_redirect(ifindex(iface)?)
                    .with_context(|| format!("adding {iface} to the XDP redirect devices"))?;
            }
        }
        Ok(())
    }

    /// Attaches ingress and egress to one interface; true if ingress is XDP.
    fn attach_iface(&mut self, iface: &str, mode: AttachMode) -> anyhow::Result<bool> {
        {
            let use_xdp = match mode {
                AttachMode::Xdp => true,
                AttachMode::Tc => false,
                AttachMode::Auto => is_physical(iface),
            };
            let ingress = if use_xdp {
                match self.attach_xdp(iface) {
                    Ok(()) => Some(Hook::XdpIngress),
                    Err(e) if mode == AttachMode::Auto => {
                        info!("{iface}: no native XDP ({e:#}); using TC");
                        None
                    }
                    Err(e) => return Err(e.context(format!("{iface}: XDP attach failed; try --attach tc"))),
                }
            } else {
                None
            };
            if ingress.is_none() {
                self.attach_tc(iface, Hook::TcIngress)?;
            }
            self.attach_tc(iface, Hook::TcEgress)?;
            info!(
                "{iface}: attached {} ingress and tc egress",
                if ingress.is_some() { "xdp" } else { "tc" }
            );
            Ok(ingress.is_some())
        }
    }

    /// Follows the client-facing interfaces after a link change (netlink): one that disappeared
    /// (its links went with the device) loses its stale pins and is reported; one that exists
    /// again under a new ifindex is attached again, in the configured mode.
    pub fn resync_interfaces(&mut self) -> Vec<IfaceChange> {
        let mut changes = Vec::new();
        for i in 0..self.ifaces.len() {
            let Iface { name, ifindex: was } = self.ifaces[i].clone();
            let now = ifindex(&name).ok();
            if now == was {
                continue;
            }
            // Gone, or replaced by a new device: the old links are defunct.
            self.detach_iface(&name);
            self.ifaces[i].ifindex = None;
            let Some(index) = now else {
                changes.push(IfaceChange::Gone(name));
                continue;
            };
            let attached = self.attach_iface(&name, self.mode).and_then(|xdp| {
                if xdp {
                    self.allow_xdp_redirect(index)?;
                }
                Ok(())
            });
            match attached {
                Ok(()) => {
                    self.ifaces[i].ifindex = Some(index);
                    changes.push(IfaceChange::Back(name));
                }
                Err(e) => {
                    self.detach_iface(&name);
                    changes.push(IfaceChange::Failed(name, format!("{e:#}")));
                }
            }
        }
        changes
    }

    /// The client-facing interfaces, each with whether its programs are attached.
    #[must_use]
    pub fn interfaces(&self) -> Vec<(String, bool)> {
        self.ifaces
            .iter()
            .map(|i| (i.name.clone(), i.ifindex.is_some()))
            .collect()
    }

    /// Lets the XDP program redirect into the device `ifindex` (`PM_REDIRECT_DEVS`).
    pub fn allow_xdp_redirect(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let mut devs: DevMapHash<_> = DevMapHash::try_from(self.map_mut(map_names::REDIRECT_DEVS)?)?;
        devs.insert(ifindex, ifindex, None, 0)?;
        Ok(())
    }

    fn attach_xdp(&mut self, iface: &str) -> anyhow::Result<()> {
        let path = hooks::link_pin(&self.pin_dir()?, iface, Hook::XdpIngress);
        if self.take_over(
            &path,
            prog_names::XDP_INGRESS,
            &format!("{iface} xdp_ingress"),
            Some(iface),
        ) {
            return Ok(());
        }
        let prog: &mut Xdp = self.program_mut(prog_names::XDP_INGRESS)?.try_into()?;
        let id = prog.attach(iface, XdpMode::Driver)?;
        let link = prog.take_link(id)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e| anyhow!("XDP link is not a bpf_link: {e}"))?;
        self.pin_link(iface, Hook::XdpIngress, fd)
    }

    pub(super) fn attach_tc(&mut self, iface: &str, hook: Hook) -> anyhow::Result<()> {
        let name = hook.program_name();
        let label = format!("{iface} {}", hook.as_str());
        if !self.tcx {
            let prog: &mut SchedClassifier = self.program_mut(name)?.try_into()?;
            let replaced = clsact::attach(prog, iface, hook)
                .with_context(|| format!("{iface}: attaching {name} (clsact)"))?;
            if replaced {
                info!("{label}: took over the attached filter");
            }
            self.record_filter(label, iface, hook);
            return Ok(());
        }
        let path = hooks::link_pin(&self.pin_dir()?, iface, hook);
        if self.take_over(&path, name, &label, Some(iface)) {
            return Ok(());
        }
        let kind = hook.tc_attach_type();
        let prog: &mut SchedClassifier = self.program_mut(name)?.try_into()?;
        // Kernel >= 6.6: a tcx bpf_link (no clsact qdisc, coexists with other tcx programs).
        let id = prog
            .attach(iface, kind)
            .with_context(|| format!("{iface}: attaching {name}"))?;
        let link = prog.take_link(id)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e| anyhow!("{iface}: TC link is not a bpf_link (kernel < 6.6?): {e}"))?;
        self.pin_link(iface, hook, fd)
    }

    /// Removes portmap's TC filters on interfaces neither configured nor carrying the reply hook
    /// any more, and all of them where tcx links replaced them (a newer kernel, or the fallback
    /// no longer forced).
    fn remove_stale_filters(&self) {
        let keep: Vec<String> = if self.tcx {
            Vec::new()
        } else {
            let configured = self.ifaces.iter().map(|i| i.name.clone());
            configured.chain(self.backend_veths.keys().cloned()).collect()
        };
        clsact::remove_except(&keep);
    }
}
