//! A mounted volume: the FUSE session, its dirty map and manifest, and the
//! operations a live volume offers (flush, refresh, status, delta).

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fuser::{Config, MountOption, SessionACL};

use crate::backing::{Backing, BackingError};
use crate::delta::{DeltaError, DeltaSummary, write_delta};
use crate::dirty::{DirtyMap, DirtyStats};
use crate::fs::{MAX_WRITE, VolFs};
use crate::manifest::{Hash, Manifest, Tracked};
use crate::scan::{self, RefreshStats, Trust};
use crate::sys;
use crate::throttle::Throttle;

/// Errors of mounting and of live-volume operations.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Opening the backing directory.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The mountpoint cannot be used.
    #[error("mountpoint {0}: {1}")]
    Mountpoint(String, String),
    /// The kernel refused the mount or the session failed.
    #[error("FUSE session: {0}")]
    Session(io::Error),
    /// Reading or hashing the tree.
    #[error("volume I/O: {0}")]
    Io(#[from] io::Error),
    /// Writing a delta.
    #[error(transparent)]
    Delta(#[from] DeltaError),
}

/// Options of a mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Block size for dirty tracking and hashing; `None` keeps the manifest's
    /// (or 64 KiB for a new volume).
    pub block_size: Option<u32>,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let every user in (`allow_other`); the kernel checks modes.
    pub allow_other: bool,
    /// Share (percent) of the machine's dirty-page budget this mount may
    /// hold in its writeback cache; `None` keeps the kernel's 1 % for FUSE.
    pub writeback_share: Option<u32>,
    /// Most bytes the volume's files may sum to (ENOSPC past it); `None`
    /// for no quota. See [`crate::fs::quota`].
    pub quota: Option<u64>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            block_size: None,
            threads: 4,
            allow_other: true,
            writeback_share: Some(20),
            quota: None,
        }
    }
}

/// The state a live mount shares between its FUSE threads, its `Volume`
/// socket and its owner.
#[derive(Debug)]
pub struct LiveVolume {
    backing: Backing,
    mountpoint: PathBuf,
    dirty: Arc<DirtyMap>,
    tracked: Mutex<Tracked>,
    throttle: Arc<Throttle>,
    /// Refreshes of the manifest so far (each takes the dirty marks).
    refreshes: std::sync::atomic::AtomicU64,
    /// Raised around [`LiveVolume::flush`] (shared with the filesystem).
    own_flushes: Arc<std::sync::atomic::AtomicUsize>,
}

impl LiveVolume {
    /// The backing directory.
    pub fn backing_dir(&self) -> &Path {
        self.backing.root()
    }

    /// Where the volume is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Block size of dirty tracking.
    pub fn block_size(&self) -> u32 {
        self.dirty.block_size()
    }

    /// Dirty files, blocks and bytes not yet in the manifest. Writes still
    /// in the kernel's writeback cache are not counted until [`flush`](Self::flush).
    pub fn dirty_stats(&self) -> DirtyStats {
        self.dirty.stats()
    }

    /// The throttle of the app's writes (auto-converge of a handover).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Pushes the kernel's writeback cache to the daemon (`syncfs` on the mount).
    pub fn flush(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        let f = fs::File::open(&self.mountpoint)?;
        self.own_flushes.fetch_add(1, Ordering::Relaxed);
        let r = sys::syncfs(f.as_raw_fd());
        self.own_flushes.fetch_sub(1, Ordering::Relaxed);
        r
    }

    /// Flushes, then rehashes the dirty blocks into the manifest. Returns the
    /// new root hash.
    pub fn refresh(&self) -> Result<(Hash, RefreshStats), MountError> {
        self.flush()?;
        let mut t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let (next, stats) = scan::refresh(
            self.backing.root(),
            &t,
            Some(&self.dirty),
            Trust::DirtyMarks,
        )?;
        *t = next;
        self.refreshes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok((t.manifest.root(), stats))
    }

    /// Refreshes of the manifest since the mount: dirty counts seen after
    /// a later refresh are new writes, even when they equal older ones.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Entries and blocks of the manifest as of the last refresh (counted
    /// in place, no copy).
    pub fn manifest_counts(&self) -> (u64, u64) {
        let t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let m = &t.manifest;
        let blocks = m.entries.values().map(|e| e.blocks.len() as u64).sum();
        (m.entries.len() as u64, blocks)
    }

    /// The manifest as of the last refresh.
    pub fn manifest(&self) -> Manifest {
        self.tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .manifest
            .clone()
    }

    /// Refreshes and writes the delta from `base` to now into `w`.
    pub fn write_delta<W: Write>(&self, base: &Manifest, w: W) -> Result<DeltaSummary, MountError> {
        self.refresh()?;
        let m = self.manifest();
        Ok(write_delta(self.backing.root(), &m, base, w)?)
    }

    /// Refreshes and hands the frames of the delta from `base` to now to
    /// `sink`, one by one.
    pub fn delta_frames<F: FnMut(edge_proto::v1::DeltaFrame) -> io::Result<()>>(
        &self,
        base: &Manifest,
        sink: F,
    ) -> Result<DeltaSummary, MountError> {
        self.refresh()?;
        let m = self.manifest();
        Ok(crate::delta::delta_frames(
            self.backing.root(),
            &m,
            base,
            sink,
        )?)
    }

    fn persist(&self, clean: bool) -> Result<(), MountError> {
        let t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        self.backing.save(&t, clean)?;
        Ok(())
    }
}

/// A running mount. Dropping it unmounts (lazily if busy) and persists.
#[derive(Debug)]
pub struct MountHandle {
    live: Arc<LiveVolume>,
    unmounter: Option<fuser::SessionUnmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Whether `path` is a mount point (listed in this process's mountinfo).
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want)
    }))
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Lets this mount hold `pct` % of the machine's dirty-page budget.
///
/// The kernel gives every FUSE mount 1 % and a strict limit, guarding against
/// an untrusted daemon that could pin dirty memory. volfs is a trusted root
/// daemon, and with the default a writer is throttled to the daemon's
/// request rate. The knob is the mount's backing-device entry in
/// `/sys/class/bdi`.
fn widen_writeback(mountpoint: &Path, pct: u32) -> io::Result<()> {
    let bdi = bdi_dir(mountpoint)?;
    fs::write(bdi.join("strict_limit"), "0")?;
    fs::write(bdi.join("max_ratio"), pct.min(100).to_string())?;
    Ok(())
}

/// Lets the kernel read ahead as far as one request carries (1 MiB).
///
/// The kernel offers a FUSE mount 128 KiB of read-ahead at `INIT` (a larger
/// `max_readahead` is refused there), but reads ahead as far as the mount's
/// backing-device entry says. A fresh mount (a volume just taken over)
/// reads everything through the daemon: a 150 MB file read cold took 66 ms
/// at 1 MiB against 77–83 ms at 128 KiB.
fn widen_readahead(mountpoint: &Path) -> io::Result<()> {
    let kib = MAX_WRITE / 1024;
    fs::write(bdi_dir(mountpoint)?.join("read_ahead_kb"), kib.to_string())
}

/// The backing-device entry of the filesystem mounted at `mountpoint`.
fn bdi_dir(mountpoint: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(mountpoint)?.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    Ok(PathBuf::from(format!("/sys/class/bdi/{maj}:{min}")))
}

/// Mounts the volume whose files are in `backing_dir` at `mountpoint` and
/// serves it on background threads.
pub fn mount(
    backing_dir: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, MountError> {
    let mp_err = |m: &str| MountError::Mountpoint(mountpoint.display().to_string(), m.to_string());
    let md = fs::metadata(mountpoint).map_err(|e| mp_err(&e.to_string()))?;
    if !md.is_dir() {
        return Err(mp_err("not a directory"));
    }
    let mp = fs::canonicalize(mountpoint)?;
    if is_mount_point(&mp)? {
        return Err(mp_err("already a mount point (in use)"));
    }
    let backing = Backing::open(backing_dir)?;
    if mp.starts_with(backing.root()) || backing.root().starts_with(&mp) {
        return Err(mp_err(
            "must not be inside the backing directory, nor contain it",
        ));
    }
    let (tracked, stats) = backing.load(opts.block_size)?;
    if !stats.changed_behind_back.is_empty() {
        tracing::warn!(
            files = stats.changed_behind_back.len(),
            "volume changed while unmounted; those files were rehashed"
        );
    }
    // Until a clean unmount, the persisted manifest is not to be trusted.
    backing.save(&tracked, false)?;
    let dirty = Arc::new(DirtyMap::new(tracked.manifest.block_size));
    let throttle = Arc::new(Throttle::default());
    let mut fs = VolFs::new(backing.root(), dirty.clone())?.with_pacer(throttle.pacer()?);
    let own_flushes = fs.own_flushes();
    if let Some(limit) = opts.quota {
        let used = tracked
            .manifest
            .entries
            .values()
            .filter(|e| e.kind == crate::manifest::Kind::File)
            .map(|e| e.size)
            .sum();
        fs = fs.with_quota(crate::fs::Quota::new(limit, used));
    }
    let config = {
        let mut c = Config::default();
        c.mount_options = vec![
            MountOption::FSName(format!("volfs:{}", backing.root().display())),
            MountOption::Subtype("volfs".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
            // What an app writes is data: no device opens through the
            // mount and no setuid bit takes effect when a file is run.
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        c.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        c.n_threads = Some(opts.threads.max(1));
        c.clone_fd = true;
        c
    };
    let mut session = fuser::Session::new(fs, &mp, &config).map_err(MountError::Session)?;
    let unmounter = session.unmount_callable();
    let thread = std::thread::Builder::new()
        .name("volfs-session".into())
        .spawn(move || session.run())?;
    if let Some(pct) = opts.writeback_share {
        if let Err(e) = widen_writeback(&mp, pct) {
            tracing::warn!(error = %e, "could not widen the writeback cache; writes will be throttled");
        }
    }
    if let Err(e) = widen_readahead(&mp) {
        tracing::warn!(error = %e, "could not widen the read-ahead; reads stay at 128 KiB");
    }
    if let Ok(dir) = bdi_dir(&mp) {
        throttle.set_bdi(dir);
    }
    let live = Arc::new(LiveVolume {
        backing,
        mountpoint: mp,
        dirty,
        tracked: Mutex::new(tracked),
        throttle,
        refreshes: std::sync::atomic::AtomicU64::new(0),
        own_flushes,
    });
    Ok(MountHandle {
        live,
        unmounter: Some(unmounter),
        thread: Some(thread),
    })
}

impl MountHandle {
    /// The live volume.
    pub fn live(&self) -> &Arc<LiveVolume> {
        &self.live
    }

    /// Unmounts, waits for the session to end, then refreshes and persists
    /// the manifest as clean. A busy mount is detached lazily and this waits
    /// until its last user is gone.
    pub fn unmount(mut self) -> Result<Hash, MountError> {
        self.stop()
    }

    /// Waits until the session ends by itself (someone ran `umount`).
    pub fn join(mut self) -> Result<Hash, MountError> {
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| MountError::Session(io::Error::other("session thread panicked")))?
                .map_err(MountError::Session)?;
        }
        self.finish()
    }

    fn stop(&mut self) -> Result<Hash, MountError> {
        // The unmount's own writeback is not held to a handover's rate.
        self.live.throttle.clear();
        if let Some(mut u) = self.unmounter.take() {
            if let Err(e) = u.unmount() {
                tracing::warn!(error = %e, "unmount failed; detaching lazily");
                let c = sys::cstr(self.live.mountpoint.as_os_str())?;
                // SAFETY: `c` is NUL-terminated.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| MountError::Session(io::Error::other("session thread panicked")))?
                .map_err(MountError::Session)?;
        }
        self.finish()
    }

    fn finish(&mut self) -> Result<Hash, MountError> {
        let live = &self.live;
        let mut t = live.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let (next, _) = scan::refresh(
            live.backing.root(),
            &t,
            Some(&live.dirty),
            Trust::DirtyMarks,
        )?;
        *t = next;
        let root = t.manifest.root();
        drop(t);
        live.persist(true)?;
        let _ = fs::remove_file(Backing::socket_path(live.backing.root()));
        Ok(root)
    }

    /// A handle that unmounts from another thread (signal handler, the `Volume` service).
    pub fn unmounter(&self) -> Unmounter {
        Unmounter {
            mountpoint: self.live.mountpoint.clone(),
        }
    }
}

/// Unmounts a mount from any thread.
#[derive(Debug, Clone)]
pub struct Unmounter {
    mountpoint: PathBuf,
}

impl Unmounter {
    /// `umount`, falling back to a lazy detach when busy.
    pub fn unmount(&self) -> io::Result<()> {
        let c = sys::cstr(self.mountpoint.as_os_str())?;
        // SAFETY: `c` is NUL-terminated.
        if unsafe { libc::umount(c.as_ptr()) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            tracing::warn!("mount busy; detaching lazily, the session ends with its last user");
            // SAFETY: `c` is NUL-terminated.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                return Ok(());
            }
            return Err(io::Error::last_os_error());
        }
        Err(e)
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.stop() {
                tracing::error!(error = %e, "unmount on drop failed");
            }
        }
    }
}
