//! `portmap-cni install`: puts the plugin in place on a node (the Kubernetes DaemonSet's init
//! container runs it): copies the binary into the CNI bin directory and chains it into every
//! `.conflist` of the configuration directory (the default network and those podman and
//! podman-compose created) in place of the reference `portmap` plugin, editing only the plugin
//! list: the rest of each file stays as it was.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use jsonc_parser::{
    ParseOptions,
    cst::{CstInputValue, CstRootNode},
};
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
    /// Copy this binary into the CNI bin directory and chain it into every .conflist of
    /// --conf-dir, in place of the reference portmap plugin (the rest of each file as it was).
    /// Running it again changes nothing.
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

/// The plugin entry portmap-cni chains in, with the daemon's socket.
fn entry(socket: &str) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "capabilities": {"portMappings": true},
        "socket": socket,
    })
}

/// The same entry for the formatting-preserving editor, with the operator's `allow` of the
/// entry it replaces (a portmap-cni entry of another socket).
fn entry_input(socket: &str, allow: Option<&Value>) -> CstInputValue {
    let mut fields = vec![
        ("type".into(), PLUGIN_TYPE.into()),
        (
            "capabilities".into(),
            CstInputValue::Object(vec![("portMappings".into(), true.into())]),
        ),
        ("socket".into(), socket.into()),
    ];
    if let Some(list) = allow.and_then(Value::as_array) {
        let items = list
            .iter()
            .filter_map(Value::as_str)
            .map(|p| CstInputValue::String(p.to_owned()))
            .collect();
        fields.push(("allow".into(), CstInputValue::Array(items)));
    }
    CstInputValue::Object(fields)
}

/// A portmap-cni entry as [`entry`] writes it, keys the operator added (`allow`) aside.
fn chained_as_wanted(plugin: &Value, socket: &str) -> bool {
    let wanted = entry(socket);
    ["type", "capabilities", "socket"]
        .iter()
        .all(|key| plugin.get(key) == wanted.get(key))
}

/// Where portmap-cni goes in a conflist's plugin list: in place of an entry of the reference
/// `portmap` plugin (both would publish the same ports) or of an older portmap-cni entry, else
/// right after the first plugin (the interface plugin whose result it reads).
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Replace(usize),
    Insert(usize),
}

/// Where portmap-cni goes in `conflist`, or `None` if it is chained there as wanted already.
fn place(conflist: &Value, socket: &str) -> anyhow::Result<Option<Place>> {
    let Some(plugins) = conflist.get("plugins").and_then(Value::as_array) else {
        bail!("not a conflist: no \"plugins\" list");
    };
    if plugins.is_empty() {
        bail!("the conflist has no plugin to chain after");
    }
    let kind = |p: &Value| p.get("type").and_then(Value::as_str).map(str::to_owned);
    Ok(
        match plugins
            .iter()
            .position(|p| matches!(kind(p).as_deref(), Some(PLUGIN_TYPE | "portmap")))
        {
            Some(i) if chained_as_wanted(&plugins[i], socket) => None,
            Some(i) => Some(Place::Replace(i)),
            None => Some(Place::Insert(1)),
        },
    )
}

/// `text` (a conflist) with portmap-cni chained in (see `place`), everything else as it was:
/// key order, indentation and spacing; the file ends with a newline. `None`: already chained.
pub fn chain(text: &str, socket: &str) -> anyhow::Result<Option<String>> {
    let conflist: Value = serde_json::from_str(text)?;
    let Some(place) = place(&conflist, socket)? else {
        return Ok(None);
    };
    let root = CstRootNode::parse(text, &ParseOptions::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plugins = root
        .object_value()
        .and_then(|o| o.array_value("plugins"))
        .context("no \"plugins\" list")?;
    match place {
        Place::Replace(i) => {
            // Removed and inserted anew (the editor indents an insert as its neighbours).
            let old = plugins.elements().into_iter().nth(i);
            old.context("no such plugin entry")?.remove();
            let replaced = &conflist["plugins"][i];
            let allow = (replaced.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
                .then(|| replaced.get("allow"))
                .flatten();
            plugins.insert(i, entry_input(socket, allow));
        }
        Place::Insert(i) => {
            plugins.insert(i, entry_input(socket, None));
        }
    }
    let mut chained = root.to_string();
    if !chained.ends_with('\n') {
        chained.push('\n');
    }
    Ok(Some(chained))
}

/// The conflists of `conf_dir`, in lexical order (runtimes take the first as the default
/// network; podman and podman-compose add one per network they create).
fn conflists(conf_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    Ok(files)
}

/// Writes `bytes` to `path` through a temporary file renamed over it.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("portmap-tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Each conflist of `conf_dir` and its text with portmap-cni chained in (`None`: already), all
/// read and checked before anything is written; a directory without a conflist is an error.
fn plan_dir(conf_dir: &Path, socket: &str) -> anyhow::Result<Vec<(PathBuf, Option<String>)>> {
    let files = conflists(conf_dir)?;
    if files.is_empty() {
        bail!(
            "no .conflist in {}: create the network first (podman network create, or the cluster's \
             network plugin), then install",
            conf_dir.display()
        );
    }
    files
        .into_iter()
        .map(|file| {
            let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let chained = chain(&text, socket).with_context(|| format!("{}", file.display()))?;
            Ok((file, chained))
        })
        .collect()
}

/// Writes what `plan_dir` planned; one line per file.
fn write_planned(planned: Vec<(PathBuf, Option<String>)>) -> anyhow::Result<Vec<String>> {
    planned
        .into_iter()
        .map(|(file, chained)| match chained {
            None => Ok(format!("{} already chains portmap-cni", file.display())),
            Some(text) => {
                let mode = fs::metadata(&file)?.permissions().mode() & 0o777;
                replace(&file, text.as_bytes(), mode)?;
                Ok(format!("chained portmap-cni into {}", file.display()))
            }
        })
        .collect()
}

/// Chains portmap-cni into the conflist `file`; returns what it did.
pub fn chain_file(file: &Path, socket: &str) -> anyhow::Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let chained = chain(&text, socket).with_context(|| format!("{}", file.display()))?;
    let mut done = write_planned(vec![(file.to_owned(), chained)])?;
    Ok(done.remove(0))
}

/// The conflists of `conf_dir` (for the daemon's `cni_conf_dir`).
pub fn conflists_of(conf_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    conflists(conf_dir)
}

/// Chains portmap-cni into every conflist of `conf_dir`; returns what it did, one line each.
pub fn chain_dir(conf_dir: &Path, socket: &str) -> anyhow::Result<Vec<String>> {
    write_planned(plan_dir(conf_dir, socket)?)
}

/// Installs the running binary and chains it into every conflist of `conf_dir`; returns what it
/// did, one line each. A directory without a conflist, or a conflist that cannot be read or
/// parsed, is an error before anything is copied.
pub fn install(bin_dir: &Path, conf_dir: &Path, socket: &str) -> anyhow::Result<Vec<String>> {
    let planned = plan_dir(conf_dir, socket)?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let target = bin_dir.join(PLUGIN_TYPE);
    fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    replace(&target, &fs::read(&exe)?, 0o755)?;
    let mut done = vec![format!("installed {}", target.display())];
    done.extend(write_planned(planned)?);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conflist as `podman network create` writes it (keys not in alphabetical order, its own
    /// indentation, no newline at the end).
    const PODMAN: &str = r#"{
   "cniVersion": "0.4.0",
   "name": "pm",
   "plugins": [
      {
         "type": "bridge",
         "bridge": "cni-podman1",
         "isGateway": true,
         "ipMasq": true
      },
      {
         "type": "portmap",
         "capabilities": {
            "portMappings": true
         }
      },
      {
         "type": "firewall",
         "backend": ""
      }
   ]
}"#;

    #[test]
    fn chaining_replaces_the_reference_plugin_and_keeps_the_rest_of_the_file() {
        let chained = chain(PODMAN, "/s").unwrap().unwrap();
        let expected = PODMAN.replace(
            r#""type": "portmap",
         "capabilities": {
            "portMappings": true
         }"#,
            r#""type": "portmap-cni",
         "capabilities": {
            "portMappings": true
         },
         "socket": "/s""#,
        ) + "\n";
        assert_eq!(chained, expected);
        // Without a port plugin: inserted after the interface plugin, indented as its neighbours.
        let bare = PODMAN.replace(
            r#"      {
         "type": "portmap",
         "capabilities": {
            "portMappings": true
         }
      },
"#,
            "",
        );
        assert_eq!(chain(&bare, "/s").unwrap().unwrap(), expected);
        // Again: nothing changes.
        assert_eq!(chain(&chained, "/s").unwrap(), None);
        // Another socket: the entry is rewritten.
        let moved: Value = serde_json::from_str(&chain(&chained, "/t").unwrap().unwrap()).unwrap();
        assert_eq!(moved["plugins"][1], entry("/t"));
        // The operator's `allow` on the entry stays, also when the socket moves.
        let mut listed: Value = serde_json::from_str(&chained).unwrap();
        listed["plugins"][1]["allow"] = json!(["198.18.1.0/24"]);
        let listed = serde_json::to_string_pretty(&listed).unwrap();
        assert_eq!(chain(&listed, "/s").unwrap(), None);
        let moved: Value = serde_json::from_str(&chain(&listed, "/t").unwrap().unwrap()).unwrap();
        assert_eq!(moved["plugins"][1]["allow"], json!(["198.18.1.0/24"]));
        assert_eq!(moved["plugins"][1]["socket"], "/t");
    }

    #[test]
    fn chaining_without_a_port_plugin_follows_the_interface_plugin() {
        let text = "{\"cniVersion\": \"1.0.0\", \"name\": \"k8s\",\n \"plugins\": [{\"type\": \"bridge\"}, {\"type\": \"tuning\"}]}\n";
        let chained = chain(text, "/s").unwrap().unwrap();
        let value: Value = serde_json::from_str(&chained).unwrap();
        assert_eq!(
            value["plugins"],
            json!([{"type": "bridge"}, entry("/s"), {"type": "tuning"}])
        );
        assert!(chained.starts_with("{\"cniVersion\": \"1.0.0\", \"name\": \"k8s\",\n"));
        assert!(chained.ends_with("}\n") && !chained.ends_with("\n\n"));
        assert!(chain("{\"type\": \"bridge\"}", "/s").is_err());
        assert!(chain("{\"plugins\": []}", "/s").is_err());
        assert!(chain("{\"plugins\": [", "/s").is_err());
    }

    #[test]
    fn every_conflist_is_chained_and_an_empty_directory_is_refused_before_any_copy() {
        let dir = std::env::temp_dir().join(format!("portmap-cni-install-{}", std::process::id()));
        let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
        fs::create_dir_all(&conf).unwrap();
        let err = install(&bin, &conf, "/s").unwrap_err().to_string();
        assert!(err.contains("no .conflist"), "{err}");
        assert!(!bin.exists(), "copied before refusing");
        fs::write(conf.join("10-a.conflist"), PODMAN).unwrap();
        fs::write(conf.join("20-b.conflist"), PODMAN.replace("\"pm\"", "\"pm2\"")).unwrap();
        fs::write(conf.join("99-broken.conflist"), "{").unwrap();
        assert!(install(&bin, &conf, "/s").is_err());
        assert!(!bin.exists(), "copied although a conflist is broken");
        fs::remove_file(conf.join("99-broken.conflist")).unwrap();
        let done = chain_dir(&conf, "/s").unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        for name in ["10-a.conflist", "20-b.conflist"] {
            let value: Value = serde_json::from_str(&fs::read_to_string(conf.join(name)).unwrap()).unwrap();
            assert_eq!(value["plugins"][1], entry("/s"), "{name}");
        }
        assert!(
            chain_dir(&conf, "/s")
                .unwrap()
                .iter()
                .all(|l| l.contains("already"))
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
