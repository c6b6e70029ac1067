//! A volume's byte quota: the sum of its regular files' sizes (or the end of
//! space allocated past a size) may not pass a limit. A write, truncate,
//! fallocate or copy that would grow the sum past it fails with ENOSPC, as
//! a full disk would; shrinking files and removing them give room back.
//!
//! The sum starts from the manifest at mount (every file's size) and is
//! kept by the operations that change sizes. A file's size is remembered
//! while it has open handles, under one lock held for a map update only (no
//! I/O), so concurrent writes to one file count its growth once; when its
//! last handle closes, its count is set to what the backing file really
//! holds (an operation that failed half-way, or a short copy, counts no
//! more than it wrote) and forgotten. A file unlinked while open keeps its
//! room until its last handle closes. Sizes are logical: a sparse file
//! counts whole. Directories, symlinks and inodes are not counted.
//!
//! With the writeback cache the app's `write(2)` lands in the page cache
//! first: the ENOSPC comes back when the kernel writes those pages to the
//! volume, at the latest at `fsync` or `close`, as on a network filesystem.

use std::collections::HashMap;
use std::sync::Mutex;

use fuser::Errno;

/// See the module docs.
#[derive(Debug)]
pub struct Quota {
    limit: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Counted sizes of files this mount is changing, by backing inode.
    sizes: HashMap<u64, u64>,
    /// Open handles by backing inode.
    handles: HashMap<u64, u32>,
    /// Files whose last name went while they were open: freed at last close.
    orphans: std::collections::HashSet<u64>,
}

impl Quota {
    /// A quota of `limit` bytes over files whose sizes sum to `used` now.
    pub fn new(limit: u64, used: u64) -> Quota {
        Quota {
            limit,
            state: Mutex::new(State {
                used,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limit, bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes counted now.
    pub fn used(&self) -> u64 {
        self.state().used
    }

    /// File `ino`, now `current` bytes long as far as the caller saw,
    /// becomes at least `end` bytes long (a write or an allocation ending
    /// there): counted, or ENOSPC if that passes the limit.
    pub fn grow_to(&self, ino: u64, current: u64, end: u64) -> Result<(), Errno> {
        let mut s = self.state();
        let old = *s.sizes.entry(ino).or_insert(current);
        if end <= old {
            return Ok(());
        }
        let grow = end - old;
        if s.used.saturating_add(grow) > self.limit {
            return Err(Errno::ENOSPC);
        }
        s.used += grow;
        s.sizes.insert(ino, end);
        Ok(())
    }

    /// File `ino` (`current` bytes as the caller saw) is set to exactly
    /// `size` bytes (a truncate): counted, or ENOSPC if it grows past the
    /// limit.
    pub fn set_size(&self, ino: u64, current: u64, size: u64) -> Result<(), Errno> {
        let mut s = self.state();
        let old = *s.sizes.entry(ino).or_insert(current);
        if size > old && s.used.saturating_add(size - old) > self.limit {
            return Err(Errno::ENOSPC);
        }
        s.used = s.used.saturating_sub(old).saturating_add(size);
        s.sizes.insert(ino, size);
        Ok(())
    }

    /// A handle of file `ino` was opened.
    pub fn opened(&self, ino: u64) {
        *self.state().handles.entry(ino).or_insert(0) += 1;
    }

    /// A handle of file `ino` closed; the backing file holds `actual` bytes
    /// now. At its last close the count is made `actual` and forgotten (or
    /// freed, for a file with no name left).
    pub fn closed(&self, ino: u64, actual: u64) {
        let mut s = self.state();
        let left = match s.handles.get_mut(&ino) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left > 0 {
            return;
        }
        s.handles.remove(&ino);
        let counted = s.sizes.remove(&ino);
        if s.orphans.remove(&ino) {
            let size = counted.unwrap_or(actual);
            s.used = s.used.saturating_sub(size);
        } else if let Some(c) = counted {
            s.used = s.used.saturating_sub(c).saturating_add(actual);
        }
    }

    /// File `ino` (`current` bytes as the caller saw) lost its last name:
    /// freed now, or at its last close if it is open.
    pub fn removed(&self, ino: u64, current: u64) {
        let mut s = self.state();
        if s.handles.get(&ino).is_some_and(|n| *n > 0) {
            s.sizes.entry(ino).or_insert(current);
            s.orphans.insert(ino);
            return;
        }
        let size = s.sizes.remove(&ino).unwrap_or(current);
        s.used = s.used.saturating_sub(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_limit_is_refused_and_room_comes_back() {
        let q = Quota::new(100, 40);
        q.grow_to(1, 10, 50).unwrap(); // +40
        assert_eq!(q.used(), 80);
        assert_eq!(q.grow_to(2, 0, 21), Err(Errno::ENOSPC));
        q.grow_to(2, 0, 20).unwrap();
        assert_eq!(q.used(), 100);
        // Writes inside a file's size cost nothing, even at the limit.
        q.grow_to(1, 50, 30).unwrap();
        // Concurrent writers that saw the old size count the growth once.
        q.grow_to(1, 10, 50).unwrap();
        assert_eq!(q.used(), 100);
        q.set_size(1, 50, 0).unwrap();
        assert_eq!(q.used(), 50);
        assert_eq!(q.set_size(3, 0, 51), Err(Errno::ENOSPC));
        q.removed(2, 20);
        assert_eq!(q.used(), 30);
        q.removed(9, 30);
        assert_eq!(q.used(), 0);
    }

    #[test]
    fn an_open_unlinked_file_keeps_its_room_until_its_last_close() {
        let q = Quota::new(100, 0);
        q.opened(7);
        q.grow_to(7, 0, 60).unwrap();
        q.removed(7, 60);
        assert_eq!(q.used(), 60, "still open: still counted");
        // Truncating it through the open handle frees its own bytes only.
        q.set_size(7, 60, 0).unwrap();
        assert_eq!(q.used(), 0);
        q.grow_to(7, 0, 100).unwrap();
        assert_eq!(q.grow_to(8, 0, 1), Err(Errno::ENOSPC));
        q.closed(7, 100);
        assert_eq!(q.used(), 0, "freed at the last close");
        q.grow_to(8, 0, 100).unwrap();
    }

    #[test]
    fn the_last_close_counts_what_the_file_really_holds() {
        let q = Quota::new(100, 0);
        q.opened(3);
        q.opened(3);
        // A copy counted at 80 that wrote 30.
        q.grow_to(3, 0, 80).unwrap();
        q.closed(3, 30);
        assert_eq!(q.used(), 80, "another handle is open");
        q.closed(3, 30);
        assert_eq!(q.used(), 30);
    }
}
