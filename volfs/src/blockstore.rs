//! A content-addressed block store: one file per block, named by its blake3
//! hash, written atomically. A receiver stages the blocks of a delta (or of
//! pre-copy rounds) here before it applies them, so a block that arrived once
//! never needs to cross the link again, and a torn transfer leaves only
//! complete, verified blocks behind.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::manifest::{Hash, hex};

/// Errors of the block store.
#[derive(Debug, thiserror::Error)]
pub enum BlockStoreError {
    /// The store's directory could not be read or written.
    #[error("block store {path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// A stored block no longer hashes to its name.
    #[error("stored block {0} is corrupt")]
    Corrupt(String),
}

/// A directory of blocks named by hash.
#[derive(Debug, Clone)]
pub struct BlockStore {
    dir: PathBuf,
}

impl BlockStore {
    /// Opens (creating) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Self, BlockStoreError> {
        fs::create_dir_all(dir).map_err(|source| BlockStoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(BlockStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, h: &Hash) -> PathBuf {
        self.dir.join(hex(h))
    }

    fn io(&self, p: &Path, source: io::Error) -> BlockStoreError {
        BlockStoreError::Io {
            path: p.display().to_string(),
            source,
        }
    }

    /// Stores a block the caller has verified. A block already present is kept.
    pub fn put(&self, h: &Hash, data: &[u8]) -> Result<(), BlockStoreError> {
        let p = self.path(h);
        if p.exists() {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".{}.{}", hex(h), std::process::id()));
        let r = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            fs::rename(&tmp, &p)
        })();
        r.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io(&p, e)
        })
    }

    /// Whether the block is present.
    pub fn contains(&self, h: &Hash) -> bool {
        self.path(h).exists()
    }

    /// Reads a block, checking its hash.
    pub fn get(&self, h: &Hash) -> Result<Vec<u8>, BlockStoreError> {
        let p = self.path(h);
        let data = fs::read(&p).map_err(|e| self.io(&p, e))?;
        if blake3::hash(&data).as_bytes() != h {
            let _ = fs::remove_file(&p);
            return Err(BlockStoreError::Corrupt(hex(h)));
        }
        Ok(data)
    }

    /// Number of blocks and their bytes.
    pub fn usage(&self) -> Result<(u64, u64), BlockStoreError> {
        let mut n = (0, 0);
        for e in fs::read_dir(&self.dir).map_err(|e| self.io(&self.dir, e))? {
            let e = e.map_err(|e| self.io(&self.dir, e))?;
            n.0 += 1;
            n.1 += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
        Ok(n)
    }

    /// Drops blocks not touched for `ttl`.
    pub fn prune(&self, ttl: Duration) -> Result<u64, BlockStoreError> {
        let now = SystemTime::now();
        let mut dropped = 0;
        for e in fs::read_dir(&self.dir).map_err(|e| self.io(&self.dir, e))? {
            let e = e.map_err(|e| self.io(&self.dir, e))?;
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > ttl);
            if old && fs::remove_file(e.path()).is_ok() {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Removes the store and everything in it.
    pub fn destroy(self) -> Result<(), BlockStoreError> {
        fs::remove_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_detect_corruption() {
        let d = tempfile::tempdir().unwrap();
        let s = BlockStore::open(&d.path().join("b")).unwrap();
        let h = *blake3::hash(b"abc").as_bytes();
        s.put(&h, b"abc").unwrap();
        assert!(s.contains(&h));
        assert_eq!(s.get(&h).unwrap(), b"abc");
        fs::write(s.dir().join(hex(&h)), b"abd").unwrap();
        assert!(matches!(s.get(&h), Err(BlockStoreError::Corrupt(_))));
        assert!(!s.contains(&h), "a corrupt block is dropped");
    }
}
