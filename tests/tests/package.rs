//! The Debian package (issue 28): `cargo xtask test` builds it (`cargo xtask package`) and passes
//! its path in `PORTMAP_DEB`. lintian reports no errors; its files are where Debian and the
//! container runtimes look; unpacked into a scratch root its binaries run, its completions print
//! and its unit verifies; its conffile is the whole configuration, commented out; its maintainer
//! scripts install the unit without starting it and purge the datapath only on purge.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use portmap_tests::TempDir;

fn deb() -> anyhow::Result<PathBuf> {
    match std::env::var_os("PORTMAP_DEB") {
        Some(path) => Ok(PathBuf::from(path)),
        None => bail!("PORTMAP_DEB is not set: run through `cargo xtask test`, which builds the package"),
    }
}

/// Runs `program` and returns its stdout; an error names the command and its stderr.
fn stdout(program: &str, args: &[&str], path: &Path) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} {}: {}\n{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The package unpacked (`dpkg-deb -x`) into a scratch root, and its control area (`-e`).
struct Unpacked {
    dir: TempDir,
}

impl Unpacked {
    fn new() -> anyhow::Result<Self> {
        let deb = deb()?;
        let dir = TempDir::new("deb")?;
        for (flag, sub) in [("-x", "root"), ("-e", "control")] {
            let out = Command::new("dpkg-deb")
                .arg(flag)
                .arg(&deb)
                .arg(dir.path().join(sub))
                .output()?;
            ensure!(
                out.status.success(),
                "dpkg-deb {flag}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self { dir })
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn control(&self, file: &str) -> anyhow::Result<String> {
        let path = self.dir.path().join("control").join(file);
        std::fs::read_to_string(&path).with_context(|| path.display().to_string())
    }
}

#[test]
fn lintian_reports_no_errors() -> anyhow::Result<()> {
    let deb = deb()?;
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(&deb)
        .output()
        .context("lintian (package lintian; `cargo xtask setup` installs it)")?;
    let report = String::from_utf8_lossy(&out.stdout);
    // Shown in every run: warnings are not failures, but they should be read.
    eprintln!("lintian:\n{report}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "lintian found errors:\n{report}");
    ensure!(
        !report.lines().any(|l| l.starts_with("E: ")),
        "lintian errors:\n{report}"
    );
    Ok(())
}

#[test]
fn the_package_holds_every_file_where_debian_and_the_runtimes_look() -> anyhow::Result<()> {
    let listing = stdout("dpkg-deb", &["-c"], &deb()?)?;
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    for want in [
        "/usr/bin/portmap",
        "/usr/lib/cni/portmap-cni",
        "/usr/lib/systemd/system/portmap.service",
        "/etc/portmap/portmap.toml",
        "/usr/share/man/man1/portmap.1.gz",
        "/usr/share/man/man1/portmap-add.1.gz",
        "/usr/share/man/man1/portmap-cni.1.gz",
        "/usr/share/bash-completion/completions/portmap",
        "/usr/share/zsh/vendor-completions/_portmap",
        "/usr/share/fish/vendor_completions.d/portmap.fish",
        "/usr/share/doc/portmap/README.md",
        "/usr/share/doc/portmap/BENCHMARKS.md",
        "/usr/share/doc/portmap/copyright",
        "/usr/share/doc/portmap/changelog.gz",
        "/usr/share/doc/portmap/examples/87-portmap-bridge.conflist",
    ] {
        ensure!(files.contains(&want), "{want} is not in the package:\n{listing}");
    }
    // Nothing under /opt or /usr/local (the /opt/cni/bin link is the postinst's).
    let strays: Vec<&&str> = files
        .iter()
        .filter(|f| f.starts_with("/opt") || f.starts_with("/usr/local"))
        .collect();
    ensure!(strays.is_empty(), "files outside Debian's hierarchy: {strays:?}");
    let unpacked = Unpacked::new()?;
    ensure!(
        unpacked
            .control("conffiles")?
            .lines()
            .any(|l| l == "/etc/portmap/portmap.toml"),
        "the config is not a conffile"
    );
    let control = unpacked.control("control")?;
    for want in ["Package: portmap", "Section: net", "Architecture: amd64"] {
        ensure!(
            control.lines().any(|l| l == want),
            "control lacks '{want}':\n{control}"
        );
    }
    ensure!(
        control
            .lines()
            .any(|l| l.starts_with("Depends:") && l.contains("libc6")),
        "no library dependencies (dpkg-shlibdeps):\n{control}"
    );
    Ok(())
}

#[test]
fn unpacked_its_binaries_run_and_its_unit_verifies() -> anyhow::Result<()> {
    let unpacked = Unpacked::new()?;
    let root = unpacked.root();
    let version = stdout(
        root.join("usr/bin/portmap").to_str().context("utf-8")?,
        &[],
        Path::new("--version"),
    )?;
    ensure!(
        version.trim() == format!("portmap {}", env!("CARGO_PKG_VERSION")),
        "portmap --version: {version}"
    );
    let bash = stdout(
        root.join("usr/bin/portmap").to_str().context("utf-8")?,
        &["completions"],
        Path::new("bash"),
    )?;
    ensure!(
        bash.contains("complete -F _portmap") && bash.contains("cleanup"),
        "portmap completions bash: {bash}"
    );
    let installed = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/portmap"))?;
    ensure!(
        installed == bash,
        "the packaged bash completions differ from the binary's"
    );
    // The CNI plugin answers VERSION as the CNI spec asks.
    let cni = Command::new(root.join("usr/lib/cni/portmap-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()?;
    let answer: serde_json::Value = serde_json::from_slice(&cni.stdout).context("portmap-cni VERSION")?;
    ensure!(
        answer["supportedVersions"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "portmap-cni VERSION: {answer}"
    );
    // The unit as installed, against the scratch root (its ExecStart binary is there).
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/portmap.service"))?;
    ensure!(
        unit.contains("ExecStart=/usr/bin/portmap run --config /etc/portmap/portmap.toml")
            && !unit.contains("/usr/local"),
        "the packaged unit: {unit}"
    );
    // The units it names (sysinit.target, ...) from the host's systemd, beside it in the root...
    let copied = Command::new("cp")
        .args(["-a", "-n", "/usr/lib/systemd/system/."])
        .arg(root.join("usr/lib/systemd/system"))
        .status()?;
    ensure!(copied.success(), "copying the host's units into the scratch root");
    // ... and /bin/kill of its ExecReload, in a merged /usr as on Debian 12.
    if !root.join("bin").exists() {
        std::os::unix::fs::symlink("usr/bin", root.join("bin"))?;
    }
    std::fs::copy("/usr/bin/kill", root.join("usr/bin/kill"))?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("/usr/lib/systemd/system/portmap.service")
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify of the packaged unit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every line of the shipped config is a comment; lines with one '#' are settings, which
/// uncommented make a configuration the daemon accepts (so the template cannot drift from the
/// keys the daemon knows).
#[test]
fn the_conffile_is_the_whole_configuration_commented_out() -> anyhow::Result<()> {
    let unpacked = Unpacked::new()?;
    let text = std::fs::read_to_string(unpacked.root().join("etc/portmap/portmap.toml"))?;
    let active = portmap::config::Config::from_toml(&text)?;
    ensure!(
        active
            .validate()
            .is_err_and(|e| e.to_string().contains("interface")),
        "as shipped, the config must set nothing (the daemon refuses to start without an interface)"
    );
    ensure!(
        text.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "a line of the shipped config is not commented out"
    );
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('#') && !l.starts_with("##"))
        .map(|l| l.strip_prefix("# ").unwrap_or(&l[1..]))
        .collect();
    ensure!(
        settings.len() > 30,
        "only {} settings in the template",
        settings.len()
    );
    let uncommented = settings.join("\n");
    let config = portmap::config::Config::from_toml(&uncommented)
        .with_context(|| format!("the template's settings, uncommented:\n{uncommented}"))?;
    config
        .validate()
        .context("the template's settings, uncommented")?;
    Ok(())
}

#[test]
fn maintainer_scripts_install_the_unit_without_starting_it_and_purge_only_on_purge() -> anyhow::Result<()> {
    let unpacked = Unpacked::new()?;
    let postinst = unpacked.control("postinst")?;
    for want in ["deb-systemd-helper", "daemon-reload", "/opt/cni/bin/portmap-cni"] {
        ensure!(postinst.contains(want), "postinst lacks {want}:\n{postinst}");
    }
    // Never started; enabled again only where the admin had enabled it (an upgrade).
    let enable = postinst.find("deb-systemd-helper enable");
    let was_enabled = postinst.find("was-enabled");
    ensure!(
        !postinst.contains("deb-systemd-invoke start")
            && enable.is_none_or(|e| was_enabled.is_some_and(|w| w < e)),
        "postinst starts or enables the service, whose shipped config has no interface:\n{postinst}"
    );
    let postrm = unpacked.control("postrm")?;
    let purge = postrm.find("purge)").context("postrm has no purge case")?;
    let cleanup = postrm
        .find("portmap-cleanup cleanup")
        .context("postrm never runs cleanup")?;
    let remove = postrm.find("remove)").context("postrm has no remove case")?;
    ensure!(
        remove < purge && purge < cleanup,
        "cleanup must run on purge only:\n{postrm}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let text = unpacked.control(script)?;
        ensure!(
            text.starts_with("#!/bin/sh\n") && text.contains("set -e"),
            "{script}: {text}"
        );
        let out = Command::new("sh")
            .arg("-n")
            .arg(unpacked.dir.path().join("control").join(script))
            .output()?;
        ensure!(
            out.status.success(),
            "sh -n {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
