//! `cni_conf_dir`: portmap-cni chained into every conflist of a directory, at start and whenever
//! one appears or changes (inotify: written and closed, or renamed into place), so networks that
//! podman or podman-compose create later publish through portmap. Each file is chained on its
//! own (a broken one is logged, the others are not held up); the daemon's own rewrite of a file
//! is seen as a change too and finds it chained already.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use log::{error, info, warn};

use crate::cni::install;

/// Chains `file`, logging the outcome.
fn chain_one(file: &Path, socket: &str) {
    match install::chain_file(file, socket) {
        Ok(done) if done.contains("already") => {}
        Ok(done) => info!("{done}"),
        // Half-written by its creator: its close comes as a change and is chained then.
        Err(e) => warn!("cni_conf_dir: {e:#}"),
    }
}

/// Chains every conflist of `dir` now, then follows the directory on a task of its own.
pub(super) fn follow(dir: PathBuf, socket: &Path) -> anyhow::Result<()> {
    let socket = socket
        .to_str()
        .context("the control socket's path is not UTF-8 (it goes into the conflists)")?
        .to_owned();
    let inotify = Inotify::init().context("inotify")?;
    inotify
        .watches()
        .add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)
        .with_context(|| format!("cni_conf_dir: watching {}", dir.display()))?;
    // After the watch exists: a file written from now on is seen, one written before is here.
    for file in install::conflists_of(&dir)? {
        chain_one(&file, &socket);
    }
    let mut events = inotify.into_event_stream([0u8; 4096])?;
    info!(
        "cni_conf_dir: chaining portmap-cni into the conflists of {}",
        dir.display()
    );
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let name = event.name.map(PathBuf::from);
                    if let Some(name) = name.filter(|n| n.extension().is_some_and(|e| e == "conflist")) {
                        chain_one(&dir.join(name), &socket);
                    }
                }
                Err(e) => {
                    error!(
                        "cni_conf_dir: watching {} failed ({e}): new networks are not chained",
                        dir.display()
                    );
                    break;
                }
            }
        }
    });
    Ok(())
}
