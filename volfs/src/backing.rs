//! A backing directory: the files of a volume as the app sees them, plus the
//! hidden `.volfs/` directory holding the persisted manifest, the lock that
//! makes one process at a time the volume's owner, the socket of a
//! live mount and the block store of incoming deltas.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::manifest::{DEFAULT_BLOCK_SIZE, Manifest, ManifestError, Tracked};
use crate::scan::{self, META_DIR, RefreshStats, Trust};

/// How long opening a volume waits for a busy lock before saying "in use".
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Errors of opening a backing directory.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// The path does not exist or is not a directory.
    #[error("backing directory {0}: {1}")]
    NotADirectory(String, String),
    /// Another process (a mount, an apply) owns the volume.
    #[error("volume {0} is in use by another volfs process (mounted?)")]
    InUse(String),
    /// I/O on the metadata directory or the tree.
    #[error("volume {path}: {source}")]
    Io {
        /// What was being accessed.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The persisted manifest is unreadable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// An opened, locked backing directory.
#[derive(Debug)]
pub struct Backing {
    root: PathBuf,
    meta: PathBuf,
    _lock: fs::File,
}

impl Backing {
    /// Opens `root`, creating `.volfs/`, and takes its lock without waiting.
    pub fn open(root: &Path) -> Result<Self, BackingError> {
        let md = fs::metadata(root)
            .map_err(|e| BackingError::NotADirectory(root.display().to_string(), e.to_string()))?;
        if !md.is_dir() {
            return Err(BackingError::NotADirectory(
                root.display().to_string(),
                "not a directory".into(),
            ));
        }
        let root = fs::canonicalize(root).map_err(|source| BackingError::Io {
            path: root.display().to_string(),
            source,
        })?;
        let meta = root.join(META_DIR);
        let io = |source| BackingError::Io {
            path: meta.display().to_string(),
            source,
        };
        match fs::create_dir(&meta) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(meta.join("lock"))
            .map_err(io)?;
        // A lock released by another thread of this process can linger for a
        // moment: a child forked meanwhile shares the lock's open file until
        // it execs. So a busy lock is tried again for a short while.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        // SAFETY: flock on an fd we own.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() > deadline {
                return Err(BackingError::InUse(root.display().to_string()));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(Backing {
            root,
            meta,
            _lock: lock,
        })
    }

    /// Whether another process holds the lock of `root` (a live mount).
    pub fn is_locked(root: &Path) -> bool {
        let Ok(f) = fs::File::open(root.join(META_DIR).join("lock")) else {
            return false;
        };
        // SAFETY: flock on an fd we own; released when `f` drops.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    }

    /// The directory of files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `.volfs/`.
    pub fn meta_dir(&self) -> &Path {
        &self.meta
    }

    /// Where the manifest is persisted.
    pub fn manifest_path(&self) -> PathBuf {
        self.meta.join("manifest.pb")
    }

    /// The socket of a live mount of `root` (its `Volume` service).
    pub fn socket_path(root: &Path) -> PathBuf {
        root.join(META_DIR).join("volume.sock")
    }

    /// Loads the persisted manifest and brings it up to date with the tree:
    /// hashes of a clean manifest are reused where inode and change time
    /// match; an unclean one (a crash while mounted) is not trusted. A block
    /// size other than the manifest's rehashes everything.
    pub fn load(&self, block_size: Option<u32>) -> Result<(Tracked, RefreshStats), BackingError> {
        let loaded = Tracked::load(&self.manifest_path())?;
        let bs = block_size
            .or(loaded.as_ref().map(|(t, _)| t.manifest.block_size))
            .unwrap_or(DEFAULT_BLOCK_SIZE);
        let (prev, trust) = match loaded {
            Some((t, clean)) if t.manifest.block_size == bs => {
                (t, if clean { Trust::Stat } else { Trust::Nothing })
            }
            _ => (
                Tracked {
                    manifest: Manifest::empty(bs),
                    local: Default::default(),
                },
                Trust::Nothing,
            ),
        };
        let (t, stats) =
            scan::refresh(&self.root, &prev, None, trust).map_err(|source| BackingError::Io {
                path: self.root.display().to_string(),
                source,
            })?;
        Ok((t, stats))
    }

    /// Persists `t`; `clean` says it matches the tree (no live writer).
    pub fn save(&self, t: &Tracked, clean: bool) -> Result<(), BackingError> {
        t.save(&self.manifest_path(), clean)?;
        Ok(())
    }
}
