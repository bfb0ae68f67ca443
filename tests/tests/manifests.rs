//! The deployment files, checked offline against the real binaries' command lines and config:
//! the Kubernetes DaemonSet (dist/kubernetes/portmap.yaml: every command parses with the clap
//! definitions of `portmap` and `portmap-cni`, every path it names lies on a volume that puts
//! it where it must be on the node, the capabilities are the systemd unit's, the config it
//! mounts is valid) and the example conflist (dist/cni/). No cluster, no root needed.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser as _;
use portmap::{
    cli::{Cli, Command},
    cni::{
        conf::NetConf,
        install::{self, CliCommand},
    },
    config::{Config, DEFAULT_SOCKET},
};
use serde::Deserialize as _;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every document of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).with_context(|| format!("{}", path.display())))
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// A container of the pod with the volumes it can reach.
struct Container<'a> {
    spec: &'a Value,
    volumes: &'a [Value],
}

impl Container<'_> {
    fn name(&self) -> &str {
        self.spec["name"].as_str().unwrap_or("?")
    }

    /// The volume a path of this container lies on, and the path relative to its mount.
    fn volume_of(&self, path: &Path) -> anyhow::Result<(&Value, PathBuf)> {
        let mounts = self.spec["volumeMounts"].as_array().into_iter().flatten();
        let (mount, rest) = mounts
            .filter_map(|m| {
                let at = Path::new(m["mountPath"].as_str()?);
                path.strip_prefix(at).ok().map(|rest| (m, rest.to_path_buf()))
            })
            .max_by_key(|(m, _)| m["mountPath"].as_str().map_or(0, str::len))
            .with_context(|| format!("{}: {} is on no volume", self.name(), path.display()))?;
        let name = &mount["name"];
        let volume = self
            .volumes
            .iter()
            .find(|v| v["name"] == *name)
            .with_context(|| format!("{}: no volume {name}", self.name()))?;
        Ok((volume, rest))
    }

    /// Where a path of this container is on the node (it must lie on a hostPath volume).
    fn on_node(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let (volume, rest) = self.volume_of(path)?;
        let host = volume["hostPath"]["path"]
            .as_str()
            .with_context(|| format!("{}: {} is not on a hostPath volume", self.name(), path.display()))?;
        Ok(Path::new(host).join(rest))
    }

    fn command(&self) -> Vec<String> {
        strings(&self.spec["command"])
    }
}

#[test]
fn the_daemonset_matches_the_binaries() -> anyhow::Result<()> {
    let docs = yaml_documents(&repo("dist/kubernetes/portmap.yaml"))?;
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .with_context(|| format!("no {kind}"))
    };
    let config_map = find("ConfigMap")?;
    let daemonset = find("DaemonSet")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    ensure!(
        pod["hostNetwork"] == true,
        "the daemon must see the node's interfaces"
    );
    let volumes = pod["volumes"].as_array().context("volumes")?;
    let containers: Vec<Container> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .map(|spec| Container { spec, volumes })
        .collect();
    let mut plugin_socket = None;
    let mut daemon_config = None;
    for c in &containers {
        let command = c.command();
        let binary = command.first().context("no command")?;
        ensure!(
            binary.starts_with("/usr/local/bin/"),
            "{}: the Containerfile installs into /usr/local/bin",
            c.name()
        );
        match Path::new(binary).file_name().and_then(|n| n.to_str()) {
            Some("portmap-cni") => {
                let CliCommand::Install {
                    bin_dir,
                    conf_dir,
                    socket,
                } = install::Cli::try_parse_from(&command)?.command;
                ensure!(
                    c.on_node(&bin_dir)? == Path::new("/opt/cni/bin"),
                    "bin dir {bin_dir:?}"
                );
                ensure!(
                    c.on_node(&conf_dir)? == Path::new("/etc/cni/net.d"),
                    "conf dir {conf_dir:?}"
                );
                plugin_socket = Some(PathBuf::from(socket));
            }
            Some("portmap") => {
                let cli = Cli::try_parse_from(&command).with_context(|| format!("{command:?}"))?;
                let Command::Run { config, .. } = cli.command else {
                    bail!("{}: not `portmap run`: {command:?}", c.name());
                };
                let config = config.context("--config")?;
                let (volume, key) = c.volume_of(&config)?;
                let map = volume["configMap"]["name"]
                    .as_str()
                    .context("--config is not on a ConfigMap")?;
                ensure!(config_map["metadata"]["name"] == map, "ConfigMap {map}");
                let text = config_map["data"][key.to_str().context("key")?]
                    .as_str()
                    .with_context(|| format!("ConfigMap {map} has no {}", key.display()))?;
                let cfg = Config::from_toml(text)?;
                cfg.clone().validate()?;
                // Pins on the node's bpffs, so that the next pod adopts them.
                ensure!(
                    c.on_node(&cfg.startup.pin_dir)?.starts_with("/sys/fs/bpf"),
                    "pin_dir {:?}",
                    cfg.startup.pin_dir
                );
                // The saved mappings outlive the pod.
                c.on_node(&cfg.startup.state_file)?;
                let mount = cfg.startup.cgroup_mount.clone().context("cgroup_mount")?;
                ensure!(
                    c.on_node(&mount)? == Path::new("/sys/fs/cgroup"),
                    "cgroup_mount {mount:?}"
                );
                let caps: BTreeSet<String> = strings(&c.spec["securityContext"]["capabilities"]["add"])
                    .into_iter()
                    .map(|c| format!("CAP_{c}"))
                    .collect();
                ensure!(caps == unit_capabilities()?, "capabilities {caps:?}");
                for probe in ["livenessProbe", "readinessProbe"] {
                    let probe = strings(&c.spec[probe]["exec"]["command"]);
                    if !probe.is_empty() {
                        Cli::try_parse_from(&probe).with_context(|| format!("{probe:?}"))?;
                    }
                }
                daemon_config = Some((c.on_node(&cfg.startup.socket)?, cfg));
            }
            other => bail!("{}: unknown binary {other:?}", c.name()),
        }
    }
    let (daemon_socket, _) = daemon_config.context("no `portmap run` container")?;
    // The plugin runs on the node and must find the daemon's socket there.
    ensure!(
        plugin_socket.as_deref() == Some(daemon_socket.as_path()),
        "plugin socket {plugin_socket:?}, daemon socket on the node {daemon_socket:?}"
    );
    let containerfile = std::fs::read_to_string(repo("dist/kubernetes/Containerfile"))?;
    ensure!(
        containerfile.contains("target/release/portmap target/release/portmap-cni /usr/local/bin/"),
        "the Containerfile installs both binaries"
    );
    Ok(())
}

/// The capabilities of the systemd unit.
fn unit_capabilities() -> anyhow::Result<BTreeSet<String>> {
    let unit = std::fs::read_to_string(repo("dist/portmap.service"))?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("CapabilityBoundingSet")?;
    Ok(line.split_whitespace().map(str::to_owned).collect())
}

#[test]
fn the_example_conflist_chains_portmap_cni_after_the_interface_plugin() -> anyhow::Result<()> {
    let path = repo("dist/cni/87-portmap-bridge.conflist");
    let text = std::fs::read_to_string(&path)?;
    let list: Value = serde_json::from_str(&text)?;
    let plugins = list["plugins"].as_array().context("plugins")?;
    let i = plugins
        .iter()
        .position(|p| p["type"] == install::PLUGIN_TYPE)
        .context("no portmap-cni")?;
    ensure!(
        i == 1 && plugins[0]["type"] == "bridge",
        "portmap-cni follows bridge"
    );
    // What a runtime hands the plugin: the entry with the list's name and version.
    let mut conf = plugins[i].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    let parsed = NetConf::parse(conf.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(parsed.socket == DEFAULT_SOCKET, "socket {}", parsed.socket);
    ensure!(
        install::chain(&text, DEFAULT_SOCKET)?.is_none(),
        "`portmap-cni install` would change it"
    );
    Ok(())
}
