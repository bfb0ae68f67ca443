//! Replies from a local backend on a host whose container subnet is masqueraded, as Docker's
//! (`iptables: true`) and podman's (`ipMasq`) networks do: the request bypassed netfilter, so
//! conntrack would meet the container's reply as a new flow of the subnet and MASQUERADE would
//! rewrite its source to the host's address (the client resets the connection). The reply hook
//! on the backend's veth sends it to the client first (`reply_redirect`), on TC and XDP, IPv4 and
//! IPv6. Needs root, iptables and ip6tables (run through `cargo xtask test`).

use std::net::SocketAddr;

use anyhow::ensure;
use portmap_common::Stat;
use portmap_tests::{
    BRIDGE, BackendLink, CLIENT_IP, HOST_IP, Mode, Topology, counter, payload, start_daemon, tcp_exchange,
    tcp_server, udp_exchange, udp_server,
};

/// The runtimes' rule for their container subnet, in the host namespace.
fn masquerade(topo: &Topology) -> anyhow::Result<()> {
    for (tool, subnet) in [("iptables", "198.18.1.0/24"), ("ip6tables", "fd00:1::/64")] {
        let rule = [
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            subnet,
            "!",
            "-o",
            BRIDGE,
            "-j",
            "MASQUERADE",
        ];
        topo.host.exec(tool, &rule)?;
    }
    Ok(())
}

/// The rule is in force: a connection the backend opens to the client itself (no mapping)
/// arrives from the host's address.
fn check_rule_applies(topo: &Topology) -> anyhow::Result<()> {
    let server = tcp_server(&topo.client, 7000, b"hi".to_vec())?;
    tcp_exchange(&topo.backend, (CLIENT_IP, 7000), b"ping".to_vec())?;
    let served = server.join().expect("server thread")?;
    ensure!(
        served.peer.ip() == HOST_IP,
        "the masquerade rule did not apply: the client saw {}",
        served.peer
    );
    Ok(())
}

fn replies_pass_a_masquerade_rule(mode: Mode) -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Bridge)?;
    topo.enable_ipv6()?;
    masquerade(&topo)?;
    check_rule_applies(&topo)?;
    let mut daemon = start_daemon(&topo, mode, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.cli_ok(&["add", "[::]:8080:[fd00:1::2]:80"])?;
    daemon.cli_ok(&["add", "5353:198.18.1.2:53/udp"])?;
    let before = daemon.stats()?;
    for dst in [SocketAddr::from((HOST_IP, 8080)), "[fd00::1]:8080".parse()?] {
        let (up, down) = (payload(64 * 1024, 1), payload(256 * 1024, 2));
        let server = tcp_server(&topo.backend, 80, down.clone())?;
        let got = tcp_exchange(&topo.client, dst, up.clone())?;
        let served = server.join().expect("server thread")?;
        ensure!(got == down && served.received == up, "TCP via {dst} not intact");
    }
    let server = udp_server(&topo.backend, 53, 5)?;
    udp_exchange(&topo.client, (HOST_IP, 5353), 5, 200)?;
    server.join().expect("server thread")?;
    let after = daemon.stats()?;
    let moved = |s| counter(&after, s) - counter(&before, s);
    ensure!(
        moved(Stat::ReplyRedirect) > 0 && moved(Stat::PassReply) == 0 && moved(Stat::DropError) == 0,
        "replies: {} redirected from the veth, {} left to the stack, {} drop_error; {}",
        moved(Stat::ReplyRedirect),
        moved(Stat::PassReply),
        moved(Stat::DropError),
        daemon.log()
    );
    daemon.stop()?;
    daemon.cleanup().map(drop)
}

#[test]
fn tc_replies_pass_a_masquerade_rule() -> anyhow::Result<()> {
    replies_pass_a_masquerade_rule(Mode::Tc)
}

#[test]
fn xdp_replies_pass_a_masquerade_rule() -> anyhow::Result<()> {
    replies_pass_a_masquerade_rule(Mode::Xdp)
}
