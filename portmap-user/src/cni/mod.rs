//! `portmap-cni`: portmap as the port-mapping plugin of a CNI chain (podman, containerd, CRI-O,
//! Kubernetes hostPort), in place of containernetworking's `portmap`. It publishes through the
//! running daemon: a container's mappings belong to it (owner `NETWORK/CONTAINER_ID/IFNAME`),
//! are replaced as a whole by ADD (the same ADD again changes nothing), removed by DEL, checked
//! by CHECK, and survive daemon restarts with the daemon's other state.
//!
//! Commands: ADD, DEL, CHECK, VERSION (spec 1.0.0) and STATUS, GC (1.1.0). Errors are CNI error
//! JSON on stdout (`code`, `msg`, `details`) with exit status 1. Run with arguments it is a
//! command line instead (`portmap-cni install`, see `install`).

pub mod conf;
pub mod install;

use std::{collections::BTreeSet, path::Path};

use serde::Serialize;
use serde_json::{Value, json};

use self::conf::{NetConf, SUPPORTED_VERSIONS, container_ips, specs};

/// CNI error code 11: try again later (the daemon is not running).
const NOT_RUNNING: u32 = 11;
use crate::{
    api::{
        control::{self, ClientError, Request, Response},
        pending,
    },
    model::{allow, mapping::Mapping},
};

/// A CNI error result.
#[derive(Debug, Serialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: String, details: impl std::fmt::Display) -> Self {
        Self {
            code,
            msg,
            details: details.to_string(),
        }
    }

    /// Code 6: the input is not the JSON it must be.
    pub fn decode(e: &serde_json::Error) -> Self {
        Self::new(6, "cannot decode the network configuration".to_owned(), e)
    }

    /// The JSON a runtime reads (with the configuration's version when it is known).
    #[must_use]
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The CNI_* environment of one invocation.
#[derive(Debug, Default)]
pub struct Invocation {
    pub command: String,
    pub container_id: Option<String>,
    pub ifname: Option<String>,
}

impl Invocation {
    #[must_use]
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            ifname: var("CNI_IFNAME"),
        }
    }

    fn owner(&self, conf: &NetConf) -> Result<String, CniError> {
        let missing =
            |name: &str| CniError::new(4, format!("{name} is not set"), "ADD, DEL and CHECK need it");
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| missing("CNI_CONTAINERID"))?;
        let ifname = self.ifname.as_deref().ok_or_else(|| missing("CNI_IFNAME"))?;
        Ok(conf.owner(id, ifname))
    }
}

/// Runs one command; `Ok(Some(json))` is printed on stdout.
pub fn run(inv: &Invocation, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match inv.command.as_str() {
        "VERSION" => Ok(Some(version(stdin))),
        "ADD" => add(inv, &NetConf::parse(stdin)?).map(Some),
        "DEL" => del(inv, &NetConf::parse(stdin)?).map(|()| None),
        "CHECK" => check(inv, &NetConf::parse(stdin)?).map(|()| None),
        "STATUS" => status(&NetConf::parse(stdin)?).map(|()| None),
        "GC" => gc(&NetConf::parse(stdin)?).map(|()| None),
        "" => Err(CniError::new(4, "CNI_COMMAND is not set".to_owned(), "")),
        other => Err(CniError::new(
            4,
            format!("unknown CNI_COMMAND '{other}'"),
            "ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    }
}

fn version(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()));
    json!({
        "cniVersion": asked.unwrap_or_else(|| "1.1.0".to_owned()),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// One request to the daemon; not running is "try again later" (11).
fn call(conf: &NetConf, request: &Request) -> Result<Response, CniError> {
    control::call(Path::new(&conf.socket), request).map_err(|e| match e {
        // Said once, in the plugin's terms: the conflist's `socket` key, not the CLI's --socket.
        ClientError::NotRunning { path } => CniError::new(
            NOT_RUNNING,
            "the portmap daemon is not running".to_owned(),
            format!(
                "no control socket at {path}: start the daemon (`portmap run`, or its systemd unit), or \
                 set this plugin's \"socket\" key in the conflist to the socket it listens on"
            ),
        ),
        _ => CniError::new(5, "cannot reach the portmap daemon".to_owned(), e),
    })
}

fn refused(msg: String, response: Response) -> CniError {
    match response {
        Response::Error { message } => CniError::new(100, msg, message),
        other => CniError::new(5, msg, format!("unexpected answer {other:?}")),
    }
}

/// The specs the configuration and `prevResult` ask for.
fn wanted(conf: &NetConf) -> Result<(Vec<String>, &Value), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            7,
            "no prevResult: portmap-cni is a chained plugin".to_owned(),
            "list it after an interface plugin such as bridge in a conflist",
        )
    })?;
    let ips = container_ips(prev)?;
    let specs = specs(&conf.runtime_config.port_mappings, ips)?;
    if specs.is_empty() && !conf.runtime_config.port_mappings.is_empty() {
        // Asked to publish and nothing to publish to: never a success.
        return Err(CniError::new(
            7,
            "prevResult has no container address for the portMappings".to_owned(),
            "the interface plugin before portmap-cni gave the container no IPv4 or IPv6 address \
             of the families the mappings ask for",
        ));
    }
    Ok((specs, prev))
}

/// The network's `allow`, parsed and checked; a bad prefix is an invalid network config (7).
fn allow_list(conf: &NetConf) -> Result<Vec<ipnet::IpNet>, CniError> {
    let invalid = |e: allow::AllowError| CniError::new(7, format!("network {}: {e}", conf.name), "");
    let list = conf
        .allow
        .iter()
        .map(|text| allow::parse_prefix(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    allow::check_list(&list).map_err(invalid)?;
    Ok(list)
}

fn add(inv: &Invocation, conf: &NetConf) -> Result<Value, CniError> {
    let owner = inv.owner(conf)?;
    let allow = allow_list(conf)?;
    let (specs, prev) = wanted(conf)?;
    let ports: BTreeSet<String> = conf
        .runtime_config
        .port_mappings
        .iter()
        .map(|m| {
            let protocol = m.protocol.to_ascii_lowercase();
            format!(
                "{}/{}",
                m.host_port,
                if protocol.is_empty() { "tcp" } else { &protocol }
            )
        })
        .collect();
    match call(conf, &Request::Publish { owner, specs, allow })? {
        Response::Ok { .. } => {}
        other => {
            let ports: Vec<String> = ports.into_iter().collect();
            return Err(refused(
                format!("cannot publish host port(s) {}", ports.join(", ")),
                other,
            ));
        }
    }
    let mut result = prev.clone();
    if let Some(obj) = result.as_object_mut() {
        obj.insert("cniVersion".into(), json!(conf.cni_version));
    }
    Ok(result)
}

/// Removes the container's ports; with no daemon running, records the removal for the next
/// one (`api::pending`) and succeeds, as DEL must once nothing is left to do now.
fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let owner = inv.owner(conf)?;
    match call(conf, &Request::Unpublish { owner: owner.clone() }) {
        Ok(Response::Ok { .. }) => Ok(()),
        Ok(other) => Err(refused("cannot remove the container's ports".to_owned(), other)),
        Err(e) if e.code == NOT_RUNNING => {
            pending::record(Path::new(&conf.socket), &owner).map_err(|io| {
                CniError::new(
                    5,
                    "the portmap daemon is not running and the removal could not be recorded for it"
                        .to_owned(),
                    format!("{}: {io}", pending::path_for(Path::new(&conf.socket)).display()),
                )
            })?;
            // A daemon that started meanwhile may have read the record already: ask it too
            // (removing what is gone is no change; the record is applied again harmlessly).
            let _ = call(conf, &Request::Unpublish { owner });
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn containers(conf: &NetConf) -> Result<std::collections::BTreeMap<String, Vec<Mapping>>, CniError> {
    match call(conf, &Request::Containers)? {
        Response::Containers { containers } => Ok(containers),
        other => Err(refused("cannot list the containers' ports".to_owned(), other)),
    }
}

fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let owner = inv.owner(conf)?;
    let (specs, _) = wanted(conf)?;
    let parsed = specs
        .iter()
        .map(|s| crate::model::spec::parse(s).map_err(|e| CniError::new(7, format!("'{s}': {e}"), "")))
        .collect::<Result<Vec<Mapping>, _>>()?;
    let want: BTreeSet<Mapping> = allow::for_container(parsed, &allow_list(conf)?)
        .0
        .into_iter()
        .collect();
    let have: BTreeSet<Mapping> = containers(conf)?
        .remove(&owner)
        .unwrap_or_default()
        .into_iter()
        .collect();
    if have != want {
        let show =
            |set: &BTreeSet<Mapping>| set.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        return Err(CniError::new(
            100,
            format!("the ports of {owner} are not as configured"),
            format!("published: [{}]; configured: [{}]", show(&have), show(&want)),
        ));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    if control::daemon_answers(Path::new(&conf.socket)) {
        Ok(())
    } else {
        Err(CniError::new(
            50,
            "the portmap daemon is not running".to_owned(),
            format!("no answer on {}", conf.socket),
        ))
    }
}

/// Removes the ports of this network's attachments that are no longer valid.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: BTreeSet<String> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| conf.owner(&a.container_id, &a.ifname))
        .collect();
    let prefix = conf.owner_prefix();
    for owner in containers(conf)?.into_keys() {
        if owner.starts_with(&prefix) && !valid.contains(&owner) {
            match call(conf, &Request::Unpublish { owner })? {
                Response::Ok { .. } => {}
                other => return Err(refused("cannot remove stale ports".to_owned(), other)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a daemon the plugin says so once, and how to fix it in CNI terms.
    #[test]
    fn a_missing_daemon_is_named_once_with_the_conflist_key() {
        let conf = NetConf::parse(
            br#"{"cniVersion": "1.0.0", "name": "n", "type": "portmap-cni", "socket": "/nonexistent/pm.sock"}"#,
        )
        .unwrap();
        let err = call(&conf, &Request::List).unwrap_err();
        let text = format!("{}: {}", err.msg, err.details);
        assert_eq!(err.code, 11, "{text}");
        assert_eq!(text.matches("not running").count(), 1, "{text}");
        assert!(
            text.contains("/nonexistent/pm.sock")
                && text.contains("\"socket\" key")
                && !text.contains("--socket"),
            "{text}"
        );
    }
}
