//! Real Docker Engine (Debian's dockerd 20.10 with its own containerd) inside a test's host
//! namespace, with a private data root, exec root, socket and bridge subnet in 198.18.0.0/15 (the
//! recipe of ../shared/TOOLCHAIN.md). There is no registry: the image is imported from a rootfs
//! of busybox-static's /bin/busybox.
//!
//! dockerd runs through `nsenter --net` (not `ip netns exec`, which hides the cgroup mounts it
//! needs) from a shell that first moves itself into the daemon's cgroup, and its containers get a
//! cgroup parent inside it: the daemon's socket hooks see dockerd's binds and the containers'
//! connections exactly as on a host whose daemon serves every process (`cgroup = "/"`).
//! `--userland-proxy=false` always; `--iptables` (with its masquerade) as the test asks. Dropping
//! it removes every container, network and image, stops dockerd (which stops its containerd) and
//! removes its mounts and cgroups.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::{
    BUSYBOX_IMAGE, Cgroup, Netns, TempDir, busybox_rootfs_tar, remove_cgroups, unmount_under, wait_for,
};

/// The image every container runs: busybox (sh, httpd, nc, ...).
pub const DOCKER_IMAGE: &str = BUSYBOX_IMAGE;

/// The default bridge's gateway (`--bip`) and the pool user networks come from.
pub const DOCKER_BIP: &str = "198.18.60.1/24";
/// The default bridge's IPv6 subnet with `ipv6` (`--fixed-cidr-v6`).
pub const DOCKER_V6: &str = "fd00:60::/64";

/// How a test's dockerd is configured (`--userland-proxy=false` always).
#[derive(Clone, Copy, Debug, Default)]
pub struct DockerdOptions {
    /// `--iptables` and `--ip-masq`: Docker's NAT, firewall and masquerade rules.
    pub iptables: bool,
    /// `--ipv6 --fixed-cidr-v6 DOCKER_V6`: dual-stack containers on the default bridge.
    pub ipv6: bool,
    /// dockerd and its containers outside the daemon's cgroup (its socket hooks do not see
    /// them), as on a host whose daemon serves a narrower `cgroup`.
    pub outside_daemon_cgroup: bool,
}
const DOCKER_POOL: &str = "base=198.18.96.0/20,size=24";

pub struct Dockerd {
    dir: TempDir,
    child: Option<Child>,
    netns: PathBuf,
    procs: PathBuf,
    /// The containers' cgroup parent (`--cgroup-parent`), inside the daemon's cgroup.
    parent: String,
    daemon_cgroup: String,
    pub options: DockerdOptions,
}

impl Dockerd {
    /// Starts a private dockerd in `host`'s namespace whose processes run in `cgroup`, and
    /// imports the busybox image.
    pub fn start(host: &Netns, cgroup: &Cgroup, options: DockerdOptions) -> anyhow::Result<Self> {
        let dir = TempDir::new("docker")?;
        let tar = busybox_rootfs_tar(dir.path())?;
        let base = if options.outside_daemon_cgroup {
            String::new()
        } else {
            cgroup.path.display().to_string()
        };
        let mut docker = Self {
            parent: format!("{base}/{}", crate::unique("docker")),
            daemon_cgroup: cgroup.path.display().to_string(),
            dir,
            child: None,
            netns: host.path(),
            procs: cgroup.procs(),
            options,
        };
        docker.spawn()?;
        docker.ok(&[
            "import",
            "--change",
            "CMD [\"/bin/sh\"]",
            tar.to_str().context("utf-8")?,
            DOCKER_IMAGE,
        ])?;
        Ok(docker)
    }

    /// The API socket, as the daemon's `--docker` takes it.
    #[must_use]
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// The test's directory (for compose files).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `program ARGS` in the namespace and the cgroup, talking to this dockerd.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .args([
                "sh",
                "-c",
                "[ -z \"$0\" ] || echo $$ > \"$0\" || exit 1; exec \"$@\"",
            ])
            .arg(if self.options.outside_daemon_cgroup {
                Path::new("")
            } else {
                &self.procs
            })
            .arg(program)
            .args(args)
            .env("DOCKER_HOST", self.url())
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.command("docker", args)
            .output()
            .context("running docker (package docker.io; `cargo xtask setup` installs it)")
    }

    /// `docker ARGS`, which must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args)?;
        ensure!(
            out.status.success(),
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts dockerd and waits until it answers.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let root = self.dir.path();
        let at = |p: &str| root.join(p).display().to_string();
        let iptables = format!("--iptables={}", self.options.iptables);
        let masquerade = format!("--ip-masq={}", self.options.iptables);
        let parent = format!("--cgroup-parent={}", self.parent);
        let host = format!("unix://{}", self.socket().display());
        let (data, exec, pidfile) = (at("data"), at("exec"), at("docker.pid"));
        let log = std::fs::File::create(root.join("dockerd.log"))?;
        let mut args = vec![
            "--data-root",
            &data,
            "--exec-root",
            &exec,
            "--pidfile",
            &pidfile,
            "-H",
            &host,
            "--bip",
            DOCKER_BIP,
            "--default-address-pool",
            DOCKER_POOL,
            &iptables,
            "--ip6tables=false",
            &masquerade,
            "--userland-proxy=false",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
            &parent,
            "--default-ulimit",
            "nofile=20000:20000",
            "--default-ulimit",
            "nproc=32768:32768",
        ];
        if self.options.ipv6 {
            args.extend(["--ipv6", "--fixed-cidr-v6", DOCKER_V6]);
        }
        let child = self
            .command("dockerd", &args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (package docker.io; `cargo xtask setup` installs it)")?;
        self.child = Some(child);
        wait_for(
            "dockerd to answer",
            crate::slowdown(Duration::from_secs(60)),
            || {
                if let Some(child) = self.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    anyhow::bail!("dockerd exited ({status}): {}", self.log());
                }
                Ok(self.output(&["version"])?.status.success())
            },
        )
    }

    /// dockerd's log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Stops dockerd (SIGTERM: it stops its containers and its containerd) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let stopped = wait_for(
            "dockerd to stop",
            crate::slowdown(Duration::from_secs(30)),
            || Ok(child.try_wait()?.is_some()),
        );
        if stopped.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        stopped
    }

    /// Stops dockerd and starts it again (its containers stopped with it; those with a restart
    /// policy start again).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let ids = self.ok(&["ps", "-aq"]).unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.output(&[&["rm", "--force"][..], &ids].concat());
            }
            let _ = self.output(&["network", "prune", "--force"]);
        }
        let _ = self.stop();
        // A containerd that outlived dockerd (killed) goes by its pidfile.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("exec/containerd/containerd.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        unmount_under(self.dir.path());
        // (The daemon's own cgroup2 directory is not empty yet: only its v1 copies go.)
        remove_cgroups(&[&self.parent, &self.daemon_cgroup]);
    }
}
