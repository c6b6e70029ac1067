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
use crate::sys;

mod limits;

use limits::{Budget, ENTRY_COST, at_most, check_entry, check_path_with};
pub use limits::{Limits, MAX_BLOCK_SIZE, MAX_FRAME, MIN_BLOCK_SIZE, MTIME_SECONDS, check_path};

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

/// Counts the bytes of the frames handed to a sink (as a file holds them:
/// each length-delimited).
struct Counting<F> {
    sink: F,
    n: u64,
}

impl<F: FnMut(pb::DeltaFrame) -> io::Result<()>> Counting<F> {
    fn frame(&mut self, f: Frame) -> io::Result<()> {
        let msg = pb::DeltaFrame { frame: Some(f) };
        let len = msg.encoded_len();
        self.n += (prost::length_delimiter_len(len) + len) as u64;
        (self.sink)(msg)
    }
}

/// Writes the delta from `base` to `current` (the manifest of the volume at
/// `root`, freshly refreshed) into `w`, each frame length-delimited.
pub fn write_delta<W: Write>(
    root: &Path,
    current: &Manifest,
    base: &Manifest,
    mut w: W,
) -> Result<DeltaSummary, DeltaError> {
    let s = delta_frames(root, current, base, |f| {
        w.write_all(&f.encode_length_delimited_to_vec())
    })?;
    w.flush()?;
    Ok(s)
}

/// Hands the frames of the delta from `base` to `current` (the manifest of
/// the volume at `root`, freshly refreshed) to `sink`, in order. An error of
/// the sink (its reader went away) ends the delta there.
pub fn delta_frames<F: FnMut(pb::DeltaFrame) -> io::Result<()>>(
    root: &Path,
    current: &Manifest,
    base: &Manifest,
    sink: F,
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
    let mut out = Counting { sink, n: 0 };
    out.frame(Frame::Header(pb::DeltaHeader {
        version: edge_proto::DELTA_VERSION,
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
    if h.version != edge_proto::DELTA_VERSION {
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
    let mut budget = Budget::new(limits);
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
                if !base.entries.contains_key(&p) {
                    return Err(DeltaError::Corrupt(format!(
                        "removes {}, which the base does not hold",
                        String::from_utf8_lossy(&p)
                    )));
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
    }
    // Every hard link, also one the delta left alone, must name a file of
    // the result: the delta may have removed or replaced its first name.
    for (p, e) in manifest
        .entries
        .iter()
        .filter(|(_, e)| e.kind == Kind::Hardlink)
    {
        if manifest
            .entries
            .get(&e.link_target)
            .is_none_or(|t| t.kind != Kind::File)
        {
            return Err(DeltaError::Corrupt(format!(
                "hard link {} to a path that is not a file",
                String::from_utf8_lossy(p)
            )));
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
