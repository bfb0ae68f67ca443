//! Real podman (4.3, CNI network backend, runc) inside a test's host namespace, with a private
//! configuration: storage, run state, network configurations and CNI plugin directories all
//! under the test's own directory (the recipe of ../shared/TOOLCHAIN.md). There is no registry:
//! the image is imported from a rootfs of busybox-static's /bin/busybox.
//!
//! Every podman command runs through `nsenter --net` (not `ip netns exec`, which hides the cgroup
//! mounts podman needs) from a shell that first moves itself into the given cgroup: conmon, which
//! podman forks and which binds every published host port as its reservation, stays there, so
//! the daemon's socket hooks on that cgroup see it exactly as they see it on a host whose daemon
//! serves every process (`cgroup = "/"`); containers get a cgroup parent inside it for the same
//! reason. Dropping it removes every container, network, image and cgroup it made.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, ensure};

use crate::{
    BUSYBOX_IMAGE, Cgroup, Netns, TempDir, busybox_rootfs_tar, portmap_cni_bin, remove_cgroups, unmount_under,
};

/// The image every container runs: busybox (sh, httpd, nc, ...).
pub const PODMAN_IMAGE: &str = BUSYBOX_IMAGE;

pub struct Podman {
    dir: TempDir,
    /// The cgroup parent of this podman's containers (`podman run --cgroup-parent`): inside the
    /// daemon's cgroup, so that container processes are served by its socket hooks as on a host
    /// whose daemon serves every process; removed from every hierarchy on drop (podman's
    /// default, /libpod_parent, would stay behind).
    parent: String,
    /// The daemon's cgroup, which the parent's creation makes in the v1 hierarchies too.
    daemon_cgroup: String,
    netns: PathBuf,
    procs: PathBuf,
    /// The network configuration directory (`network_config_dir`): conflists land here.
    pub conf_dir: PathBuf,
}

impl Podman {
    /// A private podman in `host`'s namespace whose processes start in `cgroup`.
    pub fn new(host: &Netns, cgroup: &Cgroup) -> anyhow::Result<Self> {
        let dir = TempDir::new("podman")?;
        let root = dir.path().to_owned();
        let conf_dir = root.join("net.d");
        let plugins = root.join("cni-bin");
        for sub in ["net.d", "cni-bin", "run", "graph", "tmp", "static", "volumes"] {
            fs::create_dir_all(root.join(sub))?;
        }
        fs::copy(portmap_cni_bin()?, plugins.join("portmap-cni"))?;
        let path = |p: &str| root.join(p).display().to_string();
        fs::write(
            root.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
                 cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\ndefault_subnet = \"198.18.70.0/24\"\n\
                 default_subnet_pools = [{{\"base\" = \"198.18.72.0/21\", \"size\" = 24}}]\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\ntmp_dir = \"{}\"\n\
                 static_dir = \"{}\"\nvolume_path = \"{}\"\nevents_logger = \"file\"\n",
                conf_dir.display(),
                plugins.display(),
                path("tmp"),
                path("static"),
                path("volumes"),
            ),
        )?;
        fs::write(
            root.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                path("run"),
                path("graph"),
            ),
        )?;
        let tar = busybox_rootfs_tar(&root)?;
        let podman = Self {
            parent: format!("{}/{}", cgroup.path.display(), crate::unique("podman")),
            daemon_cgroup: cgroup.path.display().to_string(),
            dir,
            netns: host.path(),
            procs: cgroup.procs(),
            conf_dir,
        };
        podman.ok(&[
            "import",
            "--change",
            "CMD [\"/bin/sh\"]",
            tar.to_str().context("utf-8")?,
            PODMAN_IMAGE,
        ])?;
        Ok(podman)
    }

    /// `podman ARGS` with this configuration, in the namespace and the cgroup.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .args(["sh", "-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(&self.procs)
            .arg(program)
            .args(args)
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.path().join("storage.conf"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.command("podman", args)
            .output()
            .context("running podman (package podman; `cargo xtask setup` installs it)")
    }

    /// `podman ARGS`, which must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args)?;
        ensure!(
            out.status.success(),
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `podman run ARGS` (detached, in this podman's cgroup parent); the container's ID.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_with(&["-d"], args)
    }

    /// `podman run --rm ARGS` in the foreground (in this podman's cgroup parent); its output.
    pub fn run_once(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_with(&["--rm"], args)
    }

    fn run_with(&self, how: &[&str], args: &[&str]) -> anyhow::Result<String> {
        let parent = format!("--cgroup-parent={}", self.parent);
        let all = [&["run", &parent][..], how, args].concat();
        self.ok(&all)
    }

    /// The test's directory (for compose files).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers (their CNI DEL runs), then networks, then images and storage.
        let _ = self.output(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.output(&["network", "prune", "--force"]);
        let _ = self.output(&["system", "reset", "--force"]);
        // The containers' cgroup parent and its conmon directory, and podman's default ones
        // (libpod_parent/conmon: shared, removed when empty), in the cgroup2 tree and in each v1
        // hierarchy (the daemon's own cgroup2 directory is not empty yet: only its v1 copies go).
        let conmon = format!("{}/conmon", self.parent);
        remove_cgroups(&[
            &conmon,
            &self.parent,
            &self.daemon_cgroup,
            "libpod_parent/conmon",
            "libpod_parent",
        ]);
        // Whatever is still mounted under the directory (overlay layers, shm) goes with it.
        unmount_under(self.dir.path());
    }
}
