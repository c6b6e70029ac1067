//! A session's volume: seeded from the app's base volume, served by its own
//! `volfs mount` process (a shim, as containerd runs one per container), so
//! an edged restart or crash does not pull the volume out from under a
//! running instance. edged talks to the shim's `Volume` service on its
//! socket (`volfs::service`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::volume_client::VolumeClient;
use tonic::transport::Channel;

use crate::runtime::process::pid_alive;

/// Errors of volume handling.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Copying the base volume failed.
    #[error("seeding the volume from {0}: {1}")]
    Seed(String, String),
    /// The volfs shim did not come up.
    #[error("volfs mount: {0}")]
    Mount(String),
    /// A request to the shim failed.
    #[error("volfs control: {0}")]
    Control(String),
    /// volfs refused the base of a delta.
    #[error("volfs: {0}")]
    BadBase(String),
}

/// Copies the contents of `base` into the empty directory `backing`,
/// keeping modes, owners, times, links and xattrs.
pub async fn seed(base: &Path, backing: &Path) -> Result<(), VolumeError> {
    let err = |m: String| VolumeError::Seed(base.display().to_string(), m);
    if !base.is_dir() {
        return Err(err("not a directory".into()));
    }
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", base.display()))
        .arg(backing)
        .output()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    // A base volume may itself have been a volfs backing directory.
    let _ = tokio::fs::remove_dir_all(backing.join(".volfs")).await;
    Ok(())
}

/// Gives `dir` and everything under it (but the volume's `.volfs/`) to
/// `uid:gid`, without following symlinks: the volume of an app that runs as
/// an unprivileged user.
pub fn give_to(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if d == dir && e.file_name() == volfs::scan::META_DIR {
                continue;
            }
            let p = e.path();
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
            if e.file_type()?.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(())
}

/// A running volfs shim.
#[derive(Debug, Clone)]
pub struct Shim {
    /// Its pid.
    pub pid: u32,
    /// The backing directory.
    pub backing: PathBuf,
    /// The mountpoint.
    pub mountpoint: PathBuf,
}

/// A client of the shim of `backing` (its `Volume` service).
pub async fn client(backing: &Path) -> Result<VolumeClient<Channel>, VolumeError> {
    match volfs::service::connect(backing).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(VolumeError::Control("no volfs answers".into())),
        Err(e) => Err(VolumeError::Control(e.to_string())),
    }
}

fn control_err(s: tonic::Status) -> VolumeError {
    VolumeError::Control(s.message().to_string())
}

/// The dirty state of the volume at `backing`; `flush`: after pushing the
/// kernel's writeback cache to volfs.
pub async fn status(backing: &Path, flush: bool) -> Result<pb::VolumeStatus, VolumeError> {
    let mut c = client(backing).await?;
    let st = c
        .status(pb::StatusRequest { no_flush: !flush })
        .await
        .map_err(control_err)?
        .into_inner();
    if st.api_version != edge_proto::VOLUME_API_VERSION {
        // Re-attached after an upgrade: it answers, which is what matters
        // (fields it lacks read as zero).
        tracing::debug!(
            shim = st.api_version,
            edged = edge_proto::VOLUME_API_VERSION,
            backing = %backing.display(),
            "the volfs shim speaks another version of the volume service"
        );
    }
    Ok(st)
}

/// Dirty bytes of the volume at `backing` (flushed first); 0 if it does not answer.
pub async fn dirty_bytes(backing: &Path) -> u64 {
    status(backing, true).await.map_or(0, |s| s.bytes)
}

/// A delta of the live volume at `backing`, as it streams out of its shim.
#[derive(Debug)]
pub struct Diff {
    stream: tonic::Streaming<pb::DiffChunk>,
    result: Vec<u8>,
}

impl Diff {
    /// Starts the delta from `base` (manifest bytes; empty: from an empty
    /// volume). The shim flushes and refreshes first. `want_result`: also
    /// the manifest the receiver then holds (the base of a next round; not
    /// worth its bytes after the last one).
    pub async fn start(
        backing: &Path,
        base: Vec<u8>,
        want_result: bool,
    ) -> Result<Diff, VolumeError> {
        let mut c = client(backing).await?;
        let stream = c
            .diff(pb::DiffRequest { base, want_result })
            .await
            .map_err(|st| match st.code() {
                tonic::Code::InvalidArgument => VolumeError::BadBase(st.message().to_string()),
                _ => control_err(st),
            })?
            .into_inner();
        Ok(Diff {
            stream,
            result: Vec::new(),
        })
    }

    /// The next frame, or the summary and the manifest the receiver then
    /// holds (the base of the next round) once the delta is whole.
    pub async fn next(&mut self) -> Result<DiffItem, VolumeError> {
        use pb::diff_chunk::Chunk;
        loop {
            let Some(c) = self.stream.message().await.map_err(control_err)? else {
                return Err(VolumeError::Control(
                    "the volume's delta ended before its summary".into(),
                ));
            };
            match c.chunk {
                Some(Chunk::Frame(f)) => return Ok(DiffItem::Frame(f)),
                Some(Chunk::ResultPart(p)) => self.result.extend_from_slice(&p),
                Some(Chunk::Done(d)) => {
                    return Ok(DiffItem::Done(d, std::mem::take(&mut self.result)));
                }
                None => {}
            }
        }
    }
}

/// What a [`Diff`] yields.
#[derive(Debug)]
pub enum DiffItem {
    /// A frame of the delta, in order.
    Frame(pb::DeltaFrame),
    /// The delta is whole: its summary, and the manifest the receiver
    /// holds once it applied it (empty unless asked for).
    Done(pb::DiffDone, Vec<u8>),
}

/// The write throttle of a live volume, as a handover's auto-converge sets
/// it: each `set` renews volfs's lease; dropping it lifts the throttle (the
/// lease would end by itself should edged die).
#[derive(Debug)]
pub struct WriteThrottle {
    backing: PathBuf,
    rate: u64,
    /// A throttle may be in force in volfs (a set was asked): lifted on
    /// clear and drop even when volfs's answer was lost.
    engaged: bool,
}

impl WriteThrottle {
    /// No throttle yet on the volume at `backing`.
    pub fn new(backing: &Path) -> Self {
        WriteThrottle {
            backing: backing.to_path_buf(),
            rate: 0,
            engaged: false,
        }
    }

    /// The rate in force, bytes/s; 0: none.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Holds the app's writes to `rate` bytes/s for `lease` (renewed by the
    /// next `set`); 0 lifts it. A volume that refuses keeps its app
    /// unthrottled (returns 0).
    pub async fn set(&mut self, rate: u64, lease: Duration) -> u64 {
        self.engaged |= rate != 0;
        self.rate = match throttle(&self.backing, rate, lease).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot throttle the app's writes");
                0
            }
        };
        self.rate
    }

    /// Lifts the throttle (asked twice if volfs does not answer).
    pub async fn clear(&mut self) {
        if !self.engaged {
            return;
        }
        for _ in 0..2 {
            if throttle(&self.backing, 0, Duration::ZERO).await.is_ok() {
                self.engaged = false;
                break;
            }
        }
        self.rate = 0;
    }
}

impl Drop for WriteThrottle {
    fn drop(&mut self) {
        if !self.engaged {
            return;
        }
        let backing = std::mem::take(&mut self.backing);
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = throttle(&backing, 0, Duration::ZERO).await;
            });
        }
    }
}

/// Holds the app's writes on the volume at `backing` to `rate` bytes/s for
/// `lease` (0: volfs's default); 0 lifts it. Returns the rate in force.
async fn throttle(backing: &Path, rate: u64, lease: Duration) -> Result<u64, VolumeError> {
    let mut c = client(backing).await?;
    let r = c
        .throttle(pb::ThrottleRequest {
            bytes_per_sec: rate,
            ttl_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX),
        })
        .await
        .map_err(control_err)?;
    Ok(r.into_inner().bytes_per_sec)
}

/// Unmounts the shim `pid` of a volume through the text control socket the
/// shims of older edgeds answer (`BACKING/.volfs/control.sock`, one line
/// `unmount`), and waits up to 10 s for it to exit; nothing when there is
/// no such socket.
pub async fn unmount_legacy(backing: &Path, pid: u32) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let sock = backing.join(volfs::scan::META_DIR).join("control.sock");
    let Ok(mut c) = tokio::net::UnixStream::connect(&sock).await else {
        return;
    };
    tracing::info!(pid, backing = %backing.display(), "unmounting the volfs shim of an older edged");
    let asked = async {
        c.write_all(b"unmount\n").await?;
        let mut line = String::new();
        tokio::io::BufReader::new(&mut c)
            .read_line(&mut line)
            .await?;
        Ok::<_, std::io::Error>(line)
    };
    if tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .is_err()
    {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Detaches whatever is mounted at `mountpoint` (a dead shim leaves a
/// mount whose every access fails with ENOTCONN).
pub fn detach(mountpoint: &Path) {
    if let Ok(c) = c_path(mountpoint) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Detaches every mount stacked at `mountpoint` (a bind on a bind).
pub fn detach_all(mountpoint: &Path) {
    let Ok(c) = c_path(mountpoint) else {
        return;
    };
    // The count bounds a path something keeps mounting on.
    for _ in 0..16 {
        // SAFETY: a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            break;
        }
    }
}

/// `p` as the C string a system call takes (EINVAL for an inner NUL).
fn c_path(p: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Swaps directories `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`).
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let (a, b) = (c_path(a)?, c_path(b)?);
    // SAFETY: valid C strings; AT_FDCWD for relative paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mount_call(src: Option<&Path>, target: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
    let target = c_path(target)?;
    let src = src.map(c_path).transpose()?;
    // SAFETY: valid C strings or null, as mount(2) takes them.
    let r = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `dir` is a mount point of edged's namespace (compared as the
/// kernel lists it: absolute, links resolved).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let want = dir.as_os_str().as_encoded_bytes();
    std::fs::read("/proc/self/mountinfo").is_ok_and(|t| {
        t.split(|&b| b == b'\n').any(|l| {
            l.split(|&b| b == b' ')
                .nth(4)
                .is_some_and(|mp| unescape(mp) == want)
        })
    })
}

/// A mountinfo path with its `\ooo` escapes decoded.
fn unescape(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        let oct = |b: u8| (b'0'..=b'7').contains(&b);
        if p[i] == b'\\' && i + 3 < p.len() && p[i + 1..=i + 3].iter().all(|&b| oct(b)) {
            out.push((p[i + 1] - b'0') * 64 + (p[i + 2] - b'0') * 8 + (p[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(p[i]);
            i += 1;
        }
    }
    out
}

/// Makes directory `dir` a private mount point (a bind onto itself, unless
/// it is one already): nothing mounted beneath it propagates to other
/// mount namespaces, whatever the host's root propagates (systemd makes
/// `/` shared).
pub fn private_point(dir: &Path) -> std::io::Result<()> {
    if !is_mount_point(dir) {
        mount_call(Some(dir), dir, libc::MS_BIND)?;
    }
    mount_call(None, dir, libc::MS_PRIVATE)
}

/// Makes directory `dir` a mount point of its own in a peer group of its
/// own (a bind onto itself, made private, then shared): what is mounted on
/// it later reaches the mount namespaces that bound it as slaves (a standby
/// instance), and those only. Its parent should be a [`private_point`].
pub fn share_point(dir: &Path) -> std::io::Result<()> {
    mount_call(Some(dir), dir, libc::MS_BIND)?;
    let shared = mount_call(None, dir, libc::MS_PRIVATE)
        .and_then(|()| mount_call(None, dir, libc::MS_SHARED));
    if let Err(e) = shared {
        detach(dir);
        return Err(e);
    }
    Ok(())
}

/// Binds the mount at `from` (a volume) onto `to`.
pub fn bind(from: &Path, to: &Path) -> std::io::Result<()> {
    mount_call(Some(from), to, libc::MS_BIND)
}

/// Starts `volfs mount backing mountpoint` in its own process group and
/// waits until its `Volume` service answers.
pub async fn mount(
    volfs: &Path,
    backing: &Path,
    mountpoint: &Path,
    block_size: u32,
    quota: u64,
    log: &Path,
) -> Result<Shim, VolumeError> {
    detach(mountpoint);
    let logf = std::os::unix::fs::OpenOptionsExt::mode(&mut std::fs::OpenOptions::new(), 0o600)
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| VolumeError::Mount(format!("{}: {e}", log.display())))?;
    let child = tokio::process::Command::new(volfs)
        .arg("mount")
        .arg(backing)
        .arg(mountpoint)
        .arg("--block-size")
        .arg(block_size.to_string())
        .arg("--quota")
        .arg(quota.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .process_group(0)
        .spawn()
        .map_err(|e| VolumeError::Mount(format!("{}: {e}", volfs.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| VolumeError::Mount("volfs exited at once".into()))?;
    // The shim must outlive edged: let tokio's orphan reaper own the child.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    // A mount on a handover's downtime path comes up in a few ms: look
    // often at first, then back off.
    let mut pause = Duration::from_millis(1);
    loop {
        if status(backing, false).await.is_ok() {
            return Ok(Shim {
                pid,
                backing: backing.to_path_buf(),
                mountpoint: mountpoint.to_path_buf(),
            });
        }
        if !pid_alive(pid) || Instant::now() > deadline {
            let tail = crate::runtime::tail(log, 5).join(" | ");
            return Err(VolumeError::Mount(format!("volfs did not come up: {tail}")));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

impl Shim {
    /// Asks the shim to unmount and waits until it exited (killing it if it hangs).
    pub async fn unmount(&self) {
        if let Ok(mut c) = client(&self.backing).await {
            let _ = c.unmount(pb::UnmountRequest {}).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(self.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if pid_alive(self.pid) {
            tracing::warn!(pid = self.pid, "volfs shim did not exit; killing it");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        detach(&self.mountpoint);
    }
}

/// Bytes of regular files under `dir` (the volume's size for the operator).
pub fn volume_bytes(dir: &Path) -> u64 {
    volfs::scan::walk(dir)
        .map(|t| t.values().filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Reads a volume's most recently modified regular files through its
/// mount, newest first, until `budget` bytes were read or `deadline`
/// passed; returns the bytes read. A volume that just arrived from another
/// edge is in the host's page cache (the apply wrote it) but not in the
/// mount's: without this the app's first reads on the new edge each cross
/// the FUSE daemon, and its first call after a handover is slow.
///
/// Files are listed from the backing directory and opened beneath the
/// mount without following a symlink at any component
/// ([`volfs::beneath::VolumeRoot`]); anything that changed kind meanwhile
/// is skipped, and at most each file's size is read.
pub fn warm(backing: &Path, mnt: &Path, budget: u64, deadline: Instant) -> std::io::Result<Warmed> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut out = Warmed::default();
    if budget == 0 {
        return Ok(out);
    }
    let mut files: Vec<(i64, u64, Vec<u8>)> = volfs::scan::walk(backing)?
        .into_iter()
        .filter(|(_, m)| m.is_file() && m.len() > 0)
        .map(|(rel, m)| (m.mtime(), m.len(), rel))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let root = volfs::beneath::VolumeRoot::new(mnt)?;
    let mut buf = vec![0u8; 1 << 20];
    for (_, size, rel) in files {
        if out.bytes >= budget || Instant::now() >= deadline {
            break;
        }
        let Some(f) = root.read_file(&rel)? else {
            continue;
        };
        out.files += 1;
        let mut f = f.take(size.min(budget - out.bytes));
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.bytes += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A file that went away or cannot be read is not warmed.
                Err(_) => break,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    Ok(out)
}

/// What [`warm`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Warmed {
    /// Bytes read.
    pub bytes: u64,
    /// Files opened (read whole, or in part when the budget ran out).
    pub files: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &Path, len: usize, mtime: i64) {
        std::fs::write(p, vec![7u8; len]).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::from_secs(mtime as u64);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn warming_reads_the_newest_files_first_within_its_budget_and_follows_no_link() {
        let vol = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = vol.path();
        file(&v.join("old"), 1000, 1_000_000);
        std::fs::create_dir(v.join("d")).unwrap();
        file(&v.join("d/new"), 10, 2_000_000);
        // Planted: links to a big file outside, a directory link, a FIFO.
        file(&outside.path().join("big"), 1 << 20, 3_000_000);
        std::os::unix::fs::symlink(outside.path().join("big"), v.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), v.join("dirlink")).unwrap();
        let fifo = std::ffi::CString::new(v.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let far = Instant::now() + Duration::from_secs(30);
        // Everything: the two regular files, nothing behind a link.
        assert_eq!(
            warm(v, v, 1 << 30, far).unwrap(),
            Warmed {
                bytes: 1010,
                files: 2
            }
        );
        // Newest first: all of the new file, then the old one until the
        // budget is spent.
        assert_eq!(
            warm(v, v, 20, far).unwrap(),
            Warmed {
                bytes: 20,
                files: 2
            }
        );
        assert_eq!(warm(v, v, 0, far).unwrap(), Warmed::default());
        // Past its deadline it opens nothing.
        assert_eq!(
            warm(v, v, 1 << 30, Instant::now()).unwrap(),
            Warmed::default()
        );
    }
}
