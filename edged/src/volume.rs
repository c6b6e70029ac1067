//! A session's volume: seeded from the app's base volume, served by its own
//! `volfs mount` process (a shim, as containerd runs one per container), so
//! an edged restart or crash does not pull the volume out from under a
//! running instance. edged talks to the shim over its control socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

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
    /// A control request failed.
    #[error("volfs control: {0}")]
    Control(String),
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

/// Sends a control request to the shim of `backing` (blocking I/O on a worker thread).
pub async fn control(backing: &Path, req: &str) -> Result<String, VolumeError> {
    let b = backing.to_path_buf();
    let req = req.to_string();
    let r = tokio::task::spawn_blocking(move || volfs::control::request(&b, &req))
        .await
        .map_err(|e| VolumeError::Control(e.to_string()))?;
    match r {
        Ok(Some(Ok(s))) => Ok(s),
        Ok(Some(Err(e))) => Err(VolumeError::Control(e)),
        Ok(None) => Err(VolumeError::Control("no volfs answers".into())),
        Err(e) => Err(VolumeError::Control(e.to_string())),
    }
}

/// One `key=value` field of a control reply.
pub fn field(reply: &str, key: &str) -> Option<u64> {
    reply
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Detaches whatever is mounted at `mountpoint` (a dead shim leaves a
/// mount whose every access fails with ENOTCONN).
pub fn detach(mountpoint: &Path) {
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Starts `volfs mount backing mountpoint` in its own process group and
/// waits until its control socket answers.
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
    loop {
        if control(backing, "status").await.is_ok() {
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Shim {
    /// Asks the shim to unmount and waits until it exited (killing it if it hangs).
    pub async fn unmount(&self) {
        let _ = control(&self.backing, "unmount").await;
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
