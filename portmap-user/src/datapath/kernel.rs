//! What the running kernel must offer, checked once at start: a kernel too old for a feature
//! portmap cannot do without is refused with a message naming the kernel each one needs; TC
//! attachment uses tcx links where the kernel has them (6.6) and a clsact qdisc with cls_bpf
//! filters below that (`clsact`).

use anyhow::bail;
use log::info;

/// Features without a fallback, and the first mainline kernel that has each.
pub const REQUIRED: [(&str, (u32, u32)); 6] = [
    ("BPF_MAP_LOOKUP_BATCH (reading every counter at once)", (5, 6)),
    (
        "BPF links for cgroup socket hooks and their in-place update",
        (5, 7),
    ),
    (
        "the BPF ring buffer (the datapath's log) and getpeername hooks",
        (5, 8),
    ),
    ("BPF links for XDP", (5, 9)),
    ("bpf_redirect_peer (the local fast path)", (5, 10)),
    (
        "SO_NETNS_COOKIE (host-local clients of the daemon's namespace only)",
        (5, 14),
    ),
];

/// The first kernel with tcx links; below it TC programs are cls_bpf filters on a clsact qdisc.
pub const TCX: (u32, u32) = (6, 6);

/// Set (to anything) to use clsact + cls_bpf filters even where tcx exists (to test the fallback).
pub const FORCE_NETLINK_ENV: &str = "PORTMAP_TC_NETLINK";

/// What the daemon may use on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub version: (u32, u32, u32),
    /// TC programs attach as tcx links (else as netlink filters).
    pub tcx: bool,
}

/// (major, minor, patch) from a release string such as `6.1.0-28-amd64` or `5.15.0-91-generic`.
#[must_use]
pub fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Checks `version` against [`REQUIRED`]; `force_netlink` turns tcx off.
pub fn check(version: (u32, u32, u32), force_netlink: bool) -> anyhow::Result<Kernel> {
    let (major, minor, _) = version;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(_, since)| (major, minor) < *since)
        .map(|(what, (a, b))| format!("{what}: Linux {a}.{b}"))
        .collect();
    if !missing.is_empty() {
        let oldest = REQUIRED.iter().map(|(_, since)| *since).max().unwrap_or((0, 0));
        bail!(
            "Linux {major}.{minor} is too old for portmap, which needs Linux {}.{} or later; missing: {}",
            oldest.0,
            oldest.1,
            missing.join("; ")
        );
    }
    Ok(Kernel {
        version,
        tcx: (major, minor) >= TCX && !force_netlink,
    })
}

/// The running kernel, checked.
pub fn detect() -> anyhow::Result<Kernel> {
    let uname = nix::sys::utsname::uname()?;
    let release = uname.release().to_string_lossy().into_owned();
    let Some(version) = parse_release(&release) else {
        bail!("cannot read the kernel version from '{release}'");
    };
    let kernel = check(version, std::env::var_os(FORCE_NETLINK_ENV).is_some())?;
    if !kernel.tcx {
        info!(
            "kernel {release}: TC programs attach as cls_bpf filters on a clsact qdisc (tcx links need Linux {}.{})",
            TCX.0, TCX.1
        );
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_as_distributions_write_them() {
        assert_eq!(parse_release("6.1.0-28-amd64"), Some((6, 1, 0)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15, 0)));
        assert_eq!(parse_release("5.14.0-427.13.1.el9_4.x86_64"), Some((5, 14, 0)));
        assert_eq!(parse_release("6.18.44-fc-v782"), Some((6, 18, 44)));
        assert_eq!(parse_release("6.6"), Some((6, 6, 0)));
        assert_eq!(parse_release("linux"), None);
    }

    #[test]
    fn old_kernels_are_refused_naming_what_they_lack() {
        let e = check((5, 10, 0), false).unwrap_err().to_string();
        assert!(e.contains("Linux 5.10 is too old"), "{e}");
        assert!(e.contains("needs Linux 5.14 or later"), "{e}");
        assert!(e.contains("SO_NETNS_COOKIE"), "{e}");
        assert!(!e.contains("bpf_redirect_peer"), "5.10 has it: {e}");
        let e = check((4, 19, 0), false).unwrap_err().to_string();
        assert!(e.contains("BPF links for XDP: Linux 5.9"), "{e}");
    }

    #[test]
    fn tcx_from_6_6_unless_netlink_is_forced() {
        assert!(!check((5, 14, 0), false).unwrap().tcx);
        assert!(!check((6, 1, 0), false).unwrap().tcx);
        assert!(check((6, 6, 0), false).unwrap().tcx);
        assert!(!check((6, 18, 0), true).unwrap().tcx);
    }
}
