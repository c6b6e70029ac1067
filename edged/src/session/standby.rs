//! A warm standby: the instance of a session being pulled here, started
//! while the volume is still on its way, so the handover's downtime holds
//! no instance start (a container's is hundreds of ms, an interpreter's
//! tens).
//!
//! ```text
//! DATA_DIR/standby/ID/          run/ (socket directory, FIFO `activate`)  app.log  app
//! DATA_DIR/standby-mounts/      a private mount point, holding only
//! DATA_DIR/standby-mounts/ID    the standby's own shared mount point
//! ```
//!
//! The instance binds its mount point while it is still an empty read-only directory
//! (root's, mode 0555), in a mount namespace that is a slave of edged's
//! (the process runtime) or with `rslave` propagation (Docker). The app
//! opens the FIFO named by `EDGE_ACTIVATION` without blocking and polls it
//! for one byte before it touches its data directory. edged sees it wait
//! (an open for writing no longer fails with ENXIO) before it asks the
//! owner for the handover, and holds the FIFO open from then on. At the
//! activation the pulled volume is mounted as every volume is (a volfs
//! shim on the session's `mnt`) and bound onto the standby's mount point: the
//! bind propagates into the instance, and edged writes the byte. Should
//! edged die or give the standby up, its end closes and the app reads end
//! of file and exits.
//!
//! At the promotion `run/` and `app.log` move into the session directory
//! (the instance holds them by inode, not path; they lie outside any mount
//! so they can be renamed); the mount point stays for the session's life,
//! since what the instance sees of its volume hangs on it, and is detached
//! at the one teardown before the shim unmounts.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Edge, EdgeError, Layout};
use crate::runtime::{ACTIVATION_NAME, InstanceId, InstanceSpec, Runtime};
use crate::volume;

/// How long an app whose standby did not wait for its activation gets no
/// standby (each try costs an instance start, and up to the start timeout).
const STANDBY_BACKOFF: std::time::Duration = std::time::Duration::from_secs(600);

/// A standby instance, started and waiting for its volume.
#[derive(Debug)]
pub(super) struct Standby {
    /// The instance.
    pub(super) instance: InstanceId,
    runtime: Arc<dyn Runtime>,
    spec: InstanceSpec,
    /// The FIFO's writing end, once the app waits on it.
    fifo: Option<std::fs::File>,
    /// The FIFO edged made (device, inode).
    made: (u64, u64),
    /// The data directory as the instance sees it (looked up once it
    /// waits, off the downtime).
    inside: Option<PathBuf>,
    dir: PathBuf,
    /// Handed over to its session (nothing to undo on drop).
    done: bool,
}

impl Layout {
    /// The standby directory of this session (`DATA_DIR/standby/ID`).
    pub fn standby(&self) -> PathBuf {
        standby_of(&self.dir)
    }
}

fn standby_of(session_dir: &Path) -> PathBuf {
    let id = session_dir.file_name().unwrap_or_default();
    let data = session_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/nonexistent"));
    data.join("standby").join(id)
}

/// Held while the mounts root is made a private mount point and while it
/// is detached once empty, so a standby's mount point never lands under a
/// root that is not private.
static ROOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The standby mount point of the standby directory `dir`.
fn mount_point(dir: &Path) -> PathBuf {
    let id = dir.file_name().unwrap_or_default();
    let data = dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/nonexistent"));
    data.join(MOUNTS).join(id)
}

/// The private mount point holding the standby mount points.
const MOUNTS: &str = "standby-mounts";

/// Removes a standby directory and its mount point, detached first and
/// never removed recursively (a mount the detach missed would be
/// emptied). The mounts root goes too once it holds none.
pub(super) fn remove_dir(dir: &Path) {
    let mnt = mount_point(dir);
    volume::detach_all(&mnt);
    let _ = std::fs::remove_file(dir.join("app.log"));
    let _ = std::fs::remove_dir_all(dir.join("run"));
    if let Err(e) = std::fs::remove_dir(&mnt) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "standby mount point not removed");
            return;
        }
    }
    // Last: a sweep after a restart reads it to end what is left.
    let _ = std::fs::remove_file(dir.join("app"));
    let _ = std::fs::remove_dir(dir);
    if let Some(root) = mnt.parent() {
        let _g = ROOT.lock().unwrap_or_else(|p| p.into_inner());
        if std::fs::read_dir(root).is_ok_and(|mut rd| rd.next().is_none()) {
            volume::detach(root);
        }
    }
}

/// Removes the standby directories of `cfg`'s edge that belong to no
/// session (a pull that ended while edged was away), and what is left of
/// their instances: a standby reads end of file and exits once edged's
/// end of its FIFO closed; its groups are removed here. Returns how many.
pub async fn sweep(cfg: &crate::config::Config) -> usize {
    let sessions = cfg.data_dir.join("sessions");
    // Standby directories, and mount points whose directory went first.
    let ids: std::collections::BTreeSet<String> = ["standby", MOUNTS]
        .iter()
        .filter_map(|d| std::fs::read_dir(cfg.data_dir.join(d)).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    let mut n = 0;
    for id in &ids {
        if sessions.join(id).exists() {
            continue;
        }
        let dir = cfg.data_dir.join("standby").join(id);
        super::recover::end_standby(cfg, id, &dir).await;
        let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
        n += 1;
    }
    n
}

/// The directory of a standby of `uid:gid`, made afresh: the shared mount
/// point, the socket directory and the FIFO.
fn prepare(dir: &Path, app: &str, uid: u32, gid: u32) -> std::io::Result<(u64, u64)> {
    remove_dir(dir);
    let mnt = mount_point(dir);
    for d in [dir.parent(), mnt.parent()].into_iter().flatten() {
        std::fs::create_dir_all(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    {
        let _g = ROOT.lock().unwrap_or_else(|p| p.into_inner());
        volume::private_point(mnt.parent().unwrap_or(&mnt))?;
        std::fs::create_dir(&mnt)?;
    }
    // For a sweep after a restart: which runtime ran it.
    std::fs::write(dir.join("app"), app)?;
    let run = dir.join("run");
    std::fs::set_permissions(&mnt, std::fs::Permissions::from_mode(0o555))?;
    volume::share_point(&mnt)?;
    std::fs::create_dir(&run)?;
    let fifo = run.join(ACTIVATION_NAME);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let made = std::fs::symlink_metadata(&fifo)?;
    std::os::unix::fs::lchown(&fifo, Some(uid), Some(gid))?;
    std::os::unix::fs::lchown(&run, Some(uid), Some(gid))?;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
    Ok((made.dev(), made.ino()))
}

/// The FIFO opened for writing, once the app has it open for reading
/// (it waits); None while it does not. Never follows a link the app put
/// there, and only the FIFO edged made (`made`: its device and inode)
/// will do.
fn open_writer(fifo: &Path, made: (u64, u64)) -> std::io::Result<Option<std::fs::File>> {
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(fifo)
    {
        Ok(f) => {
            let m = f.metadata()?;
            if (m.dev(), m.ino()) != made {
                return Err(std::io::Error::other(
                    "the activation FIFO was replaced by another file",
                ));
            }
            Ok(Some(f))
        }
        // No reader yet.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Edge {
    /// The standby directory of session `id`.
    pub(super) fn standby_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("standby").join(id)
    }

    /// Starts a standby instance of session `id` of `app`, when the app
    /// waits for its activation (`standby = true`); None when it does not.
    pub(super) async fn start_standby(
        &self,
        id: &str,
        app: &str,
    ) -> Result<Option<Standby>, EdgeError> {
        let cfg = self.app(app)?;
        if !cfg.standby {
            return Ok(None);
        }
        let (uid, gid) = cfg
            .uid_gid()
            .ok_or_else(|| EdgeError::Invalid(format!("app {app}: user {:?}", cfg.user)))?;
        let spec = InstanceSpec {
            edge_id: self.cfg.edge_id.clone(),
            session_id: id.to_string(),
            app: app.to_string(),
            volume: mount_point(&self.standby_dir(id)),
            socket_dir: self.standby_dir(id).join("run"),
            log_file: self.standby_dir(id).join("app.log"),
            memory_mib: cfg.memory_mib,
            pids_limit: cfg.pids_limit,
            cpus: cfg.cpus,
            user: cfg.user.clone(),
            standby: true,
            hidden: Some(self.cfg.data_dir.join(MOUNTS)),
        };
        let runtime = self.runtime(app).await?;
        let dir = self.standby_dir(id);
        let (d, a) = (dir.clone(), app.to_string());
        let prepared = tokio::task::spawn_blocking(move || prepare(&d, &a, uid, gid))
            .await
            .map_err(|e| EdgeError::Io(std::io::Error::other(e)))?;
        let made = match prepared {
            Ok(m) => m,
            Err(e) => {
                remove_dir(&dir);
                return Err(e.into());
            }
        };
        match runtime.start(&spec).await {
            Ok(instance) => Ok(Some(Standby {
                instance,
                runtime,
                spec,
                fifo: None,
                made,
                inside: None,
                dir,
                done: false,
            })),
            Err(e) => {
                remove_dir(&dir);
                Err(e.into())
            }
        }
    }

    /// No standby for `app` for a while ([`STANDBY_BACKOFF`]).
    pub(super) fn standby_failed_now(&self, app: &str) {
        self.standby_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.to_string(), std::time::Instant::now());
    }

    /// Starts the standby instance of session `id` of `app` and waits
    /// (within the start timeout) until the app has set itself up and waits
    /// for its activation. None when the app has no standby or it failed
    /// (said in the log; the instance then starts once the volume is here).
    pub(super) async fn standby_ready(&self, id: &str, app: &str) -> Option<Standby> {
        let t = std::time::Instant::now();
        let recent = self
            .standby_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            .is_some_and(|at| at.elapsed() < STANDBY_BACKOFF);
        if recent {
            return None;
        }
        let mut s = match self.start_standby(id, app).await {
            Ok(s) => s?,
            Err(e) => {
                tracing::warn!(session = %id, app, error = %e, "no standby instance; the instance starts once the volume is here (no standby for this app for {} s)", STANDBY_BACKOFF.as_secs());
                self.standby_failed_now(app);
                return None;
            }
        };
        match s.armed(self.cfg.start_timeout).await {
            Ok(()) => {
                tracing::debug!(
                    session = %id,
                    ms = t.elapsed().as_millis() as u64,
                    "standby instance waits for its activation"
                );
                Some(s)
            }
            Err(why) => {
                let logs = s.runtime.logs(&s.instance, &s.spec, 5).await;
                tracing::warn!(session = %id, app, why, logs = %logs.join(" | "), "the standby instance is given up; the instance starts once the volume is here (no standby for this app for {} s)", STANDBY_BACKOFF.as_secs());
                self.standby_failed_now(app);
                s.discard().await;
                None
            }
        }
    }
}

impl Standby {
    /// The app it runs.
    pub(super) fn app(&self) -> &str {
        &self.spec.app
    }

    /// Waits until the app opened its FIFO for reading (it set itself up
    /// and waits for the volume), then holds the FIFO open for writing:
    /// from here on, should edged close it without a byte, the app reads
    /// end of file and exits.
    async fn armed(&mut self, limit: std::time::Duration) -> Result<(), String> {
        let fifo = self.dir.join("run").join(ACTIVATION_NAME);
        let deadline = std::time::Instant::now() + limit;
        let mut pause = std::time::Duration::from_millis(1);
        let mut looked = std::time::Instant::now();
        loop {
            match open_writer(&fifo, self.made) {
                Ok(Some(f)) => {
                    self.fifo = Some(f);
                    self.inside = self
                        .runtime
                        .data_in_instance(&self.instance)
                        .await
                        .map_err(|e| format!("where it sees its data: {e}"))?;
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(format!("activation FIFO: {e}")),
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "the app did not wait for its activation within {limit:?} (does it read EDGE_ACTIVATION? edge-app's data_dir() does)"
                ));
            }
            // Whether it still runs, now and then (for Docker a round trip).
            if looked.elapsed() > std::time::Duration::from_millis(100) {
                if !self.runtime.alive(&self.instance).await {
                    return Err("it exited before waiting for its activation".into());
                }
                looked = std::time::Instant::now();
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(5));
        }
    }

    /// Moves the socket directory and the log into the promoted session's
    /// directory (the instance holds them by inode: it goes on unchanged).
    pub(super) fn move_into(&self, layout: &Layout) -> std::io::Result<()> {
        std::fs::rename(self.dir.join("run"), layout.run())?;
        // Only the process runtime writes one (Docker keeps its own).
        match std::fs::rename(self.dir.join("app.log"), layout.dir.join("app.log")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Activates the instance: the volume mounted at `mnt` is bound onto
    /// the standby's mount point (and so appears in the instance), and the
    /// app is told to go on.
    pub(super) fn activate(&mut self, mnt: &Path) -> std::io::Result<()> {
        volume::bind(mnt, &mount_point(&self.dir))?;
        // Seen from inside: propagation can miss (an engine in another
        // mount namespace), and the app must not go on with the empty
        // directory.
        if let Some(inside) = &self.inside {
            let want = std::fs::metadata(mnt)?.dev();
            let seen = std::fs::metadata(inside)?.dev();
            if seen != want {
                return Err(std::io::Error::other(format!(
                    "the volume did not reach the instance ({} is not the mounted volume)",
                    inside.display()
                )));
            }
        }
        match self.fifo.as_mut() {
            Some(f) => f.write_all(b"1"),
            None => Err(std::io::Error::other("the standby does not wait")),
        }
    }

    /// The instance answers: the FIFO is closed and removed from the
    /// session's socket directory `run`; the mount point stays (the
    /// session's teardown detaches it).
    pub(super) fn finish(mut self, run: &Path) -> InstanceId {
        self.fifo = None;
        let _ = std::fs::remove_file(run.join(ACTIVATION_NAME));
        self.done = true;
        self.instance.clone()
    }

    /// Ends the standby instance without letting it run on, and removes
    /// its directory.
    pub(super) async fn discard(mut self) {
        self.fifo = None;
        self.done = true;
        if let Err(e) = self.runtime.discard(&self.instance).await {
            // Its directory stays, for the next start of the session or a
            // restart's sweep to end it.
            tracing::warn!(instance = %self.instance, error = %e, "discarding a standby instance failed");
            return;
        }
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
    }
}

impl Drop for Standby {
    /// A standby dropped on an error path (a panic; every other path
    /// discards it): its FIFO closes (the app reads end of file and exits
    /// by itself), and the runtime is told to discard it, then its
    /// directory goes.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.fifo = None;
        // The directory goes after the instance (else a restart's sweep
        // finds it); without a runtime at hand, the sweep does both.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (runtime, instance) = (self.runtime.clone(), self.instance.clone());
            let dir = self.dir.clone();
            rt.spawn(async move {
                let _ = runtime.discard(&instance).await;
                let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn the_writer_opens_once_the_app_waits_and_only_on_a_fifo() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("activate");
        mkfifo(&fifo);
        let m = std::fs::metadata(&fifo).unwrap();
        let made = (m.dev(), m.ino());
        // The app is still setting itself up: nobody reads.
        assert!(open_writer(&fifo, made).unwrap().is_none());
        // It waits (open without blocking, as edge-app does).
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut w = open_writer(&fifo, made).unwrap().expect("a reader waits");
        w.write_all(b"1").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &reader, &mut b).unwrap(), 1);
        assert_eq!(&b, b"1");
        // What an app may put in its place: a link is not followed, a
        // regular file is refused.
        let other = d.path().join("other");
        std::fs::write(&other, b"").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(open_writer(&link, made).is_err());
        assert!(open_writer(&other, made).is_err());
        assert_eq!(std::fs::read(&other).unwrap(), b"");
        // Nor another FIFO under the same name.
        drop(w);
        std::fs::remove_file(&fifo).unwrap();
        mkfifo(&fifo);
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        assert!(open_writer(&fifo, made).is_err());
    }

    #[test]
    fn a_standby_directory_is_found_beside_the_sessions() {
        let l = Layout {
            dir: PathBuf::from("/var/lib/edgeshift/sessions/abc"),
        };
        assert_eq!(l.standby(), Path::new("/var/lib/edgeshift/standby/abc"));
        assert_eq!(
            mount_point(&l.standby()),
            Path::new("/var/lib/edgeshift/standby-mounts/abc")
        );
    }
}
