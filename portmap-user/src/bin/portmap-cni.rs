//! `portmap-cni`: the CNI plugin (see `portmap::cni`). A runtime runs it with CNI_COMMAND and
//! the other CNI_* variables set and the network configuration on stdin.

use std::{io::Read as _, process::ExitCode};

use clap::Parser as _;
use portmap::cni::{
    self, CniError, Invocation,
    install::{self, CliCommand},
};

fn main() -> ExitCode {
    // Runtimes run plugins without arguments; with some, it is `portmap-cni install ...`.
    if std::env::args_os().len() > 1 {
        let CliCommand::Install {
            bin_dir,
            conf_dir,
            socket,
        } = install::Cli::parse().command;
        return match install::install(&bin_dir, &conf_dir, &socket) {
            Ok(done) => {
                for line in done {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portmap-cni: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let invocation = Invocation::from_env();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(&CniError::new(5, "cannot read stdin".to_owned(), e), "1.0.0");
    }
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|v| v.as_str().map(str::to_owned)))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match cni::run(&invocation, &stdin) {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &version),
    }
}

fn fail(error: &CniError, version: &str) -> ExitCode {
    println!("{}", error.to_json(version));
    ExitCode::FAILURE
}
