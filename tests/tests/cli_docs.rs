//! Shell completions and man pages come from the binaries' own clap definitions: the bash
//! script `portmap completions bash` prints is valid bash and completes every subcommand, and
//! a man page is generated for every subcommand of `portmap` and for `portmap-cni install`.
//! No root needed.

use std::process::Command;

use anyhow::{Context as _, ensure};
use clap::CommandFactory as _;
use portmap_tests::{TempDir, portmap_bin};

#[test]
fn completion_scripts_parse_and_name_every_subcommand() -> anyhow::Result<()> {
    let subcommands: Vec<String> = portmap::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(portmap_bin()?)
            .args(["completions", shell])
            .output()?;
        ensure!(
            out.status.success(),
            "completions {shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout)?;
        for name in &subcommands {
            ensure!(has_word(&script, name), "{shell} script lacks {name}");
        }
        if shell == "bash" {
            let dir = TempDir::new("compl")?;
            let path = dir.path().join("portmap.bash");
            std::fs::write(&path, &script)?;
            let check = Command::new("bash").arg("-n").arg(&path).output()?;
            ensure!(
                check.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    let bad = Command::new(portmap_bin()?)
        .args(["completions", "cmd.exe"])
        .output()?;
    ensure!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("cmd.exe"));
    Ok(())
}

/// `word` stands in `text` on its own: not inside a longer name ("port" in "portmap" does not
/// count; "portmap__port", as clap's bash script spells a subcommand, does).
fn has_word(text: &str, word: &str) -> bool {
    let part_of_name = |c: char| c.is_ascii_alphanumeric() || c == '-';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(part_of_name) && !after.is_some_and(part_of_name)
    })
}

#[test]
fn words_are_told_from_parts_of_names() {
    assert!(!has_word("portmap portmap-cni", "port"));
    assert!(has_word("cmd=\"portmap__port\"", "port"));
    assert!(has_word("'port:Show'", "port"));
}

/// The shipped generator (`portmap-user/examples/man.rs`, what `cargo xtask man` runs), which
/// `cargo test --workspace` builds beside the test binaries.
fn man_generator() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let debug = exe
        .parent()
        .and_then(std::path::Path::parent)
        .context("the test binary's directory")?;
    let man = debug.join("examples/man");
    ensure!(
        man.exists(),
        "{} is missing: build it with `cargo build -p portmap-user --example man` (cargo test --workspace does)",
        man.display()
    );
    Ok(man)
}

#[test]
fn man_pages_cover_every_subcommand() -> anyhow::Result<()> {
    let dir = TempDir::new("man")?;
    let cli = portmap::cli::Cli::command();
    let out = Command::new(man_generator()?).arg(dir.path()).output()?;
    ensure!(
        out.status.success(),
        "examples/man: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.1"))).with_context(|| name.to_owned())
    };
    ensure!(page("portmap")?.contains("Publish host ports"), "portmap.1");
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        let text = page(&format!("portmap-{name}"))?;
        ensure!(
            text.contains(&format!("portmap\\-{name}")),
            "portmap-{name}.1 names itself"
        );
    }
    ensure!(
        page("portmap-cni-install")?.contains("conflist"),
        "portmap-cni-install.1"
    );
    Ok(())
}

/// A command whose reader went away (`portmap completions bash | head -1`) ends by SIGPIPE, as a
/// Unix tool does: no panic, no backtrace.
#[test]
fn a_command_whose_output_is_cut_short_ends_quietly() -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt as _;
    let (read, write) = nix::unistd::pipe()?;
    drop(read);
    let out = Command::new(portmap_bin()?)
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.signal() == Some(libc::SIGPIPE) && stderr.is_empty(),
        "status {:?}, stderr: {stderr}",
        out.status
    );
    Ok(())
}
