//! The puller becomes the owner in waiting (B): the staged copy is
//! promoted to a session directory (persisted `Starting` before it moves),
//! its volume mounted, its standby instance activated or an instance
//! started, its calls held until the old owner's release. A failure
//! demotes it: the instance and the shim go, and the volume is staged
//! again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pull::Pulled;
use super::standby::{self, Standby};
use super::{Edge, EdgeError, Gate, Layout, Role, Session, SessionRecord};
use crate::journal::Outcome;
use crate::migration::Peer;
use crate::volume;

/// The longest a new edge reads a pulled volume to warm its mount.
const WARM_TIME: Duration = Duration::from_secs(2);

impl Edge {
    /// Makes the staged copy the session directory (persisted `Starting`
    /// before it moves), mounts it, starts the instance with its calls held.
    pub(super) async fn promote_and_start(
        self: &Arc<Self>,
        id: &str,
        p: &Pulled,
        owner: &Peer,
        standby: Option<Standby>,
    ) -> Result<Arc<Session>, EdgeError> {
        let mut standby = match standby {
            // A standby of another app than the one pulled is of no use.
            Some(s) if s.app() != p.meta.app => {
                tracing::warn!(session = %id, named = s.app(), sent = %p.meta.app, "the owner named another app before the handover; the standby is given up");
                s.discard().await;
                None
            }
            s => s,
        };
        let r = self.promote_inner(id, p, owner, &mut standby).await;
        // Not handed on (a failure on the way, or another app): discarded
        // here and now, before a retry could start another.
        if let Some(s) = standby {
            s.discard().await;
        }
        r
    }

    async fn promote_inner(
        self: &Arc<Self>,
        id: &str,
        p: &Pulled,
        owner: &Peer,
        standby: &mut Option<Standby>,
    ) -> Result<Arc<Session>, EdgeError> {
        let staging = self.staging_dir(id);
        let dir = self.sessions_dir().join(id);
        if dir.exists() {
            // Never delete a session directory from an incoming pull.
            return Err(EdgeError::Invalid(format!(
                "a session directory for {id} exists on this edge already"
            )));
        }
        let hash = blake3::Hash::from_hex(&p.meta.token_hash)
            .map_err(|e| EdgeError::Invalid(format!("token hash: {e}")))?;
        let rec = SessionRecord {
            id: id.into(),
            app: p.meta.app.clone(),
            client_id: p.meta.client_id.clone(),
            token_hash: p.meta.token_hash.clone(),
            created: p.meta.created_unix,
            instance: None,
            volfs_pid: None,
            epoch: p.meta.epoch.clamp(1, u64::MAX - 1) + 1,
            role: Role::Starting {
                attempt: p.attempt,
                from: owner.clone(),
            },
        };
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| EdgeError::Io(e.into()))?;
        let record = Layout {
            dir: staging.clone(),
        }
        .record();
        let parent = self.sessions_dir();
        let (st2, dir2) = (staging.clone(), dir.clone());
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            super::write_durable(&record, &json)?;
            std::fs::rename(&st2, &dir2)?;
            super::layout::sync_dir(&parent)
        })
        .await
        .map_err(|e| EdgeError::Io(std::io::Error::other(e)))??;
        tracing::debug!(session = %id, ms = t.elapsed().as_secs_f64() * 1e3, "session record persisted, staged copy promoted");
        let layout = Layout { dir: dir.clone() };
        tokio::fs::create_dir_all(layout.mnt()).await?;
        // The standby's socket directory and log become the session's.
        if let Some(s) = standby.as_ref() {
            if let Err(e) = s.move_into(&layout) {
                tracing::warn!(session = %id, error = %e, "the standby instance could not be adopted");
                if let Some(s) = standby.take() {
                    s.discard().await;
                }
            }
        }
        tokio::fs::create_dir_all(layout.run()).await?;
        let runtime = self.runtime(&p.meta.app).await?;
        let session = Arc::new(self.build_session(&rec, hash, runtime)?);
        session.prepare_socket_dir(self.app(&p.meta.app)?)?;
        for o in &p.ops {
            let out = if o.code == 0 {
                Outcome::Ok(o.payload.clone().into())
            } else {
                Outcome::Err {
                    code: o.code,
                    message: o.message.clone(),
                }
            };
            session.journal.import(o.op_id, out);
        }
        // Listed at once, as moving: a client redirected here early waits.
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), session.clone());
        // The old owner keeps its volume as a staged copy once it released
        // (as of the final delta, which is what was just applied here): the
        // first pre-copy round back to it is a delta from that manifest.
        // Read before the shim mounts, written beside the other held
        // manifests while the instance starts.
        let held_back = {
            // The path alone: opening the backing would take the lock the
            // shim is about to take.
            let manifest = layout
                .backing()
                .join(volfs::scan::META_DIR)
                .join("manifest.pb");
            let to = session
                .dir
                .join("precopy")
                .join(format!("{}.manifest", owner.edge_id));
            tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
                let (t, _) = volfs::manifest::Tracked::load(&manifest)
                    .map_err(|e| e.to_string())?
                    .ok_or("no manifest")?;
                if let Some(dir) = to.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                }
                std::fs::write(&to, t.manifest.to_bytes()).map_err(|e| e.to_string())?;
                Ok(to)
            })
        };
        let started = self
            .mount_and_start(&session, &layout, standby.take())
            .await;
        // Awaited also on a failure: it must not write into a session
        // directory the failure is about to remove.
        let held = held_back.await.map_err(|e| e.to_string()).and_then(|r| r);
        started?;
        match held {
            Ok(file) => session
                .precopy
                .lock()
                .await
                .assume_held(&owner.edge_id, file),
            // The first round back then sends the whole volume.
            Err(e) => tracing::debug!(session = %id, error = %e, "the final manifest was not kept"),
        }
        Ok(session)
    }

    /// Mounts a pulled session's volume and activates its standby instance,
    /// or starts one, warming the mount meanwhile.
    async fn mount_and_start(
        &self,
        session: &Session,
        layout: &Layout,
        standby: Option<Standby>,
    ) -> Result<(), EdgeError> {
        let t = Instant::now();
        if let Err(e) = self.mount_volume(session).await {
            if let Some(s) = standby {
                s.discard().await;
            }
            return Err(e);
        }
        let id = &session.id;
        tracing::debug!(session = %id, ms = t.elapsed().as_secs_f64() * 1e3, "pulled volume mounted");
        if let Some(s) = standby {
            // Not warmed: the activated app reads at once, and a warming
            // pass beside it made its first calls and its readiness slower
            // (gapbench: downtime p50 67 ms warmed, 42 ms not).
            let t = Instant::now();
            match session.adopt_standby(&self.cfg, s).await {
                Ok(_) => {
                    tracing::debug!(session = %id, ms = t.elapsed().as_secs_f64() * 1e3, "standby activated and answering");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "the standby instance did not take over; starting one");
                    self.standby_failed_now(&session.app);
                }
            }
        }
        // While the instance starts: the mount's page cache filled with the
        // newest files (not waited for; bounded in bytes and time).
        let (backing, mnt) = (layout.backing(), layout.mnt());
        let (budget, sid) = (self.cfg.handover.warm_bytes, id.to_string());
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            match volume::warm(&backing, &mnt, budget, t + WARM_TIME) {
                Ok(w) => tracing::debug!(
                    session = %sid,
                    bytes = w.bytes,
                    files = w.files,
                    ms = t.elapsed().as_millis() as u64,
                    "volume warmed"
                ),
                Err(e) => tracing::debug!(session = %sid, error = %e, "volume not warmed"),
            }
        });
        session.ensure_running(&self.cfg).await?;
        Ok(())
    }

    /// Undoes a promotion: stops the instance and the shim, tells held calls
    /// to go back to the owner, and keeps only the volume, staged again.
    pub(super) async fn demote(&self, id: &str) {
        let s = self
            .sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let dir = self.sessions_dir().join(id);
        let staging = self.staging_dir(id);
        if let Some(s) = &s {
            if let Role::Starting { from, .. } | Role::AwaitingRelease { from, .. } = s.role() {
                s.set_gate(Gate::Moved(from));
            }
            if let Some((iid, _)) = s.instance.lock().await.take() {
                let _ = s.runtime.stop(&iid).await;
            }
            let standby = s.layout().standby();
            let _ = tokio::task::spawn_blocking(move || standby::remove_dir(&standby)).await;
            if let Some(shim) = s.shim.lock().await.take() {
                shim.unmount().await;
            }
            s.journal.close();
        }
        volume::detach(&dir.join("mnt"));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let _ = tokio::fs::create_dir_all(&staging).await;
        if tokio::fs::rename(dir.join("volume"), staging.join("volume"))
            .await
            .is_err()
        {
            tracing::warn!(session = %id, "could not keep the pulled volume staged");
        }
        super::layout::remove_session_dir(&dir).await;
    }
}
