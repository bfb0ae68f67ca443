//! `cargo xtask package`: the Debian package, built the standard Rust way (cargo-deb, configured
//! in portmap-user/Cargo.toml's `[package.metadata.deb]`). This step builds the release binaries
//! (the eBPF object is embedded) and the assets cargo-deb takes from target/release/deb-assets/:
//! the unit with the package's paths, man pages and the changelog (gzipped, as Debian ships
//! them) and shell completions.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use crate::{cargo, man_pages, output, run, say, target_dir, workspace_root};

/// cargo-deb release `ensure_cargo_deb` installs when `cargo deb` is missing (kept in
/// ~/.cargo/bin, like bpf-linker, for later runs).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// What packaging and its test need from Debian: lintian (the test runs it), dpkg-dev
/// (dpkg-shlibdeps, for the package's library dependencies) and gzip.
pub const PACKAGES: [(&str, &str); 3] = [
    ("lintian", "lintian"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("gzip", "gzip"),
];

/// Builds the package; returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    crate::ensure_packages(&PACKAGES)?;
    ensure_cargo_deb()?;
    run(cargo().args(["build", "--release", "-p", "portmap-user", "--bins"]))?;
    let assets = target_dir().join("release/deb-assets");
    let _ = fs::remove_dir_all(&assets);
    fs::create_dir_all(&assets)?;
    unit(&assets)?;
    man(&assets.join("man"))?;
    completions(&assets.join("completions"))?;
    let changelog = assets.join("changelog");
    fs::copy(workspace_root().join("dist/debian/changelog"), &changelog)?;
    gzip(&changelog)?;
    run(cargo().args(["deb", "-p", "portmap-user", "--no-build"]))?;
    let version = env!("CARGO_PKG_VERSION");
    let deb = target_dir().join(format!("debian/portmap_{version}_amd64.deb"));
    ensure!(deb.exists(), "cargo deb did not write {}", deb.display());
    say(&format!("package: {}", deb.display()));
    Ok(deb)
}

fn ensure_cargo_deb() -> anyhow::Result<()> {
    if let Some(v) = output("cargo-deb", &["--version"]) {
        say(&format!("cargo-deb: present ({})", v.trim()));
        return Ok(());
    }
    say(&format!(
        "cargo-deb: installing {CARGO_DEB_VERSION} (about two minutes)"
    ));
    run(cargo().args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB_VERSION]))
}

/// dist/portmap.service with the package's paths (the unit in dist/ is for a build from source,
/// installed under /usr/local).
fn unit(assets: &Path) -> anyhow::Result<()> {
    let source = workspace_root().join("dist/portmap.service");
    let text = fs::read_to_string(&source).with_context(|| source.display().to_string())?;
    let packaged = text
        .replace(
            "# portmap daemon. Install: see README.md, \"Running as a service\".",
            "# portmap daemon, as the Debian package installs it (README.md, \"Install\").",
        )
        .replace("/usr/local/share/doc/portmap/", "/usr/share/doc/portmap/")
        .replace("/usr/local/bin/portmap", "/usr/bin/portmap");
    ensure!(
        !packaged.contains("/usr/local"),
        "dist/portmap.service names a /usr/local path the package does not rewrite"
    );
    fs::write(assets.join("portmap.service"), packaged)?;
    Ok(())
}

fn man(dir: &Path) -> anyhow::Result<()> {
    man_pages(dir)?;
    for entry in fs::read_dir(dir)? {
        gzip(&entry?.path())?;
    }
    Ok(())
}

/// `gzip -9n`: no name or time stamp in the header, so the same input gives the same bytes.
fn gzip(path: &Path) -> anyhow::Result<()> {
    run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(path))
}

fn completions(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let portmap = target_dir().join("release/portmap");
    for (shell, file) in [
        ("bash", "portmap.bash"),
        ("zsh", "_portmap"),
        ("fish", "portmap.fish"),
    ] {
        let out = Command::new(&portmap)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("{} completions {shell}", portmap.display()))?;
        ensure!(
            out.status.success(),
            "portmap completions {shell}: {}",
            out.status
        );
        fs::write(dir.join(file), out.stdout)?;
    }
    Ok(())
}
