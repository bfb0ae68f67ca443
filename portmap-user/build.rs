//! Builds the eBPF object with aya-build (as aya-template does) so that a plain `cargo build`
//! produces a complete `portmap` binary once `cargo xtask setup` has installed the toolchain.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    check_toolchain()?;
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../portmap-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to portmap-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "portmap-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Fails with a message that names the fix instead of a deep cargo/linker error.
fn check_toolchain() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref out) if out.status.success()) {
        bail!("bpf-linker is not installed (needed to build the eBPF programs): run `cargo xtask setup`");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running `rustup run nightly rustc --print sysroot`: run `cargo xtask setup`")?;
    if !sysroot.status.success() {
        bail!("the nightly toolchain is missing (needed for -Z build-std): run `cargo xtask setup`");
    }
    let sysroot = String::from_utf8_lossy(&sysroot.stdout);
    let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        bail!("rust-src is not installed for the nightly toolchain: run `cargo xtask setup`");
    }
    Ok(())
}
