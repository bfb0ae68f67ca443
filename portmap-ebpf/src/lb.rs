//! Load balancing: which mapping a new flow matches and which of its backends it goes to
//! (Cilium's lb.h, apart from conntrack).

use portmap_common::{Addr, MappingKey, MappingValue, NO_GROUP, Stat, flow_hash, maglev_slot};

use crate::{
    maps::{PM_BACKENDS, PM_MAGLEV, PM_MAPPINGS},
    parse::Packet,
};

/// The mapping for a packet's destination: the exact host address first, then the wildcard.
#[inline(always)]
pub fn find_mapping(pkt: &Packet) -> Option<MappingValue> {
    let mut key = MappingKey {
        addr: pkt.daddr,
        port_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: the value is copied out before any other map operation.
    if let Some(v) = unsafe { PM_MAPPINGS.get(key) } {
        return Some(*v);
    }
    key.addr = [0; 4];
    // SAFETY: as above.
    unsafe { PM_MAPPINGS.get(key) }.copied()
}

/// The backend a new flow through `mapping` goes to: the inline one, or for several backends the
/// one the mapping's Maglev table gives the client's hash. `Err(drop_no_backend)` if the table or
/// the backend is missing (the daemon is replacing them).
#[inline(always)]
pub fn choose_backend(pkt: &Packet, mapping: &MappingValue) -> Result<(Addr, u16), Stat> {
    if mapping.group == NO_GROUP {
        return Ok((mapping.backend_addr, mapping.backend_port_be));
    }
    let table = PM_MAGLEV.get(mapping.group).ok_or(Stat::DropNoBackend)?;
    let slot = maglev_slot(flow_hash(&pkt.saddr, pkt.sport, pkt.proto));
    let index = *table.backends.get(slot).ok_or(Stat::DropNoBackend)?;
    let backend = PM_BACKENDS.get(index).ok_or(Stat::DropNoBackend)?;
    if backend.family != pkt.family {
        return Err(Stat::DropNoBackend);
    }
    let port = u16::from_be(backend.port_be).wrapping_add(mapping.port_offset);
    Ok((backend.addr, port.to_be()))
}
