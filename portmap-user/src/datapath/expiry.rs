//! Flow expiry: the daemon walks both flow tables every `gc_interval_seconds` (`PM_CONNTRACK`,
//! the store of assured flows, and `PM_CT_NEW`, the LRU of new flows and of the assured flows'
//! cached copies), merges the copies of each assured entry (`merge_tables`), pairs the two
//! entries of each flow (`FlowKey::reply`, the same function the datapath inserts with) and
//! deletes both, with their copies, once the flow is idle past its timeout.

use std::collections::{HashMap as StdHashMap, HashSet};

use anyhow::Context as _;
use portmap_common::{
    DIR_FORWARD, DIR_REPLY, FLOW_F_ASSURED, FLOW_F_CLOSING, FlowKey, FlowValue, PROTO_UDP, map_names,
    words_addr,
};

use super::{Datapath, sys};
use crate::{config::Timeouts, model::table::FlowFlush};

impl Datapath {
    /// The flow tables: (map, capacity, holds assured flows).
    pub(super) fn flow_tables(&self) -> [(&'static str, usize, bool); 2] {
        [
            (map_names::CONNTRACK, self.conntrack_entries as usize, true),
            (map_names::CT_NEW, self.conntrack_new_entries as usize, false),
        ]
    }

    /// Every entry of one flow table (at most its capacity), read bucket by bucket with
    /// `BPF_MAP_LOOKUP_BATCH`: a walk of N entries is N / 4096 system calls, not 2 N (at 10,000
    /// flows of a benchmark, 40,000 calls every `gc_interval_seconds`).
    pub(super) fn table_entries(
        &self,
        name: &str,
        capacity: usize,
    ) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        sys::lookup_hash(self.hash_map_fd(name)?, capacity).with_context(|| format!("reading {name}"))
    }

    /// Deletes `keys` from one table with `BPF_MAP_DELETE_BATCH`; a key already gone (LRU
    /// eviction, the datapath's removal of a reused 5-tuple) is fine.
    fn delete_entries(&mut self, name: &str, keys: &[FlowKey]) -> anyhow::Result<()> {
        sys::delete_batch(self.hash_map_fd(name)?, keys).with_context(|| format!("deleting from {name}"))?;
        Ok(())
    }

    /// The entries of assured flows and of new flows (`merge_tables`). The store is read
    /// first: a flow assured in between is seen in the cache with its mark.
    fn merged_flows(&self) -> anyhow::Result<MergedFlows> {
        let [(store, store_capacity, _), (cache, cache_capacity, _)] = self.flow_tables();
        let stored = self.table_entries(store, store_capacity)?;
        let cached = self.table_entries(cache, cache_capacity)?;
        Ok(merge_tables(stored, cached))
    }

    /// Deletes `keys` from the tables that may hold them: an assured flow's from the store
    /// first, then from the cache (the datapath caches a stored entry again, never the reverse).
    fn delete_flows(&mut self, keys: &[FlowKey], assured: bool) -> anyhow::Result<()> {
        for (name, _, store) in self.flow_tables() {
            if assured || !store {
                self.delete_entries(name, keys)?;
            }
        }
        Ok(())
    }

    /// Deletes expired flows (both entries, in both tables); returns what remains.
    pub fn expire_flows(&mut self, now_ns: u64, timeouts: &Timeouts) -> anyhow::Result<ExpiryPlan> {
        let flows = self.merged_flows()?;
        let mut total = ExpiryPlan::default();
        for (entries, assured) in [(&flows.assured, true), (&flows.new, false)] {
            let plan = plan_expiry(entries, now_ns, timeouts, assured);
            self.delete_flows(&plan.delete, assured)?;
            total.live_flows += plan.live_flows;
            total.new_flows += plan.new_flows;
            total.slots_in_use.extend(plan.slots_in_use);
            total.delete.extend(plan.delete);
        }
        Ok(total)
    }

    /// Deletes the flows `flushes` select (`plan_flush`: UDP flows of removed mappings and
    /// backends, flows from clients outside a narrowed allow-list) in both tables; returns how
    /// many flows.
    pub fn flush_flows(&mut self, flushes: &[FlowFlush]) -> anyhow::Result<usize> {
        if flushes.is_empty() {
            return Ok(0);
        }
        let flows = self.merged_flows()?;
        let mut count = 0;
        for (entries, assured) in [(&flows.assured, true), (&flows.new, false)] {
            let delete = plan_flush(entries, flushes);
            self.delete_flows(&delete, assured)?;
            count += delete.len() / 2;
        }
        Ok(count)
    }
}

/// The flow entries of both tables, one per key, by kind.
#[derive(Debug, Default, PartialEq)]
pub struct MergedFlows {
    /// Entries of assured flows: the store's, each with its cached copy's fresher time and marks
    /// folded in, and cached entries marked `FLOW_F_ASSURED` whose store copy is gone.
    pub assured: Vec<(FlowKey, FlowValue)>,
    /// Entries of flows not assured yet (in the cache only).
    pub new: Vec<(FlowKey, FlowValue)>,
}

/// Merges the store's (`PM_CONNTRACK`) and the cache's (`PM_CT_NEW`) entries: an assured
/// flow's entry is in both while the LRU keeps its copy, and the copy is the fresher one (the
/// datapath refreshes the store from it at most once per `LAST_SEEN_GRANULARITY_NS`).
#[must_use]
pub fn merge_tables(stored: Vec<(FlowKey, FlowValue)>, cached: Vec<(FlowKey, FlowValue)>) -> MergedFlows {
    let mut assured: StdHashMap<FlowKey, FlowValue> = stored.into_iter().collect();
    let mut new = Vec::new();
    for (key, copy) in cached {
        if let Some(value) = assured.get_mut(&key) {
            value.last_seen_ns = value.last_seen_ns.max(copy.last_seen_ns);
            value.flags |= copy.flags;
        } else if copy.flags & FLOW_F_ASSURED != 0 {
            assured.insert(key, copy);
        } else {
            new.push((key, copy));
        }
    }
    MergedFlows {
        assured: assured.into_iter().collect(),
        new,
    }
}

/// What an expiry pass deletes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExpiryPlan {
    pub delete: Vec<FlowKey>,
    /// Assured flows that stay.
    pub live_flows: u64,
    /// Flows not assured yet that stay.
    pub new_flows: u64,
    /// The stats slots the entries that stay still count into: a freed slot is not handed to
    /// another mapping while any is left (`Table::release_drained`).
    pub slots_in_use: HashSet<u32>,
}

/// The conntrack entries (both of each flow) that `flushes` select: after a mapping is removed
/// or remapped, or loses a backend, its UDP flows go (Docker flushes UDP conntrack then), so
/// the next datagram of a stream takes the new path, and TCP flows are left to end; after its
/// allow-list narrowed, its flows of every protocol from clients outside the list go (their
/// next packet is a new flow, which the list refuses).
#[must_use]
pub fn plan_flush(entries: &[(FlowKey, FlowValue)], flushes: &[FlowFlush]) -> Vec<FlowKey> {
    // A list change flushes every mapping on the list at once: by slot, not one scan per flush.
    let mut by_slot: StdHashMap<u32, Vec<&FlowFlush>> = StdHashMap::new();
    for flush in flushes {
        by_slot.entry(flush.stats_slot).or_default().push(flush);
    }
    let mut delete = Vec::new();
    for (key, value) in entries.iter().filter(|(_, v)| v.direction == DIR_FORWARD) {
        let Some(slot_flushes) = by_slot.get(&value.stats_slot) else {
            continue;
        };
        let backend = words_addr(key.family, value.nat_addr);
        let client = words_addr(key.family, key.src);
        let port = u16::from_be(value.nat_port_be);
        let selected = slot_flushes.iter().any(|f| match &f.outside {
            Some(list) => !crate::model::allow::admits(list, client),
            None => {
                key.proto == PROTO_UDP
                    && f.backend
                        .is_none_or(|(ip, ports)| ip == backend && ports.contains(port))
            }
        });
        if selected {
            delete.push(*key);
            delete.push(key.reply(value.nat_addr, value.nat_port_be));
        }
    }
    delete
}

/// Pure expiry decision for the entries of one table (`assured`: `PM_CONNTRACK`). A flow's age
/// is that of its most recent entry; its limit is the UDP timeout, the TCP idle timeout (the
/// handshake timeout `tcp_syn_seconds` for a TCP flow not assured), or the close grace once
/// either direction saw FIN/RST. A lone entry (its partner was evicted, or is being moved or
/// created this instant) goes after the close grace.
#[must_use]
pub fn plan_expiry(entries: &[(FlowKey, FlowValue)], now_ns: u64, t: &Timeouts, assured: bool) -> ExpiryPlan {
    const NS: u64 = 1_000_000_000;
    let by_key: StdHashMap<FlowKey, FlowValue> = entries.iter().copied().collect();
    let mut plan = ExpiryPlan::default();
    let mut paired_replies = std::collections::HashSet::new();
    let idle = |v: &FlowValue| now_ns.saturating_sub(v.last_seen_ns);
    let close_grace = t.tcp_close_seconds.saturating_mul(NS);
    for (key, value) in entries.iter().filter(|(_, v)| v.direction == DIR_FORWARD) {
        let rkey = key.reply(value.nat_addr, value.nat_port_be);
        let reply = by_key.get(&rkey).filter(|r| r.direction == DIR_REPLY);
        let Some(reply) = reply else {
            if idle(value) > close_grace {
                plan.delete.push(*key);
            }
            continue;
        };
        paired_replies.insert(rkey);
        let age = idle(value).min(idle(reply));
        let limit = if key.proto == PROTO_UDP {
            t.udp_seconds.saturating_mul(NS)
        } else if (value.flags | reply.flags) & FLOW_F_CLOSING != 0 {
            close_grace
        } else if assured {
            t.tcp_seconds.saturating_mul(NS)
        } else {
            t.tcp_syn_seconds.saturating_mul(NS)
        };
        if age > limit {
            plan.delete.push(*key);
            plan.delete.push(rkey);
        } else {
            if assured {
                plan.live_flows += 1;
            } else {
                plan.new_flows += 1;
            }
            plan.slots_in_use.insert(value.stats_slot);
        }
    }
    for (key, value) in entries
        .iter()
        .filter(|(k, v)| v.direction == DIR_REPLY && !paired_replies.contains(k))
    {
        if idle(value) > close_grace {
            plan.delete.push(*key);
        } else {
            plan.slots_in_use.insert(value.stats_slot);
        }
    }
    plan
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(ts.tv_sec())? * 1_000_000_000 + u64::try_from(ts.tv_nsec())?)
}

#[cfg(test)]
mod tests {
    use portmap_common::PROTO_TCP;

    use super::*;
    use crate::model::mapping::PortRange;

    const S: u64 = 1_000_000_000;

    fn flow(
        proto: u8,
        client_port: u16,
        fwd_seen: u64,
        reply_seen: u64,
        flags: u8,
    ) -> [(FlowKey, FlowValue); 2] {
        let fkey = FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            src_port_be: client_port,
            dst_port_be: 8080,
            proto,
            family: portmap_common::FAMILY_V4,
            _pad: [0; 2],
        };
        let fval = FlowValue {
            last_seen_ns: fwd_seen,
            nat_addr: [3, 0, 0, 0],
            nat_port_be: 80,
            direction: DIR_FORWARD,
            flags,
            stats_slot: 0,
            route: portmap_common::FlowRoute::default(),
        };
        let rkey = fkey.reply(fval.nat_addr, fval.nat_port_be);
        let rval = FlowValue {
            last_seen_ns: reply_seen,
            nat_addr: [2, 0, 0, 0],
            nat_port_be: 8080,
            direction: DIR_REPLY,
            flags: 0,
            ..fval
        };
        [(fkey, fval), (rkey, rval)]
    }

    #[test]
    fn expiry_uses_the_fresher_direction_and_protocol_timeouts() {
        let t = Timeouts {
            tcp_seconds: 100,
            tcp_close_seconds: 10,
            tcp_syn_seconds: 20,
            udp_seconds: 30,
            gc_interval_seconds: 1,
        };
        let now = 1000 * S;
        let mut entries = Vec::new();
        let live_tcp = flow(PROTO_TCP, 1, now - 500 * S, now - 50 * S, 0); // reply fresh: live
        let idle_tcp = flow(PROTO_TCP, 2, now - 101 * S, now - 150 * S, 0); // both idle > 100 s
        let closing = flow(PROTO_TCP, 3, now - 11 * S, now - 11 * S, FLOW_F_CLOSING); // past grace
        let closing_young = flow(PROTO_TCP, 4, now - 5 * S, now - 5 * S, FLOW_F_CLOSING);
        let udp_idle = flow(PROTO_UDP, 5, now - 31 * S, now - 40 * S, 0);
        let udp_live = flow(PROTO_UDP, 6, now - 29 * S, now - 40 * S, 0);
        for f in [live_tcp, idle_tcp, closing, closing_young, udp_idle, udp_live] {
            entries.extend(f);
        }
        let orphan_reply = flow(PROTO_TCP, 7, 0, now - 11 * S, 0)[1];
        let young_orphan = flow(PROTO_TCP, 8, 0, now - S, 0)[1];
        entries.push(orphan_reply);
        entries.push(young_orphan);

        let plan = plan_expiry(&entries, now, &t, true);
        assert_eq!(
            plan.slots_in_use,
            HashSet::from([0]),
            "every remaining entry counts into slot 0"
        );
        let mut want = vec![
            idle_tcp[0].0,
            idle_tcp[1].0,
            closing[0].0,
            closing[1].0,
            udp_idle[0].0,
            udp_idle[1].0,
            orphan_reply.0,
        ];
        let mut got = plan.delete.clone();
        let order = |k: &FlowKey| (k.src, k.src_port_be, k.dst_port_be, k.proto);
        want.sort_by_key(order);
        got.sort_by_key(order);
        assert_eq!(got, want);
        assert_eq!(plan.live_flows, 3);
    }

    #[test]
    fn udp_flush_takes_both_entries_of_the_selected_flows_only() {
        let slot = |mut f: [(FlowKey, FlowValue); 2], s: u32| {
            f[0].1.stats_slot = s;
            f[1].1.stats_slot = s;
            f
        };
        let a = slot(flow(PROTO_UDP, 1, 0, 0, 0), 1);
        let b = slot(flow(PROTO_UDP, 2, 0, 0, 0), 2);
        let tcp = slot(flow(PROTO_TCP, 3, 0, 0, 0), 1);
        let entries: Vec<_> = [a, b, tcp].into_iter().flatten().collect();
        let whole = FlowFlush {
            stats_slot: 1,
            backend: None,
            outside: None,
        };
        assert_eq!(plan_flush(&entries, &[whole]), vec![a[0].0, a[1].0]);
        // Flows to another backend of the mapping stay.
        let other_backend = FlowFlush {
            stats_slot: 2,
            backend: Some(("0.0.0.4".parse().unwrap(), PortRange::single(u16::from_be(80)))),
            outside: None,
        };
        assert!(plan_flush(&entries, &[other_backend]).is_empty());
        let its_backend = FlowFlush {
            stats_slot: 2,
            backend: Some((
                words_addr(portmap_common::FAMILY_V4, [3, 0, 0, 0]),
                PortRange::single(u16::from_be(80)),
            )),
            outside: None,
        };
        assert_eq!(plan_flush(&entries, &[its_backend]), vec![b[0].0, b[1].0]);
    }

    #[test]
    fn a_narrowed_allow_list_takes_the_flows_of_every_protocol_from_outside_it() {
        let from = |mut f: [(FlowKey, FlowValue); 2], client: [u8; 4]| {
            let client = u32::from_ne_bytes(client);
            f[0].0.src = [client, 0, 0, 0];
            f[1] = (f[0].0.reply(f[0].1.nat_addr, f[0].1.nat_port_be), f[1].1);
            f
        };
        let inside = from(flow(PROTO_TCP, 1, 0, 0, 0), [198, 18, 1, 5]);
        let outside_tcp = from(flow(PROTO_TCP, 2, 0, 0, 0), [198, 18, 9, 5]);
        let outside_udp = from(flow(PROTO_UDP, 3, 0, 0, 0), [198, 18, 9, 6]);
        let entries: Vec<_> = [inside, outside_tcp, outside_udp].into_iter().flatten().collect();
        let narrowed = FlowFlush {
            stats_slot: 0,
            backend: None,
            outside: Some(vec!["198.18.1.0/24".parse().unwrap()].into()),
        };
        let got = plan_flush(&entries, std::slice::from_ref(&narrowed));
        assert_eq!(
            got,
            vec![
                outside_tcp[0].0,
                outside_tcp[1].0,
                outside_udp[0].0,
                outside_udp[1].0
            ]
        );
        // Another mapping's flows stay.
        let other = FlowFlush {
            stats_slot: 7,
            ..narrowed
        };
        assert!(plan_flush(&entries, &[other]).is_empty());
    }

    #[test]
    fn an_assured_entry_and_its_cached_copy_merge_into_one_with_the_fresher_time() {
        let marked = |mut f: [(FlowKey, FlowValue); 2], flags: u8| {
            f[0].1.flags |= flags;
            f[1].1.flags |= flags;
            f
        };
        let stored = marked(flow(PROTO_TCP, 1, 10 * S, 20 * S, 0), FLOW_F_ASSURED);
        // The cache's copy: the forward entry refreshed since, the reply entry closing.
        let mut cached = stored;
        cached[0].1.last_seen_ns = 30 * S;
        cached[1].1.flags |= FLOW_F_CLOSING;
        cached[1].1.last_seen_ns = 15 * S;
        // An assured flow whose store copy is gone (deleted between the two reads) and a new one.
        let orphan = marked(flow(PROTO_TCP, 2, 5 * S, 5 * S, 0), FLOW_F_ASSURED);
        let new = flow(PROTO_UDP, 3, 7 * S, 7 * S, 0);
        let merged = merge_tables(
            stored.to_vec(),
            [cached, orphan, new].into_iter().flatten().collect(),
        );
        let mut assured = merged.assured.clone();
        assured.sort_by_key(|(k, _)| (k.src_port_be, k.dst_port_be));
        let mut want = vec![
            (
                stored[0].0,
                FlowValue {
                    last_seen_ns: 30 * S,
                    ..stored[0].1
                },
            ),
            (
                stored[1].0,
                FlowValue {
                    flags: FLOW_F_ASSURED | FLOW_F_CLOSING,
                    ..stored[1].1
                },
            ),
            orphan[0],
            orphan[1],
        ];
        want.sort_by_key(|(k, _)| (k.src_port_be, k.dst_port_be));
        assert_eq!(assured, want);
        assert_eq!(merged.new, new.to_vec());
    }

    #[test]
    fn unassured_tcp_flows_expire_after_the_handshake_timeout() {
        let t = Timeouts {
            tcp_syn_seconds: 60,
            ..Timeouts::default()
        };
        let now = 10_000 * S;
        let young = flow(PROTO_TCP, 1, now - 59 * S, now - 59 * S, 0);
        let old = flow(PROTO_TCP, 2, now - 61 * S, now - 61 * S, 0);
        let entries: Vec<_> = [young, old].into_iter().flatten().collect();
        let new = plan_expiry(&entries, now, &t, false);
        assert_eq!(new.delete, vec![old[0].0, old[1].0]);
        assert_eq!((new.live_flows, new.new_flows), (0, 1));
        // The same flows assured live for tcp_seconds.
        let assured = plan_expiry(&entries, now, &t, true);
        assert!(assured.delete.is_empty());
        assert_eq!((assured.live_flows, assured.new_flows), (2, 0));
    }
}
