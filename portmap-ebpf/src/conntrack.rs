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
    Addr, DIR_FORWARD, DIR_REPLY, FLOW_F_CLOSING, FlowKey, FlowValue, LAST_SEEN_GRANULARITY_NS, Stat,
};

use crate::{
    maps::PM_CONNTRACK,
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
    // SAFETY: a helper without arguments.
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
    // SAFETY: a pointer from a successful lookup stays valid for the program's run (RCU).
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
) -> Result<Nat, Stat> {
    let (backend_addr, backend_port) = backend;
    let reply_key = key.reply(backend_addr, backend_port);
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
        // SAFETY: a value from a successful lookup, copied before any other map operation.
        if let Some(old) = unsafe { PM_CONNTRACK.get(reply_key) }
            && (old.direction != DIR_REPLY || old.nat_addr != pkt.daddr || old.nat_port_be != pkt.dport)
        {
            return Err(Stat::DropNatClash);
        }
        if PM_CONNTRACK.insert(reply_key, reply, u64::from(BPF_ANY)).is_err() {
            return Err(Stat::DropCtFull);
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
        return Err(Stat::DropCtFull);
    }
    Ok(Nat {
        addr: backend_addr,
        port: backend_port,
        stats_slot,
    })
}
