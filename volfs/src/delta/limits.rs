//! What a delta may make its reader hold, and the rules an entry read off
//! the wire must follow (see the docs of [`crate::delta`]).

use edge_proto::v1 as pb;

use super::DeltaError;
use crate::manifest::Kind;
use crate::scan::META_DIR;

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

/// Modification times (seconds since the epoch) every filesystem a volume
/// lives on keeps as given: ext4's range, 1901-12-13 to 2446-05-10.
pub const MTIME_SECONDS: std::ops::RangeInclusive<i64> = -(1 << 31)..=0x3_7fff_ffff;

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
pub(super) const ENTRY_COST: u64 = 256;

/// Memory an xattr costs besides its name and value.
const XATTR_COST: u64 = 48;

/// What a delta has left of [`Limits::max_manifest_bytes`].
pub(super) struct Budget {
    left: u64,
    max: u64,
}

impl Budget {
    /// The whole of `limits.max_manifest_bytes`.
    pub(super) fn new(limits: &Limits) -> Self {
        Budget {
            left: limits.max_manifest_bytes,
            max: limits.max_manifest_bytes,
        }
    }

    pub(super) fn spend(&mut self, bytes: u64) -> Result<(), DeltaError> {
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
pub(super) fn at_most(what: &'static str, got: u64, max: u64) -> Result<(), DeltaError> {
    if got > max {
        Err(DeltaError::Limit { what, got, max })
    } else {
        Ok(())
    }
}

/// Checks a path from a delta: relative, no `.`/`..`/empty components, no
/// NUL, not the metadata directory, within the default [`Limits`].
pub fn check_path(p: &[u8]) -> Result<(), DeltaError> {
    check_path_with(p, &Limits::default())
}

pub(super) fn check_path_with(p: &[u8], limits: &Limits) -> Result<(), DeltaError> {
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
pub(super) fn check_entry(
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
    let bare = e.mode == 0
        && e.uid == 0
        && e.gid == 0
        && e.size == 0
        && e.mtime_sec == 0
        && e.mtime_nsec == 0
        && e.xattrs.is_empty();
    if kind == Kind::Hardlink && !bare {
        // A second name has its first name's metadata, nothing of its own.
        return Err(corrupt("metadata on a hard link"));
    }
    if e.uid == u32::MAX || e.gid == u32::MAX {
        return Err(corrupt("owner -1"));
    }
    if e.mtime_nsec >= 1_000_000_000 {
        return Err(corrupt("mtime nanoseconds past a second"));
    }
    if !MTIME_SECONDS.contains(&e.mtime_sec) {
        // A filesystem would clamp it, and the tree would no longer hash to
        // the sender's root once changed.
        return Err(corrupt("mtime outside what filesystems keep"));
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
        Kind::Symlink if e.mode != 0o777 => {
            // What Linux gives every symlink; an apply cannot set another.
            return Err(corrupt("symlink mode other than 777"));
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
