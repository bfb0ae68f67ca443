//! The state file: the mapping table saved after every change (written to a temporary file and
//! renamed over the old one, so a crash leaves the old state or the new, never half of one), and
//! read back by the next daemon when it adopts the same pinned datapath.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::table::{Snapshot, Table};

/// Bumped when the file's meaning changes; another version is not restored.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Saved {
    format: u32,
    /// The id of the pinned datapath the table describes (its `PM_META` stamp).
    datapath: u64,
    table: Snapshot,
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Saves `table` as the state of the datapath `datapath`.
pub(super) fn save(path: &Path, datapath: u64, table: &Table) -> anyhow::Result<()> {
    let saved = Saved {
        format: FORMAT,
        datapath,
        table: table.snapshot(),
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = temporary(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let mut out = std::io::BufWriter::new(&mut file);
    serde_json::to_writer(&mut out, &saved)?;
    out.flush()?;
    drop(out);
    file.sync_data()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// The table saved for the datapath `datapath`: `None` when there is no file or it describes
/// another datapath (cleaned up and created anew since) or another format.
pub(super) fn load(path: &Path, datapath: u64) -> anyhow::Result<Option<Snapshot>> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let saved: Saved =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok((saved.format == FORMAT && saved.datapath == datapath).then_some(saved.table))
}
