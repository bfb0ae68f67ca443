//! Benchmark programs (`cargo xtask bench`), never attached by the daemon: references (a no-op
//! XDP program, a forwarder without conntrack or rewrite, a TC program that only redirects into a
//! veth's peer) and the established-flow path of the ingress programs cut after each of its
//! steps (parse → conntrack lookup → rewrite → counters; the full program adds the forwarding),
//! so that the differences between consecutive cuts are the cost of each step. Every cut calls
//! the very functions the datapath does and ends with a verdict that depends on them.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::bpf_redirect_peer,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use portmap_common::{DIR_FORWARD, ICMP_SLOT_INGRESS};

use crate::{
    conntrack,
    ctx::PacketCtx,
    forward,
    nat::{self, Side},
    parse, parse_flow,
    stats::{count, count_mapping},
};

/// The ifindex `bench_tc_redirect_peer` redirects to (the host side of the sink's veth), set at
/// load time (`BENCH_REDIRECT_IFINDEX_GLOBAL`).
#[unsafe(no_mangle)]
static BENCH_REDIRECT_IFINDEX: u32 = 0;

/// The cheapest XDP program: the fixed cost of a program run.
#[xdp]
pub fn bench_xdp_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The same parse and forwarding (FIB lookup, TTL, MACs, redirect) as the datapath, without
/// conntrack or any rewrite: the floor of an XDP forwarder on the same path.
#[xdp]
pub fn bench_xdp_forward(mut ctx: XdpContext) -> u32 {
    let verdict = match parse::parse(&ctx) {
        Ok(pkt) => forward::forward(&mut ctx, &pkt, &pkt.daddr, pkt.dport),
        Err(verdict) => verdict,
    };
    ctx.verdict(verdict.action)
}

/// The floor of the TC local fast path: every packet `bpf_redirect_peer`ed into the veth
/// `BENCH_REDIRECT_IFINDEX`, nothing else.
#[classifier]
pub fn bench_tc_redirect_peer(_ctx: TcContext) -> i32 {
    // SAFETY: a plain read of a global; volatile, so that the 0 it is declared with is not folded in.
    let ifindex = unsafe { core::ptr::read_volatile(&raw const BENCH_REDIRECT_IFINDEX) };
    // SAFETY: a helper without pointer arguments.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// How far a cut goes along the established-flow path.
const PARSE: u8 = 1;
const LOOKUP: u8 = 2;
const REWRITE: u8 = 3;
const COUNT: u8 = 4;

/// The ingress path of an established flow up to `STEP`: true if every step ran (the packet
/// parsed, its flow found, rewritten, counted).
#[inline(always)]
fn established_until<const STEP: u8, C: PacketCtx>(ctx: &mut C) -> bool {
    let Ok(pkt) = parse_flow(ctx, ICMP_SLOT_INGRESS) else {
        return false;
    };
    if STEP == PARSE {
        return true;
    }
    let key = conntrack::flow_key(&pkt);
    let Some(nat) = conntrack::lookup(&key, DIR_FORWARD, pkt.tcp_flags, conntrack::now_ns()) else {
        return false;
    };
    conntrack::assure(&key, &nat, pkt.tcp_flags);
    if STEP == LOOKUP {
        return true;
    }
    if nat::rewrite(ctx, &pkt, Side::Destination, nat.addr, nat.port).is_err() {
        return false;
    }
    if STEP == REWRITE {
        return true;
    }
    count_mapping(nat.stats_slot, DIR_FORWARD, pkt.tot_len, false);
    count(portmap_common::Stat::FwdLocal);
    true
}

#[inline(always)]
fn xdp_verdict(ran: bool) -> u32 {
    if ran {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[inline(always)]
fn tc_verdict(ran: bool) -> i32 {
    if ran { TC_ACT_OK } else { TC_ACT_SHOT }
}

#[xdp]
pub fn bench_xdp_parse(mut ctx: XdpContext) -> u32 {
    xdp_verdict(established_until::<PARSE, _>(&mut ctx))
}

#[xdp]
pub fn bench_xdp_lookup(mut ctx: XdpContext) -> u32 {
    xdp_verdict(established_until::<LOOKUP, _>(&mut ctx))
}

#[xdp]
pub fn bench_xdp_rewrite(mut ctx: XdpContext) -> u32 {
    xdp_verdict(established_until::<REWRITE, _>(&mut ctx))
}

#[xdp]
pub fn bench_xdp_count(mut ctx: XdpContext) -> u32 {
    xdp_verdict(established_until::<COUNT, _>(&mut ctx))
}

#[classifier]
pub fn bench_tc_parse(mut ctx: TcContext) -> i32 {
    crate::pull_headers(&ctx);
    tc_verdict(established_until::<PARSE, _>(&mut ctx))
}

#[classifier]
pub fn bench_tc_lookup(mut ctx: TcContext) -> i32 {
    crate::pull_headers(&ctx);
    tc_verdict(established_until::<LOOKUP, _>(&mut ctx))
}

#[classifier]
pub fn bench_tc_rewrite(mut ctx: TcContext) -> i32 {
    crate::pull_headers(&ctx);
    tc_verdict(established_until::<REWRITE, _>(&mut ctx))
}

#[classifier]
pub fn bench_tc_count(mut ctx: TcContext) -> i32 {
    crate::pull_headers(&ctx);
    tc_verdict(established_until::<COUNT, _>(&mut ctx))
}
