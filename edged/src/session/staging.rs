//! The candidate side of pre-copy: copies of sessions other edges serve,
//! staged in `DATA_DIR/staging/SESSION/` from the rounds their owners send
//! (`Peer.Precopy`), a pulled session's starting point.
//!
//! A round is applied as it arrives, verified like any delta, within the
//! edge's staging budget; a full round goes to a fresh copy that replaces
//! the staged one only once whole. At most [`MAX_STAGES`] rounds are staged
//! at once, a round that sends nothing for [`STAGE_IDLE`] is given up, and
//! a session being pulled takes no round. Copies are dropped when the
//! owner says the session went elsewhere, or after `staged_ttl`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::v1 as pb;
use prost::Message;
use tonic::Status;

use super::{Edge, Session};
use crate::incoming::Incoming;
use crate::volume;

/// Pre-copy rounds this edge stages at once.
const MAX_STAGES: usize = 8;

static STAGES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_STAGES);

/// The longest a pre-copy round may send nothing before the staging edge
/// gives it up (and the staging lock with it).
const STAGE_IDLE: Duration = Duration::from_secs(30);

impl Edge {
    /// Candidate side: stages one pre-copy round.
    pub async fn stage(
        self: &Arc<Self>,
        mut stream: tonic::Streaming<pb::PrecopyChunk>,
    ) -> Result<pb::PrecopyAck, Status> {
        // Each round holds a blocking thread for its apply: a bounded few
        // at a time, whatever the neighbours send.
        let Ok(permit) = STAGES.try_acquire() else {
            return Err(Status::unavailable(format!(
                "this edge stages {MAX_STAGES} pre-copy rounds already; try again"
            )));
        };
        let first = tokio::time::timeout(STAGE_IDLE, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("the pre-copy round sent nothing"))??;
        let Some(pb::PrecopyChunk {
            chunk: Some(pb::precopy_chunk::Chunk::Meta(meta)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "a pre-copy stream starts with the session's identity",
            ));
        };
        if !crate::config::valid_name(&meta.session_id) {
            return Err(Status::invalid_argument("bad session id"));
        }
        if self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&meta.session_id)
        {
            return Err(Status::failed_precondition("this edge serves that session"));
        }
        if self.is_leaving(&meta.session_id) {
            // Its released volume is becoming the staged copy: the round
            // is for that copy, a moment from now (nothing was touched).
            return Err(Status::unavailable(
                "this edge is still moving the released session's volume into staging; try again",
            ));
        }
        // A task of its own: should the caller go, the round still ends
        // (its stream breaks, the apply finishes or fails) before the
        // staging lock is let go.
        let edge = self.clone();
        tokio::spawn(async move {
            let r = edge.stage_round(&meta.session_id, stream).await;
            drop(permit);
            r
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    async fn stage_round(
        &self,
        id: &str,
        mut stream: tonic::Streaming<pb::PrecopyChunk>,
    ) -> Result<pb::PrecopyAck, Status> {
        let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
        let lock = self.staging_lock(id);
        let _g = lock.lock().await;
        if self.is_pulling(id) {
            return Err(Status::failed_precondition(
                "a handover of this session is under way",
            ));
        }
        let staged = self.staging_dir(id);
        let vol = staged.join("volume");
        // A full round (against nothing) goes to a fresh copy beside the
        // staged one, which it replaces only once it applied whole.
        let fresh = staged.join("volume.new");
        // Left by a crash in the middle of a full round: not a copy.
        let _ = tokio::fs::remove_dir_all(&fresh).await;
        tokio::fs::create_dir_all(&vol)
            .await
            .map_err(|e| internal(&e))?;
        // The round is applied as it arrives (crate::incoming: never whole
        // in memory, never spooled), within what is left of this edge's
        // staging budget.
        let root = self.cfg.data_dir.join("staging");
        let v = vol.clone();
        let (used, own) = tokio::task::spawn_blocking(move || (dir_bytes(&root), dir_bytes(&v)))
            .await
            .unwrap_or((0, 0));
        let mut room = self.cfg.precopy.staging_budget.saturating_sub(used);
        let mut n = 0u64;
        let mut applying: Option<(Incoming, bool)> = None;
        let received = async {
            // The staging lock is held while the round streams in: a
            // neighbour that stops sending loses it after STAGE_IDLE.
            while let Some(c) = tokio::time::timeout(STAGE_IDLE, stream.message())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "the pre-copy round sent nothing for {}s",
                        STAGE_IDLE.as_secs()
                    ))
                })??
            {
                // Frames only after the identity (anything else would keep
                // the lock without counting against the budget).
                let Some(pb::precopy_chunk::Chunk::Frame(f)) = c.chunk else {
                    return Err(Status::invalid_argument(
                        "a pre-copy stream holds one identity, then delta frames",
                    ));
                };
                let len = f.encoded_len();
                n += (prost::length_delimiter_len(len) + len) as u64;
                if n > room {
                    return Err(Status::resource_exhausted(format!(
                        "this edge's staging budget of {} bytes is full",
                        self.cfg.precopy.staging_budget
                    )));
                }
                if applying.is_none() {
                    let full = matches!(
                        &f.frame,
                        Some(pb::delta_frame::Frame::Header(h))
                            if h.base_root == volfs::Manifest::empty(h.block_size).root()
                    );
                    let target = if full {
                        // It replaces this session's copy: room for it is
                        // what that copy takes, too.
                        room = room.saturating_add(own);
                        tokio::fs::create_dir_all(&fresh)
                            .await
                            .map_err(|e| internal(&e))?;
                        &fresh
                    } else {
                        &vol
                    };
                    applying = Some((Incoming::start(target), full));
                }
                let trailer = matches!(f.frame, Some(pb::delta_frame::Frame::Trailer(_)));
                let (inc, _) = applying.as_mut().expect("started above");
                // A false push: the apply failed already; its error says why.
                if !inc.push(&f).await || trailer {
                    break;
                }
            }
            Ok(())
        }
        .await;
        // Cut short (an error above): the apply sees a truncated delta and
        // changes nothing.
        let Some((inc, full)) = applying else {
            received?;
            return Err(Status::invalid_argument("the pre-copy round held no delta"));
        };
        let report = inc.finish().await;
        let applied = received.and_then(|()| {
            report
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::data_loss(e.to_string()))
        });
        if full {
            if applied.is_ok() {
                // One step: the new copy takes the old one's place (a crash
                // leaves one or the other, whole), then the old one goes.
                volume::exchange(&fresh, &vol).map_err(|e| internal(&e))?;
            }
            let _ = tokio::fs::remove_dir_all(&fresh).await;
        }
        let report = applied?;
        Ok(pb::PrecopyAck {
            root: report.root.to_vec(),
            bytes: n,
        })
    }

    /// Candidate side: drops what is staged for a session.
    pub async fn drop_staged(&self, id: &str) {
        if !crate::config::valid_name(id) {
            return;
        }
        // A released copy still being moved into staging is dropped once
        // it is there (not left behind by a drop that came first).
        self.wait_left(id, Duration::from_secs(60)).await;
        let lock = self.staging_lock(id);
        let _g = lock.lock().await;
        if self.is_pulling(id) {
            // The copy is what a pull under way resumes from.
            return;
        }
        let _ = tokio::fs::remove_dir_all(self.staging_dir(id)).await;
    }

    /// Candidate side: drops staged copies older than the TTL.
    pub async fn prune_staged(&self) {
        let Ok(mut rd) = tokio::fs::read_dir(self.cfg.data_dir.join("staging")).await else {
            return;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            let old = e
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > self.cfg.precopy.staged_ttl);
            if !old {
                continue;
            }
            // Never from under a pull of it, nor a pre-copy round into it.
            let id = e.file_name().to_string_lossy().to_string();
            let pulling = self
                .pulls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id);
            let lock = self.staging_lock(&id);
            let Ok(_staging) = lock.try_lock() else {
                continue;
            };
            if !pulling {
                tracing::info!(staged = %e.path().display(), "dropping an expired staged copy");
                let _ = tokio::fs::remove_dir_all(e.path()).await;
            }
        }
    }
}

impl Edge {
    /// Where a released session's volume is kept as a staged copy, when
    /// pre-copy is on, the new owner `to` is a neighbour (it sends rounds
    /// here) and the copy fits the staging budget.
    pub(super) async fn room_to_keep(&self, s: &Session, to: &str) -> Option<PathBuf> {
        if !self.cfg.precopy.enabled || !self.cfg.neighbours.iter().any(|n| n.id == to) {
            return None;
        }
        let (root, backing) = (self.cfg.data_dir.join("staging"), s.layout().backing());
        let (used, size) = tokio::task::spawn_blocking(move || {
            (dir_bytes(&root), crate::volume::volume_bytes(&backing))
        })
        .await
        .ok()?;
        let fits = used.saturating_add(size) <= self.cfg.precopy.staging_budget;
        if !fits {
            tracing::info!(session = %s.id, size, "the released volume does not fit the staging budget; not kept");
        }
        fits.then(|| self.staging_dir(&s.id).join("volume"))
    }
}

/// Bytes of regular files under `dir` (not following symlinks).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}
