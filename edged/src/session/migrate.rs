//! Handover of a session between edges: the async shells around the two
//! state machines of [`crate::migration`].
//!
//! B (the edge the client moved to) pulls: the client asks B
//! (`Edge.Handover`), B asks A (`Peer.Handover`) with the manifest it
//! already holds for the session. A's [`OwnerState`] accepts one puller at a
//! time and names the attempt; A streams one live round while the app runs,
//! holds new calls, waits for running ops, freezes the instance (persisted
//! first) and streams the final delta and the op results. B applies each
//! round to its staged copy (every block and the root hash verified),
//! promotes the copy to a session directory (persisted `Starting`), starts
//! the instance with its calls held, persists `AwaitingRelease` and asks A
//! to `Release` that attempt. A persists the tombstone, answers, redirects
//! its held calls to B and tears down. Until that answer A owns the
//! session: any failure makes B `Abort` (or A's timer fires) and A thaws and
//! serves on; a retry resumes from what B staged.
//!
//! The owner's shell is `session/give.rs`, the puller's `session/take.rs`;
//! this file holds what both use and the operator's moves (`Admin.Migrate`
//! on the owner, `Peer.Adopt` on the new edge).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::{Edge, EdgeError, Session, peer_status};

/// How long the client's handover waits for the old edge to answer the
/// release before it is told so (the new edge keeps asking).
pub const RELEASE_ANSWER_WAIT: Duration = Duration::from_secs(30);

pub(super) fn io_status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

pub(super) fn progress_event(
    phase: pb::HandoverPhase,
    round: u32,
    bytes: u64,
    down: u64,
    edge: &str,
) -> pb::HandoverProgress {
    pb::HandoverProgress {
        phase: phase as i32,
        round,
        bytes_received: bytes,
        downtime_micros: down,
        edge_id: edge.to_string(),
        ..Default::default()
    }
}

impl Edge {
    /// Whether a released copy of session `id` is still being torn down.
    pub(super) fn is_leaving(&self, id: &str) -> bool {
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|rx| !*rx.borrow())
    }

    /// Waits up to `limit` for the teardown of a released copy of `id`;
    /// true when none is under way (any more).
    pub(super) async fn wait_left(&self, id: &str, limit: Duration) -> bool {
        let rx = self
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        match rx {
            Some(mut done) => tokio::time::timeout(limit, done.wait_for(|d| *d))
                .await
                .is_ok(),
            None => true,
        }
    }

    pub(super) fn staging_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("staging").join(id)
    }
}

impl Edge {
    /// The staging lock of a session.
    pub(super) fn staging_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.staging_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// The app of session `id`, when this edge owns it and `token` (or a
    /// ticket) is its own.
    pub fn app_for_peer(&self, id: &str, token: &[u8]) -> Option<String> {
        let s = self.session_for_peer(id, token).ok()?;
        (s.role() == super::Role::Serving).then(|| s.app.clone())
    }

    /// The session, for a peer: the client's token, or the one-time ticket
    /// of an operator-started move.
    pub(super) fn session_for_peer(
        &self,
        id: &str,
        token: &[u8],
    ) -> Result<Arc<Session>, EdgeError> {
        match self.session(id, token) {
            Err(EdgeError::BadToken(_)) => {
                let ok = self
                    .tickets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .is_some_and(|t| *t == blake3::hash(token));
                if !ok {
                    return Err(EdgeError::BadToken(id.to_string()));
                }
                self.get(id)
                    .ok_or_else(|| EdgeError::UnknownSession(id.to_string()))
            }
            r => r,
        }
    }

    /// Operator side (the owner): checks that session `id` can be moved to
    /// neighbour `to`, then moves it in the background, relaying the new
    /// edge's progress to `progress`.
    pub fn migrate(
        self: &Arc<Self>,
        id: &str,
        to: &str,
        progress: mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<(), Status> {
        let n = self
            .cfg
            .neighbours
            .iter()
            .find(|n| n.id == to)
            .ok_or_else(|| {
                Status::invalid_argument(format!("{to:?} is not a neighbour of this edge"))
            })?;
        let s = self
            .get(id)
            .ok_or_else(|| EdgeError::UnknownSession(id.to_string()).status())?;
        if s.role() != super::Role::Serving || s.state() != super::State::Serving {
            return Err(Status::failed_precondition(format!(
                "session {id} is not owned by this edge yet (its handover here is not finished)"
            )));
        }
        let ticket: [u8; 32] = super::random_bytes();
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), blake3::hash(&ticket));
        tracing::info!(session = %id, to = %to, "operator moves the session");
        let (edge, id, to, addr) = (self.clone(), id.to_string(), to.to_string(), n.addr.clone());
        tokio::spawn(async move {
            let r = async {
                let mut p = edge.peers.dial(&to, &addr).await?;
                let mut stream = p
                    .adopt(pb::AdoptRequest {
                        session_id: id.clone(),
                        ticket: ticket.to_vec(),
                        from_addr: edge.cfg.advertised(),
                    })
                    .await?
                    .into_inner();
                while let Some(ev) = stream.message().await? {
                    let _ = progress.send(Ok(ev)).await;
                }
                Ok::<_, Status>(())
            }
            .await;
            edge.tickets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Err(st) = r {
                let _ = progress.send(Err(peer_status("move", &to, st))).await;
            }
        });
        Ok(())
    }

    /// New-edge side of an operator's move: pull with the ticket, streaming
    /// the progress back to the owner.
    pub fn adopt(
        self: &Arc<Self>,
        from: String,
        req: pb::AdoptRequest,
        progress: mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) {
        let edge = self.clone();
        tokio::spawn(async move {
            if let Err(st) = edge
                .take(
                    &req.session_id,
                    &req.ticket,
                    &from,
                    &req.from_addr,
                    &progress,
                )
                .await
            {
                let _ = progress.send(Err(st)).await;
            }
        });
    }
}
