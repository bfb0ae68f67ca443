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
    io::{BufRead as _, BufReader, Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
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

#[derive(Debug, Serialize, Deserialize)]
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
        let changes = table.take_changes().len() as u64;
        self.write_snapshot(table, self.generation + changes)
    }

    /// Writes a snapshot of `table` as generation `generation`. On failure nothing changed: the
    /// old snapshot stays (the new one is written beside it and renamed over it), and so does
    /// the saver's generation.
    fn write_snapshot(&mut self, table: &Table, generation: u64) -> anyhow::Result<()> {
        let saved = SavedSnapshot {
            format: FORMAT,
            datapath: self.datapath,
            generation,
            table: table.snapshot(),
        };
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = with_suffix(&self.path, ".tmp");
        let written = (|| {
            let mut file = create(&tmp)?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
            serde_json::to_writer(&mut out, &saved)?;
            out.flush()?;
            drop(out);
            fs::rename(&tmp, &self.path).with_context(|| format!("replacing {}", self.path.display()))
        })();
        if let Err(e) = written {
            // What it took of a full disk is given back.
            let _ = fs::remove_file(&tmp);
            return Err(e.context(format!("writing {}", self.path.display())));
        }
        self.generation = generation;
        // Lines of the old journal are all in the snapshot now (a reader skips them): if the
        // journal cannot be emptied, the next change writes a snapshot again.
        self.journal = create(&self.journal_path).ok();
        self.journal_lines = 0;
        Ok(())
    }

    /// Appends the table's changes since the last save to the journal (one write), or writes a
    /// snapshot once the journal is as long as the table (or cannot be appended to). A failed
    /// append leaves the journal as it was: what it wrote of a line is cut off again, or, if
    /// even that fails, the journal is given up and the next save writes a snapshot.
    pub(super) fn append(&mut self, table: &mut Table) -> anyhow::Result<()> {
        let pending = table.take_changes();
        if pending.is_empty() {
            return Ok(());
        }
        let too_long = self.journal_lines + pending.len() > MIN_JOURNAL.max(table.len());
        let Some(journal) = self.journal.as_mut().filter(|_| !too_long) else {
            return self.write_snapshot(table, self.generation + pending.len() as u64);
        };
        let mut text = Vec::new();
        for (i, record) in pending.into_iter().enumerate() {
            let line = Line {
                n: self.generation + i as u64 + 1,
                record,
            };
            serde_json::to_writer(&mut text, &line)?;
            text.push(b'\n');
        }
        let lines = text.iter().filter(|b| **b == b'\n').count();
        let length = journal.metadata().map(|m| m.len());
        if let Err(e) = journal.write_all(&text) {
            let cut = length.and_then(|length| {
                journal.set_len(length)?;
                journal.seek(std::io::SeekFrom::Start(length)).map(drop)
            });
            if cut.is_err() {
                self.journal = None;
            }
            return Err(e).with_context(|| format!("appending to {}", self.journal_path.display()));
        }
        self.generation += lines as u64;
        self.journal_lines += lines;
        Ok(())
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
    for (i, text) in lines.iter().enumerate() {
        let read = read_line(text).with_context(|| format!("{} line {}", journal_path.display(), i + 1))?;
        if read.torn {
            warn!(
                "{} line {}: ignoring a torn record (a write cut short){}",
                journal_path.display(),
                i + 1,
                if read.line.is_some() {
                    "; the record after it on the line is kept"
                } else {
                    ""
                }
            );
        }
        let Some(line) = read.line else { continue };
        if line.n > generation {
            generation = line.n;
            records.push(line.record);
        }
    }
    Ok(Some((saved.table, records, generation)))
}

/// What a journal line holds.
#[derive(Debug)]
struct ReadLine {
    /// Its record, if it has a complete one.
    line: Option<Line>,
    /// It starts with a torn record (a write cut short: the JSON ends early).
    torn: bool,
}

/// Reads one journal line. A torn record that later appends continued on the same line (an
/// earlier version appended after a failed write) is followed by the complete record of that
/// append, which is kept. A line that is complete but not a record is an error: it was not
/// torn, it is wrong.
fn read_line(text: &str) -> anyhow::Result<ReadLine> {
    const RECORD_START: &str = "{\"n\":";
    let e = match serde_json::from_str::<Line>(text) {
        Ok(line) => {
            return Ok(ReadLine {
                line: Some(line),
                torn: false,
            });
        }
        Err(e) => e,
    };
    if let Some(start) = text.rfind(RECORD_START).filter(|start| *start > 0)
        && let Ok(line) = serde_json::from_str::<Line>(&text[start..])
    {
        return Ok(ReadLine {
            line: Some(line),
            torn: true,
        });
    }
    if e.classify() == serde_json::error::Category::Eof {
        Ok(ReadLine {
            line: None,
            torn: true,
        })
    } else {
        Err(e.into())
    }
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

    /// A torn record in the middle of the journal (a full disk cut a write short, and an earlier
    /// version appended after it on the same line) loses nothing written after it; a complete
    /// line that is no record is an error that names its line.
    #[test]
    fn a_torn_record_is_told_from_a_bad_one_and_what_follows_it_is_kept() {
        let mut table = Table::new(CAPACITY, DYNAMIC);
        let m = crate::model::spec::parse("8080:198.18.2.2:80").unwrap();
        table
            .add_as(&mut MapContents::default(), &m, &NoSockets, Origin::Runtime)
            .unwrap();
        let record = table.take_changes().pop().unwrap();
        let put = serde_json::to_string(&Line { n: 5, record }).unwrap();
        let put = put.as_str();
        let read = read_line(put).unwrap();
        assert_eq!((read.line.map(|l| l.n), read.torn), (Some(5), false));
        let read = read_line(r#"{"n":4,"record":{"put":{"mapp"#).unwrap();
        assert!(read.line.is_none() && read.torn, "torn");
        let continued = format!(r#"{{"n":4,"record":{{"put":{{"ma{put}"#);
        let read = read_line(&continued).unwrap();
        assert_eq!(
            (read.line.map(|l| l.n), read.torn),
            (Some(5), true),
            "torn, then a record"
        );
        let bad = read_line(r#"{"n":4,"record":{"nope":1}}"#).unwrap_err();
        assert!(format!("{bad:#}").contains("unknown variant"), "{bad:#}");
    }
}
