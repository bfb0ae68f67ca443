//! `cargo xtask`: what cargo alone cannot do — toolchain setup, the demo, the privileged test run.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

mod package;
mod tally;
mod vmtest;

use tally::Tally;

/// bpf-linker release built by `setup` (against the nightly toolchain's own libLLVM).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What `vmtest` needs beyond `APT_PACKAGES`: qemu (TCG), a static busybox for the initramfs and
/// depmod.
const VMTEST_PACKAGES: [(&str, &str); 3] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    // depmod, for the unpacked kernel's module dependencies.
    ("depmod", "kmod"),
];

/// What the tests, the demo and the benchmark need from Debian: a command or file that shows the
/// package is there, and the package.
const APT_PACKAGES: [(&str, &str); 17] = [
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("systemd-analyze", "systemd"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("pkg-config", "pkg-config"),
    // The CNI tests: bridge and host-local before portmap-cni, and the reference portmap plugin.
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    // The podman tests (issue 23): podman 4.3 with runc (crun refuses this machine's hybrid
    // cgroups) and conmon; images come from busybox-static's /bin/busybox (no registry).
    ("podman", "podman"),
    ("podman-compose", "podman-compose"),
    ("runc", "runc"),
    ("conmon", "conmon"),
    ("/bin/busybox", "busybox-static"),
    // The Docker tests (issue 24): Debian's dockerd 20.10 (its containerd comes with it) and
    // docker-compose 1.29; each test starts and stops a private dockerd of its own.
    ("dockerd", "docker.io"),
    ("docker-compose", "docker-compose"),
    // plotters (benchmark plots) renders text through fontconfig.
    ("/usr/include/fontconfig/fontconfig.h", "libfontconfig1-dev"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

#[derive(Parser)]
#[command(about = "portmap development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: rust-src (nightly), bpf-linker, apt packages.
    Setup,
    /// Demo: namespaces client/host/backend, `portmap run` with a mapping, real TCP traffic, stats.
    Demo {
        /// Ingress attach mode for the demo.
        #[arg(long, default_value = "tc")]
        attach: String,
    },
    /// The whole test suite: unit, golden-packet, fuzz and end-to-end tests (needs root).
    Test {
        /// Packets the datapath fuzzer throws at the programs (default 100000).
        #[arg(long)]
        fuzz_packets: Option<u64>,
        /// Seed for the datapath fuzzer (default: random; a failure prints the one it used).
        #[arg(long)]
        fuzz_seed: Option<u64>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy on every crate, the eBPF crate for its BPF target included.
    Lint,
    /// Benchmark against iptables-nft, nftables, plain routing and an XDP floor (needs root);
    /// see docs/BENCHMARKS.md.
    Bench {
        /// A few minutes, fewer sizes: the CI smoke test.
        #[arg(long)]
        quick: bool,
        /// Copy the report and plots to docs/BENCHMARKS.md and docs/bench/.
        #[arg(long)]
        update_docs: bool,
        /// Only these sections (comma-separated: new-flows, throughput, packets, replies,
        /// programs, control, flood, memory, restarts); not with --update-docs.
        #[arg(long, conflicts_with = "update_docs")]
        only: Option<String>,
    },
    /// The golden-packet suite and end-to-end tests on Debian 12's kernel 6.1 under qemu (TCG;
    /// installs qemu and busybox, downloads the kernel package; needs root).
    Vmtest {
        /// The kernel package (default: the newest linux-image-6.1.0-N-amd64 apt knows).
        #[arg(long)]
        package: Option<String>,
        /// Packets the datapath fuzzer throws at the programs in the guest (emulated: slow).
        #[arg(long, default_value_t = 2_000)]
        fuzz_packets: u64,
        /// Run only the guest tests whose names contain this (default: the golden suite and
        /// the end-to-end tests listed in xtask/src/vmtest.rs).
        filter: Option<String>,
    },
    /// Man pages of `portmap` (one per subcommand) and `portmap-cni`, from the binaries' clap
    /// definitions (clap_mangen), into --out (default target/man).
    Man {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The Debian package (cargo-deb): target/debian/portmap_VERSION_amd64.deb with the
    /// binaries, the systemd unit, the CNI plugin, man pages, completions and the docs.
    Package,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Demo { attach } => demo(&attach),
        Task::Test {
            fuzz_packets,
            fuzz_seed,
            args,
        } => test(fuzz_packets, fuzz_seed, &args),
        Task::Lint => lint(),
        Task::Bench {
            quick,
            update_docs,
            only,
        } => bench(quick, update_docs, only.as_deref()),
        Task::Vmtest {
            package,
            fuzz_packets,
            filter,
        } => {
            ensure!(
                is_root(),
                "cargo xtask vmtest needs root (it installs packages and builds as root)"
            );
            setup()?;
            ensure_packages(&VMTEST_PACKAGES)?;
            vmtest::vmtest(package, fuzz_packets, filter.as_deref())
        }
        Task::Man { out } => {
            setup()?;
            man_pages(&out.unwrap_or_else(|| target_dir().join("man")))
        }
        Task::Package => {
            setup()?;
            package::build().map(drop)
        }
    }
}

fn man_pages(out: &Path) -> anyhow::Result<()> {
    run(cargo()
        .args(["run", "-q", "-p", "portmap-user", "--example", "man", "--"])
        .arg(out))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn say(what: &str) {
    eprintln!("xtask: {what}");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Idempotent: checks each piece and installs only what is missing.
fn setup() -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_apt_tools()?;
    say(&format!(
        "setup complete ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = output("rustc", &["+nightly", "--print", "sysroot"]).context(
        "the `nightly` toolchain is not installed (rustup toolchain list); it is needed for -Z build-std",
    )?;
    Ok(PathBuf::from(out.trim()))
}

/// rust-src for `-Z build-std=core`, and clippy to lint the eBPF crate for its BPF target.
fn ensure_rust_src() -> anyhow::Result<()> {
    let core = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    let clippy = output("cargo", &["+nightly", "clippy", "--version"]).is_some();
    if core.exists() && clippy {
        say("rust-src, clippy (nightly): present");
        return Ok(());
    }
    say("rust-src, clippy (nightly): installing with rustup");
    run(Command::new("rustup").args(["component", "add", "rust-src", "clippy", "--toolchain", "nightly"]))
}

/// bpf-linker links against libLLVM through an rpath to a directory that must persist; the
/// directory holds links to the nightly toolchain's own libLLVM (so LLVM versions always match)
/// under both its plain and its versioned (soname) name.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("no libLLVM.so.* in the nightly toolchain")?;
    let verbose = output("rustc", &["+nightly", "-vV"]).context("rustc +nightly -vV")?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_string();
    let home = env::var_os("HOME").context("HOME is not set")?;
    let llvm_dir = Path::new(&home)
        .join(".cache/portmap")
        .join(format!("llvm-{major}"));
    let lib = llvm_dir.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in [
        std::ffi::OsString::from("libLLVM.so"),
        libllvm.file_name().unwrap().to_owned(),
    ] {
        let link = lib.join(name);
        if std::fs::read_link(&link).ok().as_deref() != Some(libllvm.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&libllvm, &link)?;
        }
    }
    if let Some(v) = output("bpf-linker", &["--version"]) {
        say(&format!("bpf-linker: present ({})", v.trim()));
        return Ok(());
    }
    say(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} (about a minute)"
    ));
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &llvm_dir))?;
    ensure!(
        output("bpf-linker", &["--version"]).is_some(),
        "bpf-linker installed but does not run (is ~/.cargo/bin on PATH?)"
    );
    Ok(())
}

fn ensure_apt_tools() -> anyhow::Result<()> {
    ensure_packages(&APT_PACKAGES)?;
    ensure_packages(&package::PACKAGES)
}

/// Installs the packages of `packages` whose command or file is missing.
fn ensure_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let present = |what: &str| {
        if what.starts_with('/') {
            Path::new(what).exists()
        } else {
            which::which(what).is_ok()
        }
    };
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(what, _)| !present(what))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        say("apt packages: present");
        return Ok(());
    }
    ensure!(
        is_root(),
        "missing tools from packages {missing:?}: run `cargo xtask setup` as root"
    );
    say(&format!("apt packages: installing {}", missing.join(" ")));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // No package may start its service (dockerd, containerd) in the machine's own namespace:
    // invoke-rc.d asks policy-rc.d first, and 101 means "not now".
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts during the install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if own_policy {
        std::fs::remove_file(policy)?;
    }
    installed
}

fn build_portmap() -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "-p", "portmap-user"]))?;
    Ok(target_dir().join("debug/portmap"))
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

fn test(fuzz_packets: Option<u64>, fuzz_seed: Option<u64>, args: &[String]) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "cargo xtask test needs root: the end-to-end tests create network namespaces and load BPF programs (run it with sudo)"
    );
    setup()?;
    let bin = build_portmap()?;
    // The package test's input; built unless the run names only other tests.
    let deb = if args.is_empty() || args.iter().any(|a| a.contains("package")) {
        Some(package::build()?)
    } else {
        None
    };
    let mut cmd = cargo();
    if let Some(deb) = &deb {
        cmd.env("PORTMAP_DEB", deb);
    }
    // Every binary runs, whatever failed before it; each is counted on its own.
    cmd.args([
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "portmap-ebpf",
    ])
    .args(args)
    .env("PORTMAP_BIN", &bin);
    // One pipe for both streams, in order: cargo names each binary (`Running …`) on stderr, the
    // binary prints its results on stdout.
    let (output, writer) = std::io::pipe().context("a pipe for cargo test")?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    if let Some(n) = fuzz_packets {
        cmd.env("PORTMAP_FUZZ_PACKETS", n.to_string());
    }
    if let Some(seed) = fuzz_seed {
        cmd.env("PORTMAP_FUZZ_SEED", seed.to_string());
    }
    let sizes = target_dir().join("tmp/program-sizes.txt");
    let fuzz = target_dir().join("tmp/fuzz-run.txt");
    for report in [&sizes, &fuzz] {
        let _ = std::fs::remove_file(report);
    }
    let mut child = cmd.spawn().context("running cargo test")?;
    // Our copies of the writing end go with `cmd`, so that the pipe ends with cargo.
    drop(cmd);
    // Pass the output through and count what each test binary ran, so the run ends with one
    // total and names every binary that failed, crashed or ran nothing.
    let mut tally = Tally::default();
    for line in BufReader::new(output).lines() {
        let line = line?;
        println!("{line}");
        tally.line(&line);
    }
    let status = child.wait()?;
    // Captured by the test harness; shown here so that growth is visible in every run.
    for report in [&sizes, &fuzz] {
        if let Ok(table) = std::fs::read_to_string(report) {
            print!("\n{table}");
        }
    }
    let judged = tally.report(false);
    ensure!(status.success(), "cargo test failed: {status}");
    judged
}

fn bench(quick: bool, update_docs: bool, only: Option<&str>) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "cargo xtask bench needs root: it builds network namespaces, netfilter rules and BPF programs"
    );
    setup()?;
    run(cargo().args(["build", "--release", "-p", "portmap-user"]))?;
    let out = target_dir().join("bench");
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "portmap-tests", "--bench", "portmap", "--"])
        .arg("--out")
        .arg(&out)
        .env("PORTMAP_BIN", target_dir().join("release/portmap"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(only) = only {
        cmd.args(["--only", only]);
    }
    run(&mut cmd)?;
    if update_docs {
        let docs = workspace_root().join("docs");
        std::fs::create_dir_all(docs.join("bench"))?;
        let report = std::fs::read_to_string(out.join("report.md"))?;
        let plots = "\n## Plots\n\n![new flows](bench/new_flows.png)\n\n![eBPF cost](bench/ebpf_cost.png)\n\n\
                     ![control plane](bench/control_plane.png)\n";
        // The hand-written reading of the results (why a target is missed, what would close it).
        let notes = std::fs::read_to_string(docs.join("bench/notes.md")).unwrap_or_default();
        std::fs::write(docs.join("BENCHMARKS.md"), format!("{report}{plots}\n{notes}"))?;
        for png in ["new_flows.png", "ebpf_cost.png", "control_plane.png"] {
            std::fs::copy(out.join(png), docs.join("bench").join(png))?;
        }
        say("docs/BENCHMARKS.md and docs/bench/*.png updated");
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // `rustup run`, not `cargo +nightly`: inside `cargo xtask`, $CARGO is the toolchain's own
    // cargo, which does not take a `+toolchain` argument.
    let mut nightly = Command::new("rustup");
    nightly.current_dir(workspace_root().join("portmap-ebpf"));
    run(nightly.args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--bins",
        "--",
        "-D",
        "warnings",
    ]))
}

/// Runs `tests/examples/demo.rs` (the harness lives in the tests crate, which needs the eBPF
/// toolchain that `setup` installs first).
fn demo(attach: &str) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "cargo xtask demo needs root (network namespaces, BPF): run it with sudo"
    );
    ensure!(
        matches!(attach, "tc" | "xdp"),
        "--attach {attach}: expected tc or xdp"
    );
    setup()?;
    let bin = build_portmap()?;
    // The demo's host-local client is a process of its own (it joins the daemon's cgroup).
    run(cargo().args(["build", "--quiet", "-p", "portmap-tests", "--bin", "pm-probe"]))?;
    run(cargo()
        .args(["run", "--quiet", "-p", "portmap-tests", "--example", "demo", "--"])
        .args(["--attach", attach])
        .env("PORTMAP_BIN", &bin))
}
