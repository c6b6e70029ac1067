//! Recovery after an edged restart, and removing sessions for good.
//!
//! Sessions outlive edged by design: each has a record on disk, a volfs shim
//! and an instance in their own process groups. A restarted edged re-attaches
//! what still runs and restarts what died; what cannot be recovered is
//! stopped and removed, never leaked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Edge, EdgeError, SessionRecord, Shim, State};
use crate::config::{Config, RuntimeConfig};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{InstanceId, Runtime};
use crate::volume;

impl Edge {
    /// Recovers the sessions recorded on disk after a restart: re-attaches
    /// live shims and instances, restarts dead ones, removes what cannot be
    /// recovered. Returns (recovered, removed).
    pub async fn recover(&self) -> (usize, usize) {
        let mut recovered = 0;
        let mut removed = 0;
        let Ok(mut rd) = tokio::fs::read_dir(self.sessions_dir()).await else {
            return (0, 0);
        };
        while let Ok(Some(ent)) = rd.next_entry().await {
            let dir = ent.path();
            match self.recover_one(&dir).await {
                Ok(()) => recovered += 1,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "session not recoverable; removing it");
                    cleanup_dir(&self.cfg, &dir).await;
                    removed += 1;
                }
            }
        }
        (recovered, removed)
    }

    async fn recover_one(&self, dir: &Path) -> Result<(), EdgeError> {
        let text = tokio::fs::read(dir.join("session.json")).await?;
        let rec: SessionRecord =
            serde_json::from_slice(&text).map_err(|e| EdgeError::Invalid(e.to_string()))?;
        let hash = blake3::Hash::from_hex(&rec.token_hash)
            .map_err(|e| EdgeError::Invalid(e.to_string()))?;
        let runtime = self.runtime(&rec.app).await?;
        let session = Arc::new(self.build_session(&rec, hash, runtime.clone())?);
        let layout = session.layout();
        // The volume: re-attach a shim that still answers, else mount again
        // (volfs rescans a volume whose shim died).
        let shim = match (
            rec.volfs_pid,
            volume::control(&layout.backing(), "status").await,
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
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                volume::detach(&layout.mnt());
                self.start_shim(&session).await?
            }
        };
        *session.shim.lock().await = Some(shim);
        // The instance: re-attach if it runs and answers, else restart.
        if let Some(id) = rec.instance.clone() {
            if runtime.alive(&id).await {
                match session
                    .wait_ready(&id, Duration::from_secs(2), self.cfg.max_payload + 1024)
                    .await
                {
                    Ok(c) => *session.instance.lock().await = Some((id, c)),
                    Err(_) => {
                        let _ = runtime.stop(&id).await;
                    }
                }
            }
        }
        session.ensure_running(&self.cfg).await?;
        session.save_record().await?;
        session.set_state(State::Serving);
        tracing::info!(session = %rec.id, app = %rec.app, "session recovered");
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.clone(), session);
        Ok(())
    }
}

/// Stops whatever a session directory's record names and removes the
/// directory: for sessions that cannot be recovered, and `edged cleanup`.
pub async fn cleanup_dir(cfg: &Config, dir: &Path) {
    if let Ok(text) = tokio::fs::read(dir.join("session.json")).await {
        if let Ok(rec) = serde_json::from_slice::<SessionRecord>(&text) {
            if let Some(id) = rec.instance {
                let stopped = match (&id, cfg.apps.get(&rec.app).map(|a| &a.runtime)) {
                    (InstanceId::Pid(_), _) => {
                        ProcessRuntime::new(PathBuf::new(), Vec::new())
                            .stop(&id)
                            .await
                    }
                    (InstanceId::Container(_), Some(RuntimeConfig::Docker { image })) => {
                        match crate::runtime::docker::connect().await {
                            Ok(d) => DockerRuntime::new(d, image.clone()).stop(&id).await,
                            Err(e) => Err(e),
                        }
                    }
                    (InstanceId::Container(_), _) => {
                        match crate::runtime::docker::connect().await {
                            Ok(d) => DockerRuntime::new(d, String::new()).stop(&id).await,
                            Err(e) => Err(e),
                        }
                    }
                };
                if let Err(e) = stopped {
                    tracing::error!(instance = %id, error = %e, "could not stop instance");
                }
            }
            if let Some(pid) = rec.volfs_pid {
                let shim = Shim {
                    pid,
                    backing: dir.join("volume"),
                    mountpoint: dir.join("mnt"),
                };
                shim.unmount().await;
            }
        }
    }
    volume::detach(&dir.join("mnt"));
    let _ = tokio::fs::remove_dir_all(dir).await;
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
    n
}
