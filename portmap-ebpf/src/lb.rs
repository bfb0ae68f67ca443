//! Load balancing: which mapping a destination matches and which of its backends a new flow
//! goes to (Cilium's lb.h, apart from conntrack). Shared by the packet path and the socket hooks.
//!
//! A mapping bound to an address matches that address; a wildcard mapping only destinations that
//! are addresses of the host (`PM_LOCAL_ADDRS`, or loopback), as iptables' `--dst-type LOCAL`
//! does, so a host that routes for others never takes their traffic to a mapped port. Loopback
//! destinations never match a packet from the wire (moby#45610); the socket hooks serve them.

use aya_ebpf::maps::lpm_trie::Key;
use portmap_common::{
    Addr, AllowKey, DESTINATION_BACKEND, FAMILY_V6, LocalAddrKey, MappingKey, MappingValue, NO_ALLOW_LIST,
    NO_GROUP, Stat, flow_hash, maglev_slot,
};

use crate::{
    maps::{PM_ALLOW, PM_BACKENDS, PM_LOCAL_ADDRS, PM_MAGLEV, PM_MAPPINGS, zeroed},
    parse::Packet,
};

/// 127.0.0.0/8 or ::1.
#[inline(always)]
pub fn is_loopback(addr: &Addr, family: u8) -> bool {
    if family == FAMILY_V6 {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
    } else {
        addr[0].to_ne_bytes()[0] == 127
    }
}

/// An address of the host (loopback included).
#[inline(always)]
pub fn is_local(addr: &Addr, family: u8) -> bool {
    let key = LocalAddrKey::new(*addr, family);
    // SAFETY: only the presence of the entry is read.
    is_loopback(addr, family) || unsafe { PM_LOCAL_ADDRS.get(key) }.is_some()
}

/// The mapping published at `addr`:`port_be`: the exact address first, then the family's
/// wildcard if `local()` says the destination is the host's (asked only then: a map lookup).
#[inline(always)]
pub fn lookup(
    addr: &Addr,
    port_be: u16,
    proto: u8,
    family: u8,
    local: impl FnOnce() -> bool,
) -> Option<&'static MappingValue> {
    let mut key = MappingKey {
        addr: *addr,
        port_be,
        proto,
        family,
    };
    // The entry itself, not a copy: an `Option<MappingValue>` leaves its payload undefined on
    // `None`, and LLVM may spill that undefined register, which 6.1's verifier refuses.
    // SAFETY: the element stays readable for the program's run (RCU); an `update` racing with
    // this packet may be seen before or after, as a copy taken here would be.
    if let Some(v) = unsafe { PM_MAPPINGS.get(key) } {
        return Some(v);
    }
    if !local() {
        return None;
    }
    // The wildcard address from `maps::zeroed`: a zero literal would be a `memset` call, and any
    // call costs the XDP program's frame 32 bytes on 6.1's verifier; the program is at the limit.
    // SAFETY: all zeros is an `Addr` (integers).
    key.addr = unsafe { zeroed() };
    // SAFETY: as above.
    unsafe { PM_MAPPINGS.get(key) }
}

/// The mapping for a packet from the wire: never one of a loopback destination.
#[inline(always)]
pub fn find_mapping(pkt: &Packet) -> Option<&'static MappingValue> {
    if is_loopback(&pkt.daddr, pkt.family) {
        return None;
    }
    lookup(&pkt.daddr, pkt.dport, pkt.proto, pkt.family, || {
        is_local(&pkt.daddr, pkt.family)
    })
}

/// Whether a new flow from `src` (of `family`, the mapping's) may use `mapping`: it has no
/// allow-list, or a prefix of its list holds `src` (one LPM lookup). Asked only where a flow
/// starts: established flows and replies never pay for it. Shared by the packet path and the
/// socket hooks.
#[inline(always)]
pub fn allowed(mapping: &MappingValue, src: &Addr, family: u8) -> bool {
    if mapping.allow_list == NO_ALLOW_LIST {
        return true;
    }
    let key = Key::new(
        AllowKey::full_len(family),
        AllowKey::new(mapping.allow_list, family, *src),
    );
    PM_ALLOW.get(&key).is_some()
}

/// The flow hash of a packet: every packet of a flow (and a client's retransmitted SYN) picks
/// the same backend.
#[inline(always)]
pub fn packet_hash(pkt: &Packet) -> u32 {
    flow_hash(&pkt.saddr, pkt.sport, pkt.proto)
}

/// The backend a new flow to `dst` through `mapping` goes to: the inline one (`dst` itself for
/// `DESTINATION_BACKEND`, a port of the host), or for several backends the one the mapping's
/// Maglev table gives `hash`. `Err(drop_no_backend)` if the table or the backend is missing (the
/// daemon is replacing them) or of another family.
#[inline(always)]
pub fn choose_backend(
    mapping: &MappingValue,
    dst: &Addr,
    family: u8,
    hash: u32,
) -> Result<(Addr, u16), Stat> {
    if mapping.group == NO_GROUP {
        let addr = if mapping.backend_addr == DESTINATION_BACKEND {
            *dst
        } else {
            mapping.backend_addr
        };
        return Ok((addr, mapping.backend_port_be));
    }
    let table = PM_MAGLEV.get(mapping.group).ok_or(Stat::DropNoBackend)?;
    let slot = maglev_slot(hash);
    let index = *table.backends.get(slot).ok_or(Stat::DropNoBackend)?;
    let backend = PM_BACKENDS.get(index).ok_or(Stat::DropNoBackend)?;
    if backend.family != family {
        return Err(Stat::DropNoBackend);
    }
    let port = u16::from_be(backend.port_be).wrapping_add(mapping.port_offset);
    Ok((backend.addr, port.to_be()))
}
