//! Recovery after an edged restart, and removing sessions for good.
//!
//! Sessions outlive edged by design: each has a record on disk, a volfs shim
//! and an instance in their own process groups. A restarted edged re-attaches
//! what still runs and restarts what died, and finishes what a handover left
//! half done, by the role the record persisted:
//!
//! - a session released to another edge (its tombstone is at least as new
//!   as its epoch) never comes back: it is stopped and removed;
//! - `Frozen` (the old owner died mid-handover): the instance is thawed and
//!   the session served — its release was never persisted, so the attempt
//!   is over and a late Release of it is refused;
//! - `Starting` (the new edge died before asking for the release): the copy
//!   is staged again, the instance stopped, the old owner told to abort;
//! - `AwaitingRelease`: the session is recovered with its calls held and
//!   the old owner asked again; only its answer decides.
//!
//! A session that fails to recover for a reason that may pass (the engine
//! not up yet, an app renamed in the config) is kept on disk, untouched,
//! for the next start or the operator; nothing is deleted on an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::layout::REMOVING;
use super::{Edge, EdgeError, Layout, Role, SessionRecord, Shim, State};
use crate::config::{Config, RuntimeConfig};
use crate::migration::puller::PullerEvent;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{InstanceId, Runtime};
use crate::volume;

impl Edge {
    /// Recovers the sessions recorded on disk after a restart: re-attaches
    /// live shims and instances, restarts dead ones, removes what cannot be
    /// recovered. Returns (recovered, removed).
    pub async fn recover(self: &Arc<Self>) -> (usize, usize) {
        let mut recovered = 0;
        let mut removed = 0;
        let Ok(mut rd) = tokio::fs::read_dir(self.sessions_dir()).await else {
            return (0, 0);
        };
        while let Ok(Some(ent)) = rd.next_entry().await {
            let dir = ent.path();
            if ent.file_name().to_string_lossy().starts_with(REMOVING) {
                // Its removal was cut short by the stop: finished now,
                // stopping whatever its record still names (an instance
                // that would not stop), never thawing it.
                end_dir(&self.cfg, &dir, End::Discard).await;
                continue;
            }
            match self.recover_one(&dir).await {
                Ok(true) => recovered += 1,
                Ok(false) => removed += 1,
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "session not recovered; kept on disk, retried every minute, listed as failed for the operator");
                    self.failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(dir, e.to_string());
                }
            }
        }
        let swept = super::standby::sweep(&self.cfg).await;
        if swept > 0 {
            tracing::info!(
                swept,
                "removed the standby instances of pulls that ended while edged was away"
            );
        }
        (recovered, removed)
    }

    /// Tries again to recover the sessions that failed to (the engine is
    /// up now, the operator fixed the config, ...).
    pub async fn retry_failed(self: &Arc<Self>) {
        let dirs: Vec<PathBuf> = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for dir in dirs {
            let r = self.recover_one(&dir).await;
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            match r {
                Ok(_) => {
                    failed.remove(&dir);
                    tracing::info!(dir = %dir.display(), "a session that failed to recover is recovered");
                }
                Err(e) => {
                    failed.insert(dir, e.to_string());
                }
            }
        }
    }

    /// The sessions that failed to recover, as the operator sees them.
    pub(super) fn failed_infos(&self) -> Vec<edge_proto::v1::SessionInfo> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        failed
            .into_iter()
            .map(|(dir, reason)| {
                let rec = std::fs::read(dir.join("session.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<SessionRecord>(&b).ok());
                edge_proto::v1::SessionInfo {
                    session_id: dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    app: rec.as_ref().map(|r| r.app.clone()).unwrap_or_default(),
                    client_id: rec
                        .as_ref()
                        .map(|r| r.client_id.clone())
                        .unwrap_or_default(),
                    state: format!("failed: {reason}"),
                    created_unix: rec.as_ref().map(|r| r.created).unwrap_or(0),
                    ..Default::default()
                }
            })
            .collect()
    }

    /// The operator gives up a session that failed to recover: stop what
    /// is left of it and remove it.
    pub(super) async fn remove_failed(&self, id: &str) -> bool {
        let dir = self.sessions_dir().join(id);
        let known = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&dir)
            .is_some();
        if known {
            cleanup_dir(&self.cfg, &dir).await;
        }
        known
    }

    /// Recovers one session directory: `Ok(true)` serving (or waiting for
    /// its release), `Ok(false)` it was not this edge's to keep.
    async fn recover_one(self: &Arc<Self>, dir: &Path) -> Result<bool, EdgeError> {
        let text = match tokio::fs::read(dir.join("session.json")).await {
            Ok(t) => t,
            // A released session whose removal was cut short by the stop
            // (by an edged that removed directories in place): its
            // tombstone says it is not this edge's.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                if id.is_some_and(|id| self.tombstone(&id).is_some()) {
                    tracing::info!(dir = %dir.display(), "released before the restart, its record already gone; removing what is left of it");
                    volume::detach(&dir.join("mnt"));
                    let _ = tokio::fs::remove_dir_all(dir).await;
                    return Ok(false);
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let rec: SessionRecord =
            serde_json::from_slice(&text).map_err(|e| EdgeError::Invalid(e.to_string()))?;
        let hash = blake3::Hash::from_hex(&rec.token_hash)
            .map_err(|e| EdgeError::Invalid(e.to_string()))?;
        if let Some(t) = self.tombstone(&rec.id) {
            if t.epoch >= rec.epoch {
                tracing::info!(session = %rec.id, to = %t.to.edge_id, "released before the restart; removing what is left of it");
                // Its instance (frozen at the release) is discarded, never thawed.
                end_dir(&self.cfg, dir, End::Discard).await;
                return Ok(false);
            }
            // It came back here after it was released: the tombstone is stale.
            self.released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&rec.id);
            self.tombstones.remove(&rec.id);
        }
        if let Role::Starting { attempt, from } = &rec.role {
            tracing::warn!(session = %rec.id, from = %from.edge_id, "a pull was starting when edged stopped; staging the copy again");
            self.puller_step(
                &rec.id,
                PullerEvent::Restarted(crate::migration::puller::PullerState::Starting {
                    from: from.clone(),
                    attempt: *attempt,
                }),
            );
            stop_recorded(&self.cfg, &rec, dir, End::Stop).await;
            self.stage_back(&rec.id).await;
            let (from, attempt, id) = (from.clone(), *attempt, rec.id.clone());
            let me = self.cfg.edge_id.clone();
            let peers = self.peers.clone();
            tokio::spawn(async move {
                if let Ok(mut p) = peers.dial(&from.edge_id, &from.addr).await {
                    let _ = p
                        .abort(edge_proto::v1::ReleaseRequest {
                            session_id: id,
                            token: Vec::new(),
                            attempt,
                            from_edge: me,
                        })
                        .await;
                }
            });
            return Ok(false);
        }
        let runtime = self.runtime(&rec.app).await?;
        let session = Arc::new(self.build_session(&rec, hash, runtime.clone())?);
        let layout = session.layout();
        // The volume: re-attach a shim that still answers, else mount again
        // (volfs rescans a volume whose shim died).
        let shim = match (
            rec.volfs_pid,
            volume::status(&layout.backing(), false).await,
        ) {
            (Some(pid), Ok(_)) => Shim {
                pid,
                backing: layout.backing(),
                mountpoint: layout.mnt(),
            },
            _ => {
                if let Some(pid) = rec
                    .volfs_pid
                    .filter(|p| crate::runtime::process::pid_alive(*p))
                {
                    // A shim of an older edged (its text control socket):
                    // asked to unmount, so it saves what it holds, before
                    // anything harsher.
                    volume::unmount_legacy(&layout.backing(), pid).await;
                    if crate::runtime::process::pid_alive(pid) {
                        // SAFETY: kill has no memory-safety preconditions.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
                volume::detach(&layout.mnt());
                self.start_shim(&session).await?
            }
        };
        *session.shim.lock().await = Some(shim);
        // A frozen instance (edged died mid-handover) is thawed first: the
        // release was never persisted, so the attempt is over.
        if let (Role::Frozen { to, .. }, Some(id)) = (&rec.role, &rec.instance) {
            if let Err(e) = runtime.resume(id).await {
                tracing::error!(session = %rec.id, error = %e, "could not thaw the instance");
            }
            tracing::warn!(session = %rec.id, to = %to.edge_id, "edged stopped during a handover with the instance frozen; thawed, serving");
            *session.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Serving;
        }
        // The instance: re-attach if it runs and answers, else restart.
        if let Some(id) = rec.instance.clone() {
            if runtime.alive(&id).await {
                match session
                    .wait_ready(&id, Duration::from_secs(2), self.cfg.max_payload + 1024)
                    .await
                {
                    Ok(c) => *session.instance.lock().await = Some((id, c)),
                    Err(e) => {
                        tracing::warn!(session = %rec.id, instance = %id, error = %e, "instance runs but does not answer; restarting it");
                        let _ = runtime.stop(&id).await;
                    }
                }
            }
        }
        session.ensure_running(&self.cfg).await?;
        session.save_record().await?;
        session.set_state(State::Serving);
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.clone(), session);
        if let Role::AwaitingRelease { attempt, from } = rec.role {
            tracing::info!(session = %rec.id, from = %from.edge_id, "recovered a pulled session; asking the old edge again for its release");
            self.puller_step(
                &rec.id,
                PullerEvent::Restarted(crate::migration::puller::PullerState::AwaitingRelease {
                    from: from.clone(),
                    attempt,
                }),
            );
            let edge = self.clone();
            let id = rec.id.clone();
            tokio::spawn(async move {
                if let Err(st) = edge.ask_release(&id, &[], &from, attempt, None).await {
                    tracing::warn!(session = %id, error = %st.message(), "pulled session not released");
                }
            });
        } else {
            tracing::info!(session = %rec.id, app = %rec.app, "session recovered");
        }
        Ok(true)
    }

    /// Moves what is left of a session directory's volume back to staging
    /// and removes the directory.
    async fn stage_back(&self, id: &str) {
        let dir = self.sessions_dir().join(id);
        let staging = self.staging_dir(id);
        let standby = Layout { dir: dir.clone() }.standby();
        let _ = tokio::task::spawn_blocking(move || super::standby::remove_dir(&standby)).await;
        volume::detach(&dir.join("mnt"));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let _ = tokio::fs::create_dir_all(&staging).await;
        let _ = tokio::fs::rename(dir.join("volume"), staging.join("volume")).await;
        super::layout::remove_session_dir(&dir).await;
    }
}

/// How an instance found on disk ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Asked to stop (thawed if frozen, SIGTERM, then SIGKILL).
    Stop,
    /// Ended frozen (its session was released to another edge).
    Discard,
}

/// Stops the instance and the shim a record names, and an instance of the
/// session that started but was never recorded (edged died in between).
async fn stop_recorded(cfg: &Config, rec: &SessionRecord, dir: &Path, end: End) {
    if let Some(id) = &rec.instance {
        stop_instance(cfg, &rec.app, id, end).await;
    }
    // Started here, or as a standby (its socket directory moved here).
    let layout = Layout {
        dir: dir.to_path_buf(),
    };
    for run in [layout.run(), layout.standby().join("run")] {
        for pid in crate::runtime::process::find_by_env(
            crate::runtime::ENV_INSTANCE,
            &run.display().to_string(),
        ) {
            tracing::warn!(session = %rec.id, pid, "stopping an instance that was never recorded");
            stop_instance(cfg, &rec.app, &InstanceId::Pid(pid), end).await;
        }
    }
    crate::runtime::cgroup::remove_instance(&cfg.edge_id, &rec.id).await;
    // A container is named by edge and session, recorded or not.
    if let Some(RuntimeConfig::Docker { .. }) = cfg.apps.get(&rec.app).map(|a| &a.runtime) {
        let name = crate::runtime::docker::container_name(&cfg.edge_id, &rec.id);
        stop_instance(cfg, &rec.app, &InstanceId::Container(name), end).await;
    }
    // Before the shim unmounts (see `Session::end`).
    let standby = layout.standby();
    let _ = tokio::task::spawn_blocking(move || super::standby::remove_dir(&standby)).await;
    if let Some(pid) = rec.volfs_pid {
        let shim = Shim {
            pid,
            backing: dir.join("volume"),
            mountpoint: dir.join("mnt"),
        };
        shim.unmount().await;
    }
}

/// Ends what is left of the standby instance of session `id` whose
/// standby directory `dir` belongs to no session: an instance never
/// recorded (found by its socket directory), its groups, and for Docker
/// its container (by name). It was never given the volume.
pub(super) async fn end_standby(cfg: &Config, id: &str, dir: &Path) {
    for pid in crate::runtime::process::find_by_env(
        crate::runtime::ENV_INSTANCE,
        &dir.join("run").display().to_string(),
    ) {
        stop_instance(cfg, "", &InstanceId::Pid(pid), End::Discard).await;
    }
    crate::runtime::cgroup::remove_instance(&cfg.edge_id, id).await;
    let app = std::fs::read_to_string(dir.join("app")).unwrap_or_default();
    if let Some(RuntimeConfig::Docker { .. }) = cfg.apps.get(&app).map(|a| &a.runtime) {
        let name = crate::runtime::docker::container_name(&cfg.edge_id, id);
        stop_instance(cfg, &app, &InstanceId::Container(name), End::Discard).await;
    }
}

async fn stop_instance(cfg: &Config, app: &str, id: &InstanceId, end: End) {
    let runtime: Result<Box<dyn Runtime>, _> = match (id, cfg.apps.get(app).map(|a| &a.runtime)) {
        (InstanceId::Pid(_), _) => Ok(Box::new(ProcessRuntime::new(PathBuf::new(), Vec::new()))),
        (InstanceId::Container(_), Some(RuntimeConfig::Docker { image })) => {
            crate::runtime::docker::connect()
                .await
                .map(|d| Box::new(DockerRuntime::new(d, image.clone())) as Box<dyn Runtime>)
        }
        (InstanceId::Container(_), _) => crate::runtime::docker::connect()
            .await
            .map(|d| Box::new(DockerRuntime::new(d, String::new())) as Box<dyn Runtime>),
    };
    let stopped = match (runtime, end) {
        (Ok(r), End::Stop) => r.stop(id).await,
        (Ok(r), End::Discard) => r.discard(id).await,
        (Err(e), _) => Err(e),
    };
    if let Err(e) = stopped {
        tracing::error!(instance = %id, error = %e, "could not stop instance");
    }
}

/// Stops whatever a session directory's record names and removes the
/// directory: for sessions that cannot be recovered, and `edged cleanup`.
pub async fn cleanup_dir(cfg: &Config, dir: &Path) {
    end_dir(cfg, dir, End::Stop).await;
}

async fn end_dir(cfg: &Config, dir: &Path, end: End) {
    if let Ok(text) = tokio::fs::read(dir.join("session.json")).await {
        if let Ok(rec) = serde_json::from_slice::<SessionRecord>(&text) {
            stop_recorded(cfg, &rec, dir, end).await;
        }
    }
    volume::detach_all(&dir.join("mnt"));
    if let Err(e) = tokio::fs::remove_dir_all(dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(dir = %dir.display(), error = %e, "removing what was left of a session failed");
        }
    }
}

/// Removes every session of an edge (`edged cleanup`): returns how many.
pub async fn cleanup_all(cfg: &Config) -> usize {
    let mut n = 0;
    if let Ok(mut rd) = tokio::fs::read_dir(cfg.data_dir.join("sessions")).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            cleanup_dir(cfg, &e.path()).await;
            n += 1;
        }
    }
    super::standby::sweep(cfg).await;
    n
}
