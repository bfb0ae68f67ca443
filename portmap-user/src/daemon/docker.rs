//! The Docker follower's changes (`crate::docker`), applied like a CNI publish: a container's
//! mappings all or nothing, owned by the container (`Origin::Docker`, by ID).
//!
//! Who wins a port: whoever published it first. dockerd's own reservation socket on a port of
//! the container is no conflict (its bind succeeded, so nobody else held the port: the check
//! against the host's sockets is skipped). A port that another owner (the config, `portmap add`,
//! a CNI container, another Docker container) published first refuses the container's whole set,
//! named with both owners; the follower tries again until that mapping goes.

use std::collections::BTreeSet;

use anyhow::bail;
use log::info;

use super::state::State;
use crate::{
    host::sockets::NoSockets,
    model::{
        mapping::Mapping,
        table::{DockerContainer, Origin, TableError},
    },
};

/// Makes the mappings of `container` exactly `mappings` (none: removes them); answers with what
/// changed. A container without a name (it was destroyed) is the one with its ID.
pub(super) fn publish(
    state: &mut State,
    mut container: DockerContainer,
    mappings: &[Mapping],
) -> anyhow::Result<String> {
    let known = state
        .table
        .docker_containers()
        .into_iter()
        .find(|c| c.id == container.id);
    match (&known, container.name.is_empty()) {
        (Some(known), true) => container.name.clone_from(&known.name),
        (Some(_), false) => state.table.rename_docker(&container),
        (None, _) if mappings.is_empty() => return Ok(String::new()),
        (None, _) => {}
    }
    let origin = Origin::Docker(container.clone());
    let plan = match state.table.apply_as(&mut state.dp, &origin, mappings, &NoSockets) {
        Ok(plan) => plan,
        Err(TableError::Allocated { spec, .. }) => {
            let taken: Vec<String> = mappings
                .iter()
                .filter_map(|m| state.table.owner_overlapping(m))
                .filter(|(_, owner)| *owner != origin.owner())
                .map(|(m, owner)| format!("{m} (owner {owner})"))
                .collect();
            bail!(
                "container {} ({}): {spec} not published: the port is published already by {}; \
                 the first owner keeps it",
                container.name,
                short(&container.id),
                taken.join(", ")
            );
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "container {} ({})",
                container.name,
                short(&container.id)
            )));
        }
    };
    let message = format!(
        "docker container {} ({}): {plan}",
        container.name,
        short(&container.id)
    );
    if !plan.is_empty() {
        info!("{message}");
    }
    Ok(message)
}

/// After a connect: the mappings of every Docker container that is not among `running` go (it
/// stopped or went while the follower was away).
pub(super) fn unpublish_gone(state: &mut State, running: &BTreeSet<String>) -> anyhow::Result<String> {
    let gone: Vec<DockerContainer> = state
        .table
        .docker_containers()
        .into_iter()
        .filter(|c| !running.contains(&c.id))
        .collect();
    for container in &gone {
        publish(state, container.clone(), &[])?;
    }
    Ok(format!("{} container(s) gone", gone.len()))
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
