//! TC programs on kernels without tcx (< 6.6): cls_bpf filters in direct-action mode on a clsact
//! qdisc, added through netlink. A filter is no bpf_link and cannot be pinned; it stays attached
//! (holding its program) until it is deleted, so the daemon leaves it on exit and finds it again
//! by its fixed priority and handle: a new daemon replaces the program of the same filter
//! (`RTM_NEWTFILTER` without `NLM_F_CREATE`, atomic like a link update), and `portmap cleanup`
//! deletes the filters by program name on every interface.

use aya::programs::{
    SchedClassifier,
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact, qdisc_detach_program},
};
use log::info;

use super::hooks::Hook;

/// Where portmap's filters sit in the clsact qdisc: their own priority (lower runs first), so
/// they do not collide with other users' filters, and a fixed handle.
pub const PRIORITY: u16 = 0x5050;
pub const HANDLE: TcHandle = TcHandle::new(0, 1);

/// Attaches `prog` as portmap's filter for `hook` on `iface`: replaces the program of the filter
/// an earlier daemon left there (true), or adds the clsact qdisc if needed and a new filter.
pub(super) fn attach(prog: &mut SchedClassifier, iface: &str, hook: Hook) -> anyhow::Result<bool> {
    let kind = hook.tc_attach_type();
    let earlier = SchedClassifierLink::attached(iface, kind, PRIORITY, HANDLE, None)?;
    let (id, replaced) = match prog.attach_to_link(earlier) {
        Ok(id) => (id, true),
        Err(_) => {
            // None there (or no clsact qdisc yet): add both. An existing qdisc is fine.
            let _ = qdisc_add_clsact(iface);
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: HANDLE,
                classid: None,
            });
            (prog.attach_with_options(iface, kind, options)?, false)
        }
    };
    // The link would delete the filter when dropped: the filter outlives the daemon on purpose.
    std::mem::forget(prog.take_link(id)?);
    Ok(replaced)
}

/// Deletes portmap's filter for `hook` on `iface` (nothing to do when the device is gone: its
/// filters went with it).
pub(super) fn detach(iface: &str, hook: Hook) -> anyhow::Result<()> {
    use aya::programs::links::Link as _;
    let Ok(link) = SchedClassifierLink::attached(iface, hook.tc_attach_type(), PRIORITY, HANDLE, None) else {
        return Ok(());
    };
    link.detach()?;
    Ok(())
}

/// Deletes portmap's filters from every interface of the namespace except `keep`'s; returns the
/// interfaces it deleted any from.
pub fn remove_except(keep: &[String]) -> Vec<String> {
    let Ok(ifaces) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for iface in ifaces.iter() {
        let name = iface.name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            continue;
        }
        let mut any = false;
        for hook in Hook::TC {
            any |= qdisc_detach_program(&name, hook.tc_attach_type(), hook.program_name()).is_ok();
        }
        if any {
            info!("{name}: removed portmap's TC filters");
            removed.push(name);
        }
    }
    removed
}
