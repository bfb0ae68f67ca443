//! The CLI's side of the control socket: one request, one answer, an error line turned into an
//! error.

use std::path::Path;

use crate::api::control::{self, Listed, Request, Response, StatsReport};

/// Sends a change and prints the daemon's answer.
pub fn simple(socket: &Path, request: &Request) -> anyhow::Result<()> {
    match control::call(socket, request)? {
        Response::Ok { message } => {
            crate::cli::print::line(&message);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// The published mappings and their owners.
pub fn list(socket: &Path) -> anyhow::Result<Vec<Listed>> {
    match control::call(socket, &Request::List)? {
        Response::Mappings { mappings } => Ok(mappings),
        other => Err(unexpected(other)),
    }
}

/// The daemon's stats report.
pub fn fetch_stats(socket: &Path) -> anyhow::Result<StatsReport> {
    match control::call(socket, &Request::Stats)? {
        Response::Stats { stats } => Ok(stats),
        other => Err(unexpected(other)),
    }
}

/// The error an answer other than the expected one means.
fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::Error { message } => anyhow::anyhow!("{message}"),
        other => anyhow::anyhow!("unexpected answer from the daemon: {other:?}"),
    }
}
