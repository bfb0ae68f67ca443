//! What a container runtime hands the plugin (CNI spec 1.0/1.1, chained after an interface
//! plugin such as `bridge`), and the pure translation of its `runtimeConfig.portMappings` and
//! `prevResult` addresses into portmap specs.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use super::CniError;
use crate::config::DEFAULT_SOCKET;

/// Versions of the CNI spec this plugin speaks (VERSION lists them).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The network configuration on stdin.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The daemon's control socket (default /run/portmap/portmap.sock).
    #[serde(default = "default_socket")]
    pub socket: String,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// The network's source allow-list (`model::allow`): prefixes of either family, as text so
    /// that a bad one is named (`allow_list`). Empty: the host's list applies.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The result of the plugins before this one, passed through unchanged.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC (1.1): the attachments that are still in use.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_socket() -> String {
    DEFAULT_SOCKET.to_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One `runtimeConfig.portMappings` entry, as podman, containerd and Kubernetes (hostPort) send
/// it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[serde(default)]
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(stdin).map_err(|e| CniError::decode(&e))?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                1,
                format!("CNI version {} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// Who owns the mappings of a container's attachment to this network.
    #[must_use]
    pub fn owner(&self, container_id: &str, ifname: &str) -> String {
        format!("{}/{container_id}/{ifname}", self.name)
    }

    /// The prefix of every owner of this network.
    #[must_use]
    pub fn owner_prefix(&self) -> String {
        format!("{}/", self.name)
    }
}

/// The container's first IPv4 and first IPv6 address in `prevResult.ips`. Every entry must be
/// as the CNI spec has it (an object whose `address` is `IP/PREFIX`): anything else is an error
/// (code 7) that names the field, never a result without the container's addresses.
pub fn container_ips(prev_result: &Value) -> Result<(Option<IpAddr>, Option<IpAddr>), CniError> {
    let bad = |field: String, why: String| CniError::new(7, format!("prevResult.{field}: {why}"), "");
    let mut v4 = None;
    let mut v6 = None;
    let ips = match prev_result.get("ips") {
        None | Some(Value::Null) => return Ok((None, None)),
        Some(Value::Array(ips)) => ips,
        Some(other) => return Err(bad("ips".into(), format!("expected a list, found {other}"))),
    };
    for (i, ip) in ips.iter().enumerate() {
        let address = match ip.get("address") {
            Some(Value::String(address)) => address,
            Some(other) => {
                return Err(bad(
                    format!("ips[{i}].address"),
                    format!("expected a string, found {other}"),
                ));
            }
            None => return Err(bad(format!("ips[{i}]"), format!("no address in {ip}"))),
        };
        let addr = address
            .split_once('/')
            .filter(|(_, prefix)| prefix.parse::<u8>().is_ok())
            .and_then(|(addr, _)| addr.parse::<IpAddr>().ok())
            .ok_or_else(|| {
                bad(
                    format!("ips[{i}].address"),
                    format!("'{address}' is not an address with a prefix length (IP/PREFIX)"),
                )
            })?;
        match addr {
            IpAddr::V4(_) if v4.is_none() => v4 = Some(addr),
            IpAddr::V6(_) if v6.is_none() => v6 = Some(addr),
            _ => {}
        }
    }
    Ok((v4, v6))
}

fn spec_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The portmap specs of `mappings` to the container addresses `ips` (IPv4, IPv6): a mapping
/// without `hostIP` publishes the port on every host address of each family the container
/// has; one with a `hostIP` only to the container address of that family (none: skipped, as
/// the reference plugin does).
pub fn specs(
    mappings: &[PortMapping],
    ips: (Option<IpAddr>, Option<IpAddr>),
) -> Result<Vec<String>, CniError> {
    let mut specs = Vec::new();
    for m in mappings {
        let protocol = match m.protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => "tcp",
            "udp" => "udp",
            "sctp" => "sctp",
            other => {
                return Err(CniError::new(
                    7,
                    format!("portMappings: protocol '{other}' is not tcp, udp or sctp"),
                    format!("{m:?}"),
                ));
            }
        };
        if m.host_port == 0 || m.container_port == 0 {
            return Err(CniError::new(
                7,
                "portMappings: hostPort and containerPort must be 1-65535".to_owned(),
                format!("{m:?}"),
            ));
        }
        let host_ip: Option<IpAddr> = match m.host_ip.as_str() {
            "" => None,
            text => Some(text.parse().map_err(|e| {
                CniError::new(
                    7,
                    format!("portMappings: hostIP '{text}' is not an IP address"),
                    e,
                )
            })?),
        };
        let mut add = |container: Option<IpAddr>, host: Option<IpAddr>| {
            if let Some(container) = container {
                let host = host.map(|h| format!("{}:", spec_addr(h))).unwrap_or_default();
                specs.push(format!(
                    "{host}{}:{}:{}/{protocol}",
                    m.host_port,
                    spec_addr(container),
                    m.container_port
                ));
            }
        };
        match host_ip {
            None => {
                add(ips.0, None);
                add(ips.1, None);
            }
            Some(IpAddr::V4(_)) => add(ips.0, host_ip),
            Some(IpAddr::V6(_)) => add(ips.1, host_ip),
        }
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(host_port: u16, container_port: u16, protocol: &str, host_ip: &str) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: protocol.into(),
            host_ip: host_ip.into(),
        }
    }

    #[test]
    fn port_mappings_become_specs_per_family() {
        let prev: Value = serde_json::json!({
            "cniVersion": "1.0.0",
            "ips": [
                {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2},
                {"address": "fd00:88::5/64", "interface": 2},
                {"address": "10.88.0.6/16", "interface": 2}
            ]
        });
        let ips = container_ips(&prev).unwrap();
        let specs = specs(
            &[
                pm(8080, 80, "", ""),
                pm(5353, 53, "UDP", "198.18.0.1"),
                pm(8443, 443, "tcp", "fd00::1"),
            ],
            ips,
        )
        .unwrap();
        assert_eq!(
            specs,
            [
                "8080:10.88.0.5:80/tcp",
                "8080:[fd00:88::5]:80/tcp",
                "198.18.0.1:5353:10.88.0.5:53/udp",
                "[fd00::1]:8443:[fd00:88::5]:443/tcp",
            ]
        );
        for spec in &specs {
            crate::model::spec::parse(spec).unwrap();
        }
    }

    /// Every malformed `prevResult.ips` is an error (code 7) naming the field, never a result
    /// without the container's addresses.
    #[test]
    fn a_malformed_prev_result_names_the_field() {
        for (prev, field) in [
            (
                serde_json::json!({"ips": "10.88.0.5/16"}),
                "prevResult.ips: expected a list",
            ),
            (
                serde_json::json!({"ips": [{"address": 5}]}),
                "prevResult.ips[0].address: expected a string",
            ),
            (
                serde_json::json!({"ips": [{"gateway": "10.88.0.1"}]}),
                "prevResult.ips[0]: no address",
            ),
            (
                serde_json::json!({"ips": [{"address": "10.88.0.5"}]}),
                "prevResult.ips[0].address: '10.88.0.5'",
            ),
            (
                serde_json::json!({"ips": [{"address": "10.88.0.5/16"}, "x"]}),
                "prevResult.ips[1]: no address",
            ),
        ] {
            let e = container_ips(&prev).unwrap_err();
            assert_eq!(e.code, 7, "{prev}");
            assert!(e.msg.starts_with(field), "{prev}: {}", e.msg);
        }
        assert_eq!(container_ips(&serde_json::json!({})).unwrap(), (None, None));
    }

    #[test]
    fn bad_port_mappings_name_what_is_wrong() {
        let ips = (Some("10.88.0.5".parse().unwrap()), None);
        let err = specs(&[pm(8080, 80, "icmp", "")], ips).unwrap_err();
        assert!(err.msg.contains("protocol 'icmp'") && err.code == 7, "{err:?}");
        let err = specs(&[pm(0, 80, "", "")], ips).unwrap_err();
        assert!(err.msg.contains("hostPort"), "{err:?}");
        let err = specs(&[pm(80, 80, "", "localhost")], ips).unwrap_err();
        assert!(err.msg.contains("hostIP 'localhost'"), "{err:?}");
        // An IPv6 host address for a container without IPv6: nothing to publish.
        assert!(specs(&[pm(80, 80, "", "fd00::1")], ips).unwrap().is_empty());
    }

    #[test]
    fn unsupported_versions_and_bad_json_are_cni_errors() {
        let err = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"portmap-cni"}"#).unwrap_err();
        assert_eq!(err.code, 1);
        let err = NetConf::parse(b"{").unwrap_err();
        assert_eq!(err.code, 6);
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"portmap-cni"}"#).unwrap();
        assert_eq!(conf.socket, DEFAULT_SOCKET);
        assert_eq!(conf.owner("c1", "eth0"), "n/c1/eth0");
    }
}
