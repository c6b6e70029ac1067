//! Entry points for fuzzing the readers of untrusted input.
//!
//! [`DeltaFuzz::run`] feeds one input to the delta reader and, when the
//! reader accepts it, to a real apply on a scratch volume. It is shared by
//! the time-boxed fuzz test that CI runs (`volfs/tests/fuzz_delta.rs`) and
//! the libFuzzer target in `volfs/fuzz/` for long runs. Whatever the input,
//! `run` returns; the invariants it checks panic when broken, which is what
//! a fuzzer reports:
//! - a delta the reader refuses leaves the target exactly as it was;
//! - a delta the reader accepts applies, and leaves the target at the
//!   sender's root hash (everything an apply would only find out half way
//!   through is the reader's to refuse).
//!
//! The first byte of an input picks the target (even: an empty directory,
//! odd: a small fixed volume, the base of [`DeltaFuzz::seeds`]' incremental
//! deltas); the rest is the delta.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::apply::{ApplyError, apply_delta_with};
use crate::backing::Backing;
use crate::blockstore::BlockStore;
use crate::delta::{Limits, read_delta_with};
use crate::manifest::Manifest;
use crate::scan::{self, Trust};
use crate::{offline, sys};

/// Block size of the fuzz volumes.
pub const BLOCK_SIZE: u32 = 4096;

/// The limits a fuzzed reader runs with: the defaults, with a 16 MiB
/// manifest budget, so that the harness can hold each input to a 64 MiB peak
/// of allocation (two frames of the largest size, the budget, and slack).
pub fn fuzz_limits() -> Limits {
    Limits {
        max_manifest_bytes: 16 << 20,
        ..Limits::default()
    }
}

/// What one input did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Empty input.
    Empty,
    /// The reader refused it, with this error.
    Refused(String),
    /// The reader accepted it; the apply then failed, with this error.
    ApplyFailed(String),
    /// Read and applied; the target hashes to the sender's root.
    Applied,
}

/// A scratch directory with the fixed base volume; removed on drop.
#[derive(Debug)]
pub struct DeltaFuzz {
    dir: PathBuf,
    base: Manifest,
    limits: Limits,
    targets: u64,
}

/// Fixed mtime of every path of the fuzz volumes.
const MTIME: (i64, u32) = (1_700_000_000, 5);

impl DeltaFuzz {
    /// Creates the scratch directory (under the system's temporary
    /// directory) and the base volume.
    pub fn new() -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "volfs-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let mut me = DeltaFuzz {
            dir,
            base: Manifest::empty(BLOCK_SIZE),
            limits: fuzz_limits(),
            targets: 0,
        };
        let b = me.dir.join("base");
        build_base(&b)?;
        me.base = manifest_of(&b)?;
        Ok(me)
    }

    /// Valid inputs to start mutating from: a full delta of the base volume
    /// (for an empty target), a delta that changes it in every way a volume
    /// changes, a delta that changes nothing, and a full delta of the
    /// changed volume.
    pub fn seeds(&self) -> io::Result<Vec<Vec<u8>>> {
        let src = self.dir.join("seed-source");
        let _ = fs::remove_dir_all(&src);
        build_base(&src)?;
        offline::hash(&src, Some(BLOCK_SIZE)).map_err(io::Error::other)?;
        let diff = |base: Option<&Manifest>, sel: u8| -> io::Result<Vec<u8>> {
            let mut out = vec![sel];
            offline::diff(&src, base, &mut out).map_err(io::Error::other)?;
            Ok(out)
        };
        let mut seeds = vec![diff(None, 0)?, diff(Some(&self.base), 1)?];
        change(&src)?;
        seeds.push(diff(Some(&self.base), 1)?);
        seeds.push(diff(None, 0)?);
        fs::remove_dir_all(&src)?;
        Ok(seeds)
    }

    /// The manifest an input's first byte picks as the target.
    pub fn base_for(&self, selector: u8) -> Manifest {
        if selector & 1 == 1 {
            self.base.clone()
        } else {
            Manifest::empty(BLOCK_SIZE)
        }
    }

    /// Feeds one input to the reader and, if it accepts it, applies it to a
    /// fresh target. Panics only when an invariant of the module docs breaks.
    pub fn run(&mut self, data: &[u8]) -> Outcome {
        let Some((sel, delta)) = data.split_first() else {
            return Outcome::Empty;
        };
        let onto_base = sel & 1 == 1;
        let empty = Manifest::empty(BLOCK_SIZE);
        let base = if onto_base { &self.base } else { &empty };
        let store_dir = self.dir.join("store");
        let store = BlockStore::open(&store_dir).expect("scratch block store");
        let read = read_delta_with(delta, base, &store, &self.limits);
        let _ = store.destroy();
        if let Err(e) = read {
            return Outcome::Refused(e.to_string());
        }

        let target = self.dir.join(format!("t{}", self.targets));
        self.targets += 1;
        if onto_base {
            build_base(&target).expect("scratch target");
        } else {
            fs::create_dir_all(target.join(scan::META_DIR)).expect("scratch target");
        }
        let before = manifest_of(&target).expect("scan of the target");
        let b = Backing::open(&target).expect("scratch backing");
        let (t, _) = b.load(Some(BLOCK_SIZE)).expect("load of the target");
        let outcome = match apply_delta_with(&b, &t, delta, &self.limits) {
            Ok((_, report)) => {
                let after = manifest_of(&target).expect("scan of the target");
                assert_eq!(after.root(), report.root, "applied, but not at the root");
                Outcome::Applied
            }
            Err(e @ ApplyError::Verify { .. }) => {
                panic!("the reader accepted a delta that does not apply to its root: {e}")
            }
            Err(ApplyError::Delta(e)) => {
                let after = manifest_of(&target).expect("scan of the target");
                assert_eq!(after, before, "a refused delta ({e}) changed the target");
                Outcome::ApplyFailed(e.to_string())
            }
            // What the host's filesystem refuses half way (a full disk, an
            // xattr too large for it) is an I/O error, not a bug.
            Err(e) => Outcome::ApplyFailed(e.to_string()),
        };
        drop(b);
        let _ = fs::remove_dir_all(&target);
        outcome
    }
}

impl Drop for DeltaFuzz {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The manifest of `dir` hashed from scratch.
fn manifest_of(dir: &Path) -> io::Result<Manifest> {
    let empty = crate::manifest::Tracked {
        manifest: Manifest::empty(BLOCK_SIZE),
        local: Default::default(),
    };
    Ok(scan::refresh(dir, &empty, None, Trust::Nothing)?.0.manifest)
}

/// Sets every mtime under `dir` (deepest first) to [`MTIME`].
fn fix_mtimes(dir: &Path) -> io::Result<()> {
    for rel in scan::walk(dir)?.keys().rev() {
        let c = sys::cstr(scan::abs(dir, rel).as_os_str())?;
        sys::utimensat_nofollow(libc::AT_FDCWD, &c, MTIME)?;
    }
    Ok(())
}

/// The base volume: files of several blocks, a directory, a symlink, a hard
/// link, a FIFO and an xattr, with fixed mtimes.
fn build_base(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir.join("d/e"))?;
    let big: Vec<u8> = (0..3 * BLOCK_SIZE + 100).map(|i| (i % 251) as u8).collect();
    fs::write(dir.join("d/a"), &big)?;
    fs::write(dir.join("b"), b"bee")?;
    fs::write(dir.join("z"), vec![0u8; BLOCK_SIZE as usize])?;
    std::os::unix::fs::symlink("b", dir.join("s"))?;
    fs::hard_link(dir.join("b"), dir.join("h"))?;
    let p = sys::cstr(dir.join("p").as_os_str())?;
    sys::mknodat(libc::AT_FDCWD, &p, libc::S_IFIFO | 0o640, 0)?;
    let b = sys::cstr(dir.join("b").as_os_str())?;
    sys::xattr::set(&b, c"user.k", b"v", 0, false)?;
    // The metadata directory now, so that opening the volume later leaves
    // the root's mtime alone.
    fs::create_dir(dir.join(scan::META_DIR))?;
    fix_mtimes(dir)
}

/// Changes a base volume in every way the seeds should cover.
fn change(dir: &Path) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(dir.join("d/a"))?;
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed", u64::from(BLOCK_SIZE) + 7)?;
    f.set_len(u64::from(5 * BLOCK_SIZE))?;
    fs::remove_file(dir.join("b"))?;
    fs::write(dir.join("c"), b"new file")?;
    fs::remove_file(dir.join("s"))?;
    std::os::unix::fs::symlink("d/a", dir.join("s"))?;
    fs::remove_dir(dir.join("d/e"))?;
    fs::create_dir(dir.join("n"))?;
    fs::write(dir.join("n/x"), vec![9u8; 2 * BLOCK_SIZE as usize + 1])?;
    fs::hard_link(dir.join("n/x"), dir.join("n/y"))?;
    let x = sys::cstr(dir.join("n").as_os_str())?;
    sys::xattr::set(&x, c"user.dir", b"1", 0, false)?;
    fix_mtimes(dir)
}
