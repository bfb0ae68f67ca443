//! Where programs are attached, and the names their pins have (a leaf: everything that attaches,
//! adopts or cleans up names hooks and pins through this file).

use std::path::{Path, PathBuf};

use aya::programs::TcAttachType;
use portmap_common::prog_names;

/// Where a program is attached: on a client-facing interface, or on a veth of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    XdpIngress,
    TcIngress,
    TcEgress,
    /// TC ingress of a veth's host side (a container's uplink): replies sent to the client there.
    TcFromBackend,
}

impl Hook {
    /// The TC hooks, as netlink's clsact filters and tcx links name them.
    pub const TC: [Self; 3] = [Self::TcIngress, Self::TcEgress, Self::TcFromBackend];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XdpIngress => "xdp_ingress",
            Self::TcIngress => "tc_ingress",
            Self::TcEgress => "tc_egress",
            Self::TcFromBackend => "tc_from_backend",
        }
    }

    /// The program that runs at this hook.
    #[must_use]
    pub fn program_name(self) -> &'static str {
        match self {
            Self::XdpIngress => prog_names::XDP_INGRESS,
            Self::TcIngress => prog_names::TC_INGRESS,
            Self::TcEgress => prog_names::TC_EGRESS,
            Self::TcFromBackend => prog_names::TC_FROM_BACKEND,
        }
    }

    /// The TC attach point (`XdpIngress` has none: it is not a TC hook).
    pub(super) fn tc_attach_type(self) -> TcAttachType {
        if matches!(self, Self::TcIngress | Self::TcFromBackend) {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        }
    }
}

pub(super) fn map_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("maps").join(name)
}

/// bpffs refuses names containing '.', which interface names may have (eth0.100): those are
/// percent-encoded, as is '%' itself.
pub(super) fn link_pin(pin_dir: &Path, iface: &str, hook: Hook) -> PathBuf {
    let iface = iface.replace('%', "%25").replace('.', "%2E");
    pin_dir.join("links").join(format!("{iface}_{}", hook.as_str()))
}

/// The pin of a socket hook's link to the cgroup with inode number `cgroup_id`.
pub(super) fn cgroup_link_pin(pin_dir: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("cgroup_{cgroup_id}_{program}"))
}
