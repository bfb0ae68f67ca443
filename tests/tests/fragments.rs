//! IP fragments through a mapping (issue 11): datagrams larger than the path MTU, fragmented by
//! the client's and the backend's kernels, reach the backend and come back whole, IPv4 and IPv6,
//! TC and XDP mode, each fragment counted under the mapping. Needs root (run through
//! `cargo xtask test`).

use std::net::{Ipv6Addr, SocketAddr};

use anyhow::ensure;
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, HOST_IP, Mode, Topology, counter, mapping_stats, start_daemon, udp_exchange, udp_server,
};

/// A UDP payload that takes three fragments at MTU 1500.
const SIZE: usize = 4_000;
const DATAGRAMS: usize = 5;

#[test]
fn fragmented_datagrams_cross_a_mapping_both_ways() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        let topo = Topology::new(BackendLink::Veth)?;
        topo.enable_ipv6()?;
        let mut daemon = start_daemon(&topo, mode, &[])?;
        daemon.cli_ok(&["add", "5353:198.18.1.2:53/udp"])?;
        daemon.cli_ok(&["add", "5354:[fd00:1::2]:53/udp"])?;
        let server = udp_server(&topo.backend, 53, 2 * DATAGRAMS)?;
        let host6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        for (to, published) in [
            (SocketAddr::from((HOST_IP, 5353)), 5353),
            (SocketAddr::from((host6, 5354)), 5354),
        ] {
            let from = udp_exchange(&topo.client, to, DATAGRAMS, SIZE)?;
            ensure!(from == to, "{mode:?}: answers came from {from}, not {to}");
            let m = mapping_stats(&daemon.stats()?, published);
            // Three fragments a datagram each way (IPv6 fragments carry 8 more header bytes).
            ensure!(
                m.fwd_packets == 3 * DATAGRAMS as u64 && m.reply_packets == 3 * DATAGRAMS as u64,
                "{mode:?} {to}: {m:?}"
            );
        }
        server.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        let stats = daemon.stats()?;
        ensure!(counter(&stats, Stat::PassFragment) == 0, "{mode:?}: {stats:?}");
        daemon.stop()?;
    }
    Ok(())
}
