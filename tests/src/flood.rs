//! A flood of spoofed TCP flows, and the idle connections it must not break
//! (tests/syn_flood.rs, the benchmark's flood measurement).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::{Netns, payload, tcp_exchange};

/// Sends `count` spoofed flows, a TCP SYN and then an ACK each, to `dst`:`port` from sources in
/// 198.19.0.0/16 (the benchmark range, routed nowhere) through a raw socket of `ns`; returns how
/// many packets were sent.
pub fn spoofed_flood(ns: &Netns, dst: Ipv4Addr, port: u16, count: u32) -> anyhow::Result<u32> {
    ns.run(move || {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let mut sent = 0;
        let mut packet = Vec::with_capacity(64);
        for i in 0..2 * count {
            let flow = i / 2;
            let src = [198, 19, (flow >> 8) as u8, flow as u8];
            let tcp = etherparse::PacketBuilder::ipv4(src, dst.octets(), 64).tcp(
                1024 + (flow % 50_000) as u16,
                port,
                flow,
                64_240,
            );
            packet.clear();
            if i % 2 == 0 {
                tcp.syn().write(&mut packet, &[])?;
            } else {
                tcp.ack(1).write(&mut packet, &[])?;
            }
            // SAFETY: `packet` and `to` are valid for the sizes passed.
            let n = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n > 0 {
                sent += 1;
            }
        }
        Ok(sent)
    })
}

/// Idle connections whose server speaks first, later: what a flood must not break.
pub struct IdleConnections {
    speak: mpsc::Sender<()>,
    read: mpsc::Sender<()>,
    server: JoinHandle<anyhow::Result<()>>,
    clients: JoinHandle<anyhow::Result<usize>>,
}

impl IdleConnections {
    /// Opens `count` connections from `client` to `to`, accepted by a server on `port` of
    /// `backend` that holds them (and echoes on any later connection, so new connections can
    /// reach the same port).
    pub fn open(
        backend: &Netns,
        port: u16,
        client: &Netns,
        to: SocketAddr,
        count: usize,
    ) -> anyhow::Result<Self> {
        let (speak, speak_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let server = backend.spawn(move || {
            let listener = TcpListener::bind(("::", port))?;
            listener.set_nonblocking(true)?;
            ready_tx.send(())?;
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((c, _)) if held.len() < count => {
                        c.set_nonblocking(false)?;
                        held.push(c);
                    }
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false)?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut data = Vec::new();
                        let _ = c.read_to_end(&mut data);
                        let _ = c.write_all(&data);
                    }
                    Err(_) if speak_rx.try_recv().is_ok() => {
                        for c in &mut held {
                            let _ = c.write_all(b"late");
                        }
                        return Ok(());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
            bail!("the idle connections' server was never told to speak")
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("server not ready")?;
        let (read, read_rx) = mpsc::channel::<()>();
        let (open_tx, open_rx) = mpsc::channel::<()>();
        let clients = client.spawn(move || {
            let mut conns = Vec::new();
            for _ in 0..count {
                let c = TcpStream::connect(to)?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                conns.push(c);
            }
            open_tx.send(())?;
            read_rx.recv()?;
            let mut survived = 0;
            for c in &mut conns {
                let mut buf = [0u8; 4];
                if c.read_exact(&mut buf).is_ok() && &buf == b"late" {
                    survived += 1;
                }
            }
            Ok(survived)
        })?;
        open_rx
            .recv_timeout(Duration::from_secs(20))
            .context("idle connections not open")?;
        // Let the handshakes' last ACKs arrive (they make the flows assured).
        thread::sleep(Duration::from_millis(300));
        Ok(Self {
            speak,
            read,
            server,
            clients,
        })
    }

    /// The server speaks on every held connection; returns how many clients heard it.
    pub fn survivors(self) -> anyhow::Result<usize> {
        self.speak.send(())?;
        self.read.send(())?;
        self.server
            .join()
            .map_err(|_| anyhow!("idle connections' server panicked"))??;
        self.clients
            .join()
            .map_err(|_| anyhow!("idle connections' clients panicked"))?
    }
}

/// `spoofed_flood` of `flows` to `flood_to` while `new` new connections from `client` exchange
/// data with `new_to`; returns (packets sent, new connections that worked).
pub fn flood_with_new_connections(
    client: &Netns,
    flood_to: (Ipv4Addr, u16),
    flows: u32,
    new_to: SocketAddr,
    new: u8,
) -> anyhow::Result<(u32, usize)> {
    thread::scope(|scope| {
        let during = scope.spawn(|| {
            (0..new)
                .filter(|&i| {
                    let data = payload(32, i);
                    tcp_exchange(client, new_to, data.clone()).is_ok_and(|got| got == data)
                })
                .count()
        });
        let sent = spoofed_flood(client, flood_to.0, flood_to.1, flows)?;
        let ok = during.join().map_err(|_| anyhow!("new connections panicked"))?;
        Ok((sent, ok))
    })
}
