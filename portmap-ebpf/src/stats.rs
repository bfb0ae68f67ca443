//! Counters, not logs: every packet is counted once under its outcome (`PM_GLOBAL_STATS`), and
//! the packets and bytes of a mapping under its stats slot (`PM_MAPPING_STATS`).

use portmap_common::{DIR_FORWARD, Stat};

use crate::maps::{PM_GLOBAL_STATS, PM_MAPPING_DENIED, PM_MAPPING_STATS};

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(c) = PM_GLOBAL_STATS.get_ptr_mut(stat.code()) {
        // SAFETY: a per-CPU slot from a successful lookup; no other writer runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// One packet of `bytes` L3 bytes in direction `dir` through the mapping at `slot`, and the flow
/// it created if `new_flow`.
#[inline(always)]
pub fn count_mapping(slot: u32, dir: u8, bytes: u32, new_flow: bool) {
    if let Some(c) = PM_MAPPING_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot from a successful lookup; no other writer runs on this CPU.
        let c = unsafe { &mut *c };
        if dir == DIR_FORWARD {
            c.fwd_packets += 1;
            c.fwd_bytes += u64::from(bytes);
        } else {
            c.reply_packets += 1;
            c.reply_bytes += u64::from(bytes);
        }
        if new_flow {
            c.flows += 1;
        }
    }
}

/// A flow of a host-local client through the mapping at `slot` (its packets bypass the
/// datapath and are not counted).
#[inline(always)]
pub fn count_flow(slot: u32) {
    if let Some(c) = PM_MAPPING_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot from a successful lookup; no other writer runs on this CPU.
        unsafe { (*c).flows += 1 };
    }
}

/// A new flow (or a host-local connect) the allow-list of the mapping at `slot` refused.
#[inline(always)]
pub fn count_denied(slot: u32) {
    if let Some(c) = PM_MAPPING_DENIED.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot from a successful lookup; no other writer runs on this CPU.
        unsafe { *c += 1 };
    }
}
