//! The Docker follower (`docker = "unix:///var/run/docker.sock"`): publishes what Docker Engine
//! publishes. At every connect it lists the running containers and tells the daemon which run
//! (the mappings of any other container go: it went while either daemon was down) and what each
//! publishes (`bindings`); then it follows the event stream — container start, die, destroy,
//! rename, network connect and disconnect — and inspects the container each event names (events
//! carry no addresses). A container whose mappings were refused (a port another owner published
//! first) is tried again every few seconds. When dockerd cannot be reached the daemon keeps
//! forwarding what it has, shows Docker as disconnected and tries again.
//!
//! Changes go to the main loop as requests (`Request::Docker`), one at a time: the daemon applies
//! each like a CNI publish, all or nothing per container.

pub mod bindings;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use bollard::{
    Docker,
    models::{EventMessage, EventMessageTypeEnum},
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use log::{error, info, warn};
use tokio::sync::{mpsc, oneshot};

use crate::{
    api::control::{DockerChange, DockerStatus, Pending, Request, Response},
    model::table::DockerContainer,
};

/// How long a request to dockerd may take (the event stream itself has no limit).
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Between connection attempts, and between tries of a refused container.
const RETRY: Duration = Duration::from_secs(2);

/// Follows dockerd at `url` until the daemon stops, sending its changes to the main loop.
pub async fn follow(url: String, requests: mpsc::Sender<Pending>) {
    let to_loop = Loop { requests };
    let mut last_error = String::new();
    loop {
        let mut connected = false;
        let ended = session(&url, &to_loop, &mut connected).await;
        if connected {
            // A new outage is reported even if it looks like the last one.
            last_error.clear();
        }
        let error = match ended {
            Ok(()) => "dockerd closed the event stream".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if error != last_error {
            warn!(
                "docker: {error}; publishing again once it answers (tried every {} s)",
                RETRY.as_secs()
            );
            last_error.clone_from(&error);
        }
        let status = DockerStatus {
            url: url.clone(),
            connected: false,
            error: Some(error),
        };
        if !to_loop.send(DockerChange::Status(status)).await {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// The main loop's queue.
struct Loop {
    requests: mpsc::Sender<Pending>,
}

impl Loop {
    /// Sends one change and waits until it is applied; false when the daemon is stopping.
    async fn send(&self, change: DockerChange) -> bool {
        self.apply(change).await.is_some()
    }

    /// Sends one change; its answer (None when the daemon is stopping).
    async fn apply(&self, change: DockerChange) -> Option<Response> {
        let (tx, rx) = oneshot::channel();
        self.requests.send((Request::Docker(change), tx)).await.ok()?;
        rx.await.ok()
    }
}

/// One connection: the running containers published, then events followed until the stream
/// ends or fails (`connected` once it got that far).
async fn session(url: &str, to_loop: &Loop, connected: &mut bool) -> anyhow::Result<()> {
    let docker = connect(url).await?;
    // Events from a moment before the list on: none is missed between the two (a repeated one
    // changes nothing).
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(1));
    let running = docker
        .list_containers(None::<ListContainersOptions>)
        .await
        .context("listing containers")?;
    let ids: BTreeSet<String> = running.iter().filter_map(|c| c.id.clone()).collect();
    if !to_loop.send(DockerChange::Running(ids.clone())).await {
        return Ok(());
    }
    let mut refused = BTreeMap::new();
    for id in &ids {
        if !refresh(&docker, id, to_loop, &mut refused).await? {
            return Ok(());
        }
    }
    info!("docker: connected to {url}, {} running container(s)", ids.len());
    let status = DockerStatus {
        url: url.to_owned(),
        connected: true,
        error: None,
    };
    if !to_loop.send(DockerChange::Status(status)).await {
        return Ok(());
    }
    *connected = true;
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(HashMap::from([(
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        )])),
    }));
    let mut retry = tokio::time::interval(RETRY);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return Ok(()) };
                let event = event.context("reading the event stream")?;
                if let Some(id) = container_of(&event)
                    && !refresh(&docker, &id, to_loop, &mut refused).await?
                {
                    return Ok(());
                }
            }
            _ = retry.tick(), if !refused.is_empty() => {
                let ids: Vec<String> = refused.keys().cloned().collect();
                for id in ids {
                    if !refresh(&docker, &id, to_loop, &mut refused).await? {
                        return Ok(());
                    }
                }
            }
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<Docker> {
    let version = bollard::API_DEFAULT_VERSION;
    let docker = if let Some(path) = url.strip_prefix("unix://") {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("no Docker socket at {path} (is dockerd running?)")
            }
            _ => {}
        }
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, version)
    } else {
        Docker::connect_with_http(url, REQUEST_TIMEOUT_SECS, version)
    }
    .with_context(|| format!("connecting to {url}"))?;
    // dockerd answers in the API version it speaks (1.41 for 20.10).
    docker.negotiate_version().await.map_err(|e| match e {
        bollard::errors::Error::IOError { err } if err.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied on {url}: the daemon must run as root or in group docker")
        }
        e => anyhow::Error::new(e).context(format!("connecting to {url}")),
    })
}

/// The container an event is about: a container event's actor, a network event's `container`.
fn container_of(event: &EventMessage) -> Option<String> {
    const CONTAINER_ACTIONS: [&str; 4] = ["start", "die", "destroy", "rename"];
    let actor = event.actor.as_ref()?;
    let action = event.action.as_deref()?;
    match event.typ? {
        EventMessageTypeEnum::CONTAINER if CONTAINER_ACTIONS.contains(&action) => actor.id.clone(),
        EventMessageTypeEnum::NETWORK if matches!(action, "connect" | "disconnect") => {
            actor.attributes.as_ref()?.get("container").cloned()
        }
        _ => None,
    }
}

/// Inspects container `id` and sends what it publishes now (nothing once it stopped or went).
/// A refusal (a port another owner published first) puts it in `refused` with the daemon's
/// answer, to be tried again (logged when the answer changes). False when the daemon is stopping.
async fn refresh(
    docker: &Docker,
    id: &str,
    to_loop: &Loop,
    refused: &mut BTreeMap<String, String>,
) -> anyhow::Result<bool> {
    let (container, published) = match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(inspect) => (bindings::container_of(&inspect), bindings::published(&inspect)),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => (
            DockerContainer {
                id: id.to_owned(),
                name: String::new(),
            },
            bindings::Published::default(),
        ),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("inspecting container {id}"))),
    };
    for skipped in &published.skipped {
        info!("docker: container {}: {skipped}", container.name);
    }
    match to_loop
        .apply(DockerChange::Container(container, published.mappings))
        .await
    {
        None => return Ok(false),
        Some(Response::Error { message }) => {
            if refused.get(id) != Some(&message) {
                error!("docker: {message} (tried again every {} s)", RETRY.as_secs());
            }
            refused.insert(id.to_owned(), message);
        }
        Some(_) => {
            refused.remove(id);
        }
    }
    Ok(true)
}
