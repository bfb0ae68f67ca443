//! What a Docker container publishes, as Docker means it: its `NetworkSettings.Ports` (each
//! container port with its host bindings, the ports `-P` chose included) turned into portmap
//! mappings onto the container's address on the network that carries the bindings. Pure, so that
//! every binding shape is unit-tested from inspect output as dockerd writes it.

use std::{collections::BTreeMap, net::IpAddr};

use bollard::models::{ContainerInspectResponse, EndpointSettings};

use crate::model::{
    allow,
    mapping::{Backend, Mapping, PortRange, Protocol},
    table::DockerContainer,
};

/// A container's mappings, and the bindings it has that portmap does not publish, each with the
/// reason (logged by the follower).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub mappings: Vec<Mapping>,
    pub skipped: Vec<String>,
}

/// The container's ID and name (Docker's names start with `/`).
#[must_use]
pub fn container_of(inspect: &ContainerInspectResponse) -> DockerContainer {
    DockerContainer {
        id: inspect.id.clone().unwrap_or_default(),
        name: inspect
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
    }
}

/// Whether the container runs (a stopped one publishes nothing).
#[must_use]
pub fn running(inspect: &ContainerInspectResponse) -> bool {
    inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

/// The mappings of a running container's bindings (none for a stopped one). A binding on
/// `0.0.0.0` (or no host IP) goes to the container's IPv4 address, one on `::` to its IPv6 address;
/// a binding of a family the container has no address of is skipped (portmap translates
/// addresses, not families). Consecutive ports with consecutive container ports become one
/// range mapping (Docker lists a range port by port).
#[must_use]
pub fn published(inspect: &ContainerInspectResponse) -> Published {
    let mut out = Published::default();
    if !running(inspect) {
        return out;
    }
    let Some(settings) = &inspect.network_settings else {
        return out;
    };
    let ports = settings.ports.clone().unwrap_or_default();
    if ports.values().all(|b| b.as_ref().is_none_or(Vec::is_empty)) {
        return out;
    }
    let mode = inspect
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref());
    let Some((network, endpoint)) = carrier(mode, settings.networks.as_ref()) else {
        out.skipped.push(format!(
            "no published port: the container has no bridge network address (network mode {})",
            mode.unwrap_or("default")
        ));
        return out;
    };
    let v4 = address(endpoint.ip_address.as_deref());
    let v6 = address(endpoint.global_ipv6_address.as_deref());
    // (protocol, host address, host port) → container port, in order, for merging runs.
    let mut singles: BTreeMap<(Protocol, IpAddr, u16), (IpAddr, u16)> = BTreeMap::new();
    for (port, bindings) in &ports {
        let Some((container_port, protocol)) = container_port(port) else {
            out.skipped
                .push(format!("{port}: not a PORT/PROTOCOL Docker writes"));
            continue;
        };
        for binding in bindings.iter().flatten() {
            let host_ip = match binding.host_ip.as_deref().unwrap_or_default() {
                "" => IpAddr::from([0, 0, 0, 0]),
                ip => match ip.parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        out.skipped
                            .push(format!("{port}: host IP '{ip}' is not an address"));
                        continue;
                    }
                },
            };
            let Some(host_port) = binding
                .host_port
                .as_deref()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
            else {
                out.skipped.push(format!("{port}: no host port"));
                continue;
            };
            let backend = if host_ip.is_ipv6() { v6 } else { v4 };
            let Some(backend) = backend else {
                out.skipped.push(format!(
                    "{}:{host_port}->{port} not published: the container has no {} address on \
                     network {network} (portmap does not translate between IPv4 and IPv6)",
                    crate::model::mapping::SpecAddr(host_ip),
                    if host_ip.is_ipv6() { "IPv6" } else { "IPv4" },
                ));
                continue;
            };
            singles.insert((protocol, host_ip, host_port), (backend, container_port));
        }
    }
    let mappings = merge_runs(singles);
    match allow_label(inspect) {
        Ok(list) => {
            let (kept, left_out) = allow::for_container(mappings, &list);
            out.skipped.extend(allow::left_out_message(&left_out));
            out.mappings = kept;
        }
        // Closed, not open: a list that cannot be read publishes nothing.
        Err(e) => out
            .skipped
            .push(format!("label {ALLOW_LABEL}: {e}: no port published")),
    }
    out
}

/// The container label that gives its mappings a source allow-list: prefixes of either family,
/// comma-separated (`model::allow::for_container`).
pub const ALLOW_LABEL: &str = "portmap.allow";

/// The container's `portmap.allow` list, checked (none: empty).
fn allow_label(inspect: &ContainerInspectResponse) -> Result<Vec<ipnet::IpNet>, allow::AllowError> {
    let Some(text) = inspect
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|labels| labels.get(ALLOW_LABEL))
    else {
        return Ok(Vec::new());
    };
    let list = allow::parse_list(text)?;
    allow::check_list(&list)?;
    Ok(list)
}

/// The network whose address the bindings lead to: the container's primary network (its network
/// mode, `default` being `bridge`), else the first of its networks (by name) with an address.
/// Docker programs a container's port bindings on one bridge endpoint, its primary one.
fn carrier<'a>(
    mode: Option<&'a str>,
    networks: Option<&'a std::collections::HashMap<String, EndpointSettings>>,
) -> Option<(&'a str, &'a EndpointSettings)> {
    let networks = networks?;
    let has_address = |e: &EndpointSettings| {
        address(e.ip_address.as_deref()).is_some() || address(e.global_ipv6_address.as_deref()).is_some()
    };
    let primary = match mode {
        None | Some("default") => "bridge",
        Some(mode) => mode,
    };
    if let Some((name, e)) = networks.get_key_value(primary).filter(|(_, e)| has_address(e)) {
        return Some((name.as_str(), e));
    }
    let mut by_name: Vec<_> = networks.iter().filter(|(_, e)| has_address(e)).collect();
    by_name.sort_by_key(|(name, _)| name.as_str());
    by_name.first().map(|(name, e)| (name.as_str(), *e))
}

fn address(text: Option<&str>) -> Option<IpAddr> {
    text.filter(|t| !t.is_empty()).and_then(|t| t.parse().ok())
}

/// `80/tcp` → (80, tcp).
fn container_port(key: &str) -> Option<(u16, Protocol)> {
    let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
    let protocol = match protocol {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    Some((port.parse().ok()?, protocol))
}

/// Single-port bindings, sorted, into mappings: a run of host ports whose container ports run
/// alike to one backend address becomes one range mapping.
fn merge_runs(singles: BTreeMap<(Protocol, IpAddr, u16), (IpAddr, u16)>) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for ((protocol, host_ip, host_port), (ip, port)) in singles {
        if let Some(last) = out.last_mut()
            && let (Some(hosts), [backend]) = (last.host_ports.as_mut(), last.backends.as_mut_slice())
            && last.protocol == protocol
            && last.host_ip == host_ip
            && backend.ip == ip
            && u32::from(hosts.end) + 1 == u32::from(host_port)
            && u32::from(backend.ports.end) + 1 == u32::from(port)
        {
            hosts.end = host_port;
            backend.ports.end = port;
            continue;
        }
        out.push(Mapping {
            protocol,
            host_ip,
            host_ports: Some(PortRange::single(host_port)),
            backends: vec![Backend {
                ip,
                ports: PortRange::single(port),
                weight: 1,
            }],
            allow: Vec::new(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Inspect output as dockerd 20.10 writes it (the fields the follower reads).
    fn inspect(ports: Value, networks: Value, mode: &str, running: bool) -> ContainerInspectResponse {
        serde_json::from_value(json!({
            "Id": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Name": "/web",
            "State": {"Running": running},
            "HostConfig": {"NetworkMode": mode},
            "NetworkSettings": {"Ports": ports, "Networks": networks},
        }))
        .unwrap()
    }

    #[test]
    fn the_allow_label_lists_each_familys_sources_and_a_bad_one_publishes_nothing() {
        let ports = json!({"8000/tcp": [
            {"HostIp": "0.0.0.0", "HostPort": "8080"},
            {"HostIp": "::", "HostPort": "8080"}
        ]});
        let labelled = |label: &str| {
            let mut i = inspect(
                ports.clone(),
                bridge("198.18.60.2", "fd00:60::2"),
                "default",
                true,
            );
            i.config = Some(bollard::models::ContainerConfig {
                labels: Some([(ALLOW_LABEL.to_owned(), label.to_owned())].into()),
                ..Default::default()
            });
            published(&i)
        };
        let v4_only = labelled("198.18.1.0/24, 198.18.3.7");
        assert_eq!(v4_only.mappings.len(), 1);
        assert_eq!(
            v4_only.mappings[0].allow,
            vec!["198.18.1.0/24".parse().unwrap(), "198.18.3.7/32".parse().unwrap()]
        );
        assert!(
            v4_only.skipped[0].contains("names no prefix of their family"),
            "{:?}",
            v4_only.skipped
        );
        let both = labelled("198.18.1.0/24,fd00:1::/64");
        assert_eq!(both.mappings.len(), 2);
        assert!(both.skipped.is_empty());
        let bad = labelled("198.18.1.1/24");
        assert!(bad.mappings.is_empty());
        assert!(bad.skipped[0].contains("host bits set"), "{:?}", bad.skipped);
    }

    fn bridge(v4: &str, v6: &str) -> Value {
        json!({"bridge": {"IPAddress": v4, "GlobalIPv6Address": v6}})
    }

    fn specs(p: &Published) -> Vec<String> {
        p.mappings.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn dual_stack_bindings_go_to_each_family_and_a_missing_family_is_skipped() {
        let ports = json!({"8000/tcp": [
            {"HostIp": "0.0.0.0", "HostPort": "8080"},
            {"HostIp": "::", "HostPort": "8080"}
        ]});
        let both = published(&inspect(
            ports.clone(),
            bridge("198.18.60.2", "fd00:60::2"),
            "default",
            true,
        ));
        assert_eq!(
            specs(&both),
            ["8080:198.18.60.2:8000/tcp", "8080:[fd00:60::2]:8000/tcp"]
        );
        assert!(both.skipped.is_empty());
        let v4_only = published(&inspect(ports, bridge("198.18.60.2", ""), "default", true));
        assert_eq!(specs(&v4_only), ["8080:198.18.60.2:8000/tcp"]);
        assert_eq!(v4_only.skipped.len(), 1);
        assert!(v4_only.skipped[0].contains("no IPv6 address on network bridge"));
    }

    #[test]
    fn loopback_host_ip_udp_and_a_range_as_docker_lists_them() {
        let ports = json!({
            "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}],
            "9000/tcp": [{"HostIp": "198.18.0.1", "HostPort": "7000"}],
            "9001/tcp": [{"HostIp": "198.18.0.1", "HostPort": "7001"}],
            "9002/tcp": [{"HostIp": "198.18.0.1", "HostPort": "7002"}],
            "9004/tcp": [{"HostIp": "198.18.0.1", "HostPort": "7003"}],
            "22/tcp": null,
        });
        let p = published(&inspect(ports, bridge("198.18.60.3", ""), "default", true));
        assert_eq!(
            specs(&p),
            [
                "198.18.0.1:7000-7002:198.18.60.3:9000-9002/tcp",
                "198.18.0.1:7003:198.18.60.3:9004/tcp",
                "127.0.0.1:5353:198.18.60.3:53/udp",
            ]
        );
    }

    #[test]
    fn a_user_network_carries_the_bindings_and_stopped_or_host_network_containers_publish_nothing() {
        let ports = json!({"8000/tcp": [{"HostIp": "", "HostPort": "9999"}]});
        let networks = json!({
            "other": {"IPAddress": "198.18.97.5"},
            "web_default": {"IPAddress": "198.18.96.2"},
        });
        let p = published(&inspect(ports.clone(), networks.clone(), "web_default", true));
        assert_eq!(specs(&p), ["9999:198.18.96.2:8000/tcp"]);
        // A mode naming no network of the container (a network ID): the first by name.
        let p = published(&inspect(ports.clone(), networks.clone(), "4f1e", true));
        assert_eq!(specs(&p), ["9999:198.18.97.5:8000/tcp"]);
        assert_eq!(
            published(&inspect(ports.clone(), networks, "web_default", false)),
            Published::default()
        );
        let host = published(&inspect(ports, json!({"host": {"IPAddress": ""}}), "host", true));
        assert!(host.mappings.is_empty() && host.skipped.len() == 1, "{host:?}");
    }

    #[test]
    fn the_container_is_named_without_dockers_slash() {
        let c = container_of(&inspect(json!({}), json!({}), "default", true));
        assert_eq!(c.name, "web");
        assert_eq!(c.owner(), format!("docker/web/{}", c.id));
    }
}
