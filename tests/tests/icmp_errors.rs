//! ICMP errors about translated flows (issue 11), end to end in TC and XDP mode: a connected UDP
//! client learns that nothing listens behind a mapping (ECONNREFUSED), and TCP through a mapping
//! whose backend link has a smaller MTU discovers the path MTU instead of stalling. Needs root
//! (run through `cargo xtask test`).

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::ensure;
use portmap_common::Stat;
use portmap_tests::{
    BackendLink, HOST_BACKEND_IFACE, HOST_IP, Mode, Topology, counter, payload, start_daemon, tcp_exchange,
    tcp_server,
};

#[test]
fn a_connected_udp_client_sees_connection_refused_through_a_mapping() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        let topo = Topology::new(BackendLink::Veth)?;
        let mut daemon = start_daemon(&topo, mode, &[])?;
        // Nothing listens on the backend's port 9.
        daemon.cli_ok(&["add", "5353:198.18.1.2:9/udp"])?;
        let error = topo.client.run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(SocketAddr::from((HOST_IP, 5353)))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 16];
            Ok(socket.recv(&mut buf).err().map(|e| e.kind()))
        })?;
        ensure!(
            error == Some(std::io::ErrorKind::ConnectionRefused),
            "{mode:?}: the client saw {error:?}"
        );
        ensure!(counter(&daemon.stats()?, Stat::IcmpErrorNat) >= 1);
        daemon.stop()?;
    }
    Ok(())
}

#[test]
fn path_mtu_discovery_works_through_a_mapping() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        let topo = Topology::new(BackendLink::Veth)?;
        // The host's link to the backend carries 1400 bytes; the client and the backend both
        // have 1500 (so the backend advertises an MSS that does not fit the path).
        topo.host
            .ip(&["link", "set", HOST_BACKEND_IFACE, "mtu", "1400"])?;
        // Ordinary 1500-byte frames from the client: a veth passes GSO super-packets on
        // whatever the MTU, which would never need the error.
        topo.client
            .exec("ethtool", &["-K", "c0", "tso", "off", "gso", "off"])?;
        let mut daemon = start_daemon(&topo, mode, &[])?;
        daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
        let server = tcp_server(&topo.backend, 80, b"ok".to_vec())?;
        let got = tcp_exchange(
            &topo.client,
            SocketAddr::from((HOST_IP, 8080)),
            payload(200_000, 7),
        )?;
        ensure!(got == b"ok", "{mode:?}: {got:?}");
        let served = server.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        ensure!(
            served.received == payload(200_000, 7),
            "{mode:?}: the backend received {} bytes",
            served.received.len()
        );
        ensure!(
            counter(&daemon.stats()?, Stat::IcmpErrorNat) >= 1,
            "{mode:?}: no fragmentation-needed error was translated"
        );
        daemon.stop()?;
    }
    Ok(())
}
