//! Flows across changes of the mappings (issue 11): a UDP stream follows a remap or a removed
//! backend with its next datagram (its stale flow is deleted), established TCP flows of a
//! removed mapping finish on their backend, and their packets never count under a mapping that
//! came later. Needs root (run through `cargo xtask test`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap_tests::{
    BackendLink, EchoServer, HOST_IP, Mode, Netns, Topology, mapping_stats, start_daemon, wait_for,
};

/// A UDP server in `ns` on `port` answering every datagram with `name`, until `stop`.
fn udp_namer(
    ns: &Netns,
    port: u16,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.spawn(move || {
        let socket = UdpSocket::bind(("::", port))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        ready_tx.send(())?;
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                socket.send_to(name.as_bytes(), from)?;
            }
        }
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("udp server not ready")?;
    Ok(handle)
}

/// (phase when sent, server that answered) of each answered datagram.
type Replies = Vec<(u32, String)>;

/// Sends datagrams from ONE socket (one 5-tuple, so one flow) until `stop`, recording in `seen`
/// which server answered each, tagged with the phase the test was in when it was sent.
fn udp_stream(
    ns: &Netns,
    to: SocketAddr,
    phase: Arc<AtomicU32>,
    seen: Arc<Mutex<Replies>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    ns.spawn(move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buf = [0u8; 64];
        for _ in 0..2_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Odd phases are changes in progress; an exchange counts only if it happened
            // entirely within one stable phase.
            let sent_in = phase.load(Ordering::SeqCst);
            socket.send_to(b"x", to)?;
            if let Ok((n, _)) = socket.recv_from(&mut buf)
                && sent_in.is_multiple_of(2)
                && phase.load(Ordering::SeqCst) == sent_in
            {
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push((sent_in, reply));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
}

/// Waits until the stream has five answers to datagrams sent in `phase` (every datagram sent
/// after a change must reach the new backend; how soon is not judged).
fn settle(seen: &Mutex<Replies>, phase: u32) -> anyhow::Result<()> {
    wait_for(
        &format!("5 answers in phase {phase}"),
        Duration::from_secs(10),
        || {
            let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            Ok(seen.iter().filter(|(p, _)| *p == phase).count() >= 5)
        },
    )
}

#[test]
fn udp_streams_follow_a_remap_and_a_removed_backend_with_their_next_datagram() -> anyhow::Result<()> {
    for mode in [Mode::Tc, Mode::Xdp] {
        let topo = Topology::new(BackendLink::Bridge)?;
        let other = topo.add_container("198.18.1.3".parse()?)?;
        let mut daemon = start_daemon(&topo, mode, &[])?;
        daemon.cli_ok(&["add", "5353:198.18.1.2:53/udp"])?;
        let stop = Arc::new(AtomicBool::new(false));
        let servers = [
            udp_namer(&topo.backend, 53, "first", stop.clone())?,
            udp_namer(&other, 53, "second", stop.clone())?,
        ];
        let phase = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Replies::new()));
        let stream = udp_stream(
            &topo.client,
            SocketAddr::from((HOST_IP, 5353)),
            phase.clone(),
            seen.clone(),
            stop.clone(),
        )?;
        settle(&seen, 0)?;
        // del + add to another backend (Docker flushes UDP conntrack on such a remap).
        phase.store(1, Ordering::SeqCst);
        daemon.cli_ok(&["del", "5353:198.18.1.2:53/udp"])?;
        daemon.cli_ok(&["add", "5353:198.18.1.3:53/udp"])?;
        phase.store(2, Ordering::SeqCst);
        settle(&seen, 2)?;
        // update that removes the backend the stream uses.
        phase.store(3, Ordering::SeqCst);
        daemon.cli_ok(&["update", "5353:198.18.1.2:53/udp"])?;
        phase.store(4, Ordering::SeqCst);
        settle(&seen, 4)?;
        stop.store(true, Ordering::Relaxed);
        stream.join().map_err(|_| anyhow::anyhow!("stream panicked"))??;
        let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for s in servers {
            s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        }
        for (p, want) in [(0, "first"), (2, "second"), (4, "first")] {
            let replies: Vec<&str> = seen
                .iter()
                .filter(|(sent, _)| *sent == p)
                .map(|(_, r)| r.as_str())
                .collect();
            ensure!(
                replies.len() >= 5,
                "{mode:?} phase {p}: {} replies",
                replies.len()
            );
            ensure!(
                replies.iter().all(|r| *r == want),
                "{mode:?} phase {p}: datagrams sent after the change reached {replies:?}, not only {want}"
            );
        }
        daemon.stop()?;
    }
    Ok(())
}

#[test]
fn a_removed_mappings_tcp_flows_finish_and_never_count_under_a_later_mapping() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (up_tx, up_rx) = mpsc::channel::<()>();
    let client = topo.client.spawn(move || {
        let mut stream = TcpStream::connect(SocketAddr::from((HOST_IP, 8080)))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 1];
        stream.write_all(b"a")?;
        stream.read_exact(&mut buf)?;
        up_tx.send(())?;
        go_rx.recv()?;
        // After the mapping is gone and another one took its place.
        for _ in 0..10 {
            stream.write_all(b"b")?;
            stream.read_exact(&mut buf)?;
            ensure!(&buf == b"b", "echo");
        }
        Ok(())
    })?;
    up_rx
        .recv_timeout(Duration::from_secs(10))
        .context("connection not up")?;
    daemon.cli_ok(&["del", "8080:198.18.1.2:80"])?;
    daemon.cli_ok(&["add", "8081:198.18.1.2:80"])?;
    go_tx.send(())?;
    client.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    let later = mapping_stats(&daemon.stats()?, 8081);
    ensure!(
        later.fwd_packets == 0 && later.flows == 0,
        "the new mapping counted the old flow's packets: {later:?}"
    );
    daemon.stop()
}

/// From `ns`, a TCP exchange with `dst` from local port `port` (bound with `SO_REUSEADDR`, as a
/// client's kernel may reuse one local port towards different destinations): sends `data`,
/// half-closes and returns the echo. Connecting gives up after 3 s.
fn exchange_from_port(
    ns: &Netns,
    port: u16,
    dst: SocketAddr,
    data: &'static [u8],
) -> anyhow::Result<Vec<u8>> {
    ns.run(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        socket
            .connect_timeout(&dst.into(), Duration::from_secs(3))
            .with_context(|| format!("connect {dst} from port {port}"))?;
        let mut stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(data)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed)?;
        Ok(echoed)
    })
}

/// Two published ports of one backend port share their flows' reply keys (backend → client
/// address and port). A client whose kernel reuses a local port towards the second published
/// port once its connection through the first has closed (a FIN each way) must get through: the
/// new SYN takes the closed flow's place, as it would reusing the same 5-tuple (the backend sees
/// exactly that).
#[test]
fn a_closed_flows_client_port_reused_towards_another_published_port_connects() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.cli_ok(&["add", "8081:198.18.1.2:80"])?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    const CLIENT_PORT: u16 = 40_000;
    let first = exchange_from_port(
        &topo.client,
        CLIENT_PORT,
        SocketAddr::from((HOST_IP, 8080)),
        b"first",
    )?;
    ensure!(first == b"first", "echo through 8080: {first:?}");
    let second = exchange_from_port(
        &topo.client,
        CLIENT_PORT,
        SocketAddr::from((HOST_IP, 8081)),
        b"second",
    );
    let clashes = portmap_tests::counter(&daemon.stats()?, portmap_common::Stat::DropNatClash);
    let second = second.map_err(|e| format!("{e:#}"));
    ensure!(
        matches!(&second, Ok(echoed) if echoed == b"second"),
        "the same client port through 8081 after its flow through 8080 closed: {second:?} \
         (drop_nat_clash {clashes})"
    );
    daemon.stop()
}
