//! Where a session lives on disk, what is persisted of it, and the
//! tombstones of sessions released to other edges.
//!
//! ```text
//! DATA_DIR/sessions/ID/   volume/ (backing) mnt/ run/app.sock ops.log session.json *.log
//! DATA_DIR/staging/ID/    volume/   a copy pre-copied or pulled here, not a session
//! DATA_DIR/tombstones/ID.json       where a released session went (pruned after a TTL)
//! ```
//!
//! `session.json` holds the session's handover role: a restart reads it to
//! thaw a frozen instance, turn a half-started pull back into a staged copy,
//! or ask the old owner again for a release. Every write of it and of a
//! tombstone is durable (written to a temporary file, synced, renamed, the
//! directory synced) before what it records takes effect.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::migration::{Attempt, Peer};
use crate::runtime::InstanceId;

/// Paths of a session directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The session directory.
    pub dir: PathBuf,
}

impl Layout {
    /// The volume's backing directory.
    pub fn backing(&self) -> PathBuf {
        self.dir.join("volume")
    }
    /// Where the volume is mounted.
    pub fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    /// The app's socket directory.
    pub fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// The persisted record.
    pub fn record(&self) -> PathBuf {
        self.dir.join("session.json")
    }
    /// The op journal.
    pub fn journal(&self) -> PathBuf {
        self.dir.join("ops.log")
    }
}

/// The handover role of a session on this edge, persisted before it takes
/// effect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// This edge owns the session and its instance runs.
    #[default]
    Serving,
    /// This edge owns the session and froze its instance for a handover to
    /// `to`; a restart thaws it and serves (the attempt is then over).
    Frozen {
        /// The attempt.
        attempt: Attempt,
        /// The puller.
        to: Peer,
    },
    /// Pulled here and starting; not owned. A restart stages it again.
    Starting {
        /// The attempt.
        attempt: Attempt,
        /// The owner.
        from: Peer,
    },
    /// Pulled here, started, waiting for the owner's release; not owned
    /// until it answers. A restart asks again.
    AwaitingRelease {
        /// The attempt.
        attempt: Attempt,
        /// The owner.
        from: Peer,
    },
}

/// What is persisted of a session in `session.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// App name.
    pub app: String,
    /// Client id.
    pub client_id: String,
    /// blake3 of the token (the token itself is never stored).
    pub token_hash: String,
    /// Unix seconds.
    pub created: i64,
    /// The running instance.
    pub instance: Option<InstanceId>,
    /// Pid of the volfs shim.
    pub volfs_pid: Option<u32>,
    /// Ownership epoch: 1 at open, one more at every handover.
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// The handover role.
    #[serde(default)]
    pub role: Role,
}

fn first_epoch() -> u64 {
    1
}

/// Where a released session went, kept after the session itself is gone so
/// a late call is redirected and a repeated Release answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The edge that owns the session now.
    pub to: Peer,
    /// The attempt that moved it.
    pub attempt: Attempt,
    /// The epoch this edge held; the new owner's is higher.
    pub epoch: u64,
    /// When it was released (unix seconds).
    pub at: i64,
}

/// Names a session directory being removed carries (beside the live ones,
/// never read as a session).
pub const REMOVING: &str = ".removing-";

/// Removes a session directory so that a stop at any moment leaves it
/// whole or gone: it is first renamed aside (`.removing-ID.NONCE`, which a
/// restart removes), then deleted. A directory half deleted in place would
/// lose its record before its other files and read as a broken session.
pub async fn remove_session_dir(dir: &Path) {
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    // Its own name: two removals of one id never meet.
    let aside = dir.with_file_name(format!(
        "{REMOVING}{name}.{:016x}",
        crate::migration::new_attempt()
    ));
    let target = match tokio::fs::rename(dir, &aside).await {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                let _ = sync_dir(parent);
            }
            aside
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not set the session directory aside; removing it in place");
            dir.to_path_buf()
        }
    };
    if let Err(e) = tokio::fs::remove_dir_all(&target).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(dir = %dir.display(), error = %e, "removing the session directory failed");
        }
    }
}

/// Writes `data` to `path` durably (mode 0600): a temporary file, fsync,
/// rename, fsync of the directory.
pub fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsync of a directory (makes a rename or an unlink in it durable).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The tombstones of an edge, in `DATA_DIR/tombstones/`.
#[derive(Debug, Clone)]
pub struct Tombstones {
    dir: PathBuf,
}

impl Tombstones {
    /// The tombstone directory of `data_dir` (created).
    pub fn open(data_dir: &Path) -> std::io::Result<Tombstones> {
        let dir = data_dir.join("tombstones");
        std::fs::create_dir_all(&dir)?;
        Ok(Tombstones { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Persists one, durably.
    pub fn put(&self, id: &str, t: &Tombstone) -> std::io::Result<()> {
        let json = serde_json::to_vec(t).map_err(std::io::Error::other)?;
        write_durable(&self.path(id), &json)
    }

    /// Removes one (the session came back to this edge).
    pub fn remove(&self, id: &str) {
        if std::fs::remove_file(self.path(id)).is_ok() {
            let _ = sync_dir(&self.dir);
        }
    }

    /// Every tombstone on disk.
    pub fn load(&self) -> Vec<(String, Tombstone)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            match std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Tombstone>(&b).ok())
            {
                Some(t) => out.push((id.to_string(), t)),
                None => {
                    tracing::warn!(file = %e.path().display(), "unreadable tombstone; removing it");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_a_role_reads_as_serving_at_epoch_one() {
        let json = r#"{"id":"s","app":"list","client_id":"c","token_hash":"00","created":1,"instance":null,"volfs_pid":null}"#;
        let r: SessionRecord = serde_json::from_str(json).unwrap();
        assert_eq!(r.role, Role::Serving);
        assert_eq!(r.epoch, 1);
        let mut r2 = r.clone();
        r2.role = Role::Frozen {
            attempt: 9,
            to: Peer {
                edge_id: "b".into(),
                addr: "b:1".into(),
            },
        };
        let back: SessionRecord =
            serde_json::from_slice(&serde_json::to_vec(&r2).unwrap()).unwrap();
        assert_eq!(back.role, r2.role);
    }

    #[test]
    fn tombstones_survive_a_reload_and_can_be_removed() {
        let d = tempfile::tempdir().unwrap();
        let t = Tombstones::open(d.path()).unwrap();
        let stone = Tombstone {
            to: Peer {
                edge_id: "b".into(),
                addr: "b:1".into(),
            },
            attempt: 3,
            epoch: 2,
            at: 100,
        };
        t.put("s1", &stone).unwrap();
        let t2 = Tombstones::open(d.path()).unwrap();
        assert_eq!(t2.load(), vec![("s1".to_string(), stone)]);
        t2.remove("s1");
        assert!(t2.load().is_empty());
    }
}
