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

use super::migrate::{RELEASE_ANSWER_WAIT, io_status, progress_event};
use super::pull::Pulled;
use super::standby::Standby;
use super::{Edge, Gate, Role, Session, State, peer_status};
use crate::migration::puller::{PullerAction, PullerEvent, PullerState};
use crate::migration::pulling::{self, PullEffects};
use crate::migration::{Attempt, Peer};

/// The real effects of one pull (see [`crate::migration::pulling`]).
struct Taking<'a> {
    edge: &'a Arc<Edge>,
    id: &'a str,
    token: &'a [u8],
    progress: &'a mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    /// The owner, its id as it said in Hello.
    owner: Peer,
    peer: PeerClient<tonic::transport::Channel>,
    /// The app's standby instance, until `promote` adopts it.
    standby: &'a mut Option<Standby>,
    /// What the last `ask_owner` pulled.
    pulled: Option<Pulled>,
    /// The promoted session.
    session: Option<Arc<Session>>,
}

impl Edge {
    // ---- The puller's side ----

    /// Feeds `ev` to the puller machine of session `id`; an idle machine
    /// is forgotten.
    pub(super) fn puller_step(&self, id: &str, ev: PullerEvent) -> Vec<PullerAction> {
        self.puller_step_tagged(id, ev).1
    }

    /// [`Edge::puller_step`], also saying which pull the machine belongs
    /// to (a tag given when it left idle).
    fn puller_step_tagged(&self, id: &str, ev: PullerEvent) -> (u64, Vec<PullerAction>) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let (tag, st) = pulls
            .entry(id.to_string())
            .or_insert_with(|| (crate::migration::new_attempt(), PullerState::Idle));
        let (tag, out) = (*tag, st.step(ev));
        if matches!(st, PullerState::Idle | PullerState::Serving) {
            pulls.remove(id);
        }
        (tag, out)
    }

    /// After a failed pull tagged `tag`: whatever failed before the
    /// release was asked leaves no pull (this one's: a later pull of the
    /// session is not touched; one that awaits its release stays).
    fn end_pull(&self, id: &str, tag: u64) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(pulls.get(id), Some((t, st)) if *t == tag
            && !matches!(st, PullerState::AwaitingRelease { .. }))
        {
            pulls.remove(id);
        }
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
        let (tag, plan) = self.puller_step_tagged(
            id,
            PullerEvent::Begin {
                from: owner.clone(),
            },
        );
        if let Some(PullerAction::Refuse(m)) = plan.first() {
            return Err(Status::aborted(*m));
        }
        let span = tracing::info_span!("take", session = %id, from = %from);
        let mut standby = None;
        let r = self
            .take_inner(id, token, &owner, plan, progress, &mut standby)
            .instrument(span.clone())
            .await;
        // Not adopted (the handover failed before): gone before another
        // pull of the session can start one.
        if let Some(s) = standby.take() {
            s.discard().await;
        }
        if let Err(st) = &r {
            tracing::warn!(parent: &span, error = %st.message(), "handover failed");
            self.end_pull(id, tag);
        }
        r
    }

    async fn take_inner(
        self: &Arc<Self>,
        id: &str,
        token: &[u8],
        claimed: &Peer,
        plan: Vec<PullerAction>,
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
        // From here the machine leads: `drive` performs each action it
        // returns through `Taking` and feeds back what came of it.
        let mut t = Taking {
            edge: self,
            id,
            token,
            progress,
            owner,
            peer,
            standby,
            pulled: None,
            session: None,
        };
        let seen = pulling::drive(&mut t, |ev| self.puller_step(id, ev), plan).await?;
        let Some(pulled) = t.pulled else {
            return Err(Status::internal("served without a pull"));
        };
        // The larger of the two views: from the Quiesced chunk (which may wait
        // behind the live round it follows) and from the owner's hold.
        let down = pulled.quiesced.elapsed().max(seen.unwrap_or_default());
        *self.last_finish.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(pulled.final_at.elapsed());
        tracing::info!(
            downtime_ms = down.as_secs_f64() * 1e3,
            bytes = pulled.bytes,
            "session taken over"
        );
        let ready = progress_event(
            pb::HandoverPhase::Ready,
            pulled.round,
            pulled.bytes,
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
            let (event, released, refusal) = match answer {
                Some(Ok(r)) => {
                    let held = Duration::from_micros(r.into_inner().held_micros)
                        .min(super::pull::MAX_HELD_BEFORE_QUIESCED);
                    let answered = Instant::now();
                    (
                        PullerEvent::ReleaseAnswered { released: true },
                        Some((held, answered - asked, answered)),
                        None,
                    )
                }
                Some(Err(st))
                    if matches!(
                        st.code(),
                        tonic::Code::FailedPrecondition
                            | tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                    ) =>
                {
                    tracing::warn!(session = %id, error = %st.message(), "the old edge refused the release; staging the copy again");
                    (
                        PullerEvent::ReleaseAnswered { released: false },
                        None,
                        Some(st),
                    )
                }
                Some(Err(st)) => {
                    tracing::warn!(session = %id, error = %st.message(), "release not answered; asking again");
                    self.peers.forget(&owner.edge_id, &owner.addr);
                    peer = None;
                    (PullerEvent::ReleaseUnanswered, None, None)
                }
                None => (PullerEvent::ReleaseUnanswered, None, None),
            };
            // What the machine says to the answer, done in order.
            let mut plan = self.puller_step(id, event);
            // The owner's word decides, whatever became of the machine
            // meanwhile: released, this edge serves; refused, the copy
            // here stops.
            if plan.is_empty() && self.awaits_release(id) {
                if released.is_some() {
                    tracing::warn!(session = %id, "released while no pull was recorded; serving");
                    plan = vec![PullerAction::Serve];
                } else if refusal.is_some() {
                    tracing::warn!(session = %id, "refused while no pull was recorded; staging the copy again");
                    plan = vec![
                        PullerAction::Demote,
                        PullerAction::Fail("the old edge gave up the handover".into()),
                    ];
                }
            }
            let mut paused = false;
            for a in plan {
                match a {
                    PullerAction::Serve => {
                        self.serve_pulled(id).await?;
                        // The hold, half the Release's round trip, and the
                        // time from the answer until the calls opened here.
                        return Ok(released.and_then(|(held, rtt, answered)| {
                            (!held.is_zero()).then(|| held + rtt / 2 + answered.elapsed())
                        }));
                    }
                    PullerAction::Demote => self.demote(id).await,
                    PullerAction::Fail(reason) => {
                        let why = refusal
                            .as_ref()
                            .map_or(reason, |st| st.message().to_string());
                        return Err(Status::aborted(format!(
                            "the old edge {} gave up the handover and serves the session: {why}",
                            owner.edge_id
                        )));
                    }
                    PullerAction::AskReleaseLater => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                        paused = true;
                    }
                    other => {
                        tracing::debug!(session = %id, action = ?other, "release answer out of place");
                    }
                }
            }
            // Asked on while the pull or the copy waits for the answer
            // (only the owner's answer decides).
            if !self.is_pulling(id) && !self.awaits_release(id) {
                return Err(Status::aborted(
                    "the pull of this session ended while its release was being asked",
                ));
            }
            if !paused {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// Whether session `id` is here as a copy waiting for its release (by
    /// its persisted role, whatever its machine says).
    fn awaits_release(&self, id: &str) -> bool {
        self.get(id)
            .is_some_and(|s| matches!(s.role(), Role::AwaitingRelease { .. }))
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

impl PullEffects for Taking<'_> {
    async fn ask_owner(&mut self) -> Result<(), (Status, Option<Attempt>)> {
        self.pulled = None;
        let p = self
            .edge
            .pull(
                &mut self.peer,
                self.id,
                self.token,
                &self.owner,
                self.progress,
            )
            .await?;
        self.pulled = Some(p);
        Ok(())
    }

    async fn verify(&mut self) -> Result<(), Status> {
        let Some(p) = self.pulled.as_ref() else {
            return Err(Status::internal("verify before a pull"));
        };
        // The staged volume must be what the old edge sent.
        let vol = self.edge.staging_dir(self.id).join("volume");
        let (have, _) = tokio::task::spawn_blocking(move || volfs::offline::hash(&vol, None))
            .await
            .map_err(io_status)?
            .map_err(io_status)?;
        if have.as_slice() != p.root.as_slice() {
            return Err(Status::data_loss(format!(
                "staged volume hashes to {}, the old edge sent {}",
                volfs::hex(&have),
                volfs::hex(&p.root)
            )));
        }
        self.report(pb::HandoverPhase::Apply).await;
        Ok(())
    }

    async fn promote(&mut self) -> Result<(), Status> {
        self.report(pb::HandoverPhase::Start).await;
        let Some(p) = self.pulled.as_ref() else {
            return Err(Status::internal("promote before a pull"));
        };
        // Become the owner in waiting: session directory (persisted
        // `Starting`), journal, shim, instance with its calls held.
        let standby = self.standby.take();
        let s = self
            .edge
            .promote_and_start(self.id, p, &self.owner, standby)
            .await
            .map_err(|e| e.status())?;
        self.session = Some(s);
        Ok(())
    }

    async fn persist_awaiting(&mut self) -> Result<(), Status> {
        let (Some(s), Some(p)) = (&self.session, &self.pulled) else {
            return Err(Status::internal("no started session to persist"));
        };
        s.set_role(Role::AwaitingRelease {
            attempt: p.attempt,
            from: self.owner.clone(),
        })
        .await
        .map_err(|e| e.status())
    }

    async fn ask_release(&mut self) -> Result<Option<Duration>, Status> {
        let Some(p) = self.pulled.as_mut() else {
            return Err(Status::internal("release asked before a pull"));
        };
        let attempt = p.attempt;
        // The handover stream stays open until the answer: the owner takes
        // its end as this edge giving up.
        let stream = p.stream.take();
        let asking = tokio::spawn({
            let edge = self.edge.clone();
            let (id, token, owner) = (self.id.to_string(), self.token.to_vec(), self.owner.clone());
            let peer = self.peer.clone();
            async move {
                let r = edge
                    .ask_release(&id, &token, &owner, attempt, Some(peer))
                    .await;
                drop(stream);
                r
            }
        });
        match tokio::time::timeout(RELEASE_ANSWER_WAIT, asking).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(io_status(e)),
            Err(_) => Err(Status::unavailable(format!(
                "the old edge {} has not answered the release for {}s; this edge keeps asking and serves the session once it does",
                self.owner.edge_id,
                RELEASE_ANSWER_WAIT.as_secs()
            ))),
        }
    }

    async fn demote(&mut self) {
        self.edge.demote(self.id).await;
    }

    async fn ask_abort(&mut self, attempt: Attempt) {
        self.edge
            .ask_abort(&mut self.peer, self.id, self.token, attempt)
            .await;
    }

    fn forget_owner(&mut self) {
        // The next pull from it connects afresh.
        self.edge
            .peers
            .forget(&self.owner.edge_id, &self.owner.addr);
    }
}

impl Taking<'_> {
    /// Tells the client where the pull is.
    async fn report(&self, phase: pb::HandoverPhase) {
        let Some(p) = &self.pulled else { return };
        let msg = progress_event(
            phase,
            p.round,
            p.bytes,
            p.quiesced.elapsed().as_micros() as u64,
            &self.edge.cfg.edge_id,
        );
        let _ = self.progress.send(Ok(msg)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[tokio::test]
    async fn a_failed_pull_removes_its_own_entry_never_a_later_ones() {
        let d = tempfile::tempdir().unwrap();
        let toml = crate::config::plaintext_default().replace(
            "data_dir = \"/var/lib/edgeshift\"",
            &format!("data_dir = {:?}", d.path().display().to_string()),
        );
        let edge = Edge::new(Config::from_toml(&toml, "test").unwrap()).unwrap();
        let from = Peer {
            edge_id: "a".into(),
            addr: "a:1".into(),
        };
        let begin = || PullerEvent::Begin { from: from.clone() };
        let (first, plan) = edge.puller_step_tagged("s1", begin());
        assert_eq!(plan, [PullerAction::AskOwner]);
        // The first pull fails (its machine goes idle), and a second pull
        // of the session begins before the first one's cleanup runs.
        edge.puller_step("s1", PullerEvent::Failed { reason: "x".into() });
        let (second, plan) = edge.puller_step_tagged("s1", begin());
        assert_eq!(plan, [PullerAction::AskOwner]);
        assert_ne!(first, second);
        edge.end_pull("s1", first);
        assert!(edge.is_pulling("s1"), "the later pull's entry stays");
        // A pull that awaits its release is not ended by its own failure
        // either (the release is asked on; only the owner's answer ends it).
        for ev in [
            PullerEvent::Accepted { attempt: 3 },
            PullerEvent::FinalReceived,
            PullerEvent::Verified,
            PullerEvent::Started,
            PullerEvent::AwaitingPersisted,
        ] {
            edge.puller_step("s1", ev);
        }
        edge.end_pull("s1", second);
        assert!(edge.is_pulling("s1"), "awaiting its release");
        edge.puller_step("s1", PullerEvent::ReleaseAnswered { released: false });
        assert!(!edge.is_pulling("s1"));
        // An ordinary failure ends its own pull.
        let (third, _) = edge.puller_step_tagged("s1", begin());
        edge.end_pull("s1", third);
        assert!(!edge.is_pulling("s1"));
    }
}
