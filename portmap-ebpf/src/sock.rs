//! Host-local clients: socket-level load balancing in cgroup hooks (Cilium's bpf_sock.c), so a
//! process on the host or in a container reaches a published port without per-packet NAT.
//!
//! - connect() and sendmsg() to a published address are translated to a backend before any
//!   packet exists (TCP, connected and unconnected UDP); the socket's traffic then goes to the
//!   backend as if it had addressed it, and the backend's replies match the socket directly.
//! - recvmsg() and getpeername() report the published address back instead of the backend
//!   (`PM_SOCK_REVERSE`, keyed by the socket's cookie), so UDP replies appear to come from the
//!   address the client sent to.
//! - a mapping's allow-list applies to the client's address where the hook can know it: the
//!   address the socket is bound to (or a datagram's chosen source), else, in the host's network
//!   namespace, the address the kernel will send from — the host address connected to, or
//!   127.0.0.1 / ::1 for loopback. A socket of another network namespace (a container) that is
//!   not bound has no address the hook can know, and is refused: no path around the list.
//!   A refusal is EPERM (`sock_denied`).
//! - bind() of a published port is refused (EPERM) in the host's network namespace, as Docker's
//!   held port refuses it with EADDRINUSE — unless a container runtime owns the port
//!   (`MAPPING_F_RUNTIME_RESERVES`): its own reservation socket binds, and refuses the others.
//!
//! Which destinations match (`lb::lookup`): a mapping's own address; for a wildcard mapping, the
//! host's addresses. Loopback destinations (and mappings bound to loopback) only for sockets of
//! the host's network namespace: inside a container, 127.0.0.1 stays its own. An IPv6 socket
//! that addresses `::1` reaches an IPv4 wildcard mapping too (docker-proxy listens on both), and
//! a v4-mapped destination (`::ffff:a.b.c.d`) is looked up as the IPv4 address.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST, bpf_sock_addr},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use portmap_common::{
    Addr, FAMILY_V4, FAMILY_V6, MAPPING_F_RUNTIME_RESERVES, MappingValue, PortKey, SockRevKey, SockRevValue,
    Stat, flow_hash,
};

use crate::{
    lb,
    maps::{PM_PUBLISHED_PORTS, PM_SOCK_REVERSE},
    stats::{count, count_denied, count_flow},
};

/// Return codes of cgroup sock_addr programs.
pub const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// The cookie of the daemon's network namespace (the host's), set at load time
/// (`HOST_NETNS_COOKIE_GLOBAL`). 0 (not set) matches no socket.
#[unsafe(no_mangle)]
static HOST_NETNS_COOKIE: u64 = 0;

/// The third word of a v4-mapped IPv6 address (`::ffff:0:0/96`).
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const V4_LOOPBACK: Addr = [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0];
const V6_LOOPBACK: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// An address and port as a socket hook sees it, in the maps' representation.
#[derive(Clone, Copy)]
struct SockAddr {
    addr: Addr,
    port_be: u16,
    family: u8,
}

impl SockAddr {
    /// The IPv4 address a v4-mapped IPv6 one stands for; any other unchanged.
    #[inline(always)]
    fn unmapped(self) -> Self {
        if self.family == FAMILY_V6 && self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == V4_MAPPED {
            Self {
                addr: [self.addr[3], 0, 0, 0],
                family: FAMILY_V4,
                ..self
            }
        } else {
            self
        }
    }
}

/// The context's `struct bpf_sock_addr`.
#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the context the kernel passed is valid for the program's run.
    unsafe { &*ctx.sock_addr }
}

#[inline(always)]
fn sock_addr_mut(ctx: &mut SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the context the kernel passed is valid for the program's run, and only this
    // program (through `ctx`, borrowed mutably) writes it.
    unsafe { &mut *ctx.sock_addr }
}

/// The user address of the call (destination of connect/sendmsg, source of a received
/// datagram, peer, or bind address).
#[inline(always)]
fn read(ctx: &SockAddrContext, v6: bool) -> SockAddr {
    let sa = sock_addr(ctx);
    let addr = if v6 {
        [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]]
    } else {
        [sa.user_ip4, 0, 0, 0]
    };
    SockAddr {
        addr,
        port_be: sa.user_port as u16,
        family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
    }
}

#[inline(always)]
fn write(ctx: &mut SockAddrContext, to: &SockAddr) {
    let sa = sock_addr_mut(ctx);
    if to.family == FAMILY_V6 {
        sa.user_ip6[0] = to.addr[0];
        sa.user_ip6[1] = to.addr[1];
        sa.user_ip6[2] = to.addr[2];
        sa.user_ip6[3] = to.addr[3];
    } else {
        sa.user_ip4 = to.addr[0];
    }
    sa.user_port = u32::from(to.port_be);
}

#[inline(always)]
fn host_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a plain read of a global; volatile, so that the compiler does not fold in the
    // 0 it is declared with (the loader sets the real value).
    let host = unsafe { core::ptr::read_volatile(&raw const HOST_NETNS_COOKIE) };
    cookie == host
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a helper taking the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The mapping a socket's destination `dst` (IPv4, or IPv6 not v4-mapped) reaches.
#[inline(always)]
fn mapping_for(dst: &SockAddr, proto: u8, host: bool) -> Option<&'static MappingValue> {
    let loopback = lb::is_loopback(&dst.addr, dst.family);
    if loopback && !host {
        return None;
    }
    lb::lookup(&dst.addr, dst.port_be, proto, dst.family, || {
        lb::is_local(&dst.addr, dst.family)
    })
}

/// The address the client sends from, as far as the hook can know it (see the module docs), in
/// the family of `dst` (the published address, already unmapped).
#[inline(always)]
fn client_addr(ctx: &SockAddrContext, v6: bool, sendmsg: bool, dst: &SockAddr, host: bool) -> Option<Addr> {
    let sa = sock_addr(ctx);
    // SAFETY: `sk` of a sock_addr context is the socket of the call, never null.
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    let chosen = |addr: Addr| {
        let at = SockAddr {
            addr,
            port_be: 0,
            family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
        }
        .unmapped();
        (at.family == dst.family && at.addr != [0; 4]).then_some(at.addr)
    };
    let word4 = |w: u32| [w, 0, 0, 0];
    let bound = if v6 { sk.src_ip6 } else { word4(sk.src_ip4) };
    if let Some(addr) = chosen(bound) {
        return Some(addr);
    }
    if sendmsg {
        let src = if v6 { sa.msg_src_ip6 } else { word4(sa.msg_src_ip4) };
        if let Some(addr) = chosen(src) {
            return Some(addr);
        }
    }
    if !host {
        return None;
    }
    Some(if !lb::is_loopback(&dst.addr, dst.family) {
        dst.addr
    } else if dst.family == FAMILY_V6 {
        V6_LOOPBACK
    } else {
        V4_LOOPBACK
    })
}

/// connect() and sendmsg() (`sendmsg` true): translates a destination that is a published
/// address into a backend, and remembers the published address for the replies; returns the
/// hook's verdict (`REJECT`: the mapping's allow-list refuses the client).
#[inline(always)]
pub fn translate(ctx: &mut SockAddrContext, v6: bool, sendmsg: bool) -> i32 {
    let proto = sock_addr(ctx).protocol as u8;
    let dst = read(ctx, v6);
    let host = host_netns(ctx);
    let mut lookup = dst.unmapped();
    let mut found = mapping_for(&lookup, proto, host);
    // [::1]:PORT also reaches an IPv4 mapping published on loopback or the wildcard; not for an
    // unconnected datagram, which the kernel refuses to send to the v4-mapped address a
    // sendmsg6 hook writes (udpv6_sendmsg: ENOTSUPP).
    if found.is_none() && !sendmsg && host && dst.family == FAMILY_V6 && dst.addr == V6_LOOPBACK {
        lookup = SockAddr {
            addr: V4_LOOPBACK,
            port_be: dst.port_be,
            family: FAMILY_V4,
        };
        found = mapping_for(&lookup, proto, host);
    }
    let Some(mapping) = found else { return PROCEED };
    if mapping.allow_list != portmap_common::NO_ALLOW_LIST {
        let admitted = client_addr(ctx, v6, sendmsg, &lookup, host)
            .is_some_and(|client| lb::allowed(mapping, &client, lookup.family));
        if !admitted {
            count(Stat::SockDenied);
            count_denied(mapping.stats_slot);
            return REJECT;
        }
    }
    let cookie = socket_cookie(ctx);
    let hash = flow_hash(&[cookie as u32, (cookie >> 32) as u32, 0, 0], 0, proto);
    let Ok((backend, port_be)) = lb::choose_backend(mapping, &lookup.addr, lookup.family, hash) else {
        // A slow path (a mapping's Maglev table being replaced): logged as well as counted.
        count(Stat::SockNoBackend);
        warn!(
            ctx,
            "portmap: a host-local client reached a mapping whose backend is missing"
        );
        return PROCEED;
    };
    // An IPv6 socket reaches an IPv4 backend through its v4-mapped address.
    let to = if dst.family == FAMILY_V6 && lookup.family == FAMILY_V4 {
        SockAddr {
            addr: [0, 0, V4_MAPPED, backend[0]],
            port_be,
            family: FAMILY_V6,
        }
    } else {
        SockAddr {
            addr: backend,
            port_be,
            family: dst.family,
        }
    };
    write(ctx, &to);
    count(Stat::SockTranslated);
    if remember(cookie, &to, &dst) {
        count_flow(mapping.stats_slot);
    }
    PROCEED
}

/// Records that the socket's traffic to `to` was addressed to `published`; true for a new
/// (socket, backend) pair, which counts as a flow of the mapping.
#[inline(always)]
fn remember(cookie: u64, to: &SockAddr, published: &SockAddr) -> bool {
    let key = SockRevKey {
        cookie,
        addr: to.addr,
        port_be: to.port_be,
        family: to.family,
        _pad: [0; 5],
    };
    let value = SockRevValue {
        addr: published.addr,
        port_be: published.port_be,
        _pad: [0; 2],
    };
    if PM_SOCK_REVERSE.insert(key, value, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    // The same socket reached this backend through another published address before.
    let _ = PM_SOCK_REVERSE.insert(key, value, u64::from(BPF_ANY));
    false
}

/// recvmsg() and getpeername(): the backend's address back to the published one.
#[inline(always)]
pub fn reverse(ctx: &mut SockAddrContext, v6: bool) {
    let from = read(ctx, v6);
    let key = SockRevKey {
        cookie: socket_cookie(ctx),
        addr: from.addr,
        port_be: from.port_be,
        family: from.family,
        _pad: [0; 5],
    };
    // SAFETY: the value is copied out before any other map operation.
    if let Some(published) = unsafe { PM_SOCK_REVERSE.get(key) }.copied() {
        let to = SockAddr {
            addr: published.addr,
            port_be: published.port_be,
            family: from.family,
        };
        write(ctx, &to);
    }
}

/// bind(): refuses a published (protocol, port) on a matching address in the host's network
/// namespace; returns the hook's verdict.
#[inline(always)]
pub fn bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let at = read(ctx, v6).unmapped();
    if at.port_be == 0 || !host_netns(ctx) {
        return PROCEED;
    }
    let proto = sock_addr(ctx).protocol as u8;
    let unspecified = at.addr == [0; 4];
    // The mapping of this address (or the wildcard one); its runtime reserves the port itself.
    let reserved = || {
        lb::lookup(&at.addr, at.port_be, proto, at.family, || true)
            .map(|m| m.flags & MAPPING_F_RUNTIME_RESERVES != 0)
    };
    let refused = if unspecified {
        let key = PortKey {
            port_be: at.port_be,
            proto,
            _pad: 0,
        };
        // SAFETY: only the presence of the entry is read.
        unsafe { PM_PUBLISHED_PORTS.get(key) }.is_some() && reserved() != Some(true)
    } else {
        reserved() == Some(false)
    };
    if refused {
        count(Stat::SockBindRefused);
        return REJECT;
    }
    PROCEED
}
