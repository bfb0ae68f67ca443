//! Servers and clients inside namespaces: TCP (one-shot, echo, connect probes), UDP, bound
//! sockets, and CPU pinning for load generators.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::Ordering,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};

use crate::{Netns, io_timeout};

/// Deterministic test payload.
#[must_use]
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What the TCP server saw of one connection (IPv4 peers as IPv4, not IPv4-mapped IPv6).
#[derive(Debug)]
pub struct TcpServed {
    pub peer: SocketAddr,
    /// The address the client reached (which backend address, when the namespace has several).
    pub local: SocketAddr,
    pub received: Vec<u8>,
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn accept_with_deadline(listener: &TcpListener) -> anyhow::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + io_timeout();
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false)?;
                return Ok((s, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

/// A TCP server in `ns` on `port` (IPv4 and IPv6) that serves one connection: reads until the
/// client shuts down its side, then answers with `reply` and closes. Listening when this returns.
pub fn tcp_server(
    ns: &Netns,
    port: u16,
    reply: Vec<u8>,
) -> anyhow::Result<JoinHandle<anyhow::Result<TcpServed>>> {
    let served = tcp_server_n(ns, port, 1, reply)?;
    Ok(thread::spawn(move || {
        let mut all = served.join().map_err(|_| anyhow!("tcp server panicked"))??;
        all.pop().context("no connection served")
    }))
}

/// `tcp_server` for `count` connections, one after the other.
pub fn tcp_server_n(
    ns: &Netns,
    port: u16,
    count: usize,
    reply: Vec<u8>,
) -> anyhow::Result<JoinHandle<anyhow::Result<Vec<TcpServed>>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = ns.spawn(move || {
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port));
        let _ = ready_tx.send(listener.as_ref().map(drop).map_err(|e| e.to_string()));
        let listener = listener?;
        let mut served = Vec::new();
        for _ in 0..count {
            let (mut stream, peer) = accept_with_deadline(&listener)?;
            stream.set_read_timeout(Some(io_timeout()))?;
            stream.set_write_timeout(Some(io_timeout()))?;
            let mut received = Vec::new();
            stream.read_to_end(&mut received)?;
            stream.write_all(&reply)?;
            served.push(TcpServed {
                peer: canonical(peer),
                local: canonical(stream.local_addr()?),
                received,
            });
        }
        Ok(served)
    })?;
    ready_rx
        .recv()?
        .map_err(|e| anyhow!("binding port {port}: {e}"))?;
    Ok(handle)
}

/// Connects from `ns` to `dst`, sends `data`, half-closes, and returns everything received.
pub fn tcp_exchange(ns: &Netns, dst: impl Into<SocketAddr>, data: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let dst = dst.into();
    ns.run(move || {
        let mut s =
            TcpStream::connect_timeout(&dst, io_timeout()).with_context(|| format!("connect {dst}"))?;
        s.set_read_timeout(Some(io_timeout()))?;
        s.set_write_timeout(Some(io_timeout()))?;
        s.write_all(&data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    })
}

/// Tries a TCP connection from `ns`; returns the error kind if it fails (e.g. ConnectionRefused).
pub fn tcp_connect_result(
    ns: &Netns,
    dst: impl Into<SocketAddr>,
) -> anyhow::Result<Result<(), std::io::ErrorKind>> {
    let dst = dst.into();
    ns.run(move || {
        Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .map(drop)
            .map_err(|e| e.kind()))
    })
}

/// How many connections a server's listen queue holds before the kernel drops SYNs: the
/// namespace's `somaxconn` default. std's `TcpListener::bind` asks for 128, which a connect loop
/// at ~30,000/s fills in 4 ms whenever the accepting thread is held up; every drop then costs
/// the client a 1-s SYN retransmission (seen as `TcpExtListenOverflows`).
const LISTEN_BACKLOG: i32 = 4096;

/// A TCP listener on `port` of every IPv6 and IPv4 address (dual stack, as std binds `::`),
/// with `SO_REUSEADDR` as std sets it and a `LISTEN_BACKLOG` queue.
fn listen_any(port: u16) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A socket bound in a namespace for as long as this guard lives (a "local listener" of a host).
pub struct Bound {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Bound {
    /// A TCP listener (`tcp`) or a UDP socket bound to `addr` in `ns`.
    pub fn new(ns: &Netns, addr: SocketAddr, tcp: bool) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = ns.spawn(move || {
            let bound = if tcp {
                TcpListener::bind(addr).map(|l| Box::new(l) as Box<dyn Send>)
            } else {
                UdpSocket::bind(addr).map(|s| Box::new(s) as Box<dyn Send>)
            };
            let _ = ready_tx.send(bound.as_ref().map(drop).map_err(|e| e.to_string()));
            let _socket = bound?;
            let _ = stop_rx.recv();
            Ok(())
        })?;
        ready_rx.recv()?.map_err(|e| anyhow!("binding {addr}: {e}"))?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server in `ns` (IPv4 and IPv6) that answers `count` datagrams with their bytes reversed
/// and returns the peers it saw. Bound when this returns.
pub fn udp_server(
    ns: &Netns,
    port: u16,
    count: usize,
) -> anyhow::Result<JoinHandle<anyhow::Result<Vec<SocketAddr>>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = ns.spawn(move || {
        let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port));
        let _ = ready_tx.send(sock.as_ref().map(drop).map_err(|e| e.to_string()));
        let sock = sock?;
        sock.set_read_timeout(Some(io_timeout()))?;
        let mut peers = Vec::new();
        let mut buf = vec![0u8; 65_536];
        for _ in 0..count {
            let (n, peer) = sock.recv_from(&mut buf)?;
            let mut answer = buf[..n].to_vec();
            answer.reverse();
            sock.send_to(&answer, peer)?;
            peers.push(canonical(peer));
        }
        Ok(peers)
    })?;
    ready_rx
        .recv()?
        .map_err(|e| anyhow!("binding udp port {port}: {e}"))?;
    Ok(handle)
}

/// Sends `count` datagrams of `size` bytes from one socket in `ns` to `dst`, one at a time, and
/// checks each answer; returns the address the answers came from.
pub fn udp_exchange(
    ns: &Netns,
    dst: impl Into<SocketAddr>,
    count: usize,
    size: usize,
) -> anyhow::Result<SocketAddr> {
    let dst = dst.into();
    ns.run(move || {
        let any: SocketAddr = if dst.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut from = None;
        let mut buf = vec![0u8; 65_536];
        for i in 0..count {
            let msg = payload(size, i as u8);
            sock.send_to(&msg, dst)?;
            let (n, peer) = sock
                .recv_from(&mut buf)
                .with_context(|| format!("no answer to datagram {i}"))?;
            let mut want = msg;
            want.reverse();
            ensure!(buf[..n] == want[..], "datagram {i}: wrong answer");
            from = Some(peer);
        }
        from.context("no datagram sent")
    })
}

/// A TCP echo server in `ns` on `port` (IPv4 and IPv6) serving any number of concurrent
/// connections until dropped; records the local address each connection reached.
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    reached: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    /// Echoes every connection on its own thread until the client closes.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        Self::serve(ns, port, false, |mut stream| {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        })
    }

    /// Closes every connection as soon as it is accepted (a connection-rate sink). Its thread
    /// runs on the machine's last CPU, so that a client pinned to CPU 0 does not share one.
    pub fn accept_and_close(ns: &Netns, port: u16) -> anyhow::Result<Self> {
        Self::serve(ns, port, true, drop)
    }

    fn serve(ns: &Netns, port: u16, pin_last_cpu: bool, handle: fn(TcpStream)) -> anyhow::Result<Self> {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let reached = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop2, reached2) = (stop.clone(), reached.clone());
        let thread = ns.spawn(move || {
            if pin_last_cpu {
                pin_to_cpu(thread::available_parallelism().map_or(0, |n| n.get() - 1))?;
            }
            let listener = listen_any(port);
            let _ = ready_tx.send(listener.as_ref().map(drop).map_err(|e| e.to_string()));
            let listener = listener?;
            listener.set_nonblocking(true)?;
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false)?;
                        stream.set_read_timeout(Some(io_timeout()))?;
                        reached2
                            .lock()
                            .map_err(|_| anyhow!("poisoned"))?
                            .push(canonical(stream.local_addr()?));
                        handle(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_micros(100));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        ready_rx
            .recv()?
            .map_err(|e| anyhow!("binding port {port}: {e}"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            reached,
        })
    }

    /// The local address each accepted connection reached, in order.
    #[must_use]
    pub fn reached(&self) -> Vec<SocketAddr> {
        self.reached.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the calling thread on CPU `cpu` only.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
    Ok(())
}
