//! Operations on an unmounted volume: each takes the volume's lock, so they
//! refuse to run while a mount (or another apply) owns it.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use crate::apply::{ApplyError, ApplyReport, apply_delta};
use crate::backing::{Backing, BackingError};
use crate::delta::{DeltaError, DeltaSummary, write_delta};
use crate::manifest::{Hash, Manifest, Tracked};
use crate::scan::{self, RefreshStats, Trust};

/// Brings the persisted manifest up to date and returns it with its root.
pub fn hash(
    backing_dir: &Path,
    block_size: Option<u32>,
) -> Result<(Hash, RefreshStats), BackingError> {
    let b = Backing::open(backing_dir)?;
    let (t, stats) = b.load(block_size)?;
    b.save(&t, true)?;
    Ok((t.manifest.root(), stats))
}

/// The current manifest (refreshed).
pub fn manifest(backing_dir: &Path) -> Result<Manifest, BackingError> {
    let b = Backing::open(backing_dir)?;
    let (t, _) = b.load(None)?;
    b.save(&t, true)?;
    Ok(t.manifest)
}

/// Errors of an offline diff.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// Opening the volume.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Writing the delta.
    #[error(transparent)]
    Delta(#[from] DeltaError),
}

/// Writes the delta from `base` to the volume's current state into `w`.
pub fn diff<W: Write>(
    backing_dir: &Path,
    base: Option<&Manifest>,
    w: W,
) -> Result<DeltaSummary, DiffError> {
    let b = Backing::open(backing_dir)?;
    let (t, _) = b.load(None)?;
    b.save(&t, true)?;
    let empty = Manifest::empty(t.manifest.block_size);
    Ok(write_delta(
        b.root(),
        &t.manifest,
        base.unwrap_or(&empty),
        w,
    )?)
}

/// Applies a delta to a volume (created if the directory is new and empty).
pub fn apply<R: Read>(target_dir: &Path, r: R) -> Result<ApplyReport, ApplyError> {
    let b = Backing::open(target_dir)?;
    let (base, _) = b.load(None)?;
    let (_, report) = apply_delta(&b, &base, r)?;
    Ok(report)
}

/// Result of [`verify`].
#[derive(Debug, Clone)]
pub struct Verification {
    /// Root of the persisted manifest.
    pub recorded: Hash,
    /// Root of the tree rehashed from scratch.
    pub actual: Hash,
    /// Paths whose entries differ.
    pub differing: Vec<String>,
}

/// Rehashes every block of the volume and compares with its persisted manifest.
pub fn verify(backing_dir: &Path) -> Result<Verification, BackingError> {
    let b = Backing::open(backing_dir)?;
    let Some((recorded, _)) = Tracked::load(&b.manifest_path())? else {
        return Err(BackingError::Io {
            path: b.manifest_path().display().to_string(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no manifest recorded yet (run `volfs hash`)",
            ),
        });
    };
    let empty = Tracked {
        manifest: Manifest::empty(recorded.manifest.block_size),
        local: Default::default(),
    };
    let (fresh, _) = scan::refresh(b.root(), &empty, None, Trust::Nothing).map_err(|source| {
        BackingError::Io {
            path: b.root().display().to_string(),
            source,
        }
    })?;
    let (r, f) = (&recorded.manifest.entries, &fresh.manifest.entries);
    let differing: Vec<String> = r
        .keys()
        .chain(f.keys())
        .filter(|p| r.get(*p) != f.get(*p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Ok(Verification {
        recorded: recorded.manifest.root(),
        actual: fresh.manifest.root(),
        differing,
    })
}

/// Reads a manifest file written by `volfs manifest`.
pub fn read_manifest_file(path: &Path) -> Result<Manifest, String> {
    let b = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Manifest::from_bytes(&b).map_err(|e| format!("{}: {e}", path.display()))
}
