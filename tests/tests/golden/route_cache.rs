//! The route cache of a flow (`FlowRoute`): an established flow's packets leave by the device
//! and MACs its entry holds, without a FIB or `PM_LOCAL_BACKENDS` lookup, until the route
//! generation moves (the daemon's netlink events, `Datapath::invalidate_routes`), and a packet
//! larger than any the lookup accepted takes the lookup again.

use std::{net::IpAddr, process::Command};

use anyhow::{Context as _, ensure};
use portmap::datapath::Hook;
use portmap_common::{DIR_FORWARD, DIR_REPLY, FlowRoute, ROUTE_EPOCH_SHIFT, ROUTE_FIB, ROUTE_LOCAL, Stat};

use crate::{
    BACKEND, BACKEND6, CLIENT, CLIENT6, Golden, HOST, HOST6, diff, expect, outcome,
    packets::{self, ACK, Frame, SYN},
    with_golden,
};

/// A MAC the backend's neighbour entry moves to.
const MOVED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x99];

/// `ip` in the calling thread's namespace (the golden one: the test runs on its thread).
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip").args(args).status().context("running ip")?;
    ensure!(status.success(), "ip {} failed", args.join(" "));
    Ok(())
}

/// The cached route of the flow entry of direction `dir` whose key's source port is `port`, in
/// `PM_CT_NEW` (the entry packets find first; an assured flow's copy in `PM_CONNTRACK` keeps
/// the route it was copied with).
fn route_of(g: &Golden, port: u16, dir: u8) -> anyhow::Result<FlowRoute> {
    g.dp.flows()?
        .into_iter()
        .find(|(k, v, stored)| {
            !stored
                && v.direction == dir
                && (u16::from_be(k.src_port_be) == port || u16::from_be(k.dst_port_be) == port)
        })
        .map(|(_, v, _)| v.route)
        .with_context(|| format!("no flow entry of client port {port}"))
}

/// CLOCK_MONOTONIC_COARSE, which the programs' clock reads (`bpf_ktime_get_coarse_ns`).
fn coarse_ns() -> anyhow::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)?;
    Ok(u64::try_from(now.tv_sec())? * 1_000_000_000 + u64::try_from(now.tv_nsec())?)
}

/// How far the programs' clock (`PM_CLOCK`: a coarse read kept for 8 ticks) may lag the
/// coarse clock: 9 ticks at HZ=100, the slowest tick a kernel is built with.
const PROGRAM_CLOCK_LAG_NS: u64 = 90_000_000;

/// Whether every time the programs can have read from `from` (a coarse clock read) until now
/// lies in one route epoch (`now >> ROUTE_EPOCH_SHIFT`): then a route cached in that span is
/// still current at its end, whatever the clock's lag.
fn one_epoch_since(from: u64) -> anyhow::Result<bool> {
    let earliest = from.saturating_sub(PROGRAM_CLOCK_LAG_NS) >> ROUTE_EPOCH_SHIFT;
    Ok(earliest == coarse_ns()? >> ROUTE_EPOCH_SHIFT)
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Through the FIB path (mapping 0 and 6, backends behind h1), on XDP and TC: the first
/// established packet caches h1 and the backend's MAC; a neighbour change is followed once the
/// generation moves (before, the packet still leaves by the cache, which is what makes the
/// daemon's bump necessary), and byte for byte as the lookup would send it.
#[test]
fn established_packets_follow_the_cached_route_until_the_generation_moves() -> anyhow::Result<()> {
    with_golden(|g| {
        let h1 = nix::net::if_::if_nametoindex("h1")?;
        let cases: [(IpAddr, IpAddr, IpAddr, &str); 2] = [
            (CLIENT.into(), HOST.into(), BACKEND.into(), ""),
            (CLIENT6.into(), HOST6.into(), BACKEND6.into(), "-6"),
        ];
        for (port, hook) in [(41_000, Hook::XdpIngress), (41_001, Hook::TcIngress)] {
            for (client, host, backend, family) in cases {
                let frame = |flags| Frame::tcp((client, port), (host, 8080), flags);
                let routed = |flags| frame(flags).dnat(backend, 80).routed_to_backend();
                expect(
                    g,
                    hook,
                    &frame(SYN).build(),
                    Stat::FwdRedirect,
                    Some(&routed(SYN).build()),
                )?;
                let data = frame(ACK).payload(100).build();
                let caching = coarse_ns()?;
                expect(
                    g,
                    hook,
                    &data,
                    Stat::FwdRedirect,
                    Some(&routed(ACK).payload(100).build()),
                )?;
                let route = route_of(g, port, DIR_FORWARD)?;
                ensure!(
                    route.kind == ROUTE_FIB && route.ifindex == h1 && route.dmac == packets::BACKEND_MAC,
                    "{backend}: cached {route:?}"
                );
                // Served by the cache: the same bytes.
                expect(
                    g,
                    hook,
                    &data,
                    Stat::FwdRedirect,
                    Some(&routed(ACK).payload(100).build()),
                )?;

                let backend_s = backend.to_string();
                let neigh = |lladdr: &str| -> anyhow::Result<()> {
                    let mut args = vec![];
                    if !family.is_empty() {
                        args.push(family);
                    }
                    args.extend([
                        "neigh",
                        "replace",
                        &backend_s,
                        "lladdr",
                        lladdr,
                        "nud",
                        "permanent",
                        "dev",
                        "h1",
                    ]);
                    ip(&args)
                };
                neigh(&mac(MOVED_MAC))?;
                let result = (|| {
                    let mut moved = routed(ACK).payload(100);
                    moved.dst_mac = MOVED_MAC;
                    let cached = route_of(g, port, DIR_FORWARD)?;
                    let stale = g.run(hook, &data)?;
                    let after = route_of(g, port, DIR_FORWARD)?;
                    // Within the epoch the route was cached in, the packet leaves by the cache
                    // (the old MAC). Once the epoch moves on (near an epoch's end, or always on
                    // a slow machine: vmtest's emulated 6.1) the cache is stale whatever the
                    // generation says, and the packet takes the lookup (the new MAC, cached
                    // under a new stamp): either is right then, but only with its own entry.
                    let by_cache = routed(ACK).payload(100).build();
                    let by_lookup = moved.build();
                    let consistent = if stale.output.packet == by_cache {
                        after.stamp == cached.stamp && after.dmac == packets::BACKEND_MAC
                    } else {
                        stale.output.packet == by_lookup
                            && after.stamp != cached.stamp
                            && after.dmac == MOVED_MAC
                    };
                    let want = if one_epoch_since(caching)? {
                        &by_cache
                    } else {
                        &stale.output.packet
                    };
                    ensure!(
                        outcome(&stale.counted)?.0 == Stat::FwdRedirect
                            && consistent
                            && stale.output.packet == *want,
                        "[{}] before the generation moved (cached {cached:?}, then {after:?}): {}",
                        hook.as_str(),
                        diff(if consistent { want } else { &by_cache }, &stale.output.packet)
                    );
                    g.dp.invalidate_routes()?;
                    expect(g, hook, &data, Stat::FwdRedirect, Some(&moved.build()))?;
                    ensure!(
                        route_of(g, port, DIR_FORWARD)?.dmac == MOVED_MAC,
                        "the cache kept the old MAC"
                    );
                    anyhow::Ok(())
                })();
                neigh(&mac(packets::BACKEND_MAC))?;
                g.dp.invalidate_routes()?;
                result.with_context(|| format!("{backend} on {}", hook.as_str()))?;
                g.dp.clear_flows()?;
            }
        }
        Ok(())
    })
}

/// Mapping 5 (backend behind h2, MTU 1500): a packet larger than the one that filled the cache
/// takes the lookup, which accepts one that fits (and the cache grows to it) and hands one that
/// does not to the kernel (fragments or Frag Needed), exactly as without a cache.
#[test]
fn a_packet_larger_than_the_cached_ones_takes_the_lookup() -> anyhow::Result<()> {
    with_golden(|g| {
        for (port, hook) in [(42_000, Hook::XdpIngress), (42_001, Hook::TcIngress)] {
            let frame = |payload| Frame::tcp((CLIENT, port), (HOST, 8085), ACK).payload(payload);
            let backend2 = std::net::Ipv4Addr::new(198, 18, 2, 2);
            let routed = |payload| frame(payload).dnat(backend2, 80).routed_to_backend().build();
            expect(
                g,
                hook,
                &Frame::tcp((CLIENT, port), (HOST, 8085), SYN).build(),
                Stat::FwdRedirect,
                None,
            )?;
            // The first packet fills the cache; a larger one takes the lookup and grows it.
            for payload in [100, 1400] {
                expect(
                    g,
                    hook,
                    &frame(payload).build(),
                    Stat::FwdRedirect,
                    Some(&routed(payload)),
                )?;
                let cached = route_of(g, port, DIR_FORWARD)?.max_len;
                let want = u16::try_from(payload + 40)?;
                ensure!(
                    cached == want,
                    "after a {want}-byte packet, cached for packets up to {cached} bytes"
                );
            }
            expect(
                g,
                hook,
                &frame(1560).build(),
                Stat::FwdStack,
                Some(&frame(1560).dnat(backend2, 80).build()),
            )?;
            expect(
                g,
                hook,
                &frame(100).build(),
                Stat::FwdRedirect,
                Some(&routed(100)),
            )?;
            g.dp.clear_flows()?;
        }
        Ok(())
    })
}

/// Mapping 12 (a local backend cached on h2): the established flow caches the veth; once the
/// daemon drops the backend from `PM_LOCAL_BACKENDS` (which moves the generation), the flow takes
/// the FIB path (no neighbour entry: handed to the kernel).
#[test]
fn a_local_backend_is_cached_until_the_local_backends_change() -> anyhow::Result<()> {
    with_golden(|g| {
        let local = std::net::Ipv4Addr::new(198, 18, 2, 5);
        let frame = |flags| Frame::tcp((CLIENT, 43_000), (HOST, 8087), flags);
        let hook = Hook::TcIngress;
        expect(g, hook, &frame(SYN).build(), Stat::FwdLocal, None)?;
        let data = frame(ACK).payload(100).build();
        let routed = frame(ACK)
            .payload(100)
            .dnat(local, 80)
            .routed_to_backend()
            .build();
        expect(g, hook, &data, Stat::FwdLocal, Some(&routed))?;
        let route = route_of(g, 43_000, DIR_FORWARD)?;
        ensure!(
            route.kind == ROUTE_LOCAL && route.max_len == 1500,
            "cached {route:?}"
        );
        expect(g, hook, &data, Stat::FwdLocal, Some(&routed))?;
        let before = g.dp.route_generation()?;
        g.dp.sync_local_backends(std::iter::empty())?;
        ensure!(
            g.dp.route_generation()? != before,
            "removing a local backend left the generation"
        );
        expect(g, hook, &data, Stat::FwdStack, None)?;
        Ok(())
    })
}

/// The reply hook (h1's TC ingress) caches the route to the client on the reply entry (IPv6:
/// the client's neighbour is resolved) and sends the next replies the same way.
#[test]
fn replies_at_the_backends_veth_follow_the_cached_route() -> anyhow::Result<()> {
    with_golden(|g| {
        let port = 44_000;
        let syn = Frame::tcp((CLIENT6, port), (HOST6, 8080), SYN).build();
        expect(g, Hook::TcIngress, &syn, Stat::FwdRedirect, None)?;
        let reply = |payload| {
            Frame::tcp((BACKEND6, 80), (CLIENT6, port), ACK)
                .entering_from_backend()
                .payload(payload)
        };
        let first = g.run(Hook::TcFromBackend, &reply(10).build())?;
        ensure!(
            outcome(&first.counted)?.0 == Stat::ReplyRedirect,
            "first reply not redirected"
        );
        let route = route_of(g, port, DIR_REPLY)?;
        ensure!(
            route.kind == ROUTE_FIB && route.dmac == packets::CLIENT_MAC,
            "reply entry cached {route:?}"
        );
        expect(
            g,
            Hook::TcFromBackend,
            &reply(10).build(),
            Stat::ReplyRedirect,
            Some(&first.output.packet),
        )?;
        Ok(())
    })
}

/// The daemon's watch that moves the route generation (`local_backends::watch`) hears policy
/// rule changes too: an `ip rule` can send a flow's packets to another table than the one its
/// cached route came from.
#[test]
fn a_policy_rule_change_reaches_the_daemons_route_watch() -> anyhow::Result<()> {
    with_golden(|_| {
        let mut watch = portmap::host::local_backends::watch()?;
        // The new namespace settles first (IPv6 duplicate address detection, neighbours): what
        // is heard after the rule change must be the rule's own notification.
        let quiet = |watch: &mut portmap::host::netlink::Watch| {
            let settled = (0..50).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(200));
                !watch.drain()
            });
            ensure!(settled, "the namespace never went quiet for 200 ms");
            anyhow::Ok(())
        };
        for family in ["-4", "-6"] {
            quiet(&mut watch)?;
            let rule = [family, "rule", "add", "priority", "777", "table", "main"];
            ip(&rule)?;
            let heard = (0..100).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                watch.drain()
            });
            let mut del = rule;
            del[2] = "del";
            ip(&del)?;
            ensure!(heard, "ip {family} rule add was not heard by the route watch");
        }
        Ok(())
    })
}
