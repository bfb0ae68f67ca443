//! What the daemon learns about the host it runs on: its addresses (and when they change), the
//! cookie of its network namespace, and where its cgroup v2 hierarchy is (here); the containers
//! behind its veths (`local_backends`), the sockets bound on it (`sockets`), and the netlink
//! requests and subscriptions both use (`netlink`).

pub mod local_backends;
pub mod netlink;
pub mod sockets;

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};

use crate::model::mapping::PortRange;
use log::info;

/// The addresses of every interface of the calling thread's network namespace.
pub fn addresses() -> anyhow::Result<BTreeSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing the host's addresses (getifaddrs)")?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            sa.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect())
}

/// A netlink socket that becomes readable whenever an address is added to or removed from an
/// interface of the namespace, or an interface appears, changes or disappears (RTMGRP_LINK,
/// RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR).
pub fn address_watch() -> anyhow::Result<crate::host::netlink::Watch> {
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    crate::host::netlink::Watch::new(
        netlink_sys::protocols::NETLINK_ROUTE,
        RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
    )
    .context("subscribing to address and link changes (netlink)")
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, kernel ≥ 5.14), as
/// `bpf_get_netns_cookie` reports it for sockets there.
pub fn netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the fd is owned (and closed) below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(
        fd >= 0,
        "opening a socket to read the network namespace cookie: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    ensure!(
        rc == 0,
        "reading SO_NETNS_COOKIE: {} (kernel >= 5.14 needed)",
        std::io::Error::last_os_error()
    );
    Ok(cookie)
}

/// A cgroup v2 mount: where it is, and which cgroup of the hierarchy it shows at its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub mount_point: PathBuf,
    pub root: PathBuf,
}

/// The first cgroup2 mount in a /proc/self/mountinfo text (pure).
#[must_use]
pub fn find_cgroup2(mountinfo: &str) -> Option<Cgroup2Mount> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = before.split_whitespace().collect();
        Some(Cgroup2Mount {
            root: PathBuf::from(unescape(fields.get(3)?)),
            mount_point: PathBuf::from(unescape(fields.get(4)?)),
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where to mount cgroup2 when nothing has (as `ip netns exec` leaves processes).
/// `net.ipv4.ip_local_port_range` ("32768\t60999").
#[must_use]
pub fn parse_port_range_sysctl(text: &str) -> Option<PortRange> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(start)), Some(Ok(end)), None) = (ports.next(), ports.next(), ports.next()) else {
        return None;
    };
    (start > 0 && start <= end).then_some(PortRange { start, end })
}

/// `net.ipv4.ip_local_reserved_ports` ("8080,9000-9010", or empty).
#[must_use]
pub fn parse_reserved_ports(text: &str) -> Vec<PortRange> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let (start, end) = part.split_once('-').unwrap_or((part, part));
            let range = PortRange {
                start: start.trim().parse().ok()?,
                end: end.trim().parse().ok()?,
            };
            (range.start <= range.end).then_some(range)
        })
        .collect()
}

/// Where dynamic host ports come from: `configured`, else the kernel's ephemeral range of this
/// network namespace (Docker's allocator reads the same), and the ports the kernel reserves
/// (never allocated).
pub fn dynamic_ports(configured: Option<PortRange>) -> (PortRange, Vec<PortRange>) {
    let read = |name: &str| fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap_or_default();
    let range = configured
        .or_else(|| parse_port_range_sysctl(&read("ip_local_port_range")))
        .unwrap_or(crate::config::DEFAULT_DYNAMIC_PORTS);
    (range, parse_reserved_ports(&read("ip_local_reserved_ports")))
}

const OWN_CGROUP2_MOUNT: &str = "/run/portmap/cgroup2";

/// The directory of cgroup `path` (as /proc/PID/cgroup shows it, e.g. `/` or
/// `/system.slice/x.service`) on this host's cgroup v2 hierarchy: under `mount` when given (the
/// hierarchy's root is mounted there), else under the cgroup2 mount of mountinfo, mounting
/// cgroup2 when there is none.
pub fn cgroup_dir(path: &Path, mount: Option<&Path>) -> anyhow::Result<PathBuf> {
    ensure!(
        path.is_absolute(),
        "cgroup '{}' must be an absolute cgroup path such as / or /system.slice",
        path.display()
    );
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let given = mount.map(|m| Cgroup2Mount {
        mount_point: m.to_path_buf(),
        root: "/".into(),
    });
    let mount = match given.or_else(|| find_cgroup2(&mountinfo)) {
        Some(m) => m,
        None => {
            fs::create_dir_all(OWN_CGROUP2_MOUNT).with_context(|| format!("creating {OWN_CGROUP2_MOUNT}"))?;
            nix::mount::mount(
                Some("cgroup2"),
                OWN_CGROUP2_MOUNT,
                Some("cgroup2"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mounting cgroup2 at {OWN_CGROUP2_MOUNT}"))?;
            info!("mounted cgroup2 at {OWN_CGROUP2_MOUNT}");
            Cgroup2Mount {
                mount_point: OWN_CGROUP2_MOUNT.into(),
                root: "/".into(),
            }
        }
    };
    let Ok(relative) = path.strip_prefix(&mount.root) else {
        bail!(
            "cgroup '{}' is outside the part of the hierarchy mounted at {} ({})",
            path.display(),
            mount.mount_point.display(),
            mount.root.display()
        );
    };
    let dir = mount.mount_point.join(relative);
    ensure!(
        dir.join("cgroup.procs").exists(),
        "cgroup '{}' does not exist ({} has no cgroup.procs)",
        path.display(),
        dir.display()
    );
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_port_ranges() {
        assert_eq!(
            parse_port_range_sysctl("32768\t60999\n"),
            Some(PortRange {
                start: 32768,
                end: 60999
            })
        );
        assert_eq!(parse_port_range_sysctl("60999 32768"), None);
        assert_eq!(parse_port_range_sysctl("garbage"), None);
        assert_eq!(
            parse_reserved_ports("8080,9000-9010\n"),
            [
                PortRange::single(8080),
                PortRange {
                    start: 9000,
                    end: 9010
                }
            ]
        );
        assert!(parse_reserved_ports("\n").is_empty());
    }

    #[test]
    fn finds_the_cgroup2_mount_and_unescapes_it() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            find_cgroup2(text),
            Some(Cgroup2Mount {
                mount_point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            })
        );
        let nested = "40 30 0:26 /kubepods /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(
            find_cgroup2(nested),
            Some(Cgroup2Mount {
                mount_point: "/mnt/with space".into(),
                root: "/kubepods".into()
            })
        );
        assert_eq!(find_cgroup2("22 1 0:21 / /proc rw - proc proc rw\n"), None);
    }
}
