//! The control socket: bound root-only, and each connection served by a task of its own that
//! reads one request line, hands it to the main loop and writes the answer back.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::Context as _;
use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::api::control::{self, Pending, Request, Response};

pub(super) fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file nobody answers on is left over from a crash.
    let _ = fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    info!("control socket {}", path.display());
    Ok(listener)
}

/// One control connection, served beside the others: one request line (at most
/// `MAX_REQUEST_BYTES`, within 5 s), applied by the main loop (changes stay serialised), the
/// answer written within 10 s. A silent, slow or never-reading client only holds its own task;
/// the daemon's shutdown drops it.
pub(super) async fn client(stream: UnixStream, requests: mpsc::Sender<Pending>) {
    let (read, mut write) = stream.into_split();
    let response = match read_request(read).await {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if requests.send((request, reply)).await.is_err() {
                return;
            }
            match answer.await {
                Ok(response) => response,
                Err(_) => return,
            }
        }
        Err(message) => Response::Error { message },
    };
    let Ok(mut out) = serde_json::to_string(&response) else {
        return;
    };
    out.push('\n');
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), write.write_all(out.as_bytes())).await,
        Ok(Ok(()))
    ) {
        warn!("control connection: the client did not take its answer within 10 s");
    }
}

/// Reads one request line; what is wrong with it otherwise, as the error line to answer.
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let limit = control::MAX_REQUEST_BYTES;
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(limit as u64 + 1);
    match tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("no request within 5 s".into()),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > limit {
        return Err(format!("request larger than {limit} bytes: refused"));
    }
    let text = std::str::from_utf8(&line).map_err(|_| "bad request: not UTF-8 text".to_string())?;
    control::parse_request(text).map_err(|e| e.to_string())
}
