//! What a daemon restart costs the traffic it carries: a TCP stream through a published port
//! exchanges a 64-byte message every millisecond while the daemon runs undisturbed, then while
//! it is stopped and started again (SIGTERM) and killed and started again (SIGKILL), each
//! `restarts` times. Reported: the longest wait for an echo in each phase (a dropped packet
//! shows as a retransmission timeout, 200 ms or more) and the messages exchanged. The restart
//! test checks that nothing breaks; how long the stream waits is measured here.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use portmap_tests::{BackendLink, Daemon, EchoServer, HOST_IP, Mode, TempDir, Topology, mode_args};

/// The stream's longest wait and messages in one phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestartPhase {
    pub phase: String,
    pub messages: u64,
    pub longest_ms: f64,
}

/// The longest wait since the last `take`.
#[derive(Default)]
struct Window {
    messages: u64,
    longest: Duration,
}

pub fn restart_stalls(mode: Mode, restarts: u32) -> anyhow::Result<Vec<RestartPhase>> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("bench-restart")?;
    let config = dir.path().join("portmap.toml");
    std::fs::write(&config, "mappings = [\"8080:198.18.1.2:80\"]\n")?;
    let config_arg = config.to_str().context("utf-8")?.to_owned();
    let mut args = mode_args(&topo, mode)?;
    args.extend(["--config", &config_arg]);
    let mut daemon = Daemon::start(&topo.host, &args)?;
    let _echo = EchoServer::start(&topo.backend, 80)?;

    let window = Arc::new(Mutex::new(Window::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (window, stop) = (window.clone(), stop.clone());
        topo.client.spawn(move || -> anyhow::Result<()> {
            let mut s = TcpStream::connect(SocketAddrV4::new(HOST_IP, 8080))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            let (message, mut echo) = ([7u8; 64], [0u8; 64]);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                s.write_all(&message)?;
                s.read_exact(&mut echo)?;
                let waited = sent.elapsed();
                let mut w = window.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                w.messages += 1;
                w.longest = w.longest.max(waited);
                drop(w);
                thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })?
    };
    let take = |phase: &str| -> anyhow::Result<RestartPhase> {
        let mut w = window.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let taken = std::mem::take(&mut *w);
        Ok(RestartPhase {
            phase: phase.to_string(),
            messages: taken.messages,
            longest_ms: taken.longest.as_secs_f64() * 1e3,
        })
    };
    let phases = (|| -> anyhow::Result<Vec<RestartPhase>> {
        thread::sleep(Duration::from_secs(1));
        take("warm-up")?;
        thread::sleep(Duration::from_secs(2));
        let mut phases = vec![take("no restart (2 s)")?];
        for _ in 0..restarts {
            daemon.stop()?;
            daemon.restart(&topo.host, &args)?;
        }
        phases.push(take(&format!("{restarts} × SIGTERM + start"))?);
        for _ in 0..restarts {
            daemon.kill()?;
            daemon.restart(&topo.host, &args)?;
        }
        phases.push(take(&format!("{restarts} × SIGKILL + start"))?);
        Ok(phases)
    })();
    stop.store(true, Ordering::Relaxed);
    let streamed = stream
        .join()
        .map_err(|_| anyhow::anyhow!("stream thread panicked"))?;
    daemon.stop()?;
    daemon.cleanup()?;
    streamed.context("the stream through the restarts")?;
    phases
}
