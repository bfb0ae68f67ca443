//! Nothing acknowledged is lost (issue 25): with the state file on a full disk (a tiny tmpfs the
//! test mounts), every kind of change — `add`, `del`, `update`, a container's publish and
//! unpublish (CNI ADD/DEL) — is refused with the reason and undone in the kernel, and what was
//! acknowledged before survives a restart; a start that cannot save leaves the adopted datapath
//! as it found it; a torn journal record in the middle of the journal (an earlier version
//! appended after a write the disk cut short) loses nothing written after it. Needs root (run
//! through `cargo xtask test`).

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, ensure};
use portmap::api::control::{self, Request, Response};
use portmap_tests::{
    BackendLink, Daemon, EchoServer, Mode, TempDir, Topology, mode_args, start_daemon, tcp_connect_result,
    tcp_exchange,
};

/// A tmpfs of a few pages, mounted for the test's state file, unmounted on drop.
struct TinyDisk {
    dir: TempDir,
}

impl TinyDisk {
    fn new() -> anyhow::Result<Self> {
        let dir = TempDir::new("disk")?;
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k,mode=0700"),
        )
        .context("mounting a tmpfs for the state file")?;
        Ok(Self { dir })
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    fn filler(&self) -> PathBuf {
        self.dir.path().join("filler")
    }

    /// Fills the disk to the last byte.
    fn fill(&self) -> anyhow::Result<()> {
        let mut file = fs::File::create(self.filler())?;
        let block = vec![0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // The last partial block, byte by byte.
        while file.write(&[0]).is_ok_and(|n| n == 1) {}
        Ok(())
    }

    fn free(&self) -> anyhow::Result<()> {
        Ok(fs::remove_file(self.filler())?)
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

const BACKEND: &str = "198.18.1.2";

fn host(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1], port))
}

/// A wire client's bytes come back from the backend's echo server through `port`.
fn forwards(topo: &Topology, port: u16) -> anyhow::Result<bool> {
    Ok(tcp_exchange(&topo.client, host(port), b"durable".to_vec()).is_ok_and(|got| got == b"durable"))
}

/// A daemon (TC) whose state file is on `disk`.
fn daemon_on(topo: &Topology, disk: &TinyDisk, extra: &[&str]) -> anyhow::Result<Daemon> {
    let mut daemon = start_daemon(topo, Mode::Tc, &[])?;
    daemon.stop()?;
    fs::remove_file(&daemon.state_file).ok();
    daemon.state_file = disk.state_file();
    let mut args = mode_args(topo, Mode::Tc)?;
    args.extend_from_slice(extra);
    daemon.restart(&topo.host, &args)?;
    Ok(daemon)
}

/// `portmap ARGS` on a full disk: Ok(true) acknowledged, Ok(false) refused because it could not
/// be saved (anything else is an error).
fn on_full_disk(daemon: &Daemon, args: &[&str]) -> anyhow::Result<bool> {
    let out = daemon.cli(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(true);
    }
    ensure!(
        stderr.contains("could not be saved") && stderr.contains("No space left on device"),
        "portmap {} on a full disk: rc {:?}, {stderr}",
        args.join(" "),
        out.status.code()
    );
    Ok(false)
}

fn refused_unsaved(daemon: &Daemon, args: &[&str]) -> anyhow::Result<()> {
    ensure!(
        !on_full_disk(daemon, args)?,
        "portmap {} was acknowledged on a full disk",
        args.join(" ")
    );
    Ok(())
}

/// The CNI plugin's request, answered.
fn cni(daemon: &Daemon, request: &Request) -> anyhow::Result<Result<(), String>> {
    Ok(match control::call(&daemon.socket, request)? {
        Response::Ok { .. } => Ok(()),
        Response::Error { message } => Err(message),
        other => anyhow::bail!("{other:?}"),
    })
}

#[test]
fn every_change_on_a_full_disk_is_refused_and_undone_and_what_was_acknowledged_survives() -> anyhow::Result<()>
{
    let topo = Topology::new(BackendLink::Veth)?;
    let disk = TinyDisk::new()?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let mut daemon = daemon_on(&topo, &disk, &[])?;
    let mut expected: BTreeSet<u16> = BTreeSet::from([8080]);
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    // Spare mappings, to be deleted while the disk is full.
    let spares: Vec<u16> = (8100..8120).collect();
    for port in &spares {
        daemon.cli_ok(&["add", &format!("{port}:{BACKEND}:80")])?;
        expected.insert(*port);
    }
    // Containers' ports (portmap-cni's ADD): one to keep, spares to remove on the full disk.
    let container = |owner: &str, port: u16| Request::Publish {
        owner: owner.into(),
        specs: vec![format!("{port}:{BACKEND}:80")],
        allow: vec![],
    };
    cni(&daemon, &container("net/c1/eth0", 8082))?.map_err(anyhow::Error::msg)?;
    expected.insert(8082);
    let spare_containers: Vec<(String, u16)> =
        (0..20).map(|i| (format!("net/s{i:02}/eth0"), 8300 + i)).collect();
    for (owner, port) in &spare_containers {
        cni(&daemon, &container(owner, *port))?.map_err(anyhow::Error::msg)?;
        expected.insert(*port);
    }
    ensure!(forwards(&topo, 8080)?, "8080 before the disk filled");

    // A full tmpfs still takes a line or two into the journal's last page: what it takes is
    // acknowledged (and must survive); the first add and the first del it cannot take are
    // refused, after which none of the longer or equal records below fits.
    disk.fill()?;
    let mut refused_add = false;
    for port in 8200..8240 {
        if on_full_disk(&daemon, &["add", &format!("{port}:{BACKEND}:80")])? {
            expected.insert(port);
        } else {
            ensure!(
                tcp_connect_result(&topo.client, host(port))?.is_err(),
                "the refused add of {port} forwards"
            );
            refused_add = true;
            break;
        }
    }
    ensure!(refused_add, "no add was refused on the full disk");
    let mut refused_del = false;
    for port in &spares {
        if on_full_disk(&daemon, &["del", &format!("{port}:{BACKEND}:80")])? {
            expected.remove(port);
        } else {
            ensure!(
                forwards(&topo, *port)?,
                "the refused del of {port} took its port away"
            );
            refused_del = true;
            break;
        }
    }
    ensure!(refused_del, "no del was refused on the full disk");
    let listed = daemon.cli_ok(&["list"])?;

    refused_unsaved(&daemon, &["add", "8081:198.18.1.2:80"])?;
    refused_unsaved(&daemon, &["del", "8080:198.18.1.2:80"])?;
    refused_unsaved(&daemon, &["update", "8080:198.18.1.3:80"])?;
    // A container's publish, as portmap-cni asks for it (ADD).
    let answer = cni(&daemon, &container("net/c2/eth0", 8083))?;
    ensure!(
        answer.as_ref().is_err_and(|m| m.contains("could not be saved")),
        "CNI ADD on a full disk: {answer:?}"
    );
    ensure!(daemon.cli_ok(&["list"])? == listed, "a refused change is listed");
    ensure!(forwards(&topo, 8080)?, "8080 lost its backend");
    for port in [8081, 8083] {
        ensure!(
            tcp_connect_result(&topo.client, host(port))?.is_err(),
            "{port} forwards although it was refused"
        );
    }
    // CNI DEL (portmap-cni's unpublish): a spare's may still fit, then none does.
    let unpublish = |owner: &str| Request::Unpublish { owner: owner.into() };
    for (owner, port) in &spare_containers {
        if cni(&daemon, &unpublish(owner))?.is_ok() {
            expected.remove(port);
        } else {
            break;
        }
    }
    let answer = cni(&daemon, &unpublish("net/c1/eth0"))?;
    ensure!(
        answer.as_ref().is_err_and(|m| m.contains("could not be saved")),
        "CNI DEL on a full disk: {answer:?}"
    );
    ensure!(
        forwards(&topo, 8082)?,
        "the container's port went although DEL was refused"
    );
    disk.free()?;

    // Everything acknowledged is there after a restart, and nothing else; it forwards.
    daemon.stop()?;
    daemon.restart(&topo.host, &mode_args(&topo, Mode::Tc)?)?;
    let listed: BTreeSet<u16> = daemon
        .cli_ok(&["list"])?
        .lines()
        .filter_map(|l| {
            l.split("-> 0.0.0.0:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    ensure!(
        listed == expected,
        "after the restart: {listed:?}, acknowledged: {expected:?}"
    );
    for port in [8080, 8082] {
        ensure!(
            forwards(&topo, port)?,
            "{port} does not forward after the restart"
        );
    }
    Ok(())
}

#[test]
fn a_start_that_cannot_save_leaves_the_adopted_datapath_as_it_found_it() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let disk = TinyDisk::new()?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let mut daemon = daemon_on(&topo, &disk, &[])?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    daemon.stop()?;

    let config_dir = TempDir::new("config")?;
    let config = config_dir.path().join("portmap.toml");
    fs::write(&config, format!("mappings = [\"9090:{BACKEND}:80\"]\n"))?;
    let config_arg = config.to_str().context("utf-8")?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    args.extend(["--config", config_arg]);
    disk.fill()?;
    let failed = daemon
        .restart(&topo.host, &args)
        .err()
        .context("the daemon started without saving")?;
    ensure!(
        format!("{failed:#}").contains("left as it was found"),
        "{failed:#}"
    );
    ensure!(forwards(&topo, 8080)?, "the failed start took 8080 away");
    ensure!(
        tcp_connect_result(&topo.client, host(9090))?.is_err(),
        "the failed start left the config's 9090 in the kernel"
    );

    disk.free()?;
    daemon.restart(&topo.host, &args)?;
    let listed = daemon.cli_ok(&["list"])?;
    ensure!(
        listed.contains("0.0.0.0:8080") && listed.contains("0.0.0.0:9090"),
        "{listed}"
    );
    ensure!(
        forwards(&topo, 8080)? && forwards(&topo, 9090)?,
        "after the start"
    );
    Ok(())
}

/// The journal of an earlier version after a full disk: a record cut short, the next append on
/// the same line, more lines after it. The start restores every record but the torn one (whose
/// change was never acknowledged).
#[test]
fn a_torn_record_in_the_middle_of_the_journal_loses_nothing_after_it() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    for port in [8081, 8082, 8083, 8084] {
        daemon.cli_ok(&["add", &format!("{port}:{BACKEND}:80")])?;
    }
    daemon.stop()?;
    let journal = journal_of(&daemon.state_file);
    let text = fs::read_to_string(&journal)?;
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() == 4, "journal: {text}");
    let torn = &lines[1][..lines[1].len() / 2];
    fs::write(
        &journal,
        format!("{}\n{torn}{}\n{}\n", lines[0], lines[2], lines[3]),
    )?;
    daemon.restart(&topo.host, &mode_args(&topo, Mode::Tc)?)?;
    let listed = daemon.cli_ok(&["list"])?;
    for port in [8081, 8083, 8084] {
        ensure!(listed.contains(&format!(":{port}")), "{port} lost: {listed}");
    }
    ensure!(!listed.contains(":8082"), "the torn record came back: {listed}");
    ensure!(daemon.log().contains("torn"), "{}", daemon.log());
    Ok(())
}

/// Slots of removed mappings drain at the next expiry pass (here an hour away): with
/// `max_mappings = 100`, a reload 60 → 30 → 60 and then 40 adds fit exactly, and only the 101st
/// mapping is refused as the table being full.
#[test]
fn removed_mappings_never_make_the_table_look_full() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let dir = TempDir::new("capacity")?;
    let config = dir.path().join("portmap.toml");
    let write = |count: u16| {
        let mappings: Vec<String> = (0..count)
            .map(|i| format!("\"{}:{BACKEND}:80\"", 9000 + i))
            .collect();
        fs::write(
            &config,
            format!(
                "mappings = [{}]\n[limits]\nmax_mappings = 100\n[timeouts]\ngc_interval_seconds = 3600\n",
                mappings.join(", ")
            ),
        )
    };
    write(60)?;
    let config_arg = config.to_str().context("utf-8")?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    args.extend(["--config", config_arg]);
    let daemon = Daemon::start(&topo.host, &args)?;
    write(30)?;
    daemon.cli_ok(&["reload"])?;
    write(60)?;
    daemon.cli_ok(&["reload"])?;
    for i in 0..40 {
        daemon
            .cli_ok(&["add", &format!("{}:{BACKEND}:80", 9500 + i)])
            .with_context(|| format!("add {} of 40 with 60 mappings of 100", i + 1))?;
    }
    let out = daemon.cli(&["add", &format!("9600:{BACKEND}:80")])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("full (100, limits.max_mappings)"),
        "the 101st mapping: {stderr}"
    );
    ensure!(daemon.cli_ok(&["list"])?.lines().count() == 100, "listed");
    Ok(())
}

/// The state file gone while the datapath stays (deleted by hand, or another datapath's): the
/// next start rebuilds the mappings from the pinned maps, and they keep forwarding, listed as
/// owned by `unknown` (`unknown-container` for a container's); the config asking for one takes it
/// over, and what was rebuilt is saved for the start after.
#[test]
fn a_lost_state_file_is_rebuilt_from_the_pinned_maps() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let _echo = EchoServer::start(&topo.backend, 80)?;
    let mut daemon = start_daemon(&topo, Mode::Tc, &[])?;
    daemon.cli_ok(&["add", &format!("8080:{BACKEND}:80")])?;
    daemon.cli_ok(&["add", &format!("8081:{BACKEND}:80")])?;
    daemon.cli_ok(&["add", &format!("8082:{BACKEND}:80,198.18.1.3:80@3")])?;
    cni(
        &daemon,
        &Request::Publish {
            owner: "net/c1/eth0".into(),
            specs: vec![format!("8083:{BACKEND}:80")],
            allow: vec![],
        },
    )?
    .map_err(anyhow::Error::msg)?;
    daemon.stop()?;
    for file in [daemon.state_file.clone(), journal_of(&daemon.state_file)] {
        fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    }
    ensure!(forwards(&topo, 8081)?, "no daemon: the datapath forwards");

    let dir = TempDir::new("lost")?;
    let config = dir.path().join("portmap.toml");
    fs::write(&config, format!("mappings = [\"8080:{BACKEND}:80\"]\n"))?;
    let mut args = mode_args(&topo, Mode::Tc)?;
    args.extend(["--config", config.to_str().context("utf-8")?]);
    daemon.restart(&topo.host, &args)?;
    ensure!(
        daemon.log().contains("rebuilt from the pinned maps"),
        "{}",
        daemon.log()
    );
    let expect = |listed: &str| -> anyhow::Result<()> {
        for (port, owner) in [
            (8080, "config"),
            (8081, "unknown"),
            (8082, "unknown"),
            (8083, "unknown-container"),
        ] {
            ensure!(
                listed
                    .lines()
                    .any(|l| l.contains(&format!("0.0.0.0:{port} ")) && l.ends_with(&format!(" {owner}"))),
                "{port} owned by {owner}: {listed}"
            );
        }
        Ok(())
    };
    expect(&daemon.cli_ok(&["list"])?)?;
    let json: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["list", "--json"])?)?;
    let weights: Vec<u64> = json["mappings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["host_ports"]["start"] == 8082)
        .and_then(|m| m["backends"].as_array())
        .map(|b| b.iter().filter_map(|b| b["weight"].as_u64()).collect())
        .unwrap_or_default();
    ensure!(weights == [1, 3], "the rebuilt weights: {weights:?}");
    for port in [8080, 8081, 8083] {
        ensure!(forwards(&topo, port)?, "{port} after the rebuild");
    }
    daemon.stop()?;
    daemon.restart(&topo.host, &args)?;
    expect(&daemon.cli_ok(&["list"])?)?;
    Ok(())
}

fn journal_of(state_file: &Path) -> PathBuf {
    let mut name = state_file.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    state_file.with_file_name(name)
}
