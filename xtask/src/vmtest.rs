//! `cargo xtask vmtest`: the golden-packet suite and end-to-end tests on Debian 12's kernel (6.1)
//! under qemu. There is no usable KVM on these machines, so qemu emulates the CPU (TCG).
//!
//! The kernel is Debian's `linux-image-6.1.0-*-amd64` package, downloaded with apt and unpacked
//! under `target/vmtest/`. The guest boots a small initramfs this task writes itself (busybox and
//! the 9p modules), mounts the host's root filesystem read-only over virtio-9p, loads the kernel
//! modules the tests need from the unpacked package, and runs the test binaries built on the host
//! in a chroot of it (tmpfs over /tmp, /run and the target's tmp dir). The console output comes
//! back on qemu's stdout; this task prints it and one `N passed, N failed` line.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, run, say, tally::Tally, target_dir, workspace_root};

/// How long the whole guest run may take before qemu is killed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Modules the guest loads before it can mount the host's filesystem (in the initramfs): the
/// virtio PCI transport and 9p over it (all modules in Debian's kernel).
const BOOT_MODULES: [&str; 3] = ["virtio_pci", "9pnet_virtio", "9p"];
/// Modules the tests need (loaded from the unpacked package once the host fs is mounted);
/// nf_tables so that the e2e check "portmap installed no netfilter rule" can list the ruleset
/// (after crc32c_generic: libcrc32c, which nf_tables needs, has it as a soft dependency that
/// modules.dep does not list, and fails to load without it).
/// nf_conntrack, nf_nat, nft_chain_nat, nft_compat and xt_MASQUERADE for the masquerade test's
/// rules (iptables-nft runs the MASQUERADE target through nft_compat).
const TEST_MODULES: [&str; 11] = [
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "crc32c_generic",
    "nf_tables",
    "nf_conntrack",
    "nf_nat",
    "nft_chain_nat",
    "nft_compat",
    "xt_MASQUERADE",
];

/// The test binaries and filters run in the guest, with their arguments.
const GUEST_TESTS: [(&str, &[&str]); 5] = [
    ("golden", &["--test-threads=1"]),
    (
        "e2e",
        &[
            "--test-threads=1",
            "--exact",
            "lifecycle_tc_veth_backend",
            "lifecycle_tc_bridge_backend",
            "crash_keeps_traffic_flowing_and_restart_adopts",
        ],
    ),
    (
        "local_path",
        &["--test-threads=1", "tc_reaches", "partial_checksums"],
    ),
    ("masquerade", &["--test-threads=1", "tc_replies"]),
    ("allow_lists", &["--test-threads=1", "drops_outside_tc"]),
];

pub fn vmtest(package: Option<String>, fuzz_packets: u64, filter: Option<&str>) -> anyhow::Result<()> {
    let dir = target_dir().join("vmtest");
    fs::create_dir_all(&dir)?;
    let package = match package {
        Some(p) => p,
        None => newest_package()?,
    };
    let root = unpack_kernel(&dir, &package)?;
    let release = fs::read_dir(root.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules/RELEASE")?;
    // The package ships no modules.dep (its postinst runs depmod).
    if !root
        .join("lib/modules")
        .join(&release)
        .join("modules.dep")
        .exists()
    {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    }
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let modules = root.join("lib/modules").join(&release);
    say(&format!("guest kernel: {package} ({release})"));

    let tests = build_tests()?;
    let portmap = crate::build_portmap()?;
    let initrd = dir.join("initrd.cpio");
    write_initramfs(&initrd, &modules)?;
    let script_path = dir.join("guest.sh");
    let guest = |tests: &[(String, PathBuf)]| -> anyhow::Result<Guest> {
        let script = guest_script(&modules, &portmap, tests, fuzz_packets, filter)?;
        fs::write(&script_path, script)?;
        fs::set_permissions(&script_path, fs::Permissions::from_mode(0o755))?;
        let started = Instant::now();
        let guest = boot(&vmlinuz, &initrd, &script_path)?;
        println!(
            "vmtest: guest kernel {}, {:.0} s",
            guest.kernel.as_deref().unwrap_or("unknown"),
            started.elapsed().as_secs_f64()
        );
        Ok(guest)
    };
    let Guest {
        mut tally,
        kernel,
        stalled,
    } = guest(&tests)?;
    // A binary that failed while the guest's kernel reported a stalled CPU ran on an emulated
    // CPU the host starved (seen in CI: a soft lockup and an RCU stall of 20-60 s in whatever
    // task was current, and a daemon that could not start within its 200 s): it runs once more
    // in a new guest. A failure without a stall, or a second failure, fails the run.
    let again = run_again(&tests, &tally, &stalled);
    if !again.is_empty() {
        let names: Vec<_> = again.iter().map(|(n, _)| n.as_str()).collect();
        println!(
            "vmtest: {} failed while the guest's kernel reported a CPU stall; running again",
            names.join(", ")
        );
        let retry = guest(&again)?;
        tally.binaries.retain(|b| !names.contains(&b.name.as_str()));
        tally.binaries.extend(retry.tally.binaries);
    }
    // Without a filter every listed test binary must exit 0 having passed at least one test (a
    // test renamed away from its `--exact` name would otherwise run nothing and pass).
    let judged = tally.report(filter.is_none());
    ensure!(
        kernel.is_some(),
        "the guest did not report its kernel (it did not boot)"
    );
    judged
}

/// The newest `linux-image-6.1.0-N-amd64` apt knows (after `apt-get update` if it knows none).
fn newest_package() -> anyhow::Result<String> {
    let search = || {
        crate::output(
            "apt-cache",
            &["search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"],
        )
        .unwrap_or_default()
    };
    let mut out = search();
    if out.trim().is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        out = search();
    }
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|name| {
            name.trim_start_matches("linux-image-6.1.0-")
                .trim_end_matches("-amd64")
                .parse::<u32>()
                .unwrap_or(0)
        })
        .map(str::to_owned)
        .context("apt knows no linux-image-6.1.0-*-amd64 package (Debian 12 sources)")
}

/// Downloads and unpacks `package` once; returns the unpacked root.
fn unpack_kernel(dir: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let root = dir.join(package);
    if root.join("lib/modules").is_dir() {
        return Ok(root);
    }
    let downloads = dir.join("debs");
    fs::create_dir_all(&downloads)?;
    say(&format!("downloading {package}"));
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&downloads))?;
    let deb = fs::read_dir(&downloads)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .context("apt-get download left no .deb")?;
    let partial = dir.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &root)?;
    Ok(root)
}

/// Builds the guest's test binaries; returns (name, executable).
fn build_tests() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args(["test", "--no-run", "--message-format=json", "-p", "portmap-tests"]);
    for (name, _) in GUEST_TESTS {
        cmd.args(["--test", name]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    ensure!(out.status.success(), "building the test binaries failed");
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            msg.pointer("/target/name").and_then(|v| v.as_str()),
            msg.get("executable").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        if GUEST_TESTS.iter().any(|(t, _)| *t == name) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    ensure!(
        found.len() == GUEST_TESTS.len(),
        "test binaries not found: {found:?}"
    );
    Ok(found)
}

/// `modules.dep` of an unpacked module tree: module path → its dependencies' paths.
fn module_deps(modules: &Path) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let text = fs::read_to_string(modules.join("modules.dep")).context("reading modules.dep")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((
                module.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect())
}

/// `names` and their dependencies, in load order (dependencies first), as paths in the tree.
fn load_order(deps: &[(String, Vec<String>)], names: &[&str]) -> anyhow::Result<Vec<String>> {
    let path_of = |name: &str| {
        deps.iter()
            .map(|(m, _)| m)
            .find(|m| {
                Path::new(m)
                    .file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|f| f.split('.').next())
                    .is_some_and(|stem| stem.replace('-', "_") == name.replace('-', "_"))
            })
            .cloned()
    };
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in names {
        let Some(path) = path_of(name) else {
            // Built into this kernel.
            continue;
        };
        let chain = deps
            .iter()
            .find(|(m, _)| *m == path)
            .map(|(_, d)| d.clone())
            .unwrap_or_default();
        // modules.dep lists every (transitive) dependency, the deepest last.
        for m in chain.iter().rev().chain(std::iter::once(&path)) {
            if seen.insert(m.clone()) {
                order.push(m.clone());
            }
        }
    }
    Ok(order)
}

/// The initramfs: busybox, the boot modules, and an init that mounts the host's root and runs
/// `/host/<guest.sh>`.
fn write_initramfs(path: &Path, modules: &Path) -> anyhow::Result<()> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.exists(),
        "/bin/busybox is missing: `cargo xtask setup` installs busybox-static"
    );
    let deps = module_deps(modules)?;
    let mut archive = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "host",
        "modules",
        "lib",
        "lib/modules",
    ] {
        archive.dir(dir);
    }
    archive.file("bin/busybox", &fs::read(busybox)?, 0o755);
    let mut insmods = String::new();
    for (i, module) in load_order(&deps, &BOOT_MODULES)?.iter().enumerate() {
        let name = format!("modules/{i:02}.ko{}", compression_suffix(module));
        archive.file(&name, &fs::read(modules.join(module))?, 0o644);
        insmods.push_str(&format!("/bin/busybox insmod /{name}\n"));
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         export PATH=/bin\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         {insmods}\
         mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host\n\
         exec /bin/busybox sh /host$(cat /proc/cmdline | tr ' ' '\\n' | sed -n 's/^vmtest.script=//p')\n"
    );
    archive.file("init", init.as_bytes(), 0o755);
    fs::write(path, archive.finish())?;
    Ok(())
}

fn compression_suffix(module: &str) -> &'static str {
    if module.ends_with(".xz") {
        ".xz"
    } else if module.ends_with(".zst") {
        ".zst"
    } else {
        ""
    }
}

/// The guest's script (run by busybox sh in the initramfs, the host's root at /host).
fn guest_script(
    modules: &Path,
    portmap: &Path,
    tests: &[(String, PathBuf)],
    fuzz_packets: u64,
    filter: Option<&str>,
) -> anyhow::Result<String> {
    let release = modules
        .file_name()
        .and_then(|n| n.to_str())
        .context("module dir name")?;
    let workspace = workspace_root();
    let tmp = target_dir().join("tmp");
    let deps = module_deps(modules)?;
    let mut s = format!(
        "set -u\n\
         echo \"vmtest: kernel $(uname -r)\"\n\
         mkdir -p /lib/modules/{release}\n\
         mount --bind /host{modules} /lib/modules/{release}\n",
        modules = modules.display()
    );
    for module in load_order(&deps, &TEST_MODULES)? {
        s.push_str(&format!("insmod /lib/modules/{release}/{module} || true\n"));
    }
    s.push_str(&format!(
        "mount -t tmpfs tmp /host/tmp\n\
         mount -t tmpfs run /host/run\n\
         mount -t tmpfs target-tmp /host{tmp}\n\
         mount -t proc proc /host/proc\n\
         mount -t sysfs sys /host/sys\n\
         mount -t devtmpfs dev /host/dev\n\
         mount -t bpf bpf /host/sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /host/sys/fs/cgroup\n\
         ip() {{ chroot /host /sbin/ip \"$@\"; }}\n\
         ip link set lo up\n",
        tmp = tmp.display()
    ));
    for (name, exe) in tests {
        let args = match filter {
            Some(f) => format!("--test-threads=1 {f}"),
            None => GUEST_TESTS
                .iter()
                .find(|(t, _)| t == name)
                .map(|(_, a)| a.join(" "))
                .unwrap_or_default(),
        };
        s.push_str(&format!(
            "echo \"vmtest: running {name}\"\n\
             chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \
             PORTMAP_BIN={portmap} PORTMAP_FUZZ_PACKETS={fuzz_packets} CARGO_TARGET_TMPDIR={tmp} \
             PORTMAP_TEST_SLOWDOWN=10 \
             /bin/sh -c 'cd {workspace}/tests && exec {exe} {args}' 2>&1\n\
             echo \"vmtest: exit {name} $?\"\n",
            portmap = portmap.display(),
            tmp = tmp.display(),
            workspace = workspace.display(),
            exe = exe.display(),
        ));
    }
    s.push_str("echo vmtest: done\nsync\npoweroff -f\n");
    Ok(s)
}

/// What one guest ran.
struct Guest {
    /// What each test binary ran.
    tally: Tally,
    /// The guest's kernel release, once it reported it.
    kernel: Option<String>,
    /// The test binaries during which the guest's kernel reported a stalled CPU.
    stalled: BTreeSet<String>,
}

/// The test binaries to run once more: those that failed (or printed no result) while the
/// guest's kernel reported a stalled CPU.
fn run_again(
    tests: &[(String, PathBuf)],
    tally: &Tally,
    stalled: &BTreeSet<String>,
) -> Vec<(String, PathBuf)> {
    tests
        .iter()
        .filter(|(name, _)| {
            stalled.contains(name) && tally.binaries.iter().any(|b| &b.name == name && !b.ok())
        })
        .cloned()
        .collect()
}

/// Whether a console line is the guest kernel's report of a CPU that did not schedule (soft
/// lockup) or did not pass an RCU quiescent state for many seconds.
fn kernel_stall(line: &str) -> bool {
    [
        "soft lockup - CPU#",
        "self-detected stall on CPU",
        "detected stalls on CPUs",
    ]
    .iter()
    .any(|s| line.contains(s))
}

/// Boots the guest and follows its console.
fn boot(vmlinuz: &Path, initrd: &Path, script: &Path) -> anyhow::Result<Guest> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-cpu", "max", "-smp", "2", "-m", "3072"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        // loglevel=5: the console shows warnings too, and with them the stack of a stall report.
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=5 vmtest.script={}",
            script.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
    });
    let (mut tally, mut kernel, mut stalled) = (Tally::default(), None, BTreeSet::new());
    let mut done = false;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        println!("{line}");
        let _ = std::io::stdout().flush();
        // The console's first line may start with terminal control sequences.
        if let Some(at) = line.find("vmtest: kernel ") {
            kernel = Some(line[at + "vmtest: kernel ".len()..].to_owned());
        }
        tally.line(line);
        if kernel_stall(line)
            && let Some(b) = tally.binaries.last()
        {
            stalled.insert(b.name.clone());
        }
        done |= line == "vmtest: done";
    }
    let status = child.wait()?;
    let _ = watchdog.join();
    if !done {
        bail!("the guest stopped before the tests finished (qemu: {status}; killed after {GUEST_TIMEOUT:?})");
    }
    Ok(Guest {
        tally,
        kernel,
        stalled,
    })
}

/// A newc ("070701") cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_reports_are_told_from_other_console_lines() {
        for line in [
            "[  647.306304] rcu: INFO: rcu_preempt self-detected stall on CPU",
            "[  685.145586] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [portmap:1000]",
            "[  700.000000] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        ] {
            assert!(kernel_stall(line), "{line}");
        }
        for line in [
            "test partial_checksums_are_completed_right_after_the_rewrite ... ok",
            "[    2.119916] Unstable clock detected, switching default tracing clock to \"global\"",
            "vmtest: exit local_path 0",
        ] {
            assert!(!kernel_stall(line), "{line}");
        }
    }

    /// Only a binary that failed and saw a stall runs again: not one that failed without a
    /// stall, not one that saw a stall and passed.
    #[test]
    fn a_failure_during_a_stall_and_only_that_runs_again() {
        let mut tally = Tally::default();
        for line in [
            "vmtest: running golden",
            "test result: ok. 15 passed; 0 failed; 0 ignored",
            "vmtest: exit golden 0",
            "vmtest: running local_path",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored",
            "vmtest: exit local_path 101",
            "vmtest: running e2e",
            "vmtest: exit e2e 101",
            "vmtest: running masquerade",
            "test result: FAILED. 0 passed; 1 failed; 0 ignored",
            "vmtest: exit masquerade 101",
        ] {
            tally.line(line);
        }
        let tests: Vec<_> = ["golden", "local_path", "e2e", "masquerade"]
            .iter()
            .map(|n| ((*n).to_owned(), PathBuf::from(format!("/t/{n}"))))
            .collect();
        let stalled: BTreeSet<String> = ["golden", "local_path", "e2e"]
            .iter()
            .map(|n| (*n).to_owned())
            .collect();
        let again: Vec<_> = run_again(&tests, &tally, &stalled)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(again, ["local_path", "e2e"]);
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let deps = vec![
            (
                "kernel/fs/9p/9p.ko".to_string(),
                vec![
                    "kernel/net/9p/9pnet.ko".to_string(),
                    "kernel/fs/netfs/netfs.ko".to_string(),
                ],
            ),
            (
                "kernel/net/9p/9pnet_virtio.ko".to_string(),
                vec!["kernel/net/9p/9pnet.ko".to_string()],
            ),
            ("kernel/net/9p/9pnet.ko".to_string(), vec![]),
            ("kernel/fs/netfs/netfs.ko".to_string(), vec![]),
        ];
        let order = load_order(&deps, &["9pnet_virtio", "9p", "veth"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko"
            ]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", b"#!/bin/sh\n", 0o755);
        let out = c.finish();
        assert!(out.len().is_multiple_of(4));
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
