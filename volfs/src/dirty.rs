//! Which blocks of which files changed since the manifest last looked.
//!
//! The filesystem marks a block *after* its write reached the backing file; a
//! reader (manifest refresh, pre-copy) *takes* a file's marks (clearing them)
//! *before* it reads the blocks. A write racing that read therefore either
//! landed before the take (the read sees it) or marks the block again after
//! the take (the next round sees it): a write is never lost. This is the
//! dirty-log protocol of a VMM's live migration, per file instead of per page.
//!
//! Keys are backing inode numbers, so a rename keeps a file's marks and a
//! hard link shares them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 16;

/// The dirty state of one file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileDirty {
    /// The whole file must be rehashed (new inode, or nothing known about it).
    pub all: bool,
    /// Bit `i` set: block `i` was written.
    pub bits: Vec<u64>,
}

impl FileDirty {
    fn set_range(&mut self, first: u64, last: u64) {
        let need = (last / 64 + 1) as usize;
        if self.bits.len() < need {
            self.bits.resize(need, 0);
        }
        for b in first..=last {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Whether block `i` is marked.
    pub fn is_set(&self, i: u64) -> bool {
        self.all
            || self
                .bits
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Indices of marked blocks, ascending.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            (0..64u64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }

    /// Number of marked blocks.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Totals for `volfs status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirtyStats {
    /// Files with at least one marked block (or marked whole).
    pub files: u64,
    /// Marked blocks (a file marked whole counts none here).
    pub blocks: u64,
    /// `blocks * block_size`.
    pub bytes: u64,
    /// Files marked whole.
    pub whole_files: u64,
    /// Metadata changes (create, unlink, rename, chmod, ...) since the last take.
    pub metadata_changes: u64,
}

/// Per-file dirty block bitmaps, sharded by inode so writers on different
/// files rarely share a lock.
#[derive(Debug)]
pub struct DirtyMap {
    block_size: u64,
    shards: [Mutex<HashMap<u64, FileDirty>>; SHARDS],
    metadata_changes: AtomicU64,
}

impl DirtyMap {
    /// An empty map for blocks of `block_size` bytes.
    pub fn new(block_size: u32) -> Self {
        assert!(block_size > 0, "block size must be positive");
        DirtyMap {
            block_size: u64::from(block_size),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            metadata_changes: AtomicU64::new(0),
        }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    fn shard(&self, ino: u64) -> std::sync::MutexGuard<'_, HashMap<u64, FileDirty>> {
        let s = (ino as usize) % SHARDS;
        self.shards[s].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the blocks overlapping `[offset, offset + len)`. Call after the write landed.
    pub fn mark_range(&self, ino: u64, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.block_size;
        let last = (offset + len - 1) / self.block_size;
        self.shard(ino)
            .entry(ino)
            .or_default()
            .set_range(first, last);
    }

    /// Marks a whole file (a new inode, or content changed in an unknown way).
    pub fn mark_all(&self, ino: u64) {
        self.shard(ino).entry(ino).or_default().all = true;
        self.mark_metadata();
    }

    /// Counts a metadata change. The manifest refresh re-reads every path's
    /// metadata, so this is only for reporting.
    pub fn mark_metadata(&self) {
        self.metadata_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes (and clears) a file's marks. Call *before* reading its blocks.
    pub fn take(&self, ino: u64) -> Option<FileDirty> {
        self.shard(ino).remove(&ino)
    }

    /// Puts marks back (e.g. a refresh that failed half way), merged with any new ones.
    pub fn restore(&self, ino: u64, d: FileDirty) {
        let mut shard = self.shard(ino);
        let cur = shard.entry(ino).or_default();
        cur.all |= d.all;
        if cur.bits.len() < d.bits.len() {
            cur.bits.resize(d.bits.len(), 0);
        }
        for (a, b) in cur.bits.iter_mut().zip(&d.bits) {
            *a |= b;
        }
    }

    /// Inodes that currently have marks.
    pub fn inodes(&self) -> Vec<u64> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Resets the metadata counter (after a refresh read all metadata).
    pub fn clear_metadata_count(&self) {
        self.metadata_changes.store(0, Ordering::Relaxed);
    }

    /// Current totals.
    pub fn stats(&self) -> DirtyStats {
        let mut s = DirtyStats {
            metadata_changes: self.metadata_changes.load(Ordering::Relaxed),
            ..DirtyStats::default()
        };
        for shard in &self.shards {
            for d in shard.lock().unwrap_or_else(|p| p.into_inner()).values() {
                s.files += 1;
                s.blocks += d.count();
                s.whole_files += u64::from(d.all);
            }
        }
        s.bytes = s.blocks * self.block_size;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_every_touched_block() {
        let m = DirtyMap::new(4096);
        m.mark_range(7, 4095, 2); // straddles blocks 0 and 1
        m.mark_range(7, 64 * 4096 * 2, 1); // block 128: grows the bitmap
        let d = m.take(7).unwrap();
        assert_eq!(d.blocks().collect::<Vec<_>>(), vec![0, 1, 128]);
        assert!(m.take(7).is_none(), "take clears");
    }

    #[test]
    fn zero_length_write_marks_nothing() {
        let m = DirtyMap::new(4096);
        m.mark_range(1, 100, 0);
        assert_eq!(m.stats().files, 0);
    }

    #[test]
    fn restore_merges_with_new_marks() {
        let m = DirtyMap::new(10);
        m.mark_range(1, 0, 1);
        let taken = m.take(1).unwrap();
        m.mark_range(1, 50, 1);
        m.restore(1, taken);
        let d = m.take(1).unwrap();
        assert_eq!(d.blocks().collect::<Vec<_>>(), vec![0, 5]);
    }

    #[test]
    fn stats_count_blocks_and_bytes() {
        let m = DirtyMap::new(100);
        m.mark_range(1, 0, 250);
        m.mark_all(2);
        let s = m.stats();
        assert_eq!((s.files, s.blocks, s.bytes, s.whole_files), (2, 3, 300, 1));
    }
}
