//! The manifest: every path of a volume with its metadata and the blake3 hash
//! of each block, and the root hash over all of it.
//!
//! The root hash is blake3 over a canonical encoding of the entries in byte
//! order of their paths (see [`Manifest::root`]); two volumes with the same
//! root hash hold the same tree, bytes, modes, owners, mtimes and xattrs.
//! Access and change times are not covered: they cannot be carried over.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use edge_proto::v1 as pb;
use prost::Message;

/// A blake3 hash.
pub type Hash = [u8; 32];

/// Default block size: 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

/// Errors of manifest encoding and persistence.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing the manifest file failed.
    #[error("manifest file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The bytes are not a manifest of a version this build knows.
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A regular file (the first name of its inode).
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Another name of a regular file; `link_target` is the first name.
    Hardlink,
    /// A named pipe.
    Fifo,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A Unix socket (recreated as a bare inode).
    Socket,
}

impl Kind {
    fn to_pb(self) -> pb::EntryKind {
        match self {
            Kind::File => pb::EntryKind::File,
            Kind::Dir => pb::EntryKind::Dir,
            Kind::Symlink => pb::EntryKind::Symlink,
            Kind::Hardlink => pb::EntryKind::Hardlink,
            Kind::Fifo => pb::EntryKind::Fifo,
            Kind::CharDevice => pb::EntryKind::CharDevice,
            Kind::BlockDevice => pb::EntryKind::BlockDevice,
            Kind::Socket => pb::EntryKind::Socket,
        }
    }

    fn from_pb(k: i32) -> Result<Kind, ManifestError> {
        Ok(match pb::EntryKind::try_from(k) {
            Ok(pb::EntryKind::File) => Kind::File,
            Ok(pb::EntryKind::Dir) => Kind::Dir,
            Ok(pb::EntryKind::Symlink) => Kind::Symlink,
            Ok(pb::EntryKind::Hardlink) => Kind::Hardlink,
            Ok(pb::EntryKind::Fifo) => Kind::Fifo,
            Ok(pb::EntryKind::CharDevice) => Kind::CharDevice,
            Ok(pb::EntryKind::BlockDevice) => Kind::BlockDevice,
            Ok(pb::EntryKind::Socket) => Kind::Socket,
            _ => return Err(ManifestError::Corrupt(format!("unknown entry kind {k}"))),
        })
    }

    /// The `S_IFMT` bits of this kind (a hard link is a regular file).
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File | Kind::Hardlink => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            Kind::Socket => libc::S_IFSOCK,
        }
    }
}

/// One path of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Permission bits (with setuid/setgid/sticky), no type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (files), target length (symlinks), 0 otherwise.
    pub size: u64,
    /// Modification time, seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Symlink target, or the first name of a hard-link group.
    pub link_target: Vec<u8>,
    /// Device number of a device node.
    pub rdev: u64,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// blake3 of each block of a file.
    pub blocks: Vec<Hash>,
}

impl Entry {
    /// A directory entry with the given mode and owner, mtime zero.
    pub fn dir(mode: u32, uid: u32, gid: u32) -> Self {
        Entry {
            kind: Kind::Dir,
            mode,
            uid,
            gid,
            size: 0,
            mtime: (0, 0),
            link_target: Vec::new(),
            rdev: 0,
            xattrs: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// The proto form (full, not a patch).
    pub fn to_pb(&self, path: &[u8]) -> pb::ManifestEntry {
        pb::ManifestEntry {
            path: path.to_vec(),
            kind: self.kind.to_pb() as i32,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime_sec: self.mtime.0,
            mtime_nsec: self.mtime.1,
            link_target: self.link_target.clone(),
            rdev: self.rdev,
            xattrs: self
                .xattrs
                .iter()
                .map(|(n, v)| pb::Xattr {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            blocks: self.blocks.iter().map(|h| h.to_vec()).collect(),
            patch: false,
            block_count: self.blocks.len() as u64,
            changed: Vec::new(),
        }
    }

    /// Reads the proto form. `base` resolves the patch form. A patch's
    /// `block_count` is allocated as given: a reader of untrusted bytes
    /// checks it first (the delta reader does, within its
    /// [`Limits`](crate::delta::Limits)).
    pub fn from_pb(e: &pb::ManifestEntry, base: Option<&Entry>) -> Result<Entry, ManifestError> {
        let kind = Kind::from_pb(e.kind)?;
        let blocks = if e.patch {
            let base = base.filter(|b| b.kind == Kind::File).ok_or_else(|| {
                ManifestError::Corrupt(format!(
                    "patch for {} without a file in the base",
                    String::from_utf8_lossy(&e.path)
                ))
            })?;
            let n = usize::try_from(e.block_count)
                .map_err(|_| ManifestError::Corrupt("block count".into()))?;
            let mut blocks = base.blocks.clone();
            blocks.resize(n, [0; 32]);
            let mut set = vec![false; n];
            for c in &e.changed {
                let i = c.index as usize;
                if i >= n {
                    return Err(ManifestError::Corrupt(
                        "patch index past the block count".into(),
                    ));
                }
                blocks[i] = hash_from(&c.hash)?;
                set[i] = true;
            }
            // Blocks past the base's end must all be given.
            if (base.blocks.len()..n).any(|i| !set[i]) {
                return Err(ManifestError::Corrupt(
                    "patch leaves a new block unset".into(),
                ));
            }
            blocks
        } else {
            e.blocks
                .iter()
                .map(|h| hash_from(h))
                .collect::<Result<_, _>>()?
        };
        let mut xattrs: Vec<_> = e
            .xattrs
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        xattrs.sort();
        let entry = Entry {
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: (e.mtime_sec, e.mtime_nsec),
            link_target: e.link_target.clone(),
            rdev: e.rdev,
            xattrs,
            blocks,
        };
        Ok(entry)
    }
}

/// Reads a 32-byte hash from a proto field.
pub fn hash_from(b: &[u8]) -> Result<Hash, ManifestError> {
    b.try_into()
        .map_err(|_| ManifestError::Corrupt(format!("hash of {} bytes", b.len())))
}

/// Lowercase hex of a hash (or any bytes).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A whole volume: its block size and every path ("" is the root directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Block size the file hashes are cut at.
    pub block_size: u32,
    /// Paths relative to the root, `/`-separated, in byte order.
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

impl Manifest {
    /// A manifest with no paths at all (not even the root): the base of a full delta.
    pub fn empty(block_size: u32) -> Self {
        Manifest {
            block_size,
            entries: BTreeMap::new(),
        }
    }

    /// The root hash: blake3 over the canonical encoding of every entry.
    pub fn root(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(b"edgeshift.volfs.manifest.v1\0");
        h.update(&self.block_size.to_le_bytes());
        for (path, e) in &self.entries {
            let mut buf = Vec::with_capacity(128 + e.blocks.len() * 32);
            put_bytes(&mut buf, path);
            buf.push(e.kind.to_pb() as u8);
            buf.extend_from_slice(&e.mode.to_le_bytes());
            buf.extend_from_slice(&e.uid.to_le_bytes());
            buf.extend_from_slice(&e.gid.to_le_bytes());
            buf.extend_from_slice(&e.size.to_le_bytes());
            buf.extend_from_slice(&e.mtime.0.to_le_bytes());
            buf.extend_from_slice(&e.mtime.1.to_le_bytes());
            put_bytes(&mut buf, &e.link_target);
            buf.extend_from_slice(&e.rdev.to_le_bytes());
            buf.extend_from_slice(&(e.xattrs.len() as u64).to_le_bytes());
            for (n, v) in &e.xattrs {
                put_bytes(&mut buf, n);
                put_bytes(&mut buf, v);
            }
            buf.extend_from_slice(&(e.blocks.len() as u64).to_le_bytes());
            for b in &e.blocks {
                buf.extend_from_slice(b);
            }
            h.update(&buf);
        }
        *h.finalize().as_bytes()
    }

    /// Total bytes of regular files (first names only).
    pub fn data_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.size)
            .sum()
    }

    /// The byte range of block `i` of a file of `size` bytes.
    pub fn block_len(&self, size: u64, i: u64) -> usize {
        let bs = u64::from(self.block_size);
        size.saturating_sub(i * bs).min(bs) as usize
    }

    /// Every block hash, with one place it can be read from: (path, index).
    pub fn block_index(&self) -> std::collections::HashMap<Hash, (Vec<u8>, u64)> {
        let mut m = std::collections::HashMap::new();
        for (p, e) in &self.entries {
            if e.kind == Kind::File {
                for (i, h) in e.blocks.iter().enumerate() {
                    m.entry(*h).or_insert_with(|| (p.clone(), i as u64));
                }
            }
        }
        m
    }

    /// Serializes for `volfs manifest` (a base for a later diff).
    pub fn to_bytes(&self) -> Vec<u8> {
        let pm = pb::PersistedManifest {
            version: edge_proto::MANIFEST_VERSION,
            block_size: self.block_size,
            root: self.root().to_vec(),
            entries: self.entries.iter().map(|(p, e)| e.to_pb(p)).collect(),
            local: Vec::new(),
            clean: true,
        };
        pm.encode_to_vec()
    }

    /// Reads what [`Manifest::to_bytes`] wrote, checking its root hash.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ManifestError> {
        let (m, _, _) = decode_persisted(b)?;
        Ok(m)
    }

    /// [`Manifest::from_bytes`] for bytes from another edge: what they would
    /// take decoded is counted first ([`crate::wire`]) and refused past the
    /// entries and manifest bytes of `limits`.
    pub fn from_untrusted(b: &[u8], limits: &crate::delta::Limits) -> Result<Self, ManifestError> {
        crate::wire::manifest_cost(b, limits.max_entries, limits.max_manifest_bytes)
            .map_err(|e| ManifestError::Corrupt(e.to_string()))?;
        Self::from_bytes(b)
    }
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
    buf.extend_from_slice(b);
}

/// What the local filesystem said of a path when it was hashed: a later stat
/// that differs means the path changed behind volfs's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocalStat {
    /// Backing inode number.
    pub ino: u64,
    /// Change time, which no user can set.
    pub ctime: (i64, u32),
}

/// A manifest with its local bookkeeping, as persisted in `.volfs/manifest.pb`.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The portable part.
    pub manifest: Manifest,
    /// Per path, what the backing filesystem said when it was hashed.
    pub local: BTreeMap<Vec<u8>, LocalStat>,
}

/// A persisted manifest: the manifest, its local stats, its clean mark.
type Decoded = (Manifest, BTreeMap<Vec<u8>, LocalStat>, bool);

fn decode_persisted(b: &[u8]) -> Result<Decoded, ManifestError> {
    let pm = pb::PersistedManifest::decode(b).map_err(|e| ManifestError::Corrupt(e.to_string()))?;
    if pm.version != edge_proto::MANIFEST_VERSION {
        return Err(ManifestError::Corrupt(format!(
            "version {} unknown",
            pm.version
        )));
    }
    if pm.block_size == 0 {
        return Err(ManifestError::Corrupt("block size 0".into()));
    }
    let mut m = Manifest::empty(pm.block_size);
    let mut local = BTreeMap::new();
    for (i, e) in pm.entries.iter().enumerate() {
        let entry = Entry::from_pb(e, None)?;
        if let Some(l) = pm.local.get(i) {
            local.insert(
                e.path.clone(),
                LocalStat {
                    ino: l.ino,
                    ctime: (l.ctime_sec, l.ctime_nsec),
                },
            );
        }
        m.entries.insert(e.path.clone(), entry);
    }
    if m.root().as_slice() != pm.root.as_slice() {
        return Err(ManifestError::Corrupt(
            "root hash does not match its entries".into(),
        ));
    }
    Ok((m, local, pm.clean))
}

impl Tracked {
    /// Writes atomically (temp file, fsync, rename) to `path`.
    pub fn save(&self, path: &Path, clean: bool) -> Result<(), ManifestError> {
        let pm = pb::PersistedManifest {
            version: edge_proto::MANIFEST_VERSION,
            block_size: self.manifest.block_size,
            root: self.manifest.root().to_vec(),
            entries: self
                .manifest
                .entries
                .iter()
                .map(|(p, e)| e.to_pb(p))
                .collect(),
            local: self
                .manifest
                .entries
                .keys()
                .map(|p| {
                    let l = self.local.get(p).copied().unwrap_or_default();
                    pb::LocalStat {
                        ino: l.ino,
                        ctime_sec: l.ctime.0,
                        ctime_nsec: l.ctime.1,
                    }
                })
                .collect(),
            clean,
        };
        write_atomic(path, &pm.encode_to_vec()).map_err(|source| ManifestError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Loads; `Ok(None)` when there is no file. The flag is the `clean` mark.
    pub fn load(path: &Path) -> Result<Option<(Tracked, bool)>, ManifestError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ManifestError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let (manifest, local, clean) = decode_persisted(&bytes)?;
        Ok(Some((Tracked { manifest, local }, clean)))
    }
}

/// Writes `data` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(blocks: Vec<Hash>, size: u64) -> Entry {
        Entry {
            kind: Kind::File,
            size,
            blocks,
            ..Entry::dir(0o644, 0, 0)
        }
    }

    #[test]
    fn root_changes_with_any_field() {
        let mut m = Manifest::empty(4096);
        m.entries.insert(b"".to_vec(), Entry::dir(0o755, 0, 0));
        m.entries.insert(b"a".to_vec(), file(vec![[1; 32]], 10));
        let r0 = m.root();
        let mut m2 = m.clone();
        m2.entries.get_mut(&b"a"[..]).unwrap().mtime.1 = 1;
        assert_ne!(r0, m2.root());
        let mut m3 = m.clone();
        m3.entries
            .get_mut(&b"a"[..])
            .unwrap()
            .xattrs
            .push((b"user.x".to_vec(), vec![]));
        assert_ne!(r0, m3.root());
        let mut m4 = m.clone();
        m4.block_size = 8192;
        assert_ne!(r0, m4.root());
    }

    #[test]
    fn bytes_round_trip_and_corruption_is_caught() {
        let mut m = Manifest::empty(4096);
        m.entries.insert(b"".to_vec(), Entry::dir(0o755, 0, 0));
        m.entries
            .insert(b"x/y".to_vec(), file(vec![[7; 32], [8; 32]], 5000));
        let b = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&b).unwrap(), m);
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 40] ^= 1; // inside a block hash or root
        assert!(Manifest::from_bytes(&bad).is_err());
    }

    #[test]
    fn patch_resolves_against_base() {
        let base = file(vec![[1; 32], [2; 32]], 8192);
        let mut p = base.to_pb(b"f");
        p.blocks.clear();
        p.patch = true;
        p.block_count = 3;
        p.changed = vec![
            pb::BlockRef {
                index: 0,
                hash: vec![9; 32],
            },
            pb::BlockRef {
                index: 2,
                hash: vec![3; 32],
            },
        ];
        let e = Entry::from_pb(&p, Some(&base)).unwrap();
        assert_eq!(e.blocks, vec![[9; 32], [2; 32], [3; 32]]);
        p.changed.pop();
        assert!(
            Entry::from_pb(&p, Some(&base)).is_err(),
            "new block left unset"
        );
    }
}
