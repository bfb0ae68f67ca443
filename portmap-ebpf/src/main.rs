//! portmap datapath: the entry points. Each is a pipeline of small named steps shared by the
//! XDP and TC hooks through `ctx::PacketCtx`: parse → conntrack lookup → (mapping lookup →
//! allow-list → backend choice → flow creation) → rewrite → forward, and count the outcome. Replies are
//! reverse-NATed where they leave (TC egress of the client-facing interface) or, from a local
//! backend, where they enter the host (TC ingress of its veth).
//!
//! Modules: `maps` (every map), `ctx` (the XDP/TC seam, bounds-checked loads), `parse`, `frag`
//! (ports of later fragments), `icmp` (errors about flows), `conntrack`, `lb` (mapping lookup,
//! Maglev), `nat` (rewrite and checksums), `forward` (FIB lookup and redirect), `stats`
//! (counters), `sock` (cgroup socket hooks for host-local clients), `bench` (reference programs
//! and the ingress path cut after each step, for `cargo xtask bench` only).
#![no_std]
#![no_main]

mod bench;
mod conntrack;
mod ctx;
mod forward;
mod frag;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use portmap_common::{
    DIR_FORWARD, DIR_REPLY, ICMP_SLOT_EGRESS, ICMP_SLOT_INGRESS, MARK_REPLY_SENT, PROTO_ICMP, PROTO_ICMPV6,
    Stat,
};

use crate::{
    conntrack::Nat,
    ctx::{Action, PacketCtx, Verdict},
    nat::Side,
    parse::FRAG_LATER,
    stats::{count, count_denied, count_mapping},
};

/// The first steps of both directions: parse, the ports of a later fragment, and ICMP handed to
/// the hook's ICMP-error program in `icmp_slot` (if that returns, the slot is empty and the
/// packet is not ours).
#[inline(always)]
pub(crate) fn parse_flow<C: PacketCtx>(ctx: &C, icmp_slot: u32) -> Result<parse::Packet, Verdict> {
    let mut pkt = parse::parse(ctx)?;
    frag::complete(&mut pkt)?;
    if pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6 {
        ctx.tail_call_icmp(icmp_slot);
        return Err(Verdict::pass(Stat::PassNotOurs));
    }
    Ok(pkt)
}

/// Client → published address: find or create the flow, rewrite the destination, forward.
#[inline(always)]
fn ingress<C: PacketCtx>(ctx: &mut C) -> Verdict {
    let pkt = match parse_flow(ctx, ICMP_SLOT_INGRESS) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    let key = conntrack::flow_key(&pkt);
    let now = conntrack::now_ns();
    let (nat, new_flow): (Nat, bool) = match conntrack::lookup(&key, DIR_FORWARD, pkt.tcp_flags, now) {
        Some(nat) => {
            conntrack::assure(&key, &nat, pkt.tcp_flags);
            (nat, false)
        }
        // Only a datagram's first fragment (or a whole one) starts a flow.
        None if pkt.frag == FRAG_LATER => return Verdict::pass(Stat::PassFragment),
        None => {
            let Some(mapping) = lb::find_mapping(&pkt) else {
                return Verdict::pass(Stat::PassNoMapping);
            };
            if !lb::allowed(mapping, &pkt.saddr, pkt.family) {
                count_denied(mapping.stats_slot);
                return Verdict::drop(Stat::DropDenied);
            }
            let created = lb::choose_backend(mapping, &pkt.daddr, pkt.family, lb::packet_hash(&pkt))
                .and_then(|backend| conntrack::create(&pkt, &key, backend, mapping.stats_slot, now));
            match created {
                Ok(nat) => (nat, true),
                Err(reason) => return Verdict::drop(reason),
            }
        }
    };
    if new_flow {
        count(Stat::FlowNew);
    }
    frag::remember(&pkt);
    if nat::rewrite(ctx, &pkt, Side::Destination, nat.addr, nat.port).is_err() {
        return Verdict::drop(Stat::DropError);
    }
    count_mapping(nat.stats_slot, DIR_FORWARD, pkt.tot_len, new_flow);
    forward::forward_flow(ctx, &pkt, &nat, now)
}

/// Backend → client, leaving through the client-facing interface: restore the published source.
#[inline(always)]
fn egress<C: PacketCtx>(ctx: &mut C) -> Verdict {
    let pkt = match parse_flow(ctx, ICMP_SLOT_EGRESS) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    let key = conntrack::flow_key(&pkt);
    let Some(nat) = conntrack::lookup(&key, DIR_REPLY, pkt.tcp_flags, conntrack::now_ns()) else {
        return Verdict::pass(if pkt.frag == FRAG_LATER {
            Stat::PassFragment
        } else {
            Stat::PassNoMapping
        });
    };
    frag::remember(&pkt);
    if nat::rewrite(ctx, &pkt, Side::Source, nat.addr, nat.port).is_err() {
        return Verdict::drop(Stat::DropError);
    }
    count_mapping(nat.stats_slot, DIR_REPLY, pkt.tot_len, false);
    Verdict::pass(Stat::ReplyNat)
}

/// Backend → client at the backend's own interface (TC ingress of a local backend's veth, its
/// host side), before the host's netfilter: a reply of a flow is reverse-NATed and sent to the
/// client from here (`forward::reply_to_client`), marked `MARK_REPLY_SENT` for the client-facing
/// egress it reaches next; anything else goes on to the kernel untouched
/// (the container's own traffic, ICMP: errors are translated at the client-facing interface).
#[inline(always)]
fn from_backend(ctx: &mut TcContext) -> Verdict {
    let mut pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    if let Err(verdict) = frag::complete(&mut pkt) {
        return verdict;
    }
    if pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6 {
        return Verdict::pass(Stat::PassNotOurs);
    }
    let Some(reply) = conntrack::find_reply(&conntrack::flow_key(&pkt)) else {
        return Verdict::pass(Stat::PassNoMapping);
    };
    let now = conntrack::now_ns();
    // Left to the kernel: refreshed (and counted) by the client-facing egress, if it gets there.
    let Some(verdict) = forward::reply_to_client(ctx, &pkt, &reply.nat, now) else {
        return Verdict::pass(Stat::PassReply);
    };
    if matches!(verdict.action, Action::Redirected(_)) {
        reply.seen(&pkt, now);
        frag::remember(&pkt);
        count_mapping(reply.nat.stats_slot, DIR_REPLY, pkt.tot_len, false);
        ctx.set_mark(skb_mark(ctx) | MARK_REPLY_SENT);
    }
    verdict
}

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: the __sk_buff the kernel passed in is valid for the program's run.
    unsafe { (*ctx.skb.skb).mark }
}

/// Records the outcome and turns it into the hook's return code. The packet path does not log:
/// aya-log's call would be a BPF-to-BPF call, which the kernel refuses beside the tail calls to
/// the ICMP programs with frames of this size; helper failures show as `drop_error`.
#[inline(always)]
fn finish<C: PacketCtx>(ctx: &C, verdict: Verdict) -> u32 {
    count(verdict.stat);
    ctx.verdict(verdict.action)
}

/// TC programs need the headers in the linear part of the skb; pull them there if needed: up to
/// 256 bytes, enough for Ethernet + 802.1Q + the largest IPv4 and TCP headers (138) or IPv6 with
/// extension headers of up to 118 bytes before a 60-byte TCP header. Headers beyond the linear
/// part are `pass_malformed_l4`.
#[inline(always)]
pub(crate) fn pull_headers(ctx: &TcContext) {
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
    if sent_from_backend_veth(&ctx) {
        return TC_ACT_OK;
    }
    pull_headers(&ctx);
    let verdict = egress(&mut ctx);
    finish(&ctx, verdict) as i32
}

#[classifier]
pub fn portmap_tc_from_backend(mut ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    let verdict = from_backend(&mut ctx);
    finish(&ctx, verdict) as i32
}

/// A reply the reply hook already translated and sent on (`MARK_REPLY_SENT`, counted there):
/// the mark is cleared and the packet leaves as it is.
#[inline(always)]
fn sent_from_backend_veth(ctx: &TcContext) -> bool {
    let mark = skb_mark(ctx);
    if mark & MARK_REPLY_SENT == 0 {
        return false;
    }
    ctx.set_mark(mark & !MARK_REPLY_SENT);
    true
}

/// ICMP errors (tail-called from the program of the same hook): parse again, translate.
#[inline(always)]
fn icmp_error<C: PacketCtx>(ctx: &mut C, towards_client: bool) -> Verdict {
    match parse::parse(ctx) {
        Ok(pkt) if towards_client => icmp::egress(ctx, &pkt),
        Ok(pkt) => icmp::ingress(ctx, &pkt),
        Err(verdict) => verdict,
    }
}

#[xdp]
pub fn portmap_xdp_icmp(mut ctx: XdpContext) -> u32 {
    let verdict = icmp_error(&mut ctx, false);
    finish(&ctx, verdict)
}

#[classifier]
pub fn portmap_tc_icmp_in(mut ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    let verdict = icmp_error(&mut ctx, false);
    finish(&ctx, verdict) as i32
}

#[classifier]
pub fn portmap_tc_icmp_out(mut ctx: TcContext) -> i32 {
    pull_headers(&ctx);
    let verdict = icmp_error(&mut ctx, true);
    finish(&ctx, verdict) as i32
}

#[cgroup_sock_addr(connect4)]
pub fn portmap_connect4(mut ctx: SockAddrContext) -> i32 {
    sock::translate(&mut ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn portmap_connect6(mut ctx: SockAddrContext) -> i32 {
    sock::translate(&mut ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn portmap_sendmsg4(mut ctx: SockAddrContext) -> i32 {
    sock::translate(&mut ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn portmap_sendmsg6(mut ctx: SockAddrContext) -> i32 {
    sock::translate(&mut ctx, true, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn portmap_recvmsg4(mut ctx: SockAddrContext) -> i32 {
    sock::reverse(&mut ctx, false);
    sock::PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn portmap_recvmsg6(mut ctx: SockAddrContext) -> i32 {
    sock::reverse(&mut ctx, true);
    sock::PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn portmap_getpeername4(mut ctx: SockAddrContext) -> i32 {
    sock::reverse(&mut ctx, false);
    sock::PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn portmap_getpeername6(mut ctx: SockAddrContext) -> i32 {
    sock::reverse(&mut ctx, true);
    sock::PROCEED
}

#[cgroup_sock_addr(bind4)]
pub fn portmap_bind4(ctx: SockAddrContext) -> i32 {
    sock::bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn portmap_bind6(ctx: SockAddrContext) -> i32 {
    sock::bind(&ctx, true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
