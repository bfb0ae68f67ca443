//! The daemon's control protocol: one JSON request line, one JSON response line, over a
//! root-only Unix socket.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use portmap_common::MappingCounters;

use crate::model::{mapping::Mapping, table::DockerContainer};

/// Longest request line the daemon reads (a longer one is refused with an error line).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum Request {
    Add {
        spec: String,
        /// The mapping's own source allow-list (prefixes of its family); none: the host's.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allow: Vec<ipnet::IpNet>,
    },
    Del {
        spec: String,
    },
    /// Replace the backends of the mapping with the spec's host ports.
    Update {
        spec: String,
        /// Its own allow-list from now on (empty: none, the host's applies); absent: kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow: Option<Vec<ipnet::IpNet>>,
    },
    /// Read the config file again and apply it as one diff.
    Reload,
    List,
    Stats,
    /// Make the mappings of the container `owner` exactly `specs`, all or nothing (the CNI
    /// plugin's ADD; the same request again changes nothing).
    Publish {
        owner: String,
        specs: Vec<String>,
        /// The container's source allow-list (the CNI network's `allow`), of either family:
        /// each mapping takes the prefixes of its own, and a binding of a family the list does
        /// not name is not published. Empty: the host's list applies.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allow: Vec<ipnet::IpNet>,
    },
    /// Remove every mapping of the container `owner` (none is not an error).
    Unpublish {
        owner: String,
    },
    /// The mappings of every container, by owner.
    Containers,
    /// From the daemon's Docker follower; never read from the control socket.
    #[serde(skip)]
    Docker(DockerChange),
}

/// What the Docker follower tells the daemon's main loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerChange {
    /// The containers that run (after a connect): every other Docker container's mappings go.
    Running(std::collections::BTreeSet<String>),
    /// A container's mappings as Docker publishes them now (none: it stopped or went).
    Container(DockerContainer, Vec<Mapping>),
    /// Connected to dockerd, or not (and why).
    Status(DockerStatus),
}

/// The Docker follower's connection, as `stats` and the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerStatus {
    /// The `docker` setting.
    pub url: String,
    pub connected: bool,
    /// Why it is not connected (retried every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counters of one mapping, summed over CPUs (their fields inline in the JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingStats {
    pub mapping: Mapping,
    #[serde(flatten)]
    pub counters: MappingCounters,
    /// New flows refused by the mapping's allow-list (`drop_denied` of the global counters,
    /// per mapping; the socket hooks' refusals included).
    #[serde(default)]
    pub drop_denied: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    pub mappings: Vec<MappingStats>,
    /// Global outcome counters (`portmap_common::Stat::ALL`, each by `Stat::name`), in code order.
    pub counters: Vec<(String, u64)>,
    /// Assured flows in the conntrack table at the last expiry pass.
    pub active_flows: u64,
    /// Assured flows the conntrack table holds (`limits.conntrack_entries` / 2).
    pub flow_capacity: u64,
    /// Flows not assured yet (no completed handshake or no reply) at the last expiry pass.
    pub new_flows: u64,
    /// Flows the table of new flows holds (`limits.conntrack_new_entries` / 2).
    pub new_flow_capacity: u64,
    /// The client-facing interfaces, each with whether its programs are attached (false: the
    /// interface does not exist; it is attached again when it comes back).
    #[serde(default)]
    pub interfaces: Vec<(String, bool)>,
    /// Backends behind a veth of this host that the datapath sends to directly (the fast path;
    /// others take a FIB lookup per packet).
    #[serde(default)]
    pub local_backends: Vec<LocalBackendReport>,
    /// The Docker follower (absent unless `docker` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerStatus>,
}

/// A backend on the local fast path: its address, the host-side veth it is sent into, and its MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalBackendReport {
    pub addr: std::net::IpAddr,
    pub device: String,
    pub mac: String,
}

impl StatsReport {
    /// A global counter by name (`portmap_common::Stat::name`).
    #[must_use]
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The counters of the mapping that publishes `host_port` (on any address).
    #[must_use]
    pub fn mapping_on_port(&self, host_port: u16) -> Option<&MappingStats> {
        self.mappings
            .iter()
            .find(|m| m.mapping.host_ports.is_some_and(|r| r.contains(host_port)))
    }
}

/// A request for the daemon's main loop and where its answer goes (control connections and
/// metrics scrapes queue them alike).
pub type Pending = (Request, tokio::sync::oneshot::Sender<Response>);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "lowercase")]
pub enum Response {
    Ok {
        message: String,
    },
    Error {
        message: String,
    },
    Mappings {
        mappings: Vec<Listed>,
    },
    Stats {
        stats: StatsReport,
    },
    Containers {
        containers: std::collections::BTreeMap<String, Vec<Mapping>>,
    },
}

/// A mapping as `list` shows it: with its owner (`list --json` stays a valid config file: the
/// config ignores `owner`, and owns what it lists).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    #[serde(flatten)]
    pub mapping: Mapping,
    /// `config`, `cli`, or the container that published it (`Origin::owner`).
    #[serde(default)]
    pub owner: String,
}

impl Listed {
    /// `--owner WANTED`: the owner as listed, or a container's ID prefix, or a Docker
    /// container's name.
    #[must_use]
    pub fn owned_by(&self, wanted: &str) -> bool {
        self.owner == wanted
            || container_id(&self.owner).is_some_and(|id| !wanted.is_empty() && id.starts_with(wanted))
            || matches!(owner_parts(&self.owner)[..], [DOCKER, name, _] if name == wanted)
    }

    /// The owner as the `list` table shows it: container IDs cut to 12 characters, as Docker's.
    #[must_use]
    pub fn short_owner(&self) -> String {
        let short = |id: &str| id[..id.len().min(12)].to_owned();
        match owner_parts(&self.owner)[..] {
            [DOCKER, name, id] => format!("{DOCKER}/{name}/{}", short(id)),
            [network, id, ifname] => format!("{network}/{}/{ifname}", short(id)),
            _ => self.owner.clone(),
        }
    }
}

/// The first part of a Docker container's owner (`docker/NAME/ID`, `Origin::owner`).
const DOCKER: &str = "docker";

fn owner_parts(owner: &str) -> Vec<&str> {
    owner.split('/').collect()
}

/// The container ID of a container's owner (CNI's `NETWORK/CONTAINER_ID/IFNAME`, Docker's
/// `docker/NAME/ID`).
fn container_id(owner: &str) -> Option<&str> {
    match owner_parts(owner)[..] {
        [DOCKER, _, id] | [_, id, _] => Some(id),
        _ => None,
    }
}

/// A request line the daemon cannot read. The message says where and why (serde_json names the
/// unknown request, the missing or mistyped field, and the column).
#[derive(Debug, thiserror::Error)]
#[error("bad request: {0}")]
pub struct RequestError(serde_json::Error);

/// Parses one request line. Pure, so that it can be tested for any input.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    serde_json::from_str(line).map_err(RequestError)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the portmap daemon is not running (no control socket at {path}): start it with `portmap run`, or pass --socket"
    )]
    NotRunning { path: String },
    #[error("permission denied on {path}: the control socket is root-only")]
    Permission { path: String },
    #[error("talking to the daemon at {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(serde_json::Error),
}

/// Whether a daemon accepts connections on `socket` (a file nobody answers on is a crashed
/// daemon's).
#[must_use]
pub fn daemon_answers(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let io = |error: std::io::Error| ClientError::Io {
        path: path.clone(),
        error,
    };
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path: path.clone() }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Permission { path: path.clone() },
        _ => io(e),
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(ClientError::Protocol)?;
    line.push('\n');
    send_all(&stream, line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(ClientError::Protocol)
}

/// Writes `bytes` to the daemon with `MSG_NOSIGNAL`: a daemon that closed the connection is an
/// error (EPIPE) the command reports, not a SIGPIPE that ends it without a word (the CLI has
/// SIGPIPE at its default, for its standard output).
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::AsRawFd as _;
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(owner: &str) -> Listed {
        Listed {
            mapping: crate::model::spec::parse("8080:198.18.2.2:80").unwrap(),
            owner: owner.into(),
        }
    }

    #[test]
    fn owners_filter_by_name_or_container_id_prefix() {
        let container = listed("podman/0123456789abcdef0123/eth0");
        assert!(container.owned_by("podman/0123456789abcdef0123/eth0"));
        assert!(container.owned_by("0123456789ab"));
        assert!(container.owned_by("0123456789abcdef0123"));
        assert!(!container.owned_by("123"));
        assert!(!container.owned_by(""));
        assert!(!container.owned_by("podman"));
        assert_eq!(container.short_owner(), "podman/0123456789ab/eth0");
        assert!(listed("config").owned_by("config") && !listed("config").owned_by("cli"));
        assert_eq!(listed("cli").short_owner(), "cli");
        let docker = listed("docker/web/fedcba9876543210fedcba");
        assert!(
            docker.owned_by("web")
                && docker.owned_by("fedcba98")
                && docker.owned_by("docker/web/fedcba9876543210fedcba")
        );
        assert!(!docker.owned_by("docker") && !docker.owned_by("we"));
        assert_eq!(docker.short_owner(), "docker/web/fedcba987654");
    }

    /// `list --json` carries the owner and stays a config file (the config ignores `owner`).
    #[test]
    fn listed_json_has_the_owner_and_is_a_config() {
        let json = serde_json::json!({ "mappings": [listed("cli")] });
        assert_eq!(json["mappings"][0]["owner"], "cli");
        assert_eq!(json["mappings"][0]["protocol"], "tcp");
        let config = crate::config::Config::from_json(&format!(
            "{{\"interfaces\": [\"eth0\"], \"mappings\": {}}}",
            json["mappings"]
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(config.mappings, vec![listed("cli").mapping]);
        let back: Listed = serde_json::from_value(json["mappings"][0].clone()).unwrap();
        assert_eq!(back, listed("cli"));
    }

    #[test]
    fn wire_format_is_stable() {
        let r = Request::Add {
            spec: "8080:198.18.2.2:80".into(),
            allow: vec![],
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"request":"add","spec":"8080:198.18.2.2:80"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"list"}"#).unwrap(),
            Request::List
        );
    }

    /// Request-shaped lines: objects with known and unknown request names and fields of
    /// every JSON type, and arbitrary text. An error says where (a column) or names the
    /// unknown variant or missing field in backquotes.
    fn request_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let name = prop_oneof![
            Just("\"add\""),
            Just("\"del\""),
            Just("\"list\""),
            Just("\"stats\""),
            Just("\"update\""),
            Just("\"reload\""),
            Just("\"ADD\""),
            Just("7"),
            Just("null")
        ];
        let spec = prop_oneof![
            Just(String::new()),
            Just(",\"spec\":\"8080:198.18.2.2:80\"".to_string()),
            "\\PC{0,20}".prop_map(|s| format!(",\"spec\":{}", serde_json::Value::String(s))),
            Just(",\"spec\":42".to_string()),
            Just(",\"extra\":[]".to_string()),
        ];
        prop_oneof![
            (name, spec).prop_map(|(n, s)| format!("{{\"request\":{n}{s}}}")),
            "\\PC{0,80}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn requests_parse_or_say_where_and_why(line in request_like()) {
            match parse_request(&line) {
                Ok(request) => {
                    let again = serde_json::to_string(&request).unwrap();
                    proptest::prop_assert_eq!(parse_request(&again).unwrap(), request);
                }
                Err(e) => {
                    let msg = e.to_string();
                    proptest::prop_assert!(msg.starts_with("bad request: ") && (msg.contains("column") || msg.contains('`')), "{line:?}: {msg}");
                }
            }
        }
    }
}
