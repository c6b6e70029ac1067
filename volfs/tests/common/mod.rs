//! Shared helpers of the volfs integration tests: real FUSE mounts in
//! temporary directories, unmounted on drop.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use volfs::manifest::{Manifest, Tracked};
use volfs::scan::{self, Trust};
use volfs::{MountHandle, MountOptions};

/// Fails (never skips) when this machine cannot mount FUSE as root.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "these tests mount real FUSE filesystems: /dev/fuse is missing (install fuse3, load the fuse module)"
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these tests mount FUSE directly and chown files: run them as root"
    );
}

/// A volume mounted for one test.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub handle: Option<MountHandle>,
}

impl Mounted {
    pub fn new() -> Self {
        Self::with(MountOptions::default())
    }

    pub fn with(opts: MountOptions) -> Self {
        Self::under("backing", opts)
    }

    /// The backing directory at `rel` (made) in the test's directory.
    pub fn under(rel: &str, opts: MountOptions) -> Self {
        require_fuse();
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join(rel);
        fs::create_dir_all(&backing).unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let handle = volfs::mount(&backing, &mnt, &opts).expect("mount");
        Mounted {
            dir,
            backing,
            mnt,
            handle: Some(handle),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The mount's backing-device entry (`/sys/class/bdi/MAJ:MIN`).
    pub fn bdi(&self) -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&self.mnt).unwrap().dev();
        PathBuf::from(format!(
            "/sys/class/bdi/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ))
    }

    pub fn live(&self) -> &volfs::LiveVolume {
        self.handle.as_ref().unwrap().live()
    }

    /// Unmounts and returns the root hash persisted.
    pub fn unmount(&mut self) -> volfs::Hash {
        self.handle.take().unwrap().unmount().expect("unmount")
    }

    pub fn remount(&mut self) {
        self.handle = Some(
            volfs::mount(&self.backing, &self.mnt, &MountOptions::default()).expect("remount"),
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.unmount();
        }
    }
}

/// The manifest of a directory hashed from scratch (nothing trusted).
pub fn full_scan(root: &Path, block_size: u32) -> Manifest {
    let empty = Tracked {
        manifest: Manifest::empty(block_size),
        local: BTreeMap::new(),
    };
    scan::refresh(root, &empty, None, Trust::Nothing)
        .unwrap()
        .0
        .manifest
}

/// Every path under `root` (but `.volfs`) with its bytes or symlink target.
pub fn contents(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (rel, md) in scan::walk(root).unwrap() {
        let p = scan::abs(root, &rel);
        let v = if md.is_file() {
            fs::read(&p).unwrap()
        } else if md.file_type().is_symlink() {
            fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else {
            b"<dir>".to_vec()
        };
        out.insert(String::from_utf8_lossy(&rel).into_owned(), v);
    }
    out
}
