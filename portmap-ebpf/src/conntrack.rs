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
    DIR_FORWARD, DIR_REPLY, FLOW_F_CLOSING, FlowKey, FlowValue, LAST_SEEN_GRANULARITY_NS, MappingKey,
    MappingValue, stat,
};

use crate::{
    PM_CONNTRACK, PM_MAPPINGS,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The address and port a flow's packets are rewritten to, and the mapping's stats slot.
#[derive(Clone, Copy)]
pub struct Nat {
    pub addr: u32,
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
        src_addr_be: pkt.saddr,
        dst_addr_be: pkt.daddr,
        src_port_be: pkt.sport,
        dst_port_be: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
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
        addr: v.nat_addr_be,
        port: v.nat_port_be,
        stats_slot: v.stats_slot,
    })
}

/// The mapping for a packet's destination: the exact host address first, then the wildcard.
#[inline(always)]
pub fn find_mapping(pkt: &Packet) -> Option<MappingValue> {
    let mut key = MappingKey {
        addr_be: pkt.daddr,
        port_be: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: values are plain data copied out of the map.
    if let Some(v) = unsafe { PM_MAPPINGS.get(key) } {
        return Some(*v);
    }
    key.addr_be = 0;
    unsafe { PM_MAPPINGS.get(key) }.copied()
}

/// Records a new flow through `mapping`: the reply entry first (it may clash with another flow),
/// then the forward entry; if the forward insert fails the reply entry is removed again, so the
/// two are only ever present together.
#[inline(always)]
pub fn create(pkt: &Packet, key: &FlowKey, mapping: &MappingValue, now: u64) -> Result<Nat, u32> {
    let reply_key = FlowKey {
        src_addr_be: mapping.backend_addr_be,
        dst_addr_be: pkt.saddr,
        src_port_be: mapping.backend_port_be,
        dst_port_be: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let closing = if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        FLOW_F_CLOSING
    } else {
        0
    };
    let reply = FlowValue {
        last_seen_ns: now,
        nat_addr_be: pkt.daddr,
        nat_port_be: pkt.dport,
        direction: DIR_REPLY,
        flags: 0,
        stats_slot: mapping.stats_slot,
        _pad: 0,
    };
    if PM_CONNTRACK
        .insert(reply_key, reply, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Taken: by an earlier incarnation of this very flow (same client port, same published
        // address) it is ours to overwrite; by any other flow it is a clash.
        if let Some(old) = unsafe { PM_CONNTRACK.get(reply_key) }
            && (old.direction != DIR_REPLY || old.nat_addr_be != pkt.daddr || old.nat_port_be != pkt.dport)
        {
            return Err(stat::DROP_NAT_CLASH);
        }
        if PM_CONNTRACK.insert(reply_key, reply, u64::from(BPF_ANY)).is_err() {
            return Err(stat::DROP_CT_FULL);
        }
    }
    let forward = FlowValue {
        last_seen_ns: now,
        nat_addr_be: mapping.backend_addr_be,
        nat_port_be: mapping.backend_port_be,
        direction: DIR_FORWARD,
        flags: closing,
        stats_slot: mapping.stats_slot,
        _pad: 0,
    };
    if PM_CONNTRACK.insert(key, forward, u64::from(BPF_ANY)).is_err() {
        let _ = PM_CONNTRACK.remove(reply_key);
        return Err(stat::DROP_CT_FULL);
    }
    Ok(Nat {
        addr: mapping.backend_addr_be,
        port: mapping.backend_port_be,
        stats_slot: mapping.stats_slot,
    })
}
