//! The reply hook on the veths of the host (`portmap_tc_from_backend` on their TC ingress,
//! Cilium's from-container hook): a container's replies are reverse-NATed where they enter the
//! host and sent to the client from there, so that the host's netfilter never sees them — on a
//! host whose runtime masquerades its container subnet (Docker's and podman's defaults), it
//! would take them for new flows of that subnet, rewrite their source, and the client would
//! reset the connection. The set is every veth but the client-facing interfaces, read with the
//! local backends (`host::local_backends::read`) whenever links change; attachments are pinned
//! links (tcx) or filters (clsact) like any other, taken over by the next daemon.

use std::collections::BTreeMap;

use log::{info, warn};

use super::{Datapath, hooks::Hook};

impl Datapath {
    /// Puts the reply hook on every veth of `veths` (name → ifindex) and takes it off those that
    /// left the set or are a new device now (the old one took its link along). A veth that
    /// cannot be attached (it went meanwhile) is logged and retried at the next change: its
    /// replies take the host's path meanwhile, as without the hook. Returns how many changed.
    pub fn sync_backend_veths(&mut self, veths: &BTreeMap<String, u32>) -> usize {
        let mut changed = 0;
        let stale: Vec<String> = self
            .backend_veths
            .iter()
            .filter(|(name, index)| veths.get(*name) != Some(index))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.detach_iface(&name);
            self.backend_veths.remove(&name);
            changed += 1;
        }
        for (name, index) in veths {
            if self.backend_veths.contains_key(name) {
                continue;
            }
            match self.attach_tc(name, Hook::TcFromBackend) {
                Ok(()) => {
                    info!("{name}: attached the reply hook (tc ingress of the veth)");
                    self.backend_veths.insert(name.clone(), *index);
                    changed += 1;
                }
                Err(e) => {
                    self.detach_iface(name);
                    warn!("{name}: attaching the reply hook failed (retried at the next change): {e:#}");
                }
            }
        }
        changed
    }
}
