//! Flow table: find, create (forward + reply entries together) and refresh flows.
//!
//! Expiry is the daemon's job (it walks `PM_CONNTRACK`, pairs the two entries of a flow and
//! deletes both once idle past the protocol's timeout, or past the close grace after FIN/RST), so
//! the LRU only ever evicts when the table is truly full. The datapath only refreshes
//! `last_seen_ns` (at most once per `LAST_SEEN_GRANULARITY_NS`) and marks closing flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use portmap_common::{
    Addr, DIR_FORWARD, DIR_REPLY, FLOW_F_CLOSING, FlowKey, FlowValue, LAST_SEEN_GRANULARITY_NS, MappingKey,
    MappingValue, NO_GROUP, flow_hash, maglev_slot, stat,
};

use crate::{
    PM_BACKENDS, PM_CONNTRACK, PM_MAGLEV, PM_MAPPINGS,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The address and port a flow's packets are rewritten to, and the mapping's stats slot.
#[derive(Clone, Copy)]
pub struct Nat {
    pub addr: Addr,
    pub port: u16,
    pub stats_slot: u32,
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.saddr,
        dst: pkt.daddr,
        src_port_be: pkt.sport,
        dst_port_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Refreshes an entry for a packet seen now: last-seen time (rate-limited) and the closing mark.
#[inline(always)]
fn touch(entry: *mut FlowValue, tcp_flags: u8, now: u64) {
    // SAFETY: `entry` comes from a successful map lookup; concurrent writers only store the same
    // kind of values (a racy last_seen is harmless).
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 && (*entry).flags & FLOW_F_CLOSING == 0 {
            (*entry).flags |= FLOW_F_CLOSING;
        }
    }
}

/// Looks up the entry for `key` in direction `dir`. A TCP SYN (without ACK) on a closing flow is
/// a new connection reusing the 5-tuple: it gets `None` so that the caller creates a fresh flow.
#[inline(always)]
pub fn lookup(key: &FlowKey, dir: u8, tcp_flags: u8, now: u64) -> Option<Nat> {
    let entry = PM_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup.
    let v = unsafe { *entry };
    if v.direction != dir {
        return None;
    }
    if dir == DIR_FORWARD && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && v.flags & FLOW_F_CLOSING != 0 {
        return None;
    }
    touch(entry, tcp_flags, now);
    Some(Nat {
        addr: v.nat_addr,
        port: v.nat_port_be,
        stats_slot: v.stats_slot,
    })
}

/// The mapping for a packet's destination: the exact host address first, then the wildcard.
#[inline(always)]
pub fn find_mapping(pkt: &Packet) -> Option<MappingValue> {
    let mut key = MappingKey {
        addr: pkt.daddr,
        port_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: values are plain data copied out of the map.
    if let Some(v) = unsafe { PM_MAPPINGS.get(key) } {
        return Some(*v);
    }
    key.addr = [0; 4];
    unsafe { PM_MAPPINGS.get(key) }.copied()
}

/// The backend a new flow through `mapping` goes to: the inline one, or for several backends the
/// one the mapping's Maglev table gives the client's hash. `Err(drop_no_backend)` if the table or
/// the backend is missing (the daemon is replacing them).
#[inline(always)]
pub fn choose_backend(pkt: &Packet, mapping: &MappingValue) -> Result<(Addr, u16), u32> {
    if mapping.group == NO_GROUP {
        return Ok((mapping.backend_addr, mapping.backend_port_be));
    }
    let table = PM_MAGLEV.get(mapping.group).ok_or(stat::DROP_NO_BACKEND)?;
    let slot = maglev_slot(flow_hash(&pkt.saddr, pkt.sport, pkt.proto));
    let index = *table.backends.get(slot).ok_or(stat::DROP_NO_BACKEND)?;
    let backend = PM_BACKENDS.get(index).ok_or(stat::DROP_NO_BACKEND)?;
    if backend.family != pkt.family {
        return Err(stat::DROP_NO_BACKEND);
    }
    let port = u16::from_be(backend.port_be).wrapping_add(mapping.port_offset);
    Ok((backend.addr, port.to_be()))
}

/// Records a new flow to `backend` through `mapping`: the reply entry first (it may clash with
/// another flow), then the forward entry; if the forward insert fails the reply entry is removed
/// again, so the two are only ever present together.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    key: &FlowKey,
    backend: (Addr, u16),
    stats_slot: u32,
    now: u64,
) -> Result<Nat, u32> {
    let (backend_addr, backend_port) = backend;
    let reply_key = FlowKey {
        src: backend_addr,
        dst: pkt.saddr,
        src_port_be: backend_port,
        dst_port_be: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    let closing = if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        FLOW_F_CLOSING
    } else {
        0
    };
    let reply = FlowValue {
        last_seen_ns: now,
        nat_addr: pkt.daddr,
        nat_port_be: pkt.dport,
        direction: DIR_REPLY,
        flags: 0,
        stats_slot,
    };
    if PM_CONNTRACK
        .insert(reply_key, reply, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Taken: by an earlier incarnation of this very flow (same client port, same published
        // address) it is ours to overwrite; by any other flow it is a clash.
        if let Some(old) = unsafe { PM_CONNTRACK.get(reply_key) }
            && (old.direction != DIR_REPLY || old.nat_addr != pkt.daddr || old.nat_port_be != pkt.dport)
        {
            return Err(stat::DROP_NAT_CLASH);
        }
        if PM_CONNTRACK.insert(reply_key, reply, u64::from(BPF_ANY)).is_err() {
            return Err(stat::DROP_CT_FULL);
        }
    }
    let forward = FlowValue {
        last_seen_ns: now,
        nat_addr: backend_addr,
        nat_port_be: backend_port,
        direction: DIR_FORWARD,
        flags: closing,
        stats_slot,
    };
    if PM_CONNTRACK.insert(key, forward, u64::from(BPF_ANY)).is_err() {
        let _ = PM_CONNTRACK.remove(reply_key);
        return Err(stat::DROP_CT_FULL);
    }
    Ok(Nat {
        addr: backend_addr,
        port: backend_port,
        stats_slot,
    })
}
