//! Applying a delta to a backing directory.
//!
//! Nothing in the tree changes until the whole delta has been read, every
//! block verified into the block store, the resulting manifest checked
//! against the sender's root hash and every changed file assembled in
//! `.volfs/staging/`. Only then are paths removed, staged files renamed into
//! place and metadata set. Finally the tree is rehashed and its root must be
//! the sender's, or the apply fails loudly. Before the manifest is saved as
//! clean the volume's filesystem is synced (file data, directories and
//! metadata), so an applied delta is durable when the apply returns: a new
//! edge that asks for the release after an apply asks with its copy on disk.
//!
//! Every path is reached beneath the volume root without following a
//! symlink ([`crate::beneath`]): files are opened and renamed, and owners,
//! modes, xattrs and times set, through a parent directory opened that way,
//! with the `*at` calls and `AT_SYMLINK_NOFOLLOW`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::backing::{Backing, BackingError};
use crate::beneath::{self, VolumeRoot};
use crate::blockstore::BlockStore;
use crate::delta::{DeltaError, Limits, ReadDelta, read_delta_with};
use crate::dirty::DirtyMap;
use crate::manifest::{Entry, Hash, Kind, Manifest, Tracked, hex};
use crate::scan::{self, Trust, abs};
use crate::sys;

/// Errors of an apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The delta is bad; the target is unchanged.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// Opening the target.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Writing the tree failed part way.
    #[error("applying to {path}: {source}")]
    Io {
        /// The path being written.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// After the apply the tree does not hash to the sender's root.
    #[error("after apply the volume hashes to {got}, the sender's root is {want}")]
    Verify {
        /// The sender's root.
        want: String,
        /// The root of the tree now.
        got: String,
    },
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// Root hash of the volume now (the sender's).
    pub root: Hash,
    /// Paths added or changed.
    pub changed: u64,
    /// Paths removed.
    pub removed: u64,
    /// Blocks received.
    pub blocks: u64,
    /// Bytes of the delta stream.
    pub wire_bytes: u64,
}

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: p.display().to_string(),
        source,
    }
}

/// Applies the delta read from `r` to the (locked, unmounted) backing
/// directory whose current manifest is `base`. The delta's blocks go through
/// a block store in `.volfs/`, removed afterwards whatever the outcome.
pub fn apply_delta<R: Read>(
    backing: &Backing,
    base: &Tracked,
    r: R,
) -> Result<(Tracked, ApplyReport), ApplyError> {
    apply_delta_with(backing, base, r, &Limits::default())
}

/// [`apply_delta`] reading the delta within `limits`.
pub fn apply_delta_with<R: Read>(
    backing: &Backing,
    base: &Tracked,
    r: R,
    limits: &Limits,
) -> Result<(Tracked, ApplyReport), ApplyError> {
    let store = BlockStore::open(
        &backing
            .meta_dir()
            .join(format!("incoming-{}", std::process::id())),
    )
    .map_err(DeltaError::from)?;
    let result = (|| {
        let delta = read_delta_with(r, &base.manifest, &store, limits)?;
        check_tree_shape(&delta.manifest)?;
        apply_read(backing, base, &delta, &store)
    })();
    let _ = store.destroy();
    result
}

/// Every path's parent must be a directory of the new manifest.
fn check_tree_shape(m: &Manifest) -> Result<(), DeltaError> {
    if m.entries.is_empty() {
        return Ok(());
    }
    if m.entries.get(&b""[..]).is_none_or(|e| e.kind != Kind::Dir) {
        return Err(DeltaError::Corrupt(
            "the volume root is not a directory".into(),
        ));
    }
    for p in m.entries.keys().filter(|p| !p.is_empty()) {
        let parent = parent_of(p);
        if m.entries.get(parent).is_none_or(|e| e.kind != Kind::Dir) {
            return Err(DeltaError::Corrupt(format!(
                "{} has no parent directory",
                String::from_utf8_lossy(p)
            )));
        }
    }
    Ok(())
}

fn parent_of(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    }
}

/// Applies a delta already read and verified (blocks in `store`).
pub fn apply_read(
    backing: &Backing,
    base: &Tracked,
    delta: &ReadDelta,
    store: &BlockStore,
) -> Result<(Tracked, ApplyReport), ApplyError> {
    let root = backing.root();
    let vol = VolumeRoot::new(root).map_err(io_err(root))?;
    let old = &base.manifest;
    let new = &delta.manifest;
    let staging = backing.meta_dir().join("staging");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    let written = DirtyMap::new(new.block_size);
    let result = (|| {
        // 1. Assemble every file whose bytes change, before the tree is
        //    touched: a new copy in staging, or (a file whose blocks mostly
        //    stay) the changed blocks read into memory for a patch in place.
        let base_index = old.block_index();
        let linked: HashSet<&[u8]> = old
            .entries
            .values()
            .chain(new.entries.values())
            .filter(|e| e.kind == Kind::Hardlink)
            .map(|e| e.link_target.as_slice())
            .collect();
        let mut staged: HashMap<&[u8], CString> = HashMap::new();
        let mut patches: Vec<(&[u8], Vec<BlockWrite>)> = Vec::new();
        let mut patch_bytes = 0usize;
        for p in &delta.changed {
            let e = &new.entries[p];
            let prior = old.entries.get(p).filter(|o| o.kind == Kind::File);
            if e.kind != Kind::File
                || prior.is_some_and(|o| o.blocks == e.blocks && o.size == e.size)
            {
                continue;
            }
            let changed: Vec<usize> = (0..e.blocks.len())
                .filter(|&i| prior.and_then(|o| o.blocks.get(i)) != Some(&e.blocks[i]))
                .collect();
            let bs = new.block_size as usize;
            let small = changed.len() * 2 <= e.blocks.len()
                && patch_bytes + changed.len() * bs <= PATCH_MEMORY;
            if prior.is_some()
                && old.block_size == new.block_size
                && !linked.contains(p.as_slice())
                && small
            {
                let mut blocks = Vec::with_capacity(changed.len());
                for i in changed {
                    let data = block_data(&vol, new.block_size, &base_index, store, e, i)?;
                    patch_bytes += data.len();
                    blocks.push((i as u64, data));
                }
                patches.push((p.as_slice(), blocks));
            } else {
                let name = staged.len().to_string();
                assemble(
                    &vol,
                    new.block_size,
                    &base_index,
                    store,
                    e,
                    &staging.join(&name),
                )?;
                staged.insert(p, CString::new(name).expect("digits"));
            }
        }
        // Patches in place, recording what they wrote so the check below
        // rehashes only that.
        for (p, blocks) in &patches {
            let path = abs(root, p);
            let f = vol
                .open(p, libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .map(fs::File::from)
                .map_err(io_err(&path))?;
            let md = f.metadata().map_err(io_err(&path))?;
            if !md.is_file() {
                return Err(io_err(&path)(beneath::not_expected()));
            }
            let ino = md.ino();
            let bs = u64::from(new.block_size);
            for (i, data) in blocks {
                sys::pwrite_all(f.as_raw_fd(), data, i * bs).map_err(io_err(&path))?;
                written.mark_range(ino, i * bs, data.len() as u64);
            }
            let size = new.entries[*p].size;
            let was = f.metadata().map_err(io_err(&path))?.len();
            f.set_len(size).map_err(io_err(&path))?;
            written.mark_range(ino, was.min(size), was.abs_diff(size));
        }
        // 2. Remove what is gone or changes kind, deepest first.
        let mut doomed: BTreeSet<&[u8]> = delta.removed.iter().map(|p| p.as_slice()).collect();
        for p in &delta.changed {
            if let Some(o) = old.entries.get(p) {
                let keep = (o.kind == Kind::Dir && new.entries[p].kind == Kind::Dir)
                    || (o.kind == Kind::File && new.entries[p].kind == Kind::File);
                if !keep {
                    doomed.insert(p);
                }
            }
        }
        let mut touched_dirs: BTreeSet<Vec<u8>> = BTreeSet::new();
        for p in doomed.iter().rev() {
            let path = abs(root, p);
            let r = (|| {
                let (dir, name) = vol.parent(p)?;
                match sys::statat(dir.as_raw_fd(), &name) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        sys::unlinkat(dir.as_raw_fd(), &name, libc::AT_REMOVEDIR)
                    }
                    Ok(_) => sys::unlinkat(dir.as_raw_fd(), &name, 0),
                    Err(e) => Err(e),
                }
            })();
            match r {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => r.map_err(io_err(&path))?,
            }
            touched_dirs.insert(parent_of(p).to_vec());
        }
        let staging_dir = sys::cstr(staging.as_os_str())
            .and_then(|c| sys::open(&c, libc::O_PATH | libc::O_DIRECTORY, 0))
            .map_err(io_err(&staging))?;
        // 3. Create and replace, parents first.
        for p in &delta.changed {
            let e = &new.entries[p];
            let path = abs(root, p);
            touched_dirs.insert(parent_of(p).to_vec());
            let (dir, name) = vol.parent(p).map_err(io_err(&path))?;
            let dir = dir.as_raw_fd();
            match e.kind {
                Kind::Dir => match sys::mkdirat(dir, &name, 0o700) {
                    Ok(()) => {}
                    Err(err)
                        if err.raw_os_error() == Some(libc::EEXIST)
                            && sys::statat(dir, &name)
                                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR) => {}
                    Err(err) => return Err(io_err(&path)(err)),
                },
                Kind::File => {
                    if let Some(src) = staged.get(p.as_slice()) {
                        sys::renameat2(staging_dir.as_raw_fd(), src, dir, &name, 0)
                            .map_err(io_err(&path))?;
                    }
                }
                Kind::Symlink => {
                    let target = CString::new(e.link_target.clone())
                        .map_err(|_| io_err(&path)(io::Error::from_raw_os_error(libc::EINVAL)))?;
                    sys::symlinkat(&target, dir, &name).map_err(io_err(&path))?;
                }
                Kind::Fifo | Kind::Socket => {
                    sys::mknodat(dir, &name, e.kind.mode_bits() | e.mode, 0)
                        .map_err(io_err(&path))?;
                }
                Kind::CharDevice | Kind::BlockDevice => {
                    return Err(DeltaError::Refused(format!(
                        "entry {} is a device node",
                        String::from_utf8_lossy(p)
                    ))
                    .into());
                }
                Kind::Hardlink => {} // below, once every file is in place
            }
            if e.kind != Kind::Hardlink && e.kind != Kind::Dir {
                set_metadata(&vol, &path, p, e)?;
            }
        }
        // 4. Hard links: every second name must share its first name's inode.
        for (p, e) in new.entries.iter().filter(|(_, e)| e.kind == Kind::Hardlink) {
            let path = abs(root, p);
            let target = abs(root, &e.link_target);
            let (tdir, tname) = vol.parent(&e.link_target).map_err(io_err(&target))?;
            let st = sys::statat(tdir.as_raw_fd(), &tname).map_err(io_err(&target))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(io_err(&target)(beneath::not_expected()));
            }
            let (dir, name) = vol.parent(p).map_err(io_err(&path))?;
            match sys::statat(dir.as_raw_fd(), &name) {
                Ok(m) if m.st_ino == st.st_ino => continue,
                Ok(_) => sys::unlinkat(dir.as_raw_fd(), &name, 0).map_err(io_err(&path))?,
                Err(_) => {}
            }
            sys::linkat(tdir.as_raw_fd(), &tname, dir.as_raw_fd(), &name).map_err(io_err(&path))?;
            touched_dirs.insert(parent_of(p).to_vec());
        }
        // 5. Directories last, deepest first, so their mtimes stay put.
        for p in &delta.changed {
            if new.entries[p].kind == Kind::Dir {
                touched_dirs.insert(p.clone());
            }
        }
        for p in touched_dirs.iter().rev() {
            if let Some(e) = new.entries.get(p).filter(|e| e.kind == Kind::Dir) {
                set_metadata(&vol, &abs(root, p), p, e)?;
            }
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&staging);
    result?;

    // 6. The tree must now hash to the sender's root.
    let (now, _) = if base.manifest.block_size == new.block_size {
        // Only this apply changed the tree since `base` was checked: files it
        // replaced have new inodes (hashed whole), patched ones are marked.
        scan::refresh(root, base, Some(&written), Trust::DirtyMarks)
    } else {
        let fresh = Tracked {
            manifest: Manifest::empty(new.block_size),
            local: Default::default(),
        };
        scan::refresh(root, &fresh, None, Trust::Nothing)
    }
    .map_err(io_err(root))?;
    // Durable before it is recorded as clean (and before anyone relies on it).
    let rootdir = fs::File::open(root).map_err(io_err(root))?;
    sys::syncfs(rootdir.as_raw_fd()).map_err(io_err(root))?;
    let got = now.manifest.root();
    if got != delta.root {
        backing.save(&now, true)?;
        return Err(ApplyError::Verify {
            want: hex(&delta.root),
            got: hex(&got),
        });
    }
    backing.save(&now, true)?;
    Ok((
        now,
        ApplyReport {
            root: got,
            changed: delta.changed.len() as u64,
            removed: delta.removed.len() as u64,
            blocks: delta.blocks,
            wire_bytes: delta.wire_bytes,
        },
    ))
}

/// One block of a patch in place: its index and bytes.
type BlockWrite = (u64, Vec<u8>);

/// Most memory a patch in place may hold; larger changes go through staging.
const PATCH_MEMORY: usize = 256 << 20;

/// The bytes of block `i` of `e`, from the block store or the base tree.
fn block_data(
    vol: &VolumeRoot,
    block_size: u32,
    base_index: &HashMap<Hash, (Vec<u8>, u64)>,
    store: &BlockStore,
    e: &Entry,
    i: usize,
) -> Result<Vec<u8>, ApplyError> {
    let bs = u64::from(block_size);
    let h = &e.blocks[i];
    let len = e.size.saturating_sub(i as u64 * bs).min(bs) as usize;
    if store.contains(h) {
        let d = store.get(h).map_err(DeltaError::from)?;
        if d.len() == len {
            return Ok(d);
        }
    }
    let (p, j) = base_index
        .get(h)
        .ok_or_else(|| DeltaError::MissingBlock(hex(h)))?;
    let sp = vol.abs(p);
    let f = vol
        .read_file(p)
        .map_err(io_err(&sp))?
        .ok_or_else(|| io_err(&sp)(beneath::not_expected()))?;
    let mut buf = vec![0u8; len];
    let n = sys::pread_full(f.as_raw_fd(), &mut buf, j * bs).map_err(io_err(&sp))?;
    buf[n..].fill(0);
    if blake3::hash(&buf).as_bytes() != h {
        return Err(DeltaError::CorruptBlock(hex(h)).into());
    }
    Ok(buf)
}

/// Writes a file's bytes to `dst` from the block store or the base tree.
fn assemble(
    vol: &VolumeRoot,
    block_size: u32,
    base_index: &HashMap<Hash, (Vec<u8>, u64)>,
    store: &BlockStore,
    e: &Entry,
    dst: &Path,
) -> Result<(), ApplyError> {
    let f = fs::File::create(dst).map_err(io_err(dst))?;
    let block_size = u64::from(block_size);
    let mut open: HashMap<&[u8], fs::File> = HashMap::new();
    let mut buf = vec![0u8; block_size as usize];
    for (i, h) in e.blocks.iter().enumerate() {
        let len = e.size.saturating_sub(i as u64 * block_size).min(block_size) as usize;
        let data: Vec<u8> = if let Some((p, j)) = base_index.get(h) {
            let src = match open.entry(p.as_slice()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let sp = vol.abs(p);
                    let f = vol
                        .read_file(p)
                        .map_err(io_err(&sp))?
                        .ok_or_else(|| io_err(&sp)(beneath::not_expected()))?;
                    v.insert(f)
                }
            };
            let b = &mut buf[..len];
            let n = sys::pread_full(src.as_raw_fd(), b, j * block_size).map_err(io_err(dst))?;
            b[n..].fill(0);
            if blake3::hash(b).as_bytes() != h {
                // The base file drifted: fall back to the store.
                store.get(h).map_err(DeltaError::from)?
            } else {
                b.to_vec()
            }
        } else {
            store.get(h).map_err(DeltaError::from)?
        };
        if data.len() != len {
            return Err(DeltaError::Corrupt(format!(
                "block {} has {} bytes, {len} expected",
                hex(h),
                data.len()
            ))
            .into());
        }
        sys::pwrite_all(f.as_raw_fd(), &data, i as u64 * block_size).map_err(io_err(dst))?;
    }
    f.set_len(e.size).map_err(io_err(dst))?;
    Ok(())
}

/// Sets owner, mode, xattrs and mtime of `rel` (shown as `path`) to `e`'s,
/// through its parent directory opened beneath the root, never following a
/// symlink.
fn set_metadata(vol: &VolumeRoot, path: &Path, rel: &[u8], e: &Entry) -> Result<(), ApplyError> {
    let (dir, name) = vol.parent(rel).map_err(io_err(path))?;
    let obj = sys::openat(dir.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)
        .map_err(io_err(path))?;
    let st = sys::fstat(obj.as_raw_fd()).map_err(io_err(path))?;
    if st.st_mode & libc::S_IFMT != e.kind.mode_bits() {
        return Err(io_err(path)(beneath::not_expected()));
    }
    sys::fchown_fd(obj.as_raw_fd(), e.uid, e.gid).map_err(io_err(path))?;
    if e.kind != Kind::Symlink {
        sys::chmod_fd(obj.as_raw_fd(), e.mode).map_err(io_err(path))?;
    }
    match beneath::open_for_xattrs(dir.as_fd(), &name).map_err(io_err(path))? {
        Some(fd) => {
            let have = scan::read_xattrs(fd.as_fd()).map_err(io_err(path))?;
            for (n, _) in &have {
                if !e.xattrs.iter().any(|(m, _)| m == n) {
                    let cn = CString::new(n.clone()).expect("xattr names have no NUL");
                    sys::xattr::fremove(fd.as_raw_fd(), &cn).map_err(io_err(path))?;
                }
            }
            for (n, v) in &e.xattrs {
                if !have.iter().any(|(m, w)| m == n && w == v) {
                    let cn = CString::new(n.clone())
                        .map_err(|_| io_err(path)(io::Error::from_raw_os_error(libc::EINVAL)))?;
                    sys::xattr::fset(fd.as_raw_fd(), &cn, v).map_err(io_err(path))?;
                }
            }
        }
        None if !e.xattrs.is_empty() => {
            return Err(io_err(path)(io::Error::from_raw_os_error(libc::EPERM)));
        }
        None => {}
    }
    sys::utimensat_nofollow(dir.as_raw_fd(), &name, e.mtime).map_err(io_err(path))?;
    Ok(())
}
