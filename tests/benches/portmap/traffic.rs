//! Load generators, each bounded in time: TCP connect/close, request/response latency, iperf3
//! bulk throughput, and an AF_PACKET UDP packet generator with CPU accounting.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use portmap_tests::{EchoServer, Netns, Topology, pin_to_cpu};

/// Single-threaded TCP connect + close (RST, so no TIME_WAIT piles up) for `secs` seconds:
/// new connections per second.
pub fn new_flows_per_second(topo: &Topology, dst: SocketAddrV4, secs: f64) -> anyhow::Result<f64> {
    let _server = EchoServer::accept_and_close(&topo.backend, 80)?;
    topo.client.run(move || {
        pin_to_cpu(0)?;
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let started = Instant::now();
        let mut done = 0u64;
        while Instant::now() < deadline {
            let s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2))
                .with_context(|| format!("connect {dst} after {done} connections"))?;
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )?;
            drop(s);
            done += 1;
        }
        Ok(done as f64 / started.elapsed().as_secs_f64())
    })
}

/// One TCP connection, `count` 1-byte request/response round trips: microseconds per round
/// trip, sorted.
pub fn round_trips(topo: &Topology, dst: SocketAddrV4, count: usize) -> anyhow::Result<Vec<f64>> {
    let _echo = EchoServer::start(&topo.backend, 80)?;
    topo.client.run(move || {
        let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut byte = [0u8; 1];
        let mut samples = Vec::with_capacity(count);
        for i in 0..count + 100 {
            let started = Instant::now();
            s.write_all(&[i as u8])?;
            s.read_exact(&mut byte)?;
            if i >= 100 {
                samples.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples)
    })
}

/// The `p`-quantile of sorted samples.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// iperf3 for `secs` seconds, one stream: Gbit/s received.
pub fn iperf3_gbps(topo: &Topology, dst: SocketAddrV4, secs: u32) -> anyhow::Result<f64> {
    let port = dst.port().to_string();
    let mut server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.backend.name,
            "iperf3",
            "-s",
            "-1",
            "-p",
            "80",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 (cargo xtask setup installs it)")?;
    thread::sleep(Duration::from_millis(300));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.client.name, "iperf3", "-J", "-c"])
        .arg(dst.ip().to_string())
        .args(["-p", &port, "-t", &secs.to_string()])
        .output()?;
    let _ = server.kill();
    let _ = server.wait();
    ensure!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

/// Idle (idle + iowait) and steal time of one CPU, or of all (`None`), in seconds, from
/// /proc/stat. Idle time is accounted exactly on a tickless kernel (it comes from the idle
/// loop's own clock); the busy fields are only sampled at ticks and miss short softirq bursts,
/// so busy time is measured as wall time minus idle (minus steal, which is reported apart).
#[derive(Clone, Copy, Debug, Default)]
struct CpuClock {
    idle: f64,
    steal: f64,
}

fn cpu_clock(cpu: Option<usize>) -> anyhow::Result<CpuClock> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let label = cpu.map_or("cpu".to_string(), |c| format!("cpu{c}"));
    let fields: Vec<u64> = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("no {label} in /proc/stat"))?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    ensure!(fields.len() >= 8, "short {label} line in /proc/stat");
    Ok(CpuClock {
        idle: (fields[3] + fields[4]) as f64 / clock_ticks(),
        steal: fields[7] as f64 / clock_ticks(),
    })
}

/// Busy seconds of `cpus` CPUs over a window of `wall` seconds between two clock readings, and
/// the steal time in it.
fn busy_between(before: CpuClock, after: CpuClock, wall: f64, cpus: f64) -> (f64, f64) {
    let steal = after.steal - before.steal;
    ((wall * cpus - (after.idle - before.idle) - steal).max(0.0), steal)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The sink drops the benchmark's UDP at ingress (an nftables netdev hook on b0, after the
/// device counted it): no socket lookup and no ICMP port-unreachable on the measured CPU. The
/// client does the same with the answers of the reply-direction measurement.
pub fn sink_drops_udp(topo: &Topology) -> anyhow::Result<()> {
    drop_udp_at_ingress(&topo.backend, "b0", "udp dport 9")?;
    drop_udp_at_ingress(&topo.client, "c0", "udp dport >= 20000")
}

fn drop_udp_at_ingress(ns: &Netns, dev: &str, what: &str) -> anyhow::Result<()> {
    let ruleset = format!(
        "table netdev pmdrop {{\n  chain in {{ type filter hook ingress device \"{dev}\" priority 0; policy accept;\n    {what} drop\n  }}\n}}\n"
    );
    let dir = portmap_tests::TempDir::new("drop")?;
    let file = dir.path().join("drop.nft");
    std::fs::write(&file, ruleset)?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f"])
        .arg(&file)
        .output()?;
    ensure!(
        out.status.success(),
        "sink drop rule: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Function-call IPIs (x86's `CAL` line of /proc/interrupts) received so far, summed over every
/// CPU: the cross-CPU hand-offs of a window (RPS sends one whenever it queues a packet to CPU 1's
/// backlog while that is empty; a remote wake-up is another). `None` where the kernel shows no
/// such line (other architectures name their IPIs differently).
fn function_call_ipis() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    let counts = text.lines().find_map(|l| l.trim_start().strip_prefix("CAL:"))?;
    Some(
        counts
            .split_whitespace()
            .map_while(|f| f.parse::<u64>().ok())
            .sum(),
    )
}

fn rx_packets(ns: &Netns, dev: &str) -> anyhow::Result<u64> {
    let json: serde_json::Value = serde_json::from_str(&ns.ip(&["-s", "-j", "link", "show", dev])?)?;
    json[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet counter")
}

/// What one packet-generator run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PacketRun {
    pub offered_pps: Option<f64>,
    pub sent_pps: f64,
    pub forwarded_pps: f64,
    /// Busy time of CPU 1, where the router (and the sink's ingress drop) run, per forwarded
    /// packet (ns): wall time minus idle and steal time of the window.
    pub cpu_ns_per_packet: Option<f64>,
    /// The machine's busy CPU time per forwarded packet, generator included (ns).
    pub total_cpu_ns_per_packet: f64,
    /// CPU 1's steal time in the window (hypervisor), in percent: not counted as busy.
    pub steal_percent: f64,
    /// Function-call IPIs (all CPUs) per 1,000 forwarded packets (`function_call_ipis`).
    pub ipis_per_1000: Option<f64>,
}

/// 60-byte UDP frames (64 on the wire with the FCS) from `src` to `dst`, over `flows` source
/// ports counted up from `src`'s (etherparse fills in valid IP and UDP checksums).
fn frames(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flows: u16,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Vec<Vec<u8>> {
    (0..flows)
        .map(|i| {
            let mut out = Vec::new();
            etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
                .ipv4(src.0.octets(), dst.0.octets(), 64)
                .udp(src.1 + i, dst.1)
                .write(&mut out, &[0u8; 18])
                .expect("buildable");
            out
        })
        .collect()
}

fn mac_of(ns: &Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let text = ns.exec("cat", &[&format!("/sys/class/net/{dev}/address")])?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

/// An AF_PACKET socket on `dev` of the calling thread's namespace that bypasses the qdisc.
fn packet_socket(dev: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain syscalls on a socket we own; every pointer passed is valid for its length.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = nix::net::if_::if_nametoindex(dev)? as i32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        );
        ensure!(rc == 0, "bind to {dev}: {}", std::io::Error::last_os_error());
        Ok(fd)
    }
}

/// Sends `frames` round-robin in batches with sendmmsg until `deadline`, at `rate` packets per
/// second if given (else as fast as it can). Returns packets sent.
fn blast(fd: &OwnedFd, frames: &[Vec<u8>], rate: Option<f64>, deadline: Instant) -> u64 {
    const BATCH: usize = 64;
    let mut iovecs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut next = 0usize;
    while Instant::now() < deadline {
        if let Some(rate) = rate {
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if sent >= due {
                thread::sleep(Duration::from_micros(100));
                continue;
            }
        }
        // Each message points at one iovec that outlives the sendmmsg call.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|k| {
                // SAFETY: mmsghdr is plain data (integers and null pointers when zeroed).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &raw mut iovecs[(next + k) % frames.len()];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: valid socket and message array.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
            next = (next + n as usize) % frames.len();
        }
    }
    sent
}

/// Moves the router's receive work for `dev` to CPU 1: RPS for the kernel's receive path, and
/// for XDP on a veth (which runs in NAPI, by default on the sender's CPU) threaded NAPI with its
/// kernel threads pinned to CPU 1.
fn steer_router_to_cpu1(topo: &Topology, dev: &str) -> anyhow::Result<()> {
    topo.host.exec(
        "sh",
        &[
            "-c",
            &format!(
                "echo 2 > /sys/class/net/{dev}/queues/rx-0/rps_cpus; echo 1 > /sys/class/net/{dev}/threaded || true"
            ),
        ],
    )?;
    for entry in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(&format!("napi/{dev}-")) {
            continue;
        }
        if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(1)?;
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &cpus);
        }
    }
    Ok(())
}

/// UDP packets from the generator (pinned to CPU 0) for `secs` seconds, at `rate` pps or flat
/// out, counted where they arrive at the sink; the router's work is steered to CPU 1.
pub fn packet_run(
    topo: &Topology,
    dst: (Ipv4Addr, u16),
    flows: u16,
    rate: Option<f64>,
    secs: f64,
) -> anyhow::Result<PacketRun> {
    let frames = client_frames(topo, dst, flows)?;
    steer_router_to_cpu1(topo, "h0")?;
    measure((&topo.client, "c0"), (&topo.backend, "b0"), frames, rate, secs)
}

/// The reply direction: after one packet per flow from the client to `dst` (which sets up the
/// NAT variants' flows), the sink answers every flow from its port 9 to the client's port, at
/// `rate` or flat out; counted where the answers arrive at the client.
pub fn reply_run(
    topo: &Topology,
    dst: (Ipv4Addr, u16),
    flows: u16,
    rate: Option<f64>,
    secs: f64,
) -> anyhow::Result<PacketRun> {
    let forward = client_frames(topo, dst, flows)?;
    topo.client.run(move || {
        let fd = packet_socket("c0")?;
        // About one packet per flow.
        blast(
            &fd,
            &forward,
            Some(f64::from(flows) * 10.0),
            Instant::now() + Duration::from_millis(100),
        );
        Ok(())
    })?;
    thread::sleep(Duration::from_millis(200));
    let answers: Vec<Vec<u8>> = (0..flows)
        .flat_map(|i| {
            frames(
                (crate::setup::SINK, 9),
                ([198, 18, 0, 2].into(), 20_000 + i),
                1,
                [0; 6],
                [0; 6],
            )
        })
        .collect();
    let (src_mac, dst_mac) = (mac_of(&topo.backend, "b0")?, mac_of(&topo.host, "h1")?);
    let answers = answers
        .into_iter()
        .map(|mut f| {
            f[..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&src_mac);
            f
        })
        .collect();
    steer_router_to_cpu1(topo, "h1")?;
    measure((&topo.backend, "b0"), (&topo.client, "c0"), answers, rate, secs)
}

/// The client's frames to `dst` over `flows` source ports from 20000.
fn client_frames(topo: &Topology, dst: (Ipv4Addr, u16), flows: u16) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(frames(
        ([198, 18, 0, 2].into(), 20_000),
        dst,
        flows,
        mac_of(&topo.client, "c0")?,
        mac_of(&topo.host, "h0")?,
    ))
}

/// Sends `frames` from `from` (generator on CPU 0) for `secs` seconds and counts what arrives
/// at `to`; CPU 1's busy time per arriving packet is the router's cost.
fn measure(
    from: (&Netns, &'static str),
    to: (&Netns, &str),
    frames: Vec<Vec<u8>>,
    rate: Option<f64>,
    secs: f64,
) -> anyhow::Result<PacketRun> {
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let before_rx = rx_packets(to.0, to.1)?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let started = Instant::now();
    let (before_all, before_cpu1) = (cpu_clock(None)?, cpu_clock(Some(1)).ok());
    let before_ipis = function_call_ipis();
    let dev = from.1;
    let sent = from.0.run(move || {
        pin_to_cpu(0)?;
        let fd = packet_socket(dev)?;
        Ok(blast(
            &fd,
            &frames,
            rate,
            Instant::now() + Duration::from_secs_f64(secs),
        ))
    })?;
    // Let the last packets drain through the router.
    thread::sleep(Duration::from_millis(200));
    let wall = started.elapsed().as_secs_f64();
    let (busy_all, _) = busy_between(before_all, cpu_clock(None)?, wall, cpus);
    let cpu1 = before_cpu1.and_then(|b| Some(busy_between(b, cpu_clock(Some(1)).ok()?, wall, 1.0)));
    let busy_cpu1 = cpu1.map(|(busy, _)| busy);
    let ipis = function_call_ipis()
        .zip(before_ipis)
        .map(|(after, before)| after.saturating_sub(before));
    let forwarded = rx_packets(to.0, to.1)? - before_rx;
    if forwarded == 0 {
        bail!("no packet reached {}", to.1);
    }
    Ok(PacketRun {
        offered_pps: rate,
        sent_pps: sent as f64 / secs,
        forwarded_pps: forwarded as f64 / secs,
        cpu_ns_per_packet: busy_cpu1
            .filter(|_| two_cpus && rate.is_some())
            .map(|b| b * 1e9 / forwarded as f64),
        total_cpu_ns_per_packet: busy_all * 1e9 / forwarded as f64,
        steal_percent: cpu1.map_or(0.0, |(_, steal)| 100.0 * steal / wall),
        ipis_per_1000: ipis.map(|n| n as f64 * 1e3 / forwarded as f64),
    })
}

pub fn socket(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}
