//! Deltas: what a receiver holding one manifest (the *base*) needs to hold
//! another.
//!
//! A delta is a stream of length-delimited [`pb::DeltaFrame`]s:
//! `header, block*, entry*, removed*, trailer`. Blocks come first so a
//! receiver can stream them into its [`BlockStore`]; entries are the paths
//! added or changed since the base (a changed file as a patch of block
//! indices when that is smaller); the trailer carries counts, so a truncated
//! stream is detected, and the root hash of the result.
//!
//! The sender reads each block it sends once and re-hashes it: if a write
//! raced the extraction, the delta carries the bytes it read under their real
//! hash, and the manifest in the delta says so. A delta is thus always
//! self-consistent (a fuzzy snapshot), and the racing write, marked dirty
//! after its block was taken, is in the next delta.
//!
//! # A delta is untrusted input
//!
//! The reader checks every length, count and size it reads off the stream
//! against [`Limits`] before it allocates for it, and refuses what an apply
//! must never do to a host:
//! - device nodes (character or block): a volume holds data, and a device
//!   node in a backing directory opens the device to whoever reaches it.
//!   FIFOs and sockets travel (as bare inodes).
//! - setuid or setgid bits on anything but a directory. The scan never
//!   records them (see [`crate::scan`]), so a delta that carries them was not
//!   made by volfs.
//! - extended attributes outside the `user.` namespace. `security.*` would
//!   let a delta set file capabilities or security labels, `trusted.*` is
//!   root-only metadata of the host, and `system.*` (POSIX ACLs) names uids
//!   and gids of the source host. Only `user.*` is the app's own data.
//!
//! A delta that breaks a rule gets a clear [`DeltaError`] before anything
//! outside the block store is touched.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use edge_proto::v1 as pb;
use edge_proto::v1::delta_frame::Frame;
use prost::Message;

use crate::beneath::VolumeRoot;
use crate::blockstore::{BlockStore, BlockStoreError};
use crate::manifest::{Entry, Hash, Kind, Manifest, ManifestError, hash_from, hex};
use crate::scan::META_DIR;
use crate::sys;

/// Smallest block size a volume (and a delta) may have.
pub const MIN_BLOCK_SIZE: u32 = 512;

/// Largest block size a volume (and a delta) may have.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

/// The largest frame a reader accepts by default: one block of the largest
/// block size, plus room for its hash and the frame's encoding. A full entry
/// (34 bytes of frame per block) fits up to about 490 000 blocks: a 30 GiB
/// file at 64 KiB blocks, 7.5 TiB at 16 MiB. The writer refuses a larger
/// entry with [`DeltaError::EntryTooLarge`] before it writes anything.
pub const MAX_FRAME: usize = MAX_BLOCK_SIZE as usize + (64 << 10);

/// Bounds on what a delta may make its reader hold, each checked before
/// anything is allocated for it. [`Limits::default`] holds the defaults
/// given on each field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame in bytes (after its length prefix). Default [`MAX_FRAME`].
    pub max_frame: usize,
    /// Smallest block size a header may announce. Default [`MIN_BLOCK_SIZE`]
    /// (512 B), as `volfs mount --block-size` accepts.
    pub min_block_size: u32,
    /// Largest block size a header may announce. Default [`MAX_BLOCK_SIZE`] (16 MiB).
    pub max_block_size: u32,
    /// Paths added or changed in one delta. Default 2^20 (about a million).
    pub max_entries: u64,
    /// Paths removed in one delta. Default 2^20.
    pub max_removed: u64,
    /// Bytes of a path or link target. Default 4095 (`PATH_MAX` less its NUL).
    pub max_path: usize,
    /// Bytes of one path component. Default 255 (`NAME_MAX`).
    pub max_name: usize,
    /// Extended attributes of one entry. Default 1024.
    pub max_xattrs: usize,
    /// Bytes of an xattr name. Default 255 (`XATTR_NAME_MAX`).
    pub max_xattr_name: usize,
    /// Bytes of an xattr value. Default 65536 (`XATTR_SIZE_MAX`).
    pub max_xattr_value: usize,
    /// Bytes the entries and removed paths of one delta may occupy in memory
    /// (paths, link targets, xattrs, block hashes and a fixed cost per
    /// entry). Default 256 MiB: 8 M block hashes (a 512 GiB volume at 64 KiB
    /// blocks), or about a million small entries.
    pub max_manifest_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: MAX_FRAME,
            min_block_size: MIN_BLOCK_SIZE,
            max_block_size: MAX_BLOCK_SIZE,
            max_entries: 1 << 20,
            max_removed: 1 << 20,
            max_path: libc::PATH_MAX as usize - 1,
            max_name: 255,
            max_xattrs: 1024,
            max_xattr_name: 255,
            max_xattr_value: 64 << 10,
            max_manifest_bytes: 256 << 20,
        }
    }
}

/// Memory an entry costs besides its variable parts (the entry, its map
/// node, the set of changed paths).
const ENTRY_COST: u64 = 256;

/// Memory an xattr costs besides its name and value.
const XATTR_COST: u64 = 48;

/// What a delta has left of [`Limits::max_manifest_bytes`].
struct Budget {
    left: u64,
    max: u64,
}

impl Budget {
    fn spend(&mut self, bytes: u64) -> Result<(), DeltaError> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(DeltaError::Limit {
                what: "memory for the delta's entries",
                got: (self.max - self.left).saturating_add(bytes),
                max: self.max,
            }),
        }
    }
}

/// `Ok` when `got <= max`, else [`DeltaError::Limit`] naming `what`.
fn at_most(what: &'static str, got: u64, max: u64) -> Result<(), DeltaError> {
    if got > max {
        Err(DeltaError::Limit { what, got, max })
    } else {
        Ok(())
    }
}

/// Errors of delta extraction and reading.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// Reading the source volume or the stream failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The stream ended before its trailer.
    #[error("delta is truncated: {0}")]
    Truncated(String),
    /// A frame does not decode, or frames are out of order.
    #[error("delta is corrupt: {0}")]
    Corrupt(String),
    /// The delta was made against another base than the receiver holds.
    #[error("delta is for base {want}, but the target is at {have}")]
    WrongBase {
        /// Root hash the delta expects.
        want: String,
        /// Root hash the receiver holds.
        have: String,
    },
    /// A block's bytes do not hash to its name.
    #[error("block {0} is corrupt (its bytes hash to something else)")]
    CorruptBlock(String),
    /// A path that would escape the volume or touch its metadata.
    #[error("delta names an invalid path {0:?}")]
    BadPath(String),
    /// The manifest the delta describes does not hash to the sender's root.
    #[error("delta manifest hashes to {got}, the sender said {want}")]
    RootMismatch {
        /// The sender's root.
        want: String,
        /// What the receiver computed.
        got: String,
    },
    /// A block the new manifest needs is neither in the delta nor in the base.
    #[error("block {0} is missing from the delta and the base")]
    MissingBlock(String),
    /// Manifest decoding.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Block store.
    #[error(transparent)]
    Store(#[from] BlockStoreError),
    /// A length, count or size is past its [`Limits`].
    #[error("delta exceeds a limit: {what} is {got}, at most {max} allowed")]
    Limit {
        /// What was measured.
        what: &'static str,
        /// What the delta asked for.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// The delta asks for something an apply never does to a host (a device
    /// node, a setuid file, an xattr outside `user.`).
    #[error("delta refused: {0}")]
    Refused(String),
    /// An entry of the volume does not fit in one frame.
    #[error(
        "entry {path} needs a frame of {bytes} bytes, more than the {max} a reader \
         accepts (use a larger block size)"
    )]
    EntryTooLarge {
        /// The path.
        path: String,
        /// Bytes its frame would take.
        bytes: usize,
        /// The largest frame.
        max: usize,
    },
}

/// What an extracted delta holds.
#[derive(Debug, Clone)]
pub struct DeltaSummary {
    /// Paths added or changed.
    pub entries: u64,
    /// Paths removed.
    pub removed: u64,
    /// Blocks carried.
    pub blocks: u64,
    /// Bytes of block data carried.
    pub block_bytes: u64,
    /// Bytes of the whole stream.
    pub wire_bytes: u64,
    /// Blocks whose bytes changed during extraction (racing writes).
    pub raced_blocks: u64,
    /// The manifest the receiver holds once it applied the delta.
    pub manifest: Manifest,
}

/// Counts bytes through a writer.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Counting<W> {
    fn frame(&mut self, f: Frame) -> io::Result<()> {
        let msg = pb::DeltaFrame { frame: Some(f) };
        let buf = msg.encode_length_delimited_to_vec();
        self.inner.write_all(&buf)?;
        self.n += buf.len() as u64;
        Ok(())
    }
}

/// Writes the delta from `base` to `current` (the manifest of the volume at
/// `root`, freshly refreshed) into `w`.
pub fn write_delta<W: Write>(
    root: &Path,
    current: &Manifest,
    base: &Manifest,
    w: W,
) -> Result<DeltaSummary, DeltaError> {
    if !base.entries.is_empty() && base.block_size != current.block_size {
        return Err(DeltaError::Corrupt(format!(
            "base has block size {}, the volume {}",
            base.block_size, current.block_size
        )));
    }
    let changed: Vec<&Vec<u8>> = current
        .entries
        .iter()
        .filter(|(p, e)| base.entries.get(*p) != Some(*e))
        .map(|(p, _)| p)
        .collect();
    let removed: Vec<&Vec<u8>> = base
        .entries
        .keys()
        .filter(|p| !current.entries.contains_key(*p))
        .collect();
    // Refuse what no reader would take before writing anything.
    for p in &changed {
        let m = encode_entry(p, &current.entries[*p], base.entries.get(*p));
        let bytes = pb::DeltaFrame {
            frame: Some(Frame::Entry(m)),
        }
        .encoded_len();
        if bytes > MAX_FRAME {
            return Err(DeltaError::EntryTooLarge {
                path: String::from_utf8_lossy(p).into_owned(),
                bytes,
                max: MAX_FRAME,
            });
        }
    }

    let vol = VolumeRoot::new(root)?;
    let mut out = Counting { inner: w, n: 0 };
    out.frame(Frame::Header(pb::DeltaHeader {
        version: edge_proto::PROTOCOL_VERSION,
        block_size: current.block_size,
        base_root: base.root().to_vec(),
        root: Vec::new(),
    }))?;

    let held: HashSet<Hash> = base
        .entries
        .values()
        .flat_map(|e| e.blocks.iter().copied())
        .collect();
    let mut sent: HashSet<Hash> = HashSet::new();
    let mut result = current.clone();
    let (mut blocks, mut block_bytes, mut raced) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; current.block_size as usize];
    for p in &changed {
        let e = &current.entries[*p];
        if e.kind != Kind::File {
            continue;
        }
        let want: Vec<usize> = (0..e.blocks.len())
            .filter(|&i| !held.contains(&e.blocks[i]) && !sent.contains(&e.blocks[i]))
            .collect();
        if want.is_empty() {
            continue;
        }
        // Opened beneath the root, never through a symlink. Gone or no
        // longer a regular file since the refresh: send zeros under their
        // real hash (the next refresh sees what it is now).
        let f = vol.read_file(p)?;
        for i in want {
            let h = e.blocks[i];
            if sent.contains(&h) {
                continue;
            }
            let len = current.block_len(e.size, i as u64);
            let data = &mut buf[..len];
            let n = match &f {
                Some(f) => sys::pread_full(
                    f.as_raw_fd(),
                    data,
                    i as u64 * u64::from(current.block_size),
                )?,
                None => 0,
            };
            data[n..].fill(0);
            let real = *blake3::hash(data).as_bytes();
            if real != h {
                raced += 1;
                result.entries.get_mut(*p).expect("changed path").blocks[i] = real;
                if held.contains(&real) || sent.contains(&real) {
                    continue;
                }
            }
            out.frame(Frame::Block(pb::BlockChunk {
                hash: real.to_vec(),
                data: data.to_vec(),
            }))?;
            sent.insert(real);
            blocks += 1;
            block_bytes += len as u64;
        }
    }
    for p in &changed {
        let e = &result.entries[*p];
        out.frame(Frame::Entry(encode_entry(p, e, base.entries.get(*p))))?;
    }
    for p in &removed {
        out.frame(Frame::Removed((*p).clone()))?;
    }
    let root_hash = result.root();
    out.frame(Frame::Trailer(pb::DeltaTrailer {
        entries: changed.len() as u64,
        removed: removed.len() as u64,
        blocks,
        root: root_hash.to_vec(),
    }))?;
    out.inner.flush()?;
    Ok(DeltaSummary {
        entries: changed.len() as u64,
        removed: removed.len() as u64,
        blocks,
        block_bytes,
        wire_bytes: out.n,
        raced_blocks: raced,
        manifest: result,
    })
}

/// An entry in full, or as a patch of the base's block list when smaller.
fn encode_entry(path: &[u8], e: &Entry, base: Option<&Entry>) -> pb::ManifestEntry {
    let mut m = e.to_pb(path);
    if let Some(b) = base.filter(|b| b.kind == Kind::File && e.kind == Kind::File) {
        let changed: Vec<pb::BlockRef> = e
            .blocks
            .iter()
            .enumerate()
            .filter(|(i, h)| b.blocks.get(*i) != Some(*h))
            .map(|(i, h)| pb::BlockRef {
                index: i as u64,
                hash: h.to_vec(),
            })
            .collect();
        if changed.len() < e.blocks.len() {
            m.blocks.clear();
            m.patch = true;
            m.changed = changed;
        }
    }
    m
}

/// A delta read and checked against its base: everything needed to apply it.
#[derive(Debug, Clone)]
pub struct ReadDelta {
    /// The manifest after applying (base with the delta's changes).
    pub manifest: Manifest,
    /// Its root hash, equal to the sender's.
    pub root: Hash,
    /// Paths the delta added or changed.
    pub changed: BTreeSet<Vec<u8>>,
    /// Paths the delta removed.
    pub removed: BTreeSet<Vec<u8>>,
    /// Blocks received (all verified and in the store).
    pub blocks: u64,
    /// Bytes of the stream.
    pub wire_bytes: u64,
}

/// Checks a path from a delta: relative, no `.`/`..`/empty components, no
/// NUL, not the metadata directory, within the default [`Limits`].
pub fn check_path(p: &[u8]) -> Result<(), DeltaError> {
    check_path_with(p, &Limits::default())
}

fn check_path_with(p: &[u8], limits: &Limits) -> Result<(), DeltaError> {
    let bad = || DeltaError::BadPath(String::from_utf8_lossy(p).into_owned());
    at_most("path length", p.len() as u64, limits.max_path as u64)?;
    if p.is_empty() {
        return Ok(());
    }
    if p.contains(&0) {
        return Err(bad());
    }
    for (i, c) in p.split(|&b| b == b'/').enumerate() {
        if c.is_empty() || c == b"." || c == b".." || (i == 0 && c == META_DIR.as_bytes()) {
            return Err(bad());
        }
        at_most(
            "path component length",
            c.len() as u64,
            limits.max_name as u64,
        )?;
    }
    Ok(())
}

/// Checks an entry as it came off the wire, before it is decoded into an
/// [`Entry`]: every size against the block size and `limits`, and the rules
/// of the module docs. Charges its memory to `budget`.
fn check_entry(
    e: &pb::ManifestEntry,
    block_size: u32,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<(), DeltaError> {
    check_path_with(&e.path, limits)?;
    let name = || String::from_utf8_lossy(&e.path).into_owned();
    let corrupt = |what: &str| DeltaError::Corrupt(format!("entry {}: {what}", name()));
    let kind = match pb::EntryKind::try_from(e.kind) {
        Ok(pb::EntryKind::File) => Kind::File,
        Ok(pb::EntryKind::Dir) => Kind::Dir,
        Ok(pb::EntryKind::Symlink) => Kind::Symlink,
        Ok(pb::EntryKind::Hardlink) => Kind::Hardlink,
        Ok(pb::EntryKind::Fifo) => Kind::Fifo,
        Ok(pb::EntryKind::Socket) => Kind::Socket,
        Ok(pb::EntryKind::CharDevice | pb::EntryKind::BlockDevice) => {
            return Err(DeltaError::Refused(format!(
                "entry {} is a device node",
                name()
            )));
        }
        _ => return Err(corrupt(&format!("unknown kind {}", e.kind))),
    };
    if kind != Kind::Dir && e.mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
        return Err(DeltaError::Refused(format!(
            "entry {} is setuid or setgid (mode {:o})",
            name(),
            e.mode & 0o7777
        )));
    }
    if e.uid == u32::MAX || e.gid == u32::MAX {
        return Err(corrupt("owner -1"));
    }
    if e.mtime_nsec >= 1_000_000_000 {
        return Err(corrupt("mtime nanoseconds past a second"));
    }
    if e.rdev != 0 {
        return Err(corrupt("device number on a non-device"));
    }
    at_most(
        "link target length",
        e.link_target.len() as u64,
        limits.max_path as u64,
    )?;
    match kind {
        Kind::Symlink if e.link_target.is_empty() || e.link_target.contains(&0) => {
            return Err(corrupt("malformed symlink target"));
        }
        Kind::Symlink if e.size != e.link_target.len() as u64 => {
            return Err(corrupt("symlink size differs from its target's length"));
        }
        Kind::Hardlink => check_path_with(&e.link_target, limits)?,
        Kind::Symlink => {}
        _ if !e.link_target.is_empty() => return Err(corrupt("link target on a non-link")),
        _ => {}
    }
    // The block list: a file's has ceil(size / block size) hashes, in full
    // or as a patch; nothing else has one.
    let blocks = if kind == Kind::File {
        let n = e.size.div_ceil(u64::from(block_size));
        let given = if e.patch {
            e.block_count
        } else {
            e.blocks.len() as u64
        };
        if given != n {
            return Err(corrupt(&format!(
                "{given} blocks for {} bytes at block size {block_size}",
                e.size
            )));
        }
        if e.patch {
            at_most("changed blocks of a patch", e.changed.len() as u64, n)?;
        } else if !e.changed.is_empty() {
            return Err(corrupt("changed blocks outside a patch"));
        }
        n
    } else {
        if e.patch || !e.blocks.is_empty() || !e.changed.is_empty() || e.block_count != 0 {
            return Err(corrupt("blocks on a non-file"));
        }
        if kind != Kind::Symlink && e.size != 0 {
            return Err(corrupt("size on a non-file"));
        }
        0
    };
    at_most(
        "xattrs of an entry",
        e.xattrs.len() as u64,
        limits.max_xattrs as u64,
    )?;
    if !e.xattrs.is_empty() && !matches!(kind, Kind::File | Kind::Dir) {
        // The kernel keeps `user.*` xattrs on files and directories only.
        return Err(corrupt("xattrs on what cannot hold them"));
    }
    let mut xattr_bytes = 0u64;
    for x in &e.xattrs {
        at_most(
            "xattr name length",
            x.name.len() as u64,
            limits.max_xattr_name as u64,
        )?;
        at_most(
            "xattr value length",
            x.value.len() as u64,
            limits.max_xattr_value as u64,
        )?;
        if !x.name.starts_with(b"user.") || x.name.len() == 5 || x.name.contains(&0) {
            return Err(DeltaError::Refused(format!(
                "entry {} has xattr {:?} outside the user. namespace",
                name(),
                String::from_utf8_lossy(&x.name)
            )));
        }
        xattr_bytes += (x.name.len() + x.value.len()) as u64 + XATTR_COST;
    }
    let cost = ENTRY_COST
        .saturating_add(2 * e.path.len() as u64)
        .saturating_add(e.link_target.len() as u64)
        .saturating_add(xattr_bytes)
        // A patch also holds a flag per block while it resolves.
        .saturating_add(blocks.saturating_mul(33));
    budget.spend(cost)
}

fn read_frame<R: Read>(
    r: &mut R,
    n: &mut u64,
    limits: &Limits,
) -> Result<Option<Frame>, DeltaError> {
    // Varint length prefix, read byte by byte.
    let mut len: u64 = 0;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8; 1];
        match r.read(&mut b)? {
            0 if shift == 0 => return Ok(None),
            0 => return Err(DeltaError::Truncated("inside a frame length".into())),
            _ => {}
        }
        *n += 1;
        len |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    at_most("frame size", len, limits.max_frame as u64)?;
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => DeltaError::Truncated("inside a frame".into()),
        _ => DeltaError::Io(e),
    })?;
    *n += len;
    let f =
        pb::DeltaFrame::decode(buf.as_slice()).map_err(|e| DeltaError::Corrupt(e.to_string()))?;
    f.frame
        .map(Some)
        .ok_or_else(|| DeltaError::Corrupt("empty frame".into()))
}

/// Reads a delta against `base`, verifying every block into `store` and the
/// resulting manifest against the sender's root hash. Nothing outside the
/// store is touched. Uses the default [`Limits`].
pub fn read_delta<R: Read>(
    r: R,
    base: &Manifest,
    store: &BlockStore,
) -> Result<ReadDelta, DeltaError> {
    read_delta_with(r, base, store, &Limits::default())
}

/// [`read_delta`] within the given `limits`.
pub fn read_delta_with<R: Read>(
    mut r: R,
    base: &Manifest,
    store: &BlockStore,
    limits: &Limits,
) -> Result<ReadDelta, DeltaError> {
    let mut n = 0u64;
    let Some(Frame::Header(h)) = read_frame(&mut r, &mut n, limits)? else {
        return Err(DeltaError::Corrupt("does not start with a header".into()));
    };
    if h.version != edge_proto::PROTOCOL_VERSION {
        return Err(DeltaError::Corrupt(format!(
            "protocol version {} unknown",
            h.version
        )));
    }
    if !(limits.min_block_size..=limits.max_block_size).contains(&h.block_size) {
        return Err(DeltaError::Corrupt(format!(
            "block size {} is outside {} ..= {}",
            h.block_size, limits.min_block_size, limits.max_block_size
        )));
    }
    // A full delta (against no manifest at all) applies to an empty directory.
    let nothing = Manifest::empty(h.block_size);
    let empty_dir = base.entries.keys().all(|p| p.is_empty());
    let base = if empty_dir && h.base_root == nothing.root() {
        &nothing
    } else {
        base
    };
    let have = base.root();
    if h.base_root != have {
        return Err(DeltaError::WrongBase {
            want: hex(&h.base_root),
            have: hex(&have),
        });
    }
    if !base.entries.is_empty() && h.block_size != base.block_size {
        return Err(DeltaError::Corrupt(format!(
            "block size {} does not fit the base",
            h.block_size
        )));
    }
    let mut budget = Budget {
        left: limits.max_manifest_bytes,
        max: limits.max_manifest_bytes,
    };
    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    let mut removed = BTreeSet::new();
    let mut blocks = 0u64;
    let trailer = loop {
        match read_frame(&mut r, &mut n, limits)? {
            None => return Err(DeltaError::Truncated("no trailer".into())),
            Some(Frame::Header(_)) => return Err(DeltaError::Corrupt("second header".into())),
            Some(Frame::Block(b)) => {
                let hash = hash_from(&b.hash)?;
                if b.data.len() > h.block_size as usize || *blake3::hash(&b.data).as_bytes() != hash
                {
                    return Err(DeltaError::CorruptBlock(hex(&hash)));
                }
                store.put(&hash, &b.data)?;
                blocks += 1;
            }
            Some(Frame::Entry(e)) => {
                at_most("entries", entries.len() as u64 + 1, limits.max_entries)?;
                check_entry(&e, h.block_size, limits, &mut budget)?;
                let entry = Entry::from_pb(&e, base.entries.get(&e.path))?;
                if entry.xattrs.windows(2).any(|w| w[0].0 == w[1].0) {
                    return Err(DeltaError::Corrupt(format!(
                        "entry {} names an xattr twice",
                        String::from_utf8_lossy(&e.path)
                    )));
                }
                entries.insert(e.path, entry);
            }
            Some(Frame::Removed(p)) => {
                at_most(
                    "removed paths",
                    removed.len() as u64 + 1,
                    limits.max_removed,
                )?;
                check_path_with(&p, limits)?;
                if p.is_empty() {
                    return Err(DeltaError::BadPath("(the volume root)".into()));
                }
                budget.spend(ENTRY_COST + p.len() as u64)?;
                removed.insert(p);
            }
            Some(Frame::Trailer(t)) => break t,
        }
    };
    if trailer.entries != entries.len() as u64
        || trailer.removed != removed.len() as u64
        || trailer.blocks != blocks
    {
        return Err(DeltaError::Truncated(format!(
            "trailer counts {} entries, {} removed, {} blocks; stream had {}, {}, {}",
            trailer.entries,
            trailer.removed,
            trailer.blocks,
            entries.len(),
            removed.len(),
            blocks
        )));
    }
    let mut manifest = base.clone();
    manifest.block_size = h.block_size;
    for p in &removed {
        manifest.entries.remove(p);
    }
    let changed: BTreeSet<Vec<u8>> = entries.keys().cloned().collect();
    manifest.entries.extend(entries);
    let root = manifest.root();
    if trailer.root != root {
        return Err(DeltaError::RootMismatch {
            want: hex(&trailer.root),
            got: hex(&root),
        });
    }
    // Every block a changed file needs must be at hand.
    let base_blocks: HashMap<Hash, (Vec<u8>, u64)> = base.block_index();
    for p in &changed {
        let e = &manifest.entries[p];
        for h in &e.blocks {
            if !base_blocks.contains_key(h) && !store.contains(h) {
                return Err(DeltaError::MissingBlock(hex(h)));
            }
        }
        if e.kind == Kind::Hardlink
            && manifest
                .entries
                .get(&e.link_target)
                .is_none_or(|t| t.kind != Kind::File)
        {
            return Err(DeltaError::Corrupt(
                "hard link to a path that is not a file".into(),
            ));
        }
    }
    Ok(ReadDelta {
        manifest,
        root,
        changed,
        removed,
        blocks,
        wire_bytes: n,
    })
}
