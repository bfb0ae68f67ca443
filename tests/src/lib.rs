//! Test harness shared by the end-to-end tests and `cargo xtask demo`: network namespaces with
//! drop guards, the client/host/backend topologies, the `portmap` daemon as a real process, and
//! sockets opened inside namespaces (a thread that `setns(CLONE_NEWNET)`s).
//!
//! Sandbox rule: everything happens in namespaces this harness creates (names unique per process
//! and call, so tests run in parallel); the root network namespace is never changed. Addresses
//! come from 198.18.0.0/15.

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use nix::sched::{CloneFlags, setns};

/// Client side of the host (the published address) and the rest of the addressing plan.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const HOST_BACKEND_SIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// Interface names inside the namespaces (they only need to be unique per namespace).
pub const HOST_CLIENT_IFACE: &str = "h0";
pub const HOST_BACKEND_IFACE: &str = "h1";
pub const BRIDGE: &str = "br0";

const IO_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `pm<pid>-<n><suffix>`.
#[must_use]
pub fn unique(suffix: &str) -> String {
    format!(
        "pm{}-{}{suffix}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and fails with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A directory under the system temp dir, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("portmap-test-{}", unique(tag)));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let name = unique(role);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// `ip netns exec NAME PROGRAM ARGS...`
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Writes a sysctl of this namespace (`/proc/sys/...` path relative to /proc/sys).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sh", &["-c", &format!("echo {value} > /proc/sys/{key}")])
            .map(drop)
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that entered this namespace; sockets it opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
        let fd = File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        Ok(thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        }))
    }

    /// `spawn` and wait.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow!("thread in netns {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// How the backend is attached to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendLink {
    /// A veth pair straight into the backend namespace (`h1` ↔ `b0`).
    Veth,
    /// docker0 style: the backend's veth is a port of bridge `br0`, which holds the address.
    Bridge,
}

/// client (c0 198.18.0.2) ── (h0 198.18.0.1) host (h1|br0 198.18.1.1) ── (b0 198.18.1.2) backend
pub struct Topology {
    pub client: Netns,
    pub host: Netns,
    pub backend: Netns,
    pub link: BackendLink,
}

impl Topology {
    pub fn new(link: BackendLink) -> anyhow::Result<Self> {
        let topo = Self {
            client: Netns::new("c")?,
            host: Netns::new("h")?,
            backend: Netns::new("b")?,
            link,
        };
        let (c, h, b) = (&topo.client, &topo.host, &topo.backend);
        c.ip(&[
            "link",
            "add",
            "c0",
            "type",
            "veth",
            "peer",
            "name",
            HOST_CLIENT_IFACE,
            "netns",
            &h.name,
        ])?;
        b.ip(&[
            "link",
            "add",
            "b0",
            "type",
            "veth",
            "peer",
            "name",
            HOST_BACKEND_IFACE,
            "netns",
            &h.name,
        ])?;
        c.ip(&["addr", "add", "198.18.0.2/24", "dev", "c0"])?;
        c.ip(&["link", "set", "c0", "up"])?;
        c.ip(&["route", "add", "default", "via", "198.18.0.1"])?;
        h.ip(&["addr", "add", "198.18.0.1/24", "dev", HOST_CLIENT_IFACE])?;
        h.ip(&["link", "set", HOST_CLIENT_IFACE, "up"])?;
        let backend_side = match link {
            BackendLink::Veth => HOST_BACKEND_IFACE,
            BackendLink::Bridge => {
                h.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
                h.ip(&["link", "set", HOST_BACKEND_IFACE, "master", BRIDGE])?;
                h.ip(&["link", "set", BRIDGE, "up"])?;
                BRIDGE
            }
        };
        h.ip(&["addr", "add", "198.18.1.1/24", "dev", backend_side])?;
        h.ip(&["link", "set", HOST_BACKEND_IFACE, "up"])?;
        b.ip(&["addr", "add", "198.18.1.2/24", "dev", "b0"])?;
        b.ip(&["link", "set", "b0", "up"])?;
        b.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        h.sysctl("net/ipv4/ip_forward", "1")?;
        Ok(topo)
    }

    /// Adds IPv6 to the topology: client fd00::2, host fd00::1 and fd00:1::1, backend
    /// fd00:1::2 (no duplicate address detection), default routes, and forwarding on the host.
    pub fn enable_ipv6(&self) -> anyhow::Result<()> {
        let backend_side = if self.link == BackendLink::Bridge {
            BRIDGE
        } else {
            HOST_BACKEND_IFACE
        };
        self.client
            .ip(&["addr", "add", "fd00::2/64", "dev", "c0", "nodad"])?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "fd00::1"])?;
        self.host
            .ip(&["addr", "add", "fd00::1/64", "dev", HOST_CLIENT_IFACE, "nodad"])?;
        self.host
            .ip(&["addr", "add", "fd00:1::1/64", "dev", backend_side, "nodad"])?;
        self.backend
            .ip(&["addr", "add", "fd00:1::2/64", "dev", "b0", "nodad"])?;
        self.backend
            .ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;
        self.host.sysctl("net/ipv6/conf/all/forwarding", "1")
    }

    /// Sets the MTU of every link of the topology (veth ends and the bridge).
    pub fn set_mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        self.client.ip(&["link", "set", "c0", "mtu", &mtu])?;
        self.backend.ip(&["link", "set", "b0", "mtu", &mtu])?;
        let mut host_links = vec![HOST_CLIENT_IFACE, HOST_BACKEND_IFACE];
        if self.link == BackendLink::Bridge {
            host_links.push(BRIDGE);
        }
        for link in host_links {
            self.host.ip(&["link", "set", link, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// What XDP on the client-facing veth needs (see README, "XDP on a veth"): frames redirected
    /// into a veth are only received if the peer has GRO on, and an XDP program cannot see that a
    /// frame from a veth peer carries a partial (offloaded) checksum, so the client sends full ones.
    pub fn prepare_for_xdp(&self) -> anyhow::Result<()> {
        self.client.exec("ethtool", &["-K", "c0", "tx", "off"])?;
        self.backend.exec("ethtool", &["-K", "b0", "gro", "on"])?;
        Ok(())
    }
}

/// Path of the `portmap` binary: $PORTMAP_BIN, or target/debug/portmap beside the test binary.
pub fn portmap_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PORTMAP_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join("portmap");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "portmap binary not found near {}: build it with `cargo build -p portmap-user` (cargo xtask test does)",
        exe.display()
    )
}

/// A `portmap run` process inside a namespace, stopped (SIGKILL if needed) and cleaned up on drop.
pub struct Daemon {
    child: Option<Child>,
    bin: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    work_dir: TempDir,
}

impl Daemon {
    /// Starts `portmap run` in `ns` with a unique socket and pin directory, and waits until its
    /// control socket answers.
    pub fn start(ns: &Netns, args: &[&str]) -> anyhow::Result<Self> {
        let work_dir = TempDir::new("d")?;
        let socket = work_dir.path().join("portmap.sock");
        let pin_dir = Path::new("/sys/fs/bpf").join(work_dir.path().file_name().context("temp dir name")?);
        let mut daemon = Self {
            child: None,
            bin: portmap_bin()?,
            socket,
            pin_dir,
            work_dir,
        };
        daemon.spawn(ns, args)?;
        Ok(daemon)
    }

    /// Starts a new `portmap run` with the same socket and pin directory (after `stop` or `kill`).
    pub fn restart(&mut self, ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "the daemon is still running");
        self.spawn(ns, args)
    }

    fn spawn(&mut self, ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.path().join("daemon.log"))?;
        let netns = File::open(ns.path())?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("run")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_LOG", "info");
        // SAFETY: setns is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?,
        );
        self.wait_ready()
    }

    /// SIGKILL, as a crash: the daemon gets no chance to detach or unpin.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                bail!(
                    "portmap run exited ({}) during start-up:\n{}",
                    status?,
                    self.log()
                );
            }
            if self.socket.exists() && self.cli(&["list"])?.status.success() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("portmap run did not answer within 20 s:\n{}", self.log())
    }

    /// The daemon's output so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.work_dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs `portmap --socket SOCKET ARGS...`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        ensure!(
            out.status.success(),
            "portmap {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends a signal to the running daemon (e.g. SIGHUP: reload).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the daemon is not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    /// `portmap stats --json`, parsed.
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli_ok(&["stats", "--json"])?)?)
    }

    /// Sends SIGTERM and waits for a clean exit (at most 15 s).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "portmap run exited with {status}:\n{}",
                    self.log()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("portmap run ignored SIGTERM for 15 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Unpinning whatever a killed daemon left detaches it.
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

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
    let deadline = Instant::now() + IO_TIMEOUT;
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
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
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
        let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT).with_context(|| format!("connect {dst}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
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
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
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

/// How the daemon attaches its ingress program.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Tc,
    Xdp,
}

/// `portmap run` on the host's client-facing interface of `topo`, in `mode` (XDP mode also
/// prepares the veths and lists the backend veth as a redirect target), plus `extra` options.
pub fn start_daemon(topo: &Topology, mode: Mode, extra: &[&str]) -> anyhow::Result<Daemon> {
    let mut args = vec!["--iface", HOST_CLIENT_IFACE];
    match mode {
        Mode::Tc => args.extend(["--attach", "tc"]),
        Mode::Xdp => {
            topo.prepare_for_xdp()?;
            args.extend(["--attach", "xdp"]);
            if topo.link == BackendLink::Veth {
                args.extend(["--redirect-iface", HOST_BACKEND_IFACE]);
            }
        }
    }
    args.extend_from_slice(extra);
    Daemon::start(&topo.host, &args)
}

/// A global counter from `portmap stats --json`.
#[must_use]
pub fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["counters"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c[0] == name))
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

/// The stats of the mapping whose host ports start at `host_port`.
#[must_use]
pub fn mapping_stats(stats: &serde_json::Value, host_port: u16) -> &serde_json::Value {
    stats["mappings"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|m| m["mapping"]["host_ports"]["start"] == host_port)
        })
        .unwrap_or_else(|| panic!("no mapping for port {host_port} in {stats}"))
}

/// A numeric field of a JSON object.
#[must_use]
pub fn num(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("no {field} in {v}"))
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
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port));
            let _ = ready_tx.send(listener.as_ref().map(drop).map_err(|e| e.to_string()));
            let listener = listener?;
            listener.set_nonblocking(true)?;
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false)?;
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
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

/// CRC32c (Castagnoli), as SCTP uses it.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// An SCTP packet (common header and one INIT chunk carrying `extra`, padded) with its CRC32c,
/// stored as the kernel's `sctp_compute_cksum` does (little-endian).
#[must_use]
pub fn sctp_packet(sport: u16, dport: u16, extra: &[u8]) -> Vec<u8> {
    let params_len = extra.len().div_ceil(4) * 4;
    let mut packet = Vec::with_capacity(32 + params_len);
    packet.extend_from_slice(&sport.to_be_bytes());
    packet.extend_from_slice(&dport.to_be_bytes());
    packet.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    packet.extend_from_slice(&[0; 4]); // checksum, below
    packet.extend_from_slice(&[1, 0]); // INIT, no flags
    packet.extend_from_slice(&u16::try_from(20 + params_len).unwrap_or(u16::MAX).to_be_bytes());
    packet.extend_from_slice(&0x1111_2222u32.to_be_bytes()); // initiate tag
    packet.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    packet.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    packet.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    packet.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    packet.extend_from_slice(extra);
    packet.resize(32 + params_len, 0);
    let crc = sctp_checksum(&packet);
    packet[8..12].copy_from_slice(&crc);
    packet
}

/// The checksum field an SCTP packet (12 bytes or more) must carry: its CRC32c computed with
/// the field zeroed, little-endian.
#[must_use]
pub fn sctp_checksum(packet: &[u8]) -> [u8; 4] {
    let mut digest = CRC32C.digest();
    digest.update(&packet[..8]);
    digest.update(&[0; 4]);
    digest.update(&packet[12..]);
    digest.finalize().to_le_bytes()
}

/// Whether an SCTP packet's CRC32c verifies.
#[must_use]
pub fn sctp_crc_ok(packet: &[u8]) -> bool {
    packet.len() >= 12 && sctp_checksum(packet) == packet[8..12]
}

/// A raw IPv4 SCTP socket in the calling thread's namespace (works without the kernel's SCTP
/// module: raw sockets take any protocol). Received packets start with the IPv4 header.
pub fn raw_sctp_socket() -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Sctp,
    )
    .context("raw SCTP socket")?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(5, 0))?;
    Ok(fd)
}

/// Sends an SCTP packet (the kernel adds the IPv4 header) to `dst`.
pub fn raw_send(fd: &std::os::fd::OwnedFd, dst: Ipv4Addr, packet: &[u8]) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let addr = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
    nix::sys::socket::sendto(fd.as_raw_fd(), packet, &addr, nix::sys::socket::MsgFlags::empty())
        .with_context(|| format!("sending SCTP to {dst}"))?;
    Ok(())
}

/// Receives the next SCTP packet: (source, destination, SCTP bytes).
pub fn raw_recv(fd: &std::os::fd::OwnedFd) -> anyhow::Result<(Ipv4Addr, Ipv4Addr, Vec<u8>)> {
    use std::os::fd::AsRawFd as _;
    let mut buf = vec![0u8; 65_536];
    let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())
        .context("no SCTP packet within 5 s")?;
    ensure!(n >= 20, "short packet");
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    let addr = |o: usize| Ipv4Addr::new(buf[o], buf[o + 1], buf[o + 2], buf[o + 3]);
    Ok((addr(12), addr(16), buf[ihl..n].to_vec()))
}
