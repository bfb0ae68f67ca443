//! The state file and its journal: the daemon's mappings as the next daemon restores them when it
//! adopts the same pinned datapath.
//!
//! `STATE_FILE` holds a snapshot of the table (written to a temporary file and renamed over the
//! old one: a crash leaves the old snapshot or the new, never half of one); `STATE_FILE.journal`
//! one JSON line per change made since (an `add` appends a line instead of rewriting every
//! mapping). Start-up, reloads and a journal as long as the table write a new snapshot and empty
//! the journal. Each line carries its generation; lines the snapshot already contains (a crash
//! between the rename and emptying the journal) are skipped, and a torn last line (a crash while
//! appending, before the change was answered) is ignored. Nothing is fsynced: the files must
//! outlive the daemon, not the machine, like the pinned maps they describe.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use log::warn;
use serde::{Deserialize, Serialize};

use crate::model::table::{Record, Snapshot, Table};

/// Bumped when the files' meaning changes; another version is not restored.
const FORMAT: u32 = 2;

/// The journal grows to at least this many lines before it is folded into a snapshot.
const MIN_JOURNAL: usize = 4096;

#[derive(Serialize, Deserialize)]
struct SavedSnapshot {
    format: u32,
    /// The id of the pinned datapath the table describes (its `PM_META` stamp).
    datapath: u64,
    /// How many changes the snapshot contains.
    generation: u64,
    table: Snapshot,
}

#[derive(Serialize, Deserialize)]
struct Line {
    /// The generation this change makes.
    n: u64,
    record: Record,
}

/// The files of the state file `path`: itself and its journal (`portmap cleanup` removes both).
#[must_use]
pub fn files(path: &Path) -> [PathBuf; 2] {
    [path.to_path_buf(), with_suffix(path, ".journal")]
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn create(path: &Path) -> anyhow::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Saves the mappings of the datapath `datapath` to `path` and its journal.
pub(super) struct Saver {
    path: PathBuf,
    journal_path: PathBuf,
    datapath: u64,
    generation: u64,
    /// Open for appending after the first snapshot.
    journal: Option<File>,
    journal_lines: usize,
}

impl Saver {
    /// A saver that continues after `generation` (what was restored).
    pub(super) fn new(path: &Path, datapath: u64, generation: u64) -> Self {
        let [path, journal_path] = files(path);
        Self {
            path,
            journal_path,
            datapath,
            generation,
            journal: None,
            journal_lines: 0,
        }
    }

    /// Writes a snapshot of the whole table and empties the journal.
    pub(super) fn snapshot(&mut self, table: &mut Table) -> anyhow::Result<()> {
        self.generation += table.take_changes().len() as u64;
        let saved = SavedSnapshot {
            format: FORMAT,
            datapath: self.datapath,
            generation: self.generation,
            table: table.snapshot(),
        };
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = with_suffix(&self.path, ".tmp");
        let mut file = create(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        serde_json::to_writer(&mut out, &saved)?;
        out.flush()?;
        drop(out);
        fs::rename(&tmp, &self.path).with_context(|| format!("replacing {}", self.path.display()))?;
        self.journal = Some(create(&self.journal_path)?);
        self.journal_lines = 0;
        Ok(())
    }

    /// Appends the table's changes since the last save to the journal (one write), or writes a
    /// snapshot once the journal is as long as the table.
    pub(super) fn append(&mut self, table: &mut Table) -> anyhow::Result<()> {
        let pending = table.take_changes();
        if pending.is_empty() {
            return Ok(());
        }
        let Some(journal) = self.journal.as_mut() else {
            bail!("no snapshot written yet");
        };
        if self.journal_lines + pending.len() > MIN_JOURNAL.max(table.entries().len()) {
            self.generation += pending.len() as u64;
            return self.snapshot(table);
        }
        let mut text = Vec::new();
        for record in pending {
            self.generation += 1;
            serde_json::to_writer(
                &mut text,
                &Line {
                    n: self.generation,
                    record,
                },
            )?;
            text.push(b'\n');
            self.journal_lines += 1;
        }
        journal
            .write_all(&text)
            .with_context(|| format!("appending to {}", self.journal_path.display()))
    }
}

/// What was saved for the datapath `datapath`: the snapshot, the changes after it and the
/// generation they reach. `None` when there is no state file, or it describes another datapath
/// (cleaned up and created anew since) or is of another format.
pub(super) fn load(path: &Path, datapath: u64) -> anyhow::Result<Option<(Snapshot, Vec<Record>, u64)>> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    #[derive(Deserialize)]
    struct Header {
        format: u32,
        datapath: u64,
    }
    let header: Header =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    if header.format != FORMAT || header.datapath != datapath {
        return Ok(None);
    }
    let saved: SavedSnapshot =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    let [_, journal_path] = files(path);
    let mut records = Vec::new();
    let mut generation = saved.generation;
    let lines: Vec<String> = match File::open(&journal_path) {
        Ok(file) => BufReader::new(file).lines().collect::<Result<_, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", journal_path.display())),
    };
    let last = lines.len().saturating_sub(1);
    for (i, text) in lines.iter().enumerate() {
        let line: Line = match serde_json::from_str(text) {
            Ok(line) => line,
            Err(e) if i == last => {
                warn!("{}: ignoring a torn last line ({e})", journal_path.display());
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("{} line {}", journal_path.display(), i + 1)),
        };
        if line.n > generation {
            generation = line.n;
            records.push(line.record);
        }
    }
    Ok(Some((saved.table, records, generation)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::sockets::NoSockets,
        model::mapping::PortRange,
        model::table::{Capacity, MapContents, Origin},
    };

    const CAPACITY: Capacity = Capacity {
        ports: 16,
        groups: 2,
        backends: 8,
    };
    const DYNAMIC: PortRange = PortRange {
        start: 40000,
        end: 40009,
    };

    fn restore(path: &Path, datapath: u64) -> (Table, u64) {
        let (snapshot, records, generation) = load(path, datapath).unwrap().expect("saved");
        (
            Table::from_snapshot(CAPACITY, DYNAMIC, snapshot, records).unwrap(),
            generation,
        )
    }

    /// Snapshot, journal lines, a torn last line, lines the snapshot already holds, and state
    /// of another datapath: what `load` gives back is what was saved and answered.
    #[test]
    fn the_journal_replays_after_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("portmap-saved-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut maps = MapContents::default();
        let mut table = Table::new(CAPACITY, DYNAMIC);
        let add = |table: &mut Table, maps: &mut MapContents, spec: &str| {
            let m = crate::model::spec::parse(spec).unwrap();
            table.add_as(maps, &m, &NoSockets, Origin::Runtime).unwrap();
        };
        add(&mut table, &mut maps, "8080:198.18.2.2:80");
        let mut saver = Saver::new(&path, 7, 0);
        saver.snapshot(&mut table).unwrap();
        add(&mut table, &mut maps, "198.18.2.3:80");
        saver.append(&mut table).unwrap();
        table
            .remove(
                &mut maps,
                &crate::model::spec::parse("8080:198.18.2.2:80").unwrap(),
            )
            .unwrap();
        saver.append(&mut table).unwrap();

        let (restored, generation) = restore(&path, 7);
        assert_eq!(restored.mappings(), table.mappings());
        assert_eq!(generation, 3);
        assert!(load(&path, 8).unwrap().is_none(), "another datapath's state");

        // A crash while appending: the torn line is ignored.
        let [_, journal] = files(&path);
        let mut file = fs::OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(br#"{"n":4,"record":{"put":{"mapp"#).unwrap();
        assert_eq!(restore(&path, 7).0.mappings(), table.mappings());

        // A crash after a new snapshot, before the journal was emptied: old lines are skipped.
        let journal_text = fs::read(&journal).unwrap();
        let mut next = Saver::new(&path, 7, generation);
        next.snapshot(&mut table).unwrap();
        fs::write(&journal, journal_text).unwrap();
        let (again, _) = restore(&path, 7);
        assert_eq!(again.mappings(), table.mappings());
        fs::remove_dir_all(&dir).unwrap();
    }
}
