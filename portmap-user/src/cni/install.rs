//! `portmap-cni install`: puts the plugin in place on a node (the Kubernetes DaemonSet's init
//! container runs it): copies the binary into the CNI bin directory and chains it into the
//! node's network configuration — the first `.conflist` of the configuration directory in
//! lexical order, the one container runtimes use — in place of the reference `portmap` plugin.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::DEFAULT_SOCKET;

/// The plugin's type, as conflists name it.
pub const PLUGIN_TYPE: &str = "portmap-cni";

#[derive(Debug, Parser)]
#[command(
    name = "portmap-cni",
    version,
    about = "portmap's CNI plugin: container runtimes run it with CNI_COMMAND set and the network \
             configuration on stdin; `install` puts it in place on a node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Copy this binary into the CNI bin directory and chain it into the node's network
    /// configuration (the first .conflist of --conf-dir), in place of the reference portmap
    /// plugin. Running it again changes nothing.
    Install {
        /// Where runtimes look for plugins.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// Where the node's network configurations are.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The daemon's control socket as the plugin sees it on the node.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: String,
    },
}

/// `conflist` with portmap-cni chained in: an entry of the reference `portmap` plugin is
/// replaced in place (both would publish the same ports), an existing portmap-cni entry gets
/// `socket`, otherwise the entry goes right after the first plugin (the interface plugin whose
/// result it reads).
pub fn chain(mut conflist: Value, socket: &str) -> anyhow::Result<Value> {
    let Some(plugins) = conflist.get_mut("plugins").and_then(Value::as_array_mut) else {
        bail!("not a conflist: no \"plugins\" list");
    };
    if plugins.is_empty() {
        bail!("the conflist has no plugin to chain after");
    }
    let entry = json!({
        "type": PLUGIN_TYPE,
        "capabilities": {"portMappings": true},
        "socket": socket,
    });
    let kind = |p: &Value| p.get("type").and_then(Value::as_str).map(str::to_owned);
    match plugins
        .iter()
        .position(|p| matches!(kind(p).as_deref(), Some(PLUGIN_TYPE | "portmap")))
    {
        Some(i) => plugins[i] = entry,
        None => plugins.insert(1, entry),
    }
    Ok(conflist)
}

/// The network configuration runtimes use: the first file of `conf_dir` in lexical order that
/// ends in .conf, .conflist or .json.
fn first_config(conf_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    files.into_iter().next().with_context(|| {
        format!(
            "no network configuration in {}: install the cluster's network plugin first",
            conf_dir.display()
        )
    })
}

/// Writes `bytes` to `path` through a temporary file renamed over it.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("portmap-tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Installs the running binary and chains it; returns what it did, one line each.
pub fn install(bin_dir: &Path, conf_dir: &Path, socket: &str) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let target = bin_dir.join(PLUGIN_TYPE);
    fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    replace(&target, &fs::read(&exe)?, 0o755)?;
    let mut done = vec![format!("installed {}", target.display())];
    let conf = first_config(conf_dir)?;
    if conf.extension().is_none_or(|e| e != "conflist") {
        bail!(
            "{} is a single-plugin configuration: portmap-cni needs a .conflist to chain into",
            conf.display()
        );
    }
    let text = fs::read(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let list: Value = serde_json::from_slice(&text).with_context(|| format!("reading {}", conf.display()))?;
    let chained = chain(list.clone(), socket).with_context(|| format!("{}", conf.display()))?;
    if chained == list {
        done.push(format!("{} already chains portmap-cni", conf.display()));
    } else {
        replace(&conf, serde_json::to_string_pretty(&chained)?.as_bytes(), 0o644)?;
        done.push(format!("chained portmap-cni into {}", conf.display()));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(plugins: Value) -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": plugins})
    }

    #[test]
    fn chaining_replaces_the_reference_plugin_or_follows_the_interface_plugin() {
        let ours = json!({"type": "portmap-cni", "capabilities": {"portMappings": true}, "socket": "/s"});
        let bridge = json!({"type": "bridge"});
        let reference = json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true});
        let tuning = json!({"type": "tuning"});
        assert_eq!(
            chain(list(json!([bridge, reference, tuning])), "/s").unwrap(),
            list(json!([bridge, ours, tuning]))
        );
        assert_eq!(
            chain(list(json!([bridge, tuning])), "/s").unwrap(),
            list(json!([bridge, ours, tuning]))
        );
        // Again: nothing changes.
        let once = chain(list(json!([bridge, tuning])), "/s").unwrap();
        assert_eq!(chain(once.clone(), "/s").unwrap(), once);
        assert!(chain(json!({"type": "bridge"}), "/s").is_err());
        assert!(chain(list(json!([])), "/s").is_err());
    }
}
