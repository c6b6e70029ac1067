//! The puller's side of a handover (B): the async shell around
//! [`PullerState`]. B learns the session's app from the owner and starts
//! its standby instance (`standby`), asks the owner for the session with
//! the manifest of its staged copy, applies each round to that copy (every
//! block and the root hash verified), promotes the copy to a session
//! directory and activates the standby or starts an instance with its
//! calls held (`promote`), persists `AwaitingRelease` and asks the owner
//! to release that attempt, keeping the handover stream open until the
//! answer. Released: it serves. Refused: the instance stops and the copy
//! is staged again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::peer_client::PeerClient;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use super::migrate::{PULL_ATTEMPTS, RELEASE_ANSWER_WAIT, io_status, progress_event};
use super::standby::Standby;
use super::{Edge, Gate, Role, State, peer_status};
use crate::migration::puller::{PullerAction, PullerEvent, PullerState};
use crate::migration::{Attempt, Peer};

impl Edge {
    // ---- The puller's side ----

    /// Feeds `ev` to the puller machine of session `id`; an idle machine
    /// is forgotten.
    pub(super) fn puller_step(&self, id: &str, ev: PullerEvent) -> Vec<PullerAction> {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let st = pulls.entry(id.to_string()).or_insert(PullerState::Idle);
        let out = st.step(ev);
        if matches!(st, PullerState::Idle | PullerState::Serving) {
            pulls.remove(id);
        }
        out
    }

    /// Whether session `id` is being pulled here.
    pub(super) fn is_pulling(&self, id: &str) -> bool {
        self.pulls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// B side: pulls session `id` from the edge at `from` and serves it.
    pub async fn take(
        self: &Arc<Self>,
        id: &str,
        token: &[u8],
        from_edge: &str,
        from: &str,
        progress: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<(), Status> {
        if !crate::config::valid_name(id) {
            return Err(Status::invalid_argument("bad session id"));
        }
        // Refused before any network call.
        {
            let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
            if sessions.contains_key(id) {
                return Err(Status::already_exists(
                    "this edge already serves the session",
                ));
            }
            // Pulls under way count: each may run a standby instance (a
            // pulled session waiting for its release is counted once).
            let pulling = self
                .pulls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .filter(|k| !sessions.contains_key(*k))
                .count();
            if sessions.len() + pulling >= self.cfg.max_sessions {
                return Err(Status::resource_exhausted(format!(
                    "this edge serves its limit of {} sessions",
                    self.cfg.max_sessions
                )));
            }
        }
        // The session may come back while its last copy here is still
        // being torn down: wait for the directory to go.
        if !self.wait_left(id, Duration::from_secs(60)).await {
            return Err(Status::unavailable(
                "this edge is still removing its earlier copy of the session; try again",
            ));
        }
        if self.sessions_dir().join(id).exists() {
            return Err(Status::unavailable(
                "an earlier copy of the session is still on this edge (being removed); try again",
            ));
        }
        // Also without TLS: the id names files (the held manifest).
        if !crate::pki::valid_label(from_edge) {
            return Err(Status::invalid_argument(
                "the handover names no valid id of the edge serving the session (from_edge)",
            ));
        }
        let owner = Peer {
            edge_id: from_edge.to_string(),
            addr: from.to_string(),
        };
        if let Some(PullerAction::Refuse(m)) = self
            .puller_step(
                id,
                PullerEvent::Begin {
                    from: owner.clone(),
                },
            )
            .first()
        {
            return Err(Status::aborted(*m));
        }
        let span = tracing::info_span!("take", session = %id, from = %from);
        let mut standby = None;
        let r = self
            .take_inner(id, token, &owner, progress, &mut standby)
            .instrument(span.clone())
            .await;
        // Not adopted (the handover failed before): gone before another
        // pull of the session can start one.
        if let Some(s) = standby.take() {
            s.discard().await;
        }
        if let Err(st) = &r {
            tracing::warn!(parent: &span, error = %st.message(), "handover failed");
            // Whatever failed before the release was asked leaves no pull.
            let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
            if !matches!(pulls.get(id), Some(PullerState::AwaitingRelease { .. })) {
                pulls.remove(id);
            }
        }
        r
    }

    async fn take_inner(
        self: &Arc<Self>,
        id: &str,
        token: &[u8],
        claimed: &Peer,
        progress: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
        standby: &mut Option<Standby>,
    ) -> Result<(), Status> {
        let from = claimed.addr.as_str();
        // Under TLS the handshake proves the peer is `claimed.edge_id`
        // before this edge sends anything.
        let mut peer = self.peers.dial(&claimed.edge_id, from).await?;
        let hello = peer
            .hello(pb::HelloRequest {
                version: edge_proto::PEER_VERSION,
                edge_id: self.cfg.edge_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(|st| peer_status("handover", from, st))?
            .into_inner();
        if hello.version != edge_proto::PEER_VERSION {
            return Err(Status::failed_precondition(format!(
                "the old edge speaks peer protocol v{}, this edge v{}",
                hello.version,
                edge_proto::PEER_VERSION
            )));
        }
        if !claimed.edge_id.is_empty() && hello.edge_id != claimed.edge_id {
            return Err(Status::failed_precondition(format!(
                "the edge at {from} is {:?}, not {:?} as the handover says",
                hello.edge_id, claimed.edge_id
            )));
        }
        let owner = Peer {
            edge_id: hello.edge_id.clone(),
            addr: from.to_string(),
        };
        // The app's standby instance starts, and sets itself up, before the
        // handover begins: the owner serves on meanwhile, and the downtime
        // holds no instance start. The owner names the app to a holder of
        // the token, asked once the owner's id is checked (in plaintext
        // too, where no handshake proved it).
        let wants_standby = self.cfg.apps.values().any(|a| a.standby);
        let named = match wants_standby {
            false => String::new(),
            true => peer
                .hello(pb::HelloRequest {
                    version: edge_proto::PEER_VERSION,
                    edge_id: self.cfg.edge_id.clone(),
                    session_id: id.to_string(),
                    token: token.to_vec(),
                })
                .await
                .map(|r| r.into_inner().app)
                .unwrap_or_default(),
        };
        if crate::config::valid_name(&named) {
            *standby = self.standby_ready(id, &named).await;
        }
        // A block that does not hash to its name (damaged in transit) fails
        // its round; the old edge serves on (abort) and the pull starts again
        // from what is staged, so the damaged blocks are sent again.
        let mut tries = 0;
        let pulled = loop {
            tries += 1;
            match self.pull(&mut peer, id, token, &owner, progress).await {
                Ok(p) => break p,
                Err((st, attempt)) => {
                    if let Some(attempt) = attempt {
                        self.ask_abort(&mut peer, id, token, attempt).await;
                    }
                    self.puller_step(
                        id,
                        PullerEvent::Failed {
                            reason: st.message().to_string(),
                        },
                    );
                    if st.code() == tonic::Code::Unavailable {
                        // The old edge stopped answering: the next pull
                        // from it connects afresh.
                        self.peers.forget(&owner.edge_id, &owner.addr);
                    }
                    if st.code() == tonic::Code::DataLoss && tries < PULL_ATTEMPTS {
                        tracing::warn!(error = %st.message(), tries, "damaged in transit; pulling again");
                        self.puller_step(
                            id,
                            PullerEvent::Begin {
                                from: owner.clone(),
                            },
                        );
                        continue;
                    }
                    return Err(st);
                }
            }
        };
        self.puller_step(id, PullerEvent::Verified);
        let (round, bytes, quiesced, final_at) =
            (pulled.round, pulled.bytes, pulled.quiesced, pulled.final_at);
        let report = |phase| {
            let msg = progress_event(
                phase,
                round,
                bytes,
                quiesced.elapsed().as_micros() as u64,
                &self.cfg.edge_id,
            );
            let tx = progress.clone();
            async move {
                let _ = tx.send(Ok(msg)).await;
            }
        };
        // Become the owner in waiting: session directory (persisted
        // `Starting`), journal, shim, instance with its calls held.
        report(pb::HandoverPhase::Start).await;
        let standby = standby.take();
        let session = match self.promote_and_start(id, &pulled, &owner, standby).await {
            Ok(s) => s,
            Err(e) => {
                self.puller_step(
                    id,
                    PullerEvent::Failed {
                        reason: e.to_string(),
                    },
                );
                self.demote(id).await;
                self.ask_abort(&mut peer, id, token, pulled.attempt).await;
                return Err(e.status());
            }
        };
        self.puller_step(id, PullerEvent::Started);
        // Persisted before asking: after a crash this edge asks again.
        if let Err(e) = session
            .set_role(Role::AwaitingRelease {
                attempt: pulled.attempt,
                from: owner.clone(),
            })
            .await
        {
            self.puller_step(id, PullerEvent::ReleaseAnswered { released: false });
            self.demote(id).await;
            self.ask_abort(&mut peer, id, token, pulled.attempt).await;
            return Err(e.status());
        }
        let asking = tokio::spawn({
            let edge = self.clone();
            let (id, token, owner) = (id.to_string(), token.to_vec(), owner.clone());
            let attempt = pulled.attempt;
            let stream = pulled.stream;
            async move {
                let r = edge
                    .ask_release(&id, &token, &owner, attempt, Some(peer))
                    .await;
                drop(stream);
                r
            }
        });
        let t_ask = Instant::now();
        let seen = match tokio::time::timeout(RELEASE_ANSWER_WAIT, asking).await {
            Ok(Ok(Ok(seen))) => seen,
            Ok(Ok(Err(st))) => return Err(st),
            Ok(Err(e)) => return Err(io_status(e)),
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the old edge {} has not answered the release for {}s; this edge keeps asking and serves the session once it does",
                    owner.edge_id,
                    RELEASE_ANSWER_WAIT.as_secs()
                )));
            }
        };
        // The larger of the two views: from the Quiesced chunk (which may wait
        // behind the live round it follows) and from the owner's hold.
        let down = quiesced.elapsed().max(seen.unwrap_or_default());
        *self.last_finish.lock().unwrap_or_else(|p| p.into_inner()) = Some(final_at.elapsed());
        tracing::debug!(session = %id, ms = t_ask.elapsed().as_secs_f64() * 1e3, "release answered");
        tracing::info!(
            downtime_ms = down.as_secs_f64() * 1e3,
            bytes,
            "session taken over"
        );
        let ready = progress_event(
            pb::HandoverPhase::Ready,
            round,
            bytes,
            down.as_micros() as u64,
            &self.cfg.edge_id,
        );
        let _ = progress.send(Ok(ready)).await;
        Ok(())
    }

    /// Asks the old owner to release attempt `attempt` until it answers:
    /// released → serve; refused → the copy is staged again. Serving, it
    /// returns the downtime the client saw, when the owner said how long
    /// it held the calls: that hold, half the round trip of the Release,
    /// and the time from its answer until the calls open here.
    pub(super) async fn ask_release(
        self: &Arc<Self>,
        id: &str,
        token: &[u8],
        owner: &Peer,
        attempt: Attempt,
        mut peer: Option<PeerClient<tonic::transport::Channel>>,
    ) -> Result<Option<Duration>, Status> {
        let mut pause = Duration::from_millis(50);
        loop {
            if peer.is_none() {
                peer = self.peers.dial(&owner.edge_id, &owner.addr).await.ok();
            }
            let asked = Instant::now();
            let answer = match peer.as_mut() {
                Some(p) => Some(
                    p.release(pb::ReleaseRequest {
                        session_id: id.into(),
                        token: token.to_vec(),
                        attempt,
                        from_edge: self.cfg.edge_id.clone(),
                    })
                    .await,
                ),
                None => None,
            };
            match answer {
                Some(Ok(r)) => {
                    let answered = Instant::now();
                    let held = Duration::from_micros(r.into_inner().held_micros)
                        .min(super::pull::MAX_HELD_BEFORE_QUIESCED);
                    self.puller_step(id, PullerEvent::ReleaseAnswered { released: true });
                    self.serve_pulled(id).await?;
                    return Ok((!held.is_zero())
                        .then(|| held + (answered - asked) / 2 + answered.elapsed()));
                }
                Some(Err(st))
                    if matches!(
                        st.code(),
                        tonic::Code::FailedPrecondition
                            | tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                    ) =>
                {
                    self.puller_step(id, PullerEvent::ReleaseAnswered { released: false });
                    tracing::warn!(session = %id, error = %st.message(), "the old edge refused the release; staging the copy again");
                    self.demote(id).await;
                    return Err(Status::aborted(format!(
                        "the old edge {} gave up the handover and serves the session: {}",
                        owner.edge_id,
                        st.message()
                    )));
                }
                Some(Err(st)) => {
                    tracing::warn!(session = %id, error = %st.message(), "release not answered; asking again");
                    self.peers.forget(&owner.edge_id, &owner.addr);
                    peer = None;
                }
                None => {}
            }
            self.puller_step(id, PullerEvent::ReleaseUnanswered);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// The release came: persist `Serving` (one epoch more than the old
    /// owner's), forget any tombstone of an earlier stay, open the calls.
    async fn serve_pulled(&self, id: &str) -> Result<(), Status> {
        let s = self
            .get(id)
            .ok_or_else(|| Status::internal("pulled session vanished"))?;
        s.set_role(Role::Serving).await.map_err(|e| e.status())?;
        if self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
        {
            self.tombstones.remove(id);
        }
        s.set_state(State::Serving);
        s.set_gate(Gate::Open);
        Ok(())
    }

    async fn ask_abort(
        &self,
        peer: &mut PeerClient<tonic::transport::Channel>,
        id: &str,
        token: &[u8],
        attempt: Attempt,
    ) {
        let r = peer
            .abort(pb::ReleaseRequest {
                session_id: id.into(),
                token: token.to_vec(),
                attempt,
                from_edge: self.cfg.edge_id.clone(),
            })
            .await;
        if let Err(st) = r {
            tracing::debug!(session = %id, error = %st.message(), "abort not delivered (the old edge's timer will end the attempt)");
        }
    }
}
