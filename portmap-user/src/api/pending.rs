//! Removals the CNI plugin could not deliver: a container deleted while no daemon runs (CNI DEL
//! with the daemon stopped; podman 4.3 never calls GC) must still lose its ports. The plugin
//! records the owner durably in `SOCKET.pending-del` (the conflist's `socket` plus a suffix:
//! both sides know it) and DEL succeeds; the next daemon unpublishes every recorded owner
//! before it is ready, saves its state, then empties the file. One JSON string per line; both
//! sides hold an exclusive `flock` on the file while they use it, so a removal recorded while a
//! daemon starts is applied now or at the next start, never lost.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// Where removals for the daemon at `socket` are recorded.
#[must_use]
pub fn path_for(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pending-del");
    PathBuf::from(name)
}

fn open_locked(path: &Path, create: bool) -> std::io::Result<Option<Flock<File>>> {
    let file = match OpenOptions::new()
        .read(true)
        .append(true)
        .create(create)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Flock::lock(file, FlockArg::LockExclusive)
        .map(Some)
        .map_err(|(_, errno)| errno.into())
}

/// Records that `owner`'s ports must go (the plugin's side), durably: the line and the file's
/// directory entry are on disk when this returns.
pub fn record(socket: &Path, owner: &str) -> std::io::Result<()> {
    let path = path_for(socket);
    let mut file = open_locked(&path, true)?.expect("created");
    let line = serde_json::to_string(owner).map_err(std::io::Error::other)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The removals recorded for the daemon at `socket`, locked until `done` (the daemon's side).
pub struct Pending {
    file: Option<Flock<File>>,
    pub owners: Vec<String>,
}

impl Pending {
    /// Takes the recorded owners (none if nothing is recorded); a torn last line (the plugin
    /// died while writing it) is skipped.
    pub fn take(socket: &Path) -> std::io::Result<Self> {
        let Some(file) = open_locked(&path_for(socket), false)? else {
            return Ok(Self {
                file: None,
                owners: Vec::new(),
            });
        };
        let mut owners = Vec::new();
        for line in BufReader::new(&*file).lines() {
            if let Ok(owner) = serde_json::from_str::<String>(&line?) {
                owners.push(owner);
            }
        }
        Ok(Self {
            file: Some(file),
            owners,
        })
    }

    /// The owners are unpublished and the state saved: empties the record.
    pub fn done(self) -> std::io::Result<()> {
        if let Some(mut file) = self.file {
            file.set_len(0)?;
            file.rewind()?;
            file.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_owners_are_taken_once_and_a_torn_line_is_skipped() {
        let dir = std::env::temp_dir().join(format!("portmap-pending-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("portmap.sock");
        assert!(Pending::take(&socket).unwrap().owners.is_empty());
        record(&socket, "n/c1/eth0").unwrap();
        record(&socket, "n/c\"2/eth0").unwrap();
        let mut torn = OpenOptions::new().append(true).open(path_for(&socket)).unwrap();
        torn.write_all(b"\"n/c3").unwrap();
        let pending = Pending::take(&socket).unwrap();
        assert_eq!(pending.owners, ["n/c1/eth0", "n/c\"2/eth0"]);
        pending.done().unwrap();
        assert!(Pending::take(&socket).unwrap().owners.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
