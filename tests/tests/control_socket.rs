//! The control socket serves clients concurrently (issue 12, part): a client that sends nothing,
//! or asks and never reads its answer, delays no other request and no signal; requests over
//! 1 MiB and malformed ones get an error line; 50 CLI clients changing mappings at once all get
//! answers and leave a consistent table; `list` and `stats` answer while a reload of 65,000
//! changed mappings runs. Needs root (run through `cargo xtask test`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap_tests::{BackendLink, Daemon, Notifications, TempDir, Topology, wait_for};

/// A daemon with `n` published ports, so that `list` answers with a few hundred KB.
fn daemon_with(topo: &Topology, n: u16) -> anyhow::Result<(Daemon, TempDir)> {
    let dir = TempDir::new("ctl")?;
    let config = dir.path().join("portmap.toml");
    let mappings: Vec<String> = (0..n)
        .map(|i| format!("\"{}:198.18.1.2:80\"", 20_000 + i))
        .collect();
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [{}]\n",
            mappings.join(", ")
        ),
    )?;
    let daemon = Daemon::start(&topo.host, &["--config", config.to_str().context("utf-8")?])?;
    Ok((daemon, dir))
}

/// Sends `request` on a new raw connection and reads the one answer line.
fn raw(daemon: &Daemon, request: &[u8]) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(&daemon.socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    // The daemon stops reading an oversized request and answers: the rest of the write fails.
    let _ = stream.write_all(request);
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

#[test]
fn silent_and_unread_clients_delay_no_other_request_and_no_signal() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let (mut daemon, _dir) = daemon_with(&topo, 5_000)?;
    // Eight clients that connect and say nothing (each used to hold the daemon for 5 s), and
    // one that asks for the whole list and never reads it (its answer does not fit the socket's
    // buffers: the daemon used to block on it for good).
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&daemon.socket))
        .collect::<Result<_, _>>()?;
    let mut unread = UnixStream::connect(&daemon.socket)?;
    unread.write_all(b"{\"request\":\"list\"}\n")?;
    // The daemon has begun the answer it cannot finish: its first bytes arrive (one is taken
    // here, the rest stays unread).
    unread.set_nonblocking(true)?;
    wait_for(
        "the daemon to begin answering the unread client",
        Duration::from_secs(10),
        || Ok(unread.read(&mut [0; 1]).is_ok_and(|n| n > 0)),
    )?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.lines().count() == 5_000,
        "list answered {} lines",
        listed.lines().count()
    );
    daemon.cli_ok(&["add", "9999:198.18.1.2:80"])?;
    daemon.cli_ok(&["stats"])?;
    // SIGTERM still stops it while both kinds of clients hang on.
    daemon.stop()?;
    drop((silent, unread));
    Ok(())
}

#[test]
fn oversized_and_malformed_requests_get_an_error_line() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let (mut daemon, _dir) = daemon_with(&topo, 1)?;
    let mut big = vec![b'x'; 2 << 20];
    big.push(b'\n');
    let answer = raw(&daemon, &big)?;
    ensure!(
        answer.contains("\"error\"") && answer.contains("larger than 1048576 bytes"),
        "{answer}"
    );
    let answer = raw(&daemon, b"\xff\xfe garbage\n")?;
    ensure!(
        answer.contains("\"error\"") && answer.contains("not UTF-8"),
        "{answer}"
    );
    let answer = raw(&daemon, b"{\"request\":\"launch\"}\n")?;
    ensure!(
        answer.contains("\"error\"") && answer.contains("launch"),
        "{answer}"
    );
    // The daemon is fine afterwards.
    ensure!(daemon.cli_ok(&["list"])?.lines().count() == 1);
    daemon.stop()
}

#[test]
fn fifty_clients_changing_mappings_at_once_leave_a_consistent_table() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let (mut daemon, _dir) = daemon_with(&topo, 1)?;
    // Each client adds its port; the odd ones delete it again.
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50u16)
            .map(|i| {
                let daemon = &daemon;
                scope.spawn(move || -> anyhow::Result<()> {
                    let spec = format!("{}:198.18.1.2:80", 30_000 + i);
                    daemon.cli_ok(&["add", &spec])?;
                    if i % 2 == 1 {
                        daemon.cli_ok(&["del", &spec])?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let listed = daemon.cli_ok(&["list"])?;
    for i in 0..50u16 {
        let present = listed.contains(&format!("0.0.0.0:{}", 30_000 + i));
        ensure!(present == (i % 2 == 0), "port {}: listed {present}", 30_000 + i);
    }
    ensure!(listed.lines().count() == 1 + 25, "{listed}");
    daemon.stop()
}

/// A reload that changes every one of 65,000 mappings does not hold up `list` and `stats`: asked
/// after the reload began (RELOADING=1), they answer with the mappings as they were before it —
/// a daemon that served them after the reload would show the new backend — and once it is done
/// `list` shows the new backend everywhere. The reload reads its config from a FIFO the test
/// writes only after both answers came, so it cannot finish first however fast it is.
#[test]
fn list_and_stats_answer_during_a_reload_of_65000_mappings() -> anyhow::Result<()> {
    const N: u32 = 65_000;
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("big-reload")?;
    let config = dir.path().join("portmap.toml");
    let render = |backend: &str| {
        let mappings: Vec<String> = (0..N).map(|i| format!("\"{}:{backend}:80\"", 500 + i)).collect();
        format!(
            "interfaces = [\"h0\"]\nattach = \"tc\"\nmappings = [{}]\n[limits]\nmax_mappings = {N}\n",
            mappings.join(", ")
        )
    };
    std::fs::write(&config, render("198.18.1.2"))?;
    let notifications = Notifications::bind(dir.path())?;
    let notify = notifications.path.to_str().context("utf-8")?.to_owned();
    let daemon = Daemon::start_with_env(
        &topo.host,
        &["--config", config.to_str().context("utf-8")?],
        &[("NOTIFY_SOCKET", &notify)],
    )?;
    notifications.next_with_in("READY=1", Duration::from_secs(60))?;
    std::fs::remove_file(&config)?;
    nix::unistd::mkfifo(
        &config,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )?;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let reload = scope.spawn(|| daemon.cli_ok(&["reload"]));
        notifications.next_with_in("RELOADING=1", Duration::from_secs(60))?;
        // Both asked at once (each takes the CLI a while to print at this size).
        let list = scope.spawn(|| daemon.cli_ok(&["list", "--json"]));
        let stats = daemon.stats();
        let listed = list.join().map_err(|_| anyhow::anyhow!("list thread panicked"));
        // Released whatever the answers were, so that the reload (and this scope) ends.
        release_fifo(&config, &render("198.18.1.3"))?;
        let message = reload
            .join()
            .map_err(|_| anyhow::anyhow!("reload thread panicked"))??;
        let (listed, stats) = (listed??, stats?);
        ensure!(
            !listed.contains("198.18.1.3") && listed.matches("198.18.1.2").count() == N as usize,
            "list answered after the reload, not during it"
        );
        ensure!(
            stats.mappings.len() == N as usize
                && stats
                    .mappings
                    .iter()
                    .all(|m| m.mapping.to_string().contains("198.18.1.2")),
            "stats answered after the reload, not during it"
        );
        ensure!(message.contains(&format!("{N} updated")), "{message}");
        Ok(())
    })?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.lines().count() == N as usize && listed.lines().all(|l| l.starts_with("198.18.1.3:80")),
        "after the reload"
    );
    Ok(())
}

/// Writes `text` into the FIFO at `path` once its reader (the reloading daemon) has opened it.
fn release_fifo(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut reader_present = None;
    wait_for("the reload to open its config", Duration::from_secs(60), || {
        // Without a reader a non-blocking open for writing fails (ENXIO) instead of waiting.
        reader_present = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .ok();
        Ok(reader_present.is_some())
    })?;
    let mut fifo = std::fs::OpenOptions::new().write(true).open(path)?;
    drop(reader_present);
    fifo.write_all(text.as_bytes())?;
    Ok(())
}
