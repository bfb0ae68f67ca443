//! portmap datapath: maps and thin entry points. The logic lives in the modules and is shared by
//! the XDP and TC hooks through `ctx::PacketCtx`.
#![no_std]
#![no_main]

mod conntrack;
mod ctx;
mod nat;
mod parse;

use aya_ebpf::{
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::error;
use portmap_common::{
    Backend, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKEND_GROUPS, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_MAPPINGS, DIR_FORWARD, DIR_REPLY, FlowKey, FlowValue, MAX_REDIRECT_DEVS, MaglevTable,
    MappingCounters, MappingKey, MappingValue, stat,
};

use crate::{
    conntrack::Nat,
    ctx::{Action, PacketCtx},
    nat::Side,
};

/// (proto, host address, host port) → backend. Written by the daemon only.
#[map]
static PM_MAPPINGS: HashMap<MappingKey, MappingValue> = HashMap::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

/// Backends of mappings with several backends, indexed by what `PM_MAGLEV` tables hold.
#[map]
static PM_BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// One Maglev table per mapping with several backends (`MappingValue::group`).
#[map]
static PM_MAGLEV: Array<MaglevTable> = Array::with_max_entries(DEFAULT_MAX_BACKEND_GROUPS, 0);

/// Flows: two entries each (forward and reply), see `conntrack`.
#[map]
static PM_CONNTRACK: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Per-mapping packet/byte counters, indexed by `MappingValue::stats_slot`.
#[map]
static PM_MAPPING_STATS: PerCpuArray<MappingCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

/// Global outcome counters, indexed by `portmap_common::stat` codes.
#[map]
static PM_GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Devices the XDP program may redirect into (keyed by ifindex).
#[map]
static PM_REDIRECT_DEVS: DevMapHash = DevMapHash::with_max_entries(MAX_REDIRECT_DEVS, 0);

/// A packet's outcome: the counter it is recorded under and what happens to it.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub stat: u32,
    pub action: Action,
}

impl Verdict {
    #[inline(always)]
    pub fn pass(stat: u32) -> Self {
        Self {
            stat,
            action: Action::Pass,
        }
    }

    #[inline(always)]
    pub fn drop(stat: u32) -> Self {
        Self {
            stat,
            action: Action::Drop,
        }
    }
}

#[inline(always)]
fn count(code: u32) {
    if let Some(c) = PM_GLOBAL_STATS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_mapping(slot: u32, dir: u8, bytes: u32, new_flow: bool) {
    if let Some(c) = PM_MAPPING_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            if dir == DIR_FORWARD {
                (*c).fwd_packets += 1;
                (*c).fwd_bytes += u64::from(bytes);
            } else {
                (*c).reply_packets += 1;
                (*c).reply_bytes += u64::from(bytes);
            }
            if new_flow {
                (*c).flows += 1;
            }
        }
    }
}

/// Client → published address: find or create the flow, rewrite the destination, forward.
#[inline(always)]
fn ingress<C: PacketCtx>(ctx: &mut C) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    let key = conntrack::flow_key(&pkt);
    let now = conntrack::now_ns();
    let (nat, new_flow): (Nat, bool) = match conntrack::lookup(&key, DIR_FORWARD, pkt.tcp_flags, now) {
        Some(nat) => (nat, false),
        None => {
            let Some(mapping) = conntrack::find_mapping(&pkt) else {
                return Verdict::pass(stat::PASS_NO_MAPPING);
            };
            let created = conntrack::choose_backend(&pkt, &mapping)
                .and_then(|backend| conntrack::create(&pkt, &key, backend, mapping.stats_slot, now));
            match created {
                Ok(nat) => (nat, true),
                Err(reason) => return Verdict::drop(reason),
            }
        }
    };
    if new_flow {
        count(stat::FLOW_NEW);
    }
    if nat::rewrite(ctx, &pkt, Side::Destination, nat.addr, nat.port).is_err() {
        return Verdict::drop(stat::DROP_ERROR);
    }
    count_mapping(nat.stats_slot, DIR_FORWARD, pkt.tot_len, new_flow);
    nat::forward(ctx, &pkt, &nat.addr, nat.port)
}

/// Backend → client, leaving through the client-facing interface: restore the published source.
#[inline(always)]
fn egress<C: PacketCtx>(ctx: &mut C) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    let key = conntrack::flow_key(&pkt);
    let Some(nat) = conntrack::lookup(&key, DIR_REPLY, pkt.tcp_flags, conntrack::now_ns()) else {
        return Verdict::pass(stat::PASS_NO_MAPPING);
    };
    if nat::rewrite(ctx, &pkt, Side::Source, nat.addr, nat.port).is_err() {
        return Verdict::drop(stat::DROP_ERROR);
    }
    count_mapping(nat.stats_slot, DIR_REPLY, pkt.tot_len, false);
    Verdict::pass(stat::REPLY_NAT)
}

/// Records the outcome and turns it into the hook's return code. Helper failures (which point at
/// a bug, never at traffic) are also logged; nothing else on the packet path logs.
#[inline(always)]
fn finish<C: PacketCtx>(ctx: &C, verdict: Verdict) -> u32 {
    count(verdict.stat);
    if verdict.stat == stat::DROP_ERROR {
        error!(ctx, "portmap: packet store or checksum helper failed");
    }
    ctx.verdict(verdict.action)
}

/// TC programs need the headers in the linear part of the skb; pull them there if needed: up to
/// 256 bytes, enough for Ethernet + 802.1Q + the largest IPv4 and TCP headers (138) or IPv6 with
/// extension headers of up to 118 bytes before a 60-byte TCP header. Headers beyond the linear
/// part are `pass_malformed_l4`.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    const WANT: u32 = 256;
    let want = if ctx.len() < WANT { ctx.len() } else { WANT };
    if ctx.data_end() - ctx.data() < want as usize {
        let _ = ctx.pull_data(want);
    }
}

#[xdp]
pub fn portmap_xdp_ingress(mut ctx: XdpContext) -> u32 {
    let verdict = ingress(&mut ctx);
    finish(&ctx, verdict)
}

#[classifier]
pub fn portmap_tc_ingress(mut ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    let verdict = ingress(&mut ctx);
    finish(&ctx, verdict) as i32
}

#[classifier]
pub fn portmap_tc_egress(mut ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    let verdict = egress(&mut ctx);
    finish(&ctx, verdict) as i32
}

/// Benchmark reference, never attached by the daemon: the cheapest XDP program (`cargo xtask
/// bench` runs it beside the datapath to show the fixed cost of a program run).
#[xdp]
pub fn bench_xdp_noop(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Benchmark reference, never attached by the daemon: the same parse and forwarding (FIB lookup,
/// TTL, MACs, redirect) as the datapath, without conntrack or any rewrite: the floor of an XDP
/// forwarder on the same path.
#[xdp]
pub fn bench_xdp_forward(mut ctx: XdpContext) -> u32 {
    let verdict = match parse::parse(&ctx) {
        Ok(pkt) => nat::forward(&mut ctx, &pkt, &pkt.daddr, pkt.dport),
        Err(verdict) => verdict,
    };
    ctx.verdict(verdict.action)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
