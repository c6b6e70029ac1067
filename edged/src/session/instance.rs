//! The instance of a session: started on its volume, answering on its
//! socket, restarted after it died, stopped with the session (the one
//! teardown).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tonic::Status;

use super::standby::{self, Standby};
use super::{EdgeError, Gate, Session, State};
use crate::config::{AppConfig, Config};
use crate::forward::{AppClient, SOCKET_NAME};
use crate::runtime::InstanceId;
use crate::volume;

impl Session {
    /// The socket directory belongs to the instance's user and nobody else.
    pub(super) fn prepare_socket_dir(&self, app: &AppConfig) -> Result<(), EdgeError> {
        use std::os::unix::fs::PermissionsExt;
        let run = self.layout().run();
        std::fs::create_dir_all(&run)?;
        if let Some((uid, gid)) = app.uid_gid() {
            std::os::unix::fs::lchown(&run, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    }

    /// Waits until the instance answers on its socket, or fails with its output.
    pub(super) async fn wait_ready(
        &self,
        id: &InstanceId,
        timeout: Duration,
        max_message: usize,
    ) -> Result<AppClient, EdgeError> {
        let socket = self.spec.socket_dir.join(SOCKET_NAME);
        let deadline = Instant::now() + timeout;
        // Looked at often at first (a start on a handover's downtime path
        // answers in tens of ms), then every 10 ms.
        let mut pause = Duration::from_millis(1);
        loop {
            if socket.exists() {
                if let Ok(c) = AppClient::connect(&socket, max_message).await {
                    return Ok(c);
                }
            }
            let reason = if !self.runtime.alive(id).await {
                "it exited".to_string()
            } else if Instant::now() > deadline {
                format!("no answer on its socket within {timeout:?}")
            } else {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(10));
                continue;
            };
            let logs = self.runtime.logs(id, &self.spec, 10).await.join(" | ");
            return Err(EdgeError::NotReady { reason, logs });
        }
    }

    /// Starts the instance (or restarts a dead one) and returns a client of it.
    pub(super) async fn ensure_running(&self, cfg: &Config) -> Result<AppClient, EdgeError> {
        let mut inst = self.instance.lock().await;
        // Liveness is checked when a call fails (see `mark_failed`), not on
        // every call: for Docker it is a round trip to the engine.
        if let Some((_, client)) = inst.as_ref() {
            return Ok(client.clone());
        }
        self.prepare_start(cfg).await?;
        let id = self.runtime.start(&self.spec).await?;
        if let Err(e) = self.save_record_with(Some(id.clone())).await {
            let _ = self.runtime.stop(&id).await;
            return Err(e);
        }
        match self
            .wait_ready(&id, cfg.start_timeout, cfg.max_payload + 1024)
            .await
        {
            Ok(client) => {
                *inst = Some((id, client.clone()));
                drop(inst);
                self.save_record().await?;
                Ok(client)
            }
            Err(e) => {
                let _ = self.runtime.stop(&id).await;
                Err(e)
            }
        }
    }

    /// Before an instance starts: no stale socket; the instance's user owns
    /// its socket directory and its volume, also for a session made before
    /// (or on an edge with) another `user`.
    async fn prepare_start(&self, cfg: &Config) -> Result<(), EdgeError> {
        let _ = std::fs::remove_file(self.spec.socket_dir.join(SOCKET_NAME));
        if let Some(app) = cfg.apps.get(&self.app) {
            self.prepare_socket_dir(app)?;
            if let Some((uid, gid)) = app.uid_gid() {
                let backing = self.layout().backing();
                let owned = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&backing)?);
                if owned != uid {
                    tracing::info!(session = %self.id, uid, "giving the volume to the app's user");
                    tokio::task::spawn_blocking(move || volume::give_to(&backing, uid, gid))
                        .await
                        .map_err(|e| EdgeError::Io(std::io::Error::other(e)))??;
                }
            }
        }
        Ok(())
    }

    /// Makes a standby instance this session's: the mounted volume
    /// appears in it, it is told to go on, and it answers. On a failure the
    /// standby is discarded (the caller starts an instance the usual way).
    pub(super) async fn adopt_standby(
        &self,
        cfg: &Config,
        mut standby: Standby,
    ) -> Result<AppClient, EdgeError> {
        let mut inst = self.instance.lock().await;
        if inst.is_some() {
            standby.discard().await;
            return Err(EdgeError::Invalid(
                "the session has an instance already".into(),
            ));
        }
        if let Err(e) = self.prepare_start(cfg).await {
            standby.discard().await;
            return Err(e);
        }
        if let Err(e) = standby.activate(&self.layout().mnt()) {
            standby.discard().await;
            return Err(e.into());
        }
        let id = standby.instance.clone();
        if let Err(e) = self.save_record_with(Some(id.clone())).await {
            standby.discard().await;
            return Err(e);
        }
        match self
            .wait_ready(&id, cfg.start_timeout, cfg.max_payload + 1024)
            .await
        {
            Ok(client) => {
                let id = standby.finish(&self.layout().run());
                *inst = Some((id, client.clone()));
                drop(inst);
                self.save_record().await?;
                Ok(client)
            }
            Err(e) => {
                standby.discard().await;
                Err(e)
            }
        }
    }

    /// After a failed call: if the instance is gone, forget it (the next
    /// call starts a new one) and say so with its last output.
    pub(super) async fn check_after_failure(&self, st: &Status) -> Option<String> {
        let mut inst = self.instance.lock().await;
        let id = inst.as_ref().map(|(i, _)| i.clone())?;
        // A dying process closes its socket a moment before it is seen to
        // exit: after a transport failure, look a little longer.
        let transport = matches!(
            st.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
        );
        let deadline = Instant::now()
            + if transport {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
        while self.runtime.alive(&id).await {
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let logs = self.runtime.logs(&id, &self.spec, 5).await.join(" | ");
        tracing::warn!(session = %self.id, instance = %id, "instance exited; the next call restarts it");
        let _ = self.runtime.stop(&id).await;
        *inst = None;
        Some(logs)
    }

    /// Stops the instance, unmounts and removes the session directory.
    pub(super) async fn teardown(&self) {
        self.end(None).await;
    }

    /// The teardown of a session released to another edge: its frozen
    /// instance is discarded (never runs again); with `keep`, the volume
    /// (its backing directory, manifest and all) is moved there once the
    /// instance and the shim are gone, instead of being removed.
    pub(super) async fn retire(&self, keep: Option<PathBuf>) {
        if self.discard_instance().await {
            self.end(keep).await;
        }
    }

    /// Discards the instance (frozen, of a released session) at once;
    /// false when it could not be (it stays recorded).
    pub(super) async fn discard_instance(&self) -> bool {
        let mut inst = self.instance.lock().await;
        let Some((id, _)) = inst.as_ref() else {
            return true;
        };
        match self.runtime.discard(id).await {
            Ok(()) => {
                *inst = None;
                true
            }
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "discarding the released instance failed");
                false
            }
        }
    }

    async fn end(&self, keep: Option<PathBuf>) {
        self.set_state(State::Closing);
        if let Some((id, _)) = self.instance.lock().await.take() {
            if let Err(e) = self.runtime.stop(&id).await {
                tracing::error!(session = %self.id, error = %e, "stopping the instance failed");
            }
        }
        crate::runtime::cgroup::remove_instance(&self.spec.edge_id, &self.id).await;
        // Before the shim unmounts: a bind of the volume left there would
        // keep its filesystem alive.
        let standby = self.layout().standby();
        let _ = tokio::task::spawn_blocking(move || standby::remove_dir(&standby)).await;
        if let Some(shim) = self.shim.lock().await.take() {
            shim.unmount().await;
        }
        volume::detach(&self.layout().mnt());
        if let Some(to) = keep {
            let from = self.layout().backing();
            let moved = tokio::task::spawn_blocking(move || {
                if to.exists() {
                    std::fs::remove_dir_all(&to)?;
                }
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::rename(&from, &to)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            if let Err(e) = moved {
                tracing::warn!(session = %self.id, error = %e, "the released volume could not be kept as a staged copy");
            }
        }
        self.gate.send_if_modified(|g| {
            let open = matches!(g, Gate::Open | Gate::Held);
            if open {
                *g = Gate::Gone;
            }
            open
        });
        self.journal.close();
        super::layout::remove_session_dir(&self.dir).await;
    }
}
