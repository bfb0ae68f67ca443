//! `portmap`: publish host ports to backends with an eBPF/XDP datapath.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser as _;
use portmap::{
    api::control::Request,
    cli::{
        Cli, Command,
        client::{fetch_stats, list, simple},
        print,
    },
    config::{self, Config, Overrides},
    daemon,
    model::{mapping::SpecAddr, spec},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_daemon = matches!(cli.command, Command::Run { .. });
    if !is_daemon {
        // A command whose output is cut short (`portmap list | head -1`) ends quietly, as a Unix
        // tool does, instead of panicking in println!. The daemon keeps SIGPIPE ignored: a
        // client that went away must not stop it.
        // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if is_daemon {
        "info"
    } else {
        "warn"
    }))
    .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portmap: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| config::DEFAULT_SOCKET.into());
    match cli.command {
        Command::Run {
            config,
            mut overrides,
        } => {
            overrides.socket = cli.socket;
            run(config, *overrides)
        }
        Command::Add {
            spec,
            backends,
            allow,
        } => simple(
            &socket,
            &Request::Add {
                spec: with_backends(&spec, &backends)?,
                allow,
            },
        ),
        Command::Update {
            spec,
            backends,
            allow,
            allow_all,
        } => simple(
            &socket,
            &Request::Update {
                spec: with_backends(&spec, &backends)?,
                allow: (allow_all || !allow.is_empty()).then_some(allow),
            },
        ),
        Command::Del { spec } => simple(&socket, &Request::Del { spec }),
        Command::Reload => simple(&socket, &Request::Reload),
        Command::Cleanup { pin_dir, state_file } => cleanup(&socket, pin_dir, state_file),
        Command::List { json, owner } => {
            let mut listed = list(&socket)?;
            if let Some(owner) = &owner {
                listed.retain(|l| l.owned_by(owner));
            }
            if json {
                print::json(&serde_json::json!({ "mappings": listed }))
            } else {
                print::mappings(&listed);
                Ok(())
            }
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "portmap", &mut std::io::stdout());
            Ok(())
        }
        Command::Port { backend } => port(&socket, &backend),
        Command::Stats {
            json,
            watch: true,
            interval,
            count,
        } => print::watch_stats(&socket, json, interval, count),
        Command::Stats { json: true, .. } => print::json(&fetch_stats(&socket)?),
        Command::Stats { .. } => {
            print::stats(&fetch_stats(&socket)?);
            Ok(())
        }
    }
}

/// `portmap run`: the config file with the command line's overrides, validated, then the daemon.
fn run(config: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let (mut cfg, path) = load_config(config)?;
    overrides.apply(&mut cfg.startup);
    let valid = cfg.validate()?;
    let reload = path.map(|path| daemon::ReloadSource { path, overrides });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(daemon::run(valid, reload))
}

fn cleanup(socket: &Path, pin_dir: Option<PathBuf>, state_file: Option<PathBuf>) -> anyhow::Result<()> {
    let pin_dir = pin_dir.unwrap_or_else(|| config::DEFAULT_PIN_DIR.into());
    let state_file = state_file.unwrap_or_else(|| config::DEFAULT_STATE_FILE.into());
    // The saved state, and the removals recorded for a daemon that will not adopt anything now.
    let [state, journal] = daemon::state_files(&state_file);
    let files = [state, journal, portmap::api::pending::path_for(socket)];
    let removed = portmap::datapath::cleanup(&pin_dir, socket, &files)?;
    if removed.is_empty() {
        print::line(&format!("nothing to clean up in {}", pin_dir.display()));
    }
    for path in removed {
        print::line(&format!("removed {}", path.display()));
    }
    Ok(())
}

/// `portmap port`, as `docker port`: a port nobody publishes is an error, no port at all is not.
fn port(socket: &Path, backend: &str) -> anyhow::Result<()> {
    let query = spec::PortQuery::parse(backend)?;
    let mappings: Vec<_> = list(socket)?.into_iter().map(|l| l.mapping).collect();
    let lines = spec::port_lines(&mappings, &query);
    if let Some((port, protocol)) = query.port
        && lines.is_empty()
    {
        anyhow::bail!(
            "No public port '{port}/{protocol}' published for {}",
            SpecAddr(query.ip)
        );
    }
    for line in lines {
        print::line(&line);
    }
    Ok(())
}

/// The spec with `--backend` arguments added to its backends, in canonical form.
fn with_backends(spec: &str, backends: &[String]) -> anyhow::Result<String> {
    if backends.is_empty() {
        return Ok(spec.to_string());
    }
    let mut mapping = spec::parse(spec)?;
    for b in backends {
        mapping
            .backends
            .push(spec::parse_backend_arg(b).with_context(|| format!("--backend {b}"))?);
    }
    spec::check(&mapping, &mapping.to_string())?;
    Ok(mapping.to_string())
}

/// The config, and the file it came from (what `reload` reads again), if any.
fn load_config(path: Option<PathBuf>) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let (path, required) = match path {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    if !required && !path.exists() {
        return Ok((Config::default(), None));
    }
    Ok((Config::read(&path)?, Some(path)))
}
