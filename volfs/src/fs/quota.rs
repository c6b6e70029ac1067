//! A volume's byte quota: the sum of its regular files' sizes may not pass
//! a limit. A write, truncate, fallocate or copy that would grow the sum
//! past it fails with ENOSPC, as a full disk would; shrinking and removing
//! files give room back.
//!
//! The sum starts from the manifest at mount (every file's size) and is
//! kept by the operations that change sizes. Each file's size is
//! remembered from the first time this mount grows or cuts it, under one
//! lock held for a map update only (no I/O), so concurrent writes to one
//! file count its growth once. Sizes are logical: a sparse file counts
//! whole. Directories, symlinks and inodes are not counted.

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
    /// Sizes of files this mount changed, by backing inode.
    sizes: HashMap<u64, u64>,
}

impl Quota {
    /// A quota of `limit` bytes over files whose sizes sum to `used` now.
    pub fn new(limit: u64, used: u64) -> Quota {
        Quota {
            limit,
            state: Mutex::new(State {
                used,
                sizes: HashMap::new(),
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

    /// File `ino` (`current` bytes as the caller saw) lost its last name.
    pub fn removed(&self, ino: u64, current: u64) {
        let mut s = self.state();
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
}
