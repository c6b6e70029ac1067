//! Refreshing a manifest from a backing directory.
//!
//! A refresh walks the tree (one `lstat` per path, cheap next to hashing) and
//! re-reads every path's metadata, but hashes only the blocks it has to: on a
//! live mount the blocks the [`DirtyMap`] marked; after a remount the files
//! whose inode or change time differs from what the manifest recorded; and
//! every block when nothing is trusted (`volfs verify`).
//!
//! The tree is the app's: every directory is listed, and every file, symlink
//! and xattr read, through a descriptor opened beneath the root without
//! following a symlink ([`crate::beneath`]). A path that changes kind while
//! it is read (a file or directory swapped for a symlink) is left out of
//! this refresh, with everything under it, and read again by the next.
//!
//! # What a manifest records
//!
//! What travels to another host is what the app may hand it, nothing more:
//! - only extended attributes in the `user.` namespace (see [`crate::delta`]
//!   for why `security.*`, `trusted.*` and `system.*` stay on their host);
//! - modes of everything but directories without their setuid and setgid
//!   bits. An app may `chmod u+s` its own file (the mount is `nosuid`, so it
//!   gains nothing); the file still moves, as a plain file. A receiver
//!   refuses a delta that carries those bits, so recording them would make
//!   such a volume unmovable;
//! - no device nodes: they are left out of the manifest, and a receiver
//!   refuses a delta that carries one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::beneath::{self, VolumeRoot};
use crate::dirty::{DirtyMap, FileDirty};
use crate::manifest::{Entry, Hash, Kind, LocalStat, Manifest, Tracked};
use crate::sys;

/// Name of the metadata directory at the root of a backing directory. It is
/// hidden from the mount and never part of the manifest.
pub const META_DIR: &str = ".volfs";

/// How much of the previous manifest a refresh may reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// A live mount: every content change went through volfs and is in the
    /// dirty map; unmarked blocks keep their hashes.
    DirtyMarks,
    /// After a remount or offline: reuse a file's hashes only when its inode,
    /// change time, size and mtime are what the manifest recorded.
    Stat,
    /// Rehash every block.
    Nothing,
}

/// What a refresh did.
#[derive(Debug, Clone, Default)]
pub struct RefreshStats {
    /// Paths in the new manifest.
    pub paths: u64,
    /// Blocks read and hashed.
    pub hashed_blocks: u64,
    /// Bytes read and hashed.
    pub hashed_bytes: u64,
    /// Blocks whose hash was kept.
    pub reused_blocks: u64,
    /// Files rehashed whole because they changed without volfs seeing it
    /// (only with [`Trust::Stat`]).
    pub changed_behind_back: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
    /// Time spent hashing (a subset of `elapsed`).
    pub hash_time: Duration,
}

/// Relative path bytes → absolute path under `root`.
pub fn abs(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn kind_of(mode: u32) -> Option<Kind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR => Kind::CharDevice,
        libc::S_IFBLK => Kind::BlockDevice,
        libc::S_IFSOCK => Kind::Socket,
        _ => return None,
    })
}

/// Walks `root` and returns every path (relative bytes) with its `lstat`.
/// Directories are opened beneath the root ([`VolumeRoot`]) and listed
/// through that descriptor, so a directory swapped for a symlink is never
/// followed. Paths that vanish or change kind during the walk are left out.
pub fn walk(root: &Path) -> io::Result<BTreeMap<Vec<u8>, fs::Metadata>> {
    walk_beneath(&VolumeRoot::new(root)?)
}

fn walk_beneath(vol: &VolumeRoot) -> io::Result<BTreeMap<Vec<u8>, fs::Metadata>> {
    let mut out = BTreeMap::new();
    out.insert(
        Vec::new(),
        fs::File::from(vol.open(b"", libc::O_PATH)?).metadata()?,
    );
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(dir) = stack.pop() {
        let fd = match vol.open(&dir, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if beneath::changed(&e) => continue,
            Err(e) => return Err(e),
        };
        // Listed through /proc/self/fd, which reopens the very directory
        // `fd` holds; each entry's metadata is an `fstatat` relative to it.
        let listing = sys::proc_path(fd.as_raw_fd());
        let rd = match fs::read_dir(OsStr::from_bytes(listing.as_bytes())) {
            Ok(rd) => rd,
            Err(e) if beneath::changed(&e) => continue,
            Err(e) => return Err(e),
        };
        for ent in rd {
            let ent = match ent {
                Ok(e) => e,
                Err(e) if beneath::changed(&e) => continue,
                Err(e) => return Err(e),
            };
            let name = ent.file_name();
            if dir.is_empty() && name == META_DIR {
                continue;
            }
            let mut rel = dir.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let md = match ent.metadata() {
                Ok(m) => m,
                Err(e) if beneath::changed(&e) => continue,
                Err(e) => return Err(e),
            };
            if md.is_dir() {
                stack.push(rel.clone());
            }
            out.insert(rel, md);
        }
    }
    Ok(out)
}

/// Sorted extended attributes of the object behind an open fd (not
/// `O_PATH`), those a manifest carries only (see [`carried_xattr`]).
pub fn read_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let fd = fd.as_raw_fd();
    let names = match sys::xattr::flist(fd) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| carried_xattr(n)) {
        let cname = std::ffi::CString::new(name).expect("split at NUL");
        match sys::xattr::fget(fd, &cname) {
            Ok(v) => out.push((name.to_vec(), v)),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// The permission bits a manifest records for a `kind` with `mode`: setuid
/// and setgid only on directories (where setgid means "inherit the group").
pub fn recorded_mode(kind: Kind, mode: u32) -> u32 {
    let mode = mode & 0o7777;
    if kind == Kind::Dir {
        mode
    } else {
        mode & !(libc::S_ISUID | libc::S_ISGID)
    }
}

/// Whether an xattr name is one a manifest carries (`user.*`).
pub fn carried_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.")
}

fn meta_entry(kind: Kind, md: &fs::Metadata) -> Entry {
    Entry {
        kind,
        mode: recorded_mode(kind, md.mode()),
        uid: md.uid(),
        gid: md.gid(),
        size: match kind {
            Kind::File | Kind::Symlink => md.size(),
            _ => 0,
        },
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        link_target: Vec::new(),
        rdev: match kind {
            Kind::CharDevice | Kind::BlockDevice => md.rdev(),
            _ => 0,
        },
        xattrs: Vec::new(),
        blocks: Vec::new(),
    }
}

/// Hashes blocks of open files, keeping one buffer.
struct Hasher {
    block_size: u64,
    buf: Vec<u8>,
    stats: RefreshStats,
}

impl Hasher {
    /// Reads block `i` of a file of `size` bytes (zero-padded if the file
    /// shrank meanwhile) and returns its hash.
    fn block(&mut self, fd: i32, size: u64, i: u64) -> io::Result<Hash> {
        let len = size
            .saturating_sub(i * self.block_size)
            .min(self.block_size) as usize;
        let t = Instant::now();
        let buf = &mut self.buf[..len];
        let n = sys::pread_full(fd, buf, i * self.block_size)?;
        buf[n..].fill(0);
        let h = *blake3::hash(buf).as_bytes();
        self.stats.hashed_blocks += 1;
        self.stats.hashed_bytes += len as u64;
        self.stats.hash_time += t.elapsed();
        Ok(h)
    }
}

/// Builds the manifest of `root` as it is now, reusing `prev` as `trust` allows.
pub fn refresh(
    root: &Path,
    prev: &Tracked,
    dirty: Option<&DirtyMap>,
    trust: Trust,
) -> io::Result<(Tracked, RefreshStats)> {
    let start = Instant::now();
    let block_size = prev.manifest.block_size;
    let bs = u64::from(block_size);
    let vol = VolumeRoot::new(root)?;
    let tree = walk_beneath(&vol)?;
    let mut hasher = Hasher {
        block_size: bs,
        buf: vec![0; block_size as usize],
        stats: RefreshStats::default(),
    };

    // Previous file content by inode, to follow renames and replacements.
    let mut prev_by_ino: HashMap<u64, &[u8]> = HashMap::new();
    for (p, l) in &prev.local {
        if prev
            .manifest
            .entries
            .get(p)
            .is_some_and(|e| e.kind == Kind::File)
        {
            prev_by_ino.insert(l.ino, p);
        }
    }

    let mut out = Tracked {
        manifest: Manifest::empty(block_size),
        local: BTreeMap::new(),
    };
    let mut first_name: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut seen_inodes = HashSet::new();
    for (rel, md) in &tree {
        let Some(kind) = kind_of(md.mode()) else {
            continue;
        };
        if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            continue;
        }
        if kind == Kind::File && md.nlink() > 1 {
            if let Some(first) = first_name.get(&md.ino()) {
                let e = Entry {
                    kind: Kind::Hardlink,
                    link_target: first.clone(),
                    ..Entry::dir(0, 0, 0)
                };
                out.local.insert(
                    rel.clone(),
                    LocalStat {
                        ino: md.ino(),
                        ctime: (md.ctime(), md.ctime_nsec() as u32),
                    },
                );
                out.manifest.entries.insert(rel.clone(), e);
                continue;
            }
            first_name.insert(md.ino(), rel.clone());
        }
        let (entry, local) = if kind == Kind::File {
            seen_inodes.insert(md.ino());
            match hash_file(
                &vol,
                rel,
                md.ino(),
                prev,
                &prev_by_ino,
                dirty,
                trust,
                &mut hasher,
            ) {
                Ok(x) => x,
                Err(e) if beneath::changed(&e) => continue,
                Err(e) => return Err(e),
            }
        } else {
            let mut e = meta_entry(kind, md);
            match other_details(&vol, rel, md, &mut e) {
                Ok(()) => {}
                Err(err) if beneath::changed(&err) => continue,
                Err(err) => return Err(err),
            }
            (
                e,
                LocalStat {
                    ino: md.ino(),
                    ctime: (md.ctime(), md.ctime_nsec() as u32),
                },
            )
        };
        out.local.insert(rel.clone(), local);
        out.manifest.entries.insert(rel.clone(), entry);
    }
    // Marks of inodes no longer in the tree would only grow the map. A file
    // created after the walk passed its directory is absent from the new
    // manifest, so the next refresh hashes it whole anyway.
    if let Some(d) = dirty {
        for ino in d.inodes() {
            if !seen_inodes.contains(&ino) {
                d.take(ino);
            }
        }
        d.clear_metadata_count();
    }
    prune_orphans(&mut out);
    let mut stats = hasher.stats;
    stats.paths = out.manifest.entries.len() as u64;
    stats.elapsed = start.elapsed();
    Ok((out, stats))
}

/// Reads what a directory or symlink entry holds besides its `lstat`: a
/// directory's xattrs, a symlink's target. The object must still be the one
/// the walk saw (same inode), else it [changed](beneath::changed).
fn other_details(vol: &VolumeRoot, rel: &[u8], md: &fs::Metadata, e: &mut Entry) -> io::Result<()> {
    let flags = match e.kind {
        Kind::Dir => libc::O_RDONLY | libc::O_DIRECTORY,
        Kind::Symlink => libc::O_PATH | libc::O_NOFOLLOW,
        // FIFOs and sockets hold no `user.*` xattrs.
        _ => return Ok(()),
    };
    let fd = vol.open(rel, flags)?;
    let st = sys::fstat(fd.as_raw_fd())?;
    if st.st_ino != md.ino() || st.st_mode & libc::S_IFMT != md.mode() & libc::S_IFMT {
        return Err(beneath::not_expected());
    }
    if e.kind == Kind::Dir {
        e.xattrs = read_xattrs(fd.as_fd())?;
    } else {
        e.link_target = sys::readlink_fd(fd.as_raw_fd())?;
        e.size = e.link_target.len() as u64;
    }
    Ok(())
}

/// Leaves out paths whose parent is not a directory of the manifest, and
/// hard links whose first name is not a file of it: the walk saw a
/// directory or file that changed before it was read. They come back in a
/// later refresh; a manifest always describes a tree.
fn prune_orphans(t: &mut Tracked) {
    let paths: Vec<Vec<u8>> = t.manifest.entries.keys().cloned().collect();
    // Byte order puts every directory before what it holds.
    for p in paths.iter().filter(|p| !p.is_empty()) {
        let parent = match p.iter().rposition(|&b| b == b'/') {
            Some(i) => &p[..i],
            None => &b""[..],
        };
        if t.manifest
            .entries
            .get(parent)
            .is_none_or(|e| e.kind != Kind::Dir)
        {
            t.manifest.entries.remove(p);
            t.local.remove(p);
        }
    }
    let dangling: Vec<Vec<u8>> = t
        .manifest
        .entries
        .iter()
        .filter(|(_, e)| {
            e.kind == Kind::Hardlink
                && t.manifest
                    .entries
                    .get(&e.link_target)
                    .is_none_or(|f| f.kind != Kind::File)
        })
        .map(|(p, _)| p.clone())
        .collect();
    for p in dangling {
        t.manifest.entries.remove(&p);
        t.local.remove(&p);
    }
}

/// Hashes one regular file: takes its dirty marks first, then stats and reads
/// it through one open fd (so a write after the take is marked again).
#[allow(clippy::too_many_arguments)]
fn hash_file(
    vol: &VolumeRoot,
    rel: &[u8],
    ino: u64,
    prev: &Tracked,
    prev_by_ino: &HashMap<u64, &[u8]>,
    dirty: Option<&DirtyMap>,
    trust: Trust,
    hasher: &mut Hasher,
) -> io::Result<(Entry, LocalStat)> {
    let marks: Option<FileDirty> = dirty.and_then(|d| d.take(ino));
    let result = (|| {
        let f = vol.read_file(rel)?.ok_or_else(beneath::not_expected)?;
        let md = f.metadata()?;
        if md.ino() != ino {
            // Replaced since the walk: its marks are not the ones taken.
            return Err(beneath::not_expected());
        }
        let fd = f.as_raw_fd();
        let local = LocalStat {
            ino: md.ino(),
            ctime: (md.ctime(), md.ctime_nsec() as u32),
        };
        let mut entry = meta_entry(Kind::File, &md);
        let size = md.size();
        let n = size.div_ceil(hasher.block_size);

        // The previous entry of this inode, if its hashes may be reused.
        let candidate = prev
            .local
            .get(rel)
            .filter(|l| l.ino == md.ino())
            .map(|_| rel)
            .or_else(|| prev_by_ino.get(&md.ino()).copied())
            .and_then(|p| Some((p, prev.manifest.entries.get(p)?, prev.local.get(p)?)))
            .filter(|(_, e, _)| e.kind == Kind::File);
        let prior = match trust {
            Trust::Nothing => None,
            Trust::DirtyMarks => candidate.filter(|_| !marks.as_ref().is_some_and(|m| m.all)),
            Trust::Stat => candidate.filter(|(_, e, l)| {
                l.ino == local.ino
                    && l.ctime == local.ctime
                    && e.size == size
                    && e.mtime == entry.mtime
            }),
        };
        match prior {
            None => {
                if trust == Trust::Stat && candidate.is_some() {
                    hasher
                        .stats
                        .changed_behind_back
                        .push(String::from_utf8_lossy(rel).into_owned());
                }
                entry.blocks = (0..n)
                    .map(|i| hasher.block(fd, size, i))
                    .collect::<io::Result<_>>()?;
            }
            Some((_, pe, _)) => {
                let mut todo: BTreeSet<u64> = BTreeSet::new();
                if let Some(m) = &marks {
                    todo.extend(m.blocks().take_while(|&i| i < n));
                }
                todo.extend(pe.blocks.len() as u64..n);
                if pe.size != size {
                    let edge = pe.size.min(size) / hasher.block_size;
                    if edge < n {
                        todo.insert(edge);
                    }
                }
                let mut blocks = pe.blocks.clone();
                blocks.resize(n as usize, [0; 32]);
                hasher.stats.reused_blocks += n - todo.len() as u64;
                for i in todo {
                    blocks[i as usize] = hasher.block(fd, size, i)?;
                }
                entry.blocks = blocks;
            }
        }
        entry.xattrs = read_xattrs(f.as_fd())?;
        Ok((entry, local))
    })();
    if result.is_err() {
        if let (Some(d), Some(m)) = (dirty, marks) {
            d.restore(ino, m);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(root: &Path, bs: u32) -> (Tracked, RefreshStats) {
        let empty = Tracked {
            manifest: Manifest::empty(bs),
            local: BTreeMap::new(),
        };
        refresh(root, &empty, None, Trust::Nothing).unwrap()
    }

    #[test]
    fn dirty_marks_limit_rehashing_and_match_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, vec![1u8; 10 * 4096]).unwrap();
        let (t0, s0) = fresh(dir.path(), 4096);
        assert_eq!(s0.hashed_blocks, 10);

        let dm = DirtyMap::new(4096);
        let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, b"xy", 3 * 4096 + 5).unwrap();
        dm.mark_range(fs::metadata(&f).unwrap().ino(), 3 * 4096 + 5, 2);
        let (t1, s1) = refresh(dir.path(), &t0, Some(&dm), Trust::DirtyMarks).unwrap();
        assert_eq!(s1.hashed_blocks, 1);
        assert_eq!(t1.manifest, fresh(dir.path(), 4096).0.manifest);
    }

    #[test]
    fn truncate_and_regrow_is_seen_through_size_change() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, vec![1u8; 3 * 4096 + 100]).unwrap();
        let (t0, _) = fresh(dir.path(), 4096);
        let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(4096 + 7).unwrap();
        let dm = DirtyMap::new(4096);
        let (t1, _) = refresh(dir.path(), &t0, Some(&dm), Trust::DirtyMarks).unwrap();
        assert_eq!(t1.manifest, fresh(dir.path(), 4096).0.manifest);
    }

    #[test]
    fn change_behind_back_is_detected_with_stat_trust() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"hello").unwrap();
        let (t0, _) = fresh(dir.path(), 4096);
        std::thread::sleep(Duration::from_millis(10));
        fs::write(dir.path().join("a"), b"world").unwrap();
        let (t1, s1) = refresh(dir.path(), &t0, None, Trust::Stat).unwrap();
        assert_eq!(s1.changed_behind_back, vec!["a".to_string()]);
        assert_ne!(t1.manifest.root(), t0.manifest.root());
    }

    #[test]
    fn hard_links_and_symlinks_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"x").unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("s")).unwrap();
        fs::create_dir(dir.path().join(META_DIR)).unwrap();
        let (t, _) = fresh(dir.path(), 4096);
        let e = &t.manifest.entries;
        assert_eq!(e[&b"b"[..]].kind, Kind::Hardlink);
        assert_eq!(e[&b"b"[..]].link_target, b"a");
        assert_eq!(e[&b"s"[..]].link_target, b"a");
        assert!(
            !e.contains_key(META_DIR.as_bytes()),
            "metadata dir is not part of the volume"
        );
    }
}
