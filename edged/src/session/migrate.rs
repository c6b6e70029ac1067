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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::handover_chunk::Chunk;
use edge_proto::v1::peer_client::PeerClient;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use super::{
    Edge, EdgeError, Gate, Layout, Role, Session, SessionRecord, State, Tombstone, now_unix,
    peer_status,
};
use crate::journal::Outcome;
use crate::migration::owner::{OwnerAction, OwnerEvent, OwnerState, OwnerTimer, Persist, Refusal};
use crate::migration::puller::{PullerAction, PullerEvent, PullerState};
use crate::migration::{Attempt, Peer, new_attempt};
use crate::volume;

/// How often the new edge pulls when what arrives is damaged.
pub const PULL_ATTEMPTS: u32 = 3;

/// How long the client's handover waits for the old edge to answer the
/// release before it is told so (the new edge keeps asking).
pub const RELEASE_ANSWER_WAIT: Duration = Duration::from_secs(30);

fn io_status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Reads the length-delimited frames of a delta file.
fn frames(bytes: &[u8]) -> Result<Vec<pb::DeltaFrame>, Status> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        out.push(pb::DeltaFrame::decode_length_delimited(&mut rest).map_err(io_status)?);
    }
    Ok(out)
}

fn progress_event(
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
    }
}

/// A peer client to `addr` with the limits of a delta stream.
pub(super) async fn peer_client(
    addr: &str,
) -> Result<PeerClient<tonic::transport::Channel>, Status> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ch = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("bad edge address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| {
            Status::unavailable(format!(
                "edge at {addr} does not answer ({e}); is it running?"
            ))
        })?;
    Ok(PeerClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// What a pull brought: everything needed to start serving.
struct Pulled {
    /// The handover stream, kept open until the release is answered: the
    /// owner takes its end as the puller giving up.
    stream: tonic::Streaming<pb::HandoverChunk>,
    meta: pb::SessionMeta,
    ops: Vec<pb::OpResult>,
    attempt: Attempt,
    quiesced: Instant,
    bytes: u64,
    round: u32,
}

impl Edge {
    pub(super) fn staging_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("staging").join(id)
    }

    // ---- The owner's side ----

    /// Feeds `ev` to the session's owner machine and performs the actions
    /// that touch the session (persist, freeze, thaw, the call gate, timers,
    /// teardown) under its lock, in order. A failing action drops the rest
    /// of its step and feeds `Failed`. Returns the actions left to the
    /// caller: the streaming work and the answers.
    pub(super) async fn owner_event(
        self: &Arc<Self>,
        s: &Arc<Session>,
        ev: OwnerEvent,
    ) -> Vec<OwnerAction> {
        let mut st = s.owner.lock().await;
        let mut out = Vec::new();
        let mut next = Some(ev);
        while let Some(ev) = next.take() {
            let before = st.clone();
            let attempt = st.attempt();
            let actions = st.step(ev);
            for a in actions {
                let failed = match &a {
                    OwnerAction::Persist(p) => self.persist_owner(s, p).await.err(),
                    OwnerAction::Freeze => s.freeze().await.err(),
                    OwnerAction::Thaw => {
                        s.thaw().await;
                        None
                    }
                    OwnerAction::HoldCalls => {
                        s.set_gate(Gate::Held);
                        s.journal.hold_new();
                        None
                    }
                    OwnerAction::ResumeCalls => {
                        s.journal.admit_new();
                        s.set_gate(Gate::Open);
                        None
                    }
                    OwnerAction::RedirectCalls(to) => {
                        s.set_gate(Gate::Moved(to.clone()));
                        None
                    }
                    OwnerAction::Arm {
                        attempt,
                        timer,
                        after,
                    } => {
                        self.arm(s, *attempt, *timer, *after);
                        None
                    }
                    OwnerAction::Teardown => {
                        self.teardown_released(s, st.peer().map(|p| p.edge_id.clone()));
                        None
                    }
                    OwnerAction::RefusePull(_)
                    | OwnerAction::SendLive
                    | OwnerAction::WaitOps
                    | OwnerAction::SendFinal
                    | OwnerAction::Reply(_) => {
                        out.push(a.clone());
                        None
                    }
                };
                if let Some(reason) = failed {
                    tracing::error!(session = %s.id, state = st.name(), error = %reason, "handover step failed");
                    if let (
                        OwnerAction::Persist(Persist::Released { .. }),
                        OwnerState::FinalSent { .. },
                    ) = (&a, &before)
                    {
                        // Not released after all: the puller may ask again.
                        *st = before;
                        out.push(OwnerAction::Reply(Err(Refusal::NotGiving)));
                    } else if let Some(attempt) = attempt.or(st.attempt()) {
                        next = Some(OwnerEvent::Failed { attempt, reason });
                    }
                    break;
                }
            }
        }
        out
    }

    async fn persist_owner(&self, s: &Session, p: &Persist) -> Result<(), String> {
        match p {
            Persist::Frozen { attempt, to } => s
                .set_role(Role::Frozen {
                    attempt: *attempt,
                    to: to.clone(),
                })
                .await
                .map_err(|e| e.to_string()),
            Persist::Serving => s.set_role(Role::Serving).await.map_err(|e| e.to_string()),
            Persist::Released { attempt, to } => {
                let t = Tombstone {
                    to: to.clone(),
                    attempt: *attempt,
                    epoch: s.epoch.load(Ordering::SeqCst),
                    at: now_unix(),
                };
                let (store, id, t2) = (self.tombstones.clone(), s.id.clone(), t.clone());
                tokio::task::spawn_blocking(move || store.put(&id, &t2))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("persisting the tombstone: {e}"))?;
                self.released
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(s.id.clone(), t);
                Ok(())
            }
        }
    }

    /// A timer of an attempt; it holds the session weakly (a released
    /// session is freed at once).
    fn arm(
        self: &Arc<Self>,
        s: &Arc<Session>,
        attempt: Attempt,
        timer: OwnerTimer,
        after: Duration,
    ) {
        let (edge, weak) = (self.clone(), Arc::downgrade(s));
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(s) = weak.upgrade() {
                if !edge
                    .owner_event(&s, OwnerEvent::Timer { attempt, timer })
                    .await
                    .is_empty()
                {
                    tracing::debug!(session = %s.id, "timer left work undone");
                }
                tracing::debug!(session = %s.id, attempt, ?timer, "handover timer fired");
            }
        });
    }

    /// The session is the new owner's: forget it here and clean up behind
    /// (the teardown is not part of anyone's downtime).
    fn teardown_released(self: &Arc<Self>, s: &Arc<Session>, to: Option<String>) {
        {
            let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            if map.get(&s.id).is_some_and(|x| Arc::ptr_eq(x, s)) {
                map.remove(&s.id);
            }
        }
        let gone = s.clone();
        tokio::spawn(async move { gone.teardown().await });
        self.tell_candidates_to_drop(&s.id, to.as_deref().unwrap_or(""));
        tracing::info!(session = %s.id, to = ?to, "released to the new edge");
    }

    /// A side: streams session `req.session_id` to the edge that asked.
    pub async fn give(
        self: &Arc<Self>,
        req: pb::PeerHandoverRequest,
        tx: mpsc::Sender<Result<pb::HandoverChunk, Status>>,
    ) {
        let s = match self.session_for_peer(&req.session_id, &req.token) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.status())).await;
                return;
            }
        };
        let attempt = new_attempt();
        let to = Peer {
            edge_id: req.to_edge.clone(),
            addr: req.to_addr.clone(),
        };
        let span = tracing::info_span!("give", session = %s.id, to = %to.edge_id, attempt);
        let acts = self.owner_event(&s, OwnerEvent::Pull { attempt, to }).await;
        if let Some(OwnerAction::RefusePull(r)) = acts.first() {
            let msg = match r {
                Refusal::Moving(p) => format!(
                    "session {} is being handed over to edge {} already",
                    s.id, p.edge_id
                ),
                Refusal::Moved(p) => format!("session {} moved to edge {}", s.id, p.edge_id),
                Refusal::NotGiving => "refused".to_string(),
            };
            tracing::info!(parent: &span, "{msg}; pull refused");
            let _ = tx
                .send(Err(EdgeError::Refused(msg, r.clone()).status()))
                .await;
            return;
        }
        if !acts.contains(&OwnerAction::SendLive) {
            let _ = tx.send(Err(Status::aborted("handover not started"))).await;
            return;
        }
        tracing::info!(parent: &span, "handover requested");
        let r = self
            .give_attempt(&s, attempt, &req, &tx)
            .instrument(span.clone())
            .await;
        if let Err(st) = r {
            tracing::warn!(parent: &span, error = %st.message(), "handover given up; serving on");
            self.owner_event(
                &s,
                OwnerEvent::Failed {
                    attempt,
                    reason: st.message().to_string(),
                },
            )
            .await;
            let _ = tx.send(Err(st)).await;
        }
    }

    async fn give_attempt(
        self: &Arc<Self>,
        s: &Arc<Session>,
        attempt: Attempt,
        req: &pb::PeerHandoverRequest,
        tx: &mpsc::Sender<Result<pb::HandoverChunk, Status>>,
    ) -> Result<(), Status> {
        // No pre-copy round of this session may run during the handover
        // (it would change what the new edge holds under its feet).
        let _precopy = s.precopy.lock().await;
        let send = |c: Chunk| async {
            tx.send(Ok(pb::HandoverChunk { chunk: Some(c) }))
                .await
                .map_err(|_| Status::cancelled("the new edge went away"))
        };
        let given_up = || Status::aborted("the handover was given up (aborted or timed out)");
        let tmp = tempfile_dir(&s.dir)?;
        send(Chunk::Meta(pb::SessionMeta {
            session_id: s.id.clone(),
            app: s.app.clone(),
            client_id: s.client_id.clone(),
            token_hash: s.token_hash.to_hex().to_string(),
            created_unix: s.created,
            block_size: self.cfg.block_size,
            attempt,
            epoch: s.epoch.load(Ordering::SeqCst),
        }))
        .await?;
        let backing = s.layout().backing();
        // Round 1, live: what B lacks of the volume as it is now.
        let base = if req.held_manifest.is_empty() {
            "-".to_string()
        } else {
            let p = tmp.join("held.manifest");
            std::fs::write(&p, &req.held_manifest).map_err(io_status)?;
            p.display().to_string()
        };
        let round = |n: u32, base: String| {
            let backing = backing.clone();
            let tmp = tmp.clone();
            async move {
                let out = tmp.join(format!("round{n}.delta"));
                let result = tmp.join(format!("round{n}.manifest"));
                volume::control(
                    &backing,
                    &format!("diff {} {base} {}", out.display(), result.display()),
                )
                .await
                .map_err(io_status)?;
                let bytes = tokio::fs::read(&out).await.map_err(io_status)?;
                Ok::<_, Status>((frames(&bytes)?, result))
            }
        };
        let (f1, held1) = round(1, base).await?;
        for f in f1 {
            send(Chunk::Frame(f)).await?;
        }
        // Quiesce: new calls are held; running ones finish.
        let acts = self.owner_event(s, OwnerEvent::LiveSent { attempt }).await;
        if !acts.contains(&OwnerAction::WaitOps) {
            return Err(given_up());
        }
        let t = Instant::now();
        while s.journal.has_running() {
            if s.owner.lock().await.attempt() != Some(attempt) {
                return Err(given_up());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let waited = t.elapsed();
        // Persist "frozen", freeze the instance (it keeps its state and can
        // go on if the move fails).
        let acts = self
            .owner_event(s, OwnerEvent::OpsDrained { attempt })
            .await;
        if !acts.contains(&OwnerAction::SendFinal) {
            return Err(given_up());
        }
        send(Chunk::Quiesced(pb::Quiesced {
            waited_ops_micros: waited.as_micros() as u64,
        }))
        .await?;
        // The final round: the instance is frozen, the control request flushes volfs.
        let (f2, held2) = round(2, held1.display().to_string()).await?;
        for f in f2 {
            send(Chunk::Frame(f)).await?;
        }
        for (op_id, o) in s.journal.done_ops() {
            let op = match o {
                Outcome::Ok(p) => pb::OpResult {
                    op_id,
                    code: 0,
                    message: String::new(),
                    payload: p.to_vec(),
                },
                Outcome::Err { code, message } => pb::OpResult {
                    op_id,
                    code,
                    message,
                    payload: Vec::new(),
                },
            };
            send(Chunk::Op(op)).await?;
        }
        let root = volfs::Manifest::from_bytes(&std::fs::read(&held2).map_err(io_status)?)
            .map_err(io_status)?
            .root();
        // The machine waits for the release from here on, before B can ask.
        self.owner_event(s, OwnerEvent::FinalSent { attempt }).await;
        if s.owner.lock().await.attempt() != Some(attempt) {
            return Err(given_up());
        }
        send(Chunk::Final(pb::Final {
            root: root.to_vec(),
        }))
        .await?;
        let _ = std::fs::remove_dir_all(&tmp);
        drop(_precopy);
        tracing::info!(root = %volfs::hex(&root), "final delta sent; owner until released");
        // The puller keeps the stream open until its release is answered: an
        // end before that (it died, or gave up) ends the attempt at once
        // (after a release, the event is stale and changes nothing).
        tx.closed().await;
        self.owner_event(
            s,
            OwnerEvent::Failed {
                attempt,
                reason: "the new edge closed the handover stream".into(),
            },
        )
        .await;
        Ok(())
    }

    /// A side: the new edge is ready and asks to own the session. The
    /// attempt id — random, and known only to the two edges of the
    /// handover stream the session's token opened — is the credential, so
    /// a puller that restarted (and never stored the token) can ask again.
    pub async fn release(
        self: &Arc<Self>,
        id: &str,
        attempt: Attempt,
        from: &str,
    ) -> Result<(), EdgeError> {
        let live = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let Some(s) = live else {
            // Released already (the answer was lost, or this edge restarted).
            return match self.tombstone(id) {
                Some(t) if t.attempt == attempt && t.to.edge_id == from => Ok(()),
                _ => Err(EdgeError::Refused(
                    format!("session {id} is not being handed over to {from} in attempt {attempt}"),
                    Refusal::NotGiving,
                )),
            };
        };
        let acts = self
            .owner_event(
                &s,
                OwnerEvent::Release {
                    attempt,
                    from: from.to_string(),
                },
            )
            .await;
        reply_of(id, acts)
    }

    /// A side: the new edge gave up; serve again.
    pub async fn abort_handover(
        self: &Arc<Self>,
        id: &str,
        attempt: Attempt,
        from: &str,
    ) -> Result<(), EdgeError> {
        let s = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| EdgeError::UnknownSession(id.to_string()))?;
        let acts = self
            .owner_event(
                &s,
                OwnerEvent::Abort {
                    attempt,
                    from: from.to_string(),
                },
            )
            .await;
        let r = reply_of(id, acts);
        if r.is_ok() {
            tracing::warn!(session = %id, attempt, "handover aborted by the new edge; serving again");
        }
        r
    }

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
        from: &str,
        progress: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<(), Status> {
        if !crate::config::valid_name(id) {
            return Err(Status::invalid_argument("bad session id"));
        }
        // Refused before any network call.
        if self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
        {
            return Err(Status::already_exists(
                "this edge already serves the session",
            ));
        }
        let owner = Peer {
            edge_id: String::new(),
            addr: from.to_string(),
        };
        if let Some(PullerAction::Refuse(m)) = self
            .puller_step(id, PullerEvent::Begin { from: owner })
            .first()
        {
            return Err(Status::aborted(*m));
        }
        let span = tracing::info_span!("take", session = %id, from = %from);
        let r = self
            .take_inner(id, token, from, progress)
            .instrument(span.clone())
            .await;
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
        from: &str,
        progress: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<(), Status> {
        let mut peer = peer_client(from).await?;
        let hello = peer
            .hello(pb::HelloRequest {
                version: edge_proto::PEER_VERSION,
                edge_id: self.cfg.edge_id.clone(),
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
        let owner = Peer {
            edge_id: hello.edge_id.clone(),
            addr: from.to_string(),
        };
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
        let (round, bytes, quiesced) = (pulled.round, pulled.bytes, pulled.quiesced);
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
        let session = match self.promote_and_start(id, &pulled, &owner).await {
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
        match tokio::time::timeout(RELEASE_ANSWER_WAIT, asking).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(st))) => return Err(st),
            Ok(Err(e)) => return Err(io_status(e)),
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the old edge {} has not answered the release for {}s; this edge keeps asking and serves the session once it does",
                    owner.edge_id,
                    RELEASE_ANSWER_WAIT.as_secs()
                )));
            }
        }
        let down = quiesced.elapsed();
        tracing::info!(
            downtime_ms = down.as_secs_f64() * 1e3,
            bytes,
            "session taken over"
        );
        report(pb::HandoverPhase::Ready).await;
        Ok(())
    }

    /// Asks the old owner to release attempt `attempt` until it answers:
    /// released → serve; refused → the copy is staged again.
    pub(super) async fn ask_release(
        self: &Arc<Self>,
        id: &str,
        token: &[u8],
        owner: &Peer,
        attempt: Attempt,
        mut peer: Option<PeerClient<tonic::transport::Channel>>,
    ) -> Result<(), Status> {
        let mut pause = Duration::from_millis(50);
        loop {
            if peer.is_none() {
                peer = peer_client(&owner.addr).await.ok();
            }
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
                Some(Ok(_)) => {
                    self.puller_step(id, PullerEvent::ReleaseAnswered { released: true });
                    return self.serve_pulled(id).await;
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
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
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

    async fn pull(
        self: &Arc<Self>,
        peer: &mut PeerClient<tonic::transport::Channel>,
        id: &str,
        token: &[u8],
        owner: &Peer,
        progress_tx: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<Pulled, (Status, Option<Attempt>)> {
        let fail = |st: Status| (st, None);
        let staging = self.staging_dir(id);
        let vol = staging.join("volume");
        tokio::fs::create_dir_all(&vol)
            .await
            .map_err(|e| fail(io_status(e)))?;
        // What is staged, read under the staging lock (pre-copy rounds of a
        // session being pulled are refused from here on).
        let held = {
            let lock = self.staging_lock(id);
            let _g = lock.lock().await;
            if vol.join(".volfs/manifest.pb").exists() {
                let v = vol.clone();
                tokio::task::spawn_blocking(move || volfs::offline::manifest(&v))
                    .await
                    .map_err(|e| fail(io_status(e)))?
                    .map_err(|e| fail(io_status(e)))?
                    .to_bytes()
            } else {
                Vec::new()
            }
        };
        let mut stream = peer
            .handover(pb::PeerHandoverRequest {
                session_id: id.into(),
                token: token.to_vec(),
                held_manifest: held,
                to_edge: self.cfg.edge_id.clone(),
                to_addr: self.cfg.advertised(),
            })
            .await
            .map_err(|st| fail(peer_status("handover", &owner.edge_id, st)))?
            .into_inner();
        let report = |phase, round: u32, bytes: u64, down: u64| {
            let p = progress_event(phase, round, bytes, down, &self.cfg.edge_id);
            let tx = progress_tx.clone();
            async move {
                let _ = tx.send(Ok(p)).await;
            }
        };
        let mut meta: Option<pb::SessionMeta> = None;
        let mut round = 1u32;
        let mut buf: Vec<u8> = Vec::new();
        let bytes = AtomicU64::new(0);
        let mut t_quiesce: Option<Instant> = None;
        let mut ops = Vec::new();
        let mut root = None;
        let attempt_of = |m: &Option<pb::SessionMeta>| m.as_ref().map(|m| m.attempt);
        while root.is_none() {
            let chunk = match stream.message().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(st) => {
                    return Err((
                        peer_status("handover", &owner.edge_id, st),
                        attempt_of(&meta),
                    ));
                }
            };
            match chunk.chunk {
                Some(Chunk::Meta(m)) => {
                    if m.session_id != id || m.attempt == 0 {
                        return Err((
                            Status::failed_precondition("the old edge sent another session"),
                            None,
                        ));
                    }
                    self.puller_step(id, PullerEvent::Accepted { attempt: m.attempt });
                    meta = Some(m);
                }
                Some(Chunk::Frame(f)) => {
                    let trailer = matches!(f.frame, Some(pb::delta_frame::Frame::Trailer(_)));
                    let enc = f.encode_length_delimited_to_vec();
                    bytes.fetch_add(enc.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&enc);
                    if trailer {
                        let data = std::mem::take(&mut buf);
                        let v = vol.clone();
                        tokio::task::spawn_blocking(move || {
                            volfs::offline::apply(&v, data.as_slice())
                        })
                        .await
                        .map_err(|e| (io_status(e), attempt_of(&meta)))?
                        .map_err(|e| {
                            (
                                Status::data_loss(format!("round {round}: {e}")),
                                attempt_of(&meta),
                            )
                        })?;
                        let down = t_quiesce
                            .map(|t| t.elapsed().as_micros() as u64)
                            .unwrap_or(0);
                        let phase = if t_quiesce.is_some() {
                            pb::HandoverPhase::Final
                        } else {
                            pb::HandoverPhase::Pull
                        };
                        report(phase, round, bytes.load(Ordering::Relaxed), down).await;
                        round += 1;
                    }
                }
                Some(Chunk::Quiesced(_)) => {
                    t_quiesce = Some(Instant::now());
                    report(
                        pb::HandoverPhase::Quiesced,
                        round,
                        bytes.load(Ordering::Relaxed),
                        0,
                    )
                    .await;
                }
                Some(Chunk::Op(o)) => ops.push(o),
                Some(Chunk::Final(f)) => root = Some(f.root),
                None => {}
            }
        }
        let attempt = attempt_of(&meta);
        let (Some(meta), Some(root), Some(t_q)) = (meta, root, t_quiesce) else {
            return Err((
                Status::unavailable(format!(
                    "the old edge {} ended the handover early; it still serves the session",
                    owner.edge_id
                )),
                attempt,
            ));
        };
        self.puller_step(id, PullerEvent::FinalReceived);
        // The staged volume must be what the old edge sent.
        let v = vol.clone();
        let have = tokio::task::spawn_blocking(move || volfs::offline::hash(&v, None))
            .await
            .map_err(|e| (io_status(e), attempt))?
            .map_err(|e| (io_status(e), attempt))?
            .0;
        if have.as_slice() != root.as_slice() {
            return Err((
                Status::data_loss(format!(
                    "staged volume hashes to {}, the old edge sent {}",
                    volfs::hex(&have),
                    volfs::hex(&root)
                )),
                attempt,
            ));
        }
        report(
            pb::HandoverPhase::Apply,
            round,
            bytes.load(Ordering::Relaxed),
            t_q.elapsed().as_micros() as u64,
        )
        .await;
        Ok(Pulled {
            stream,
            attempt: meta.attempt,
            meta,
            ops,
            quiesced: t_q,
            bytes: bytes.load(Ordering::Relaxed),
            round,
        })
    }

    /// Makes the staged copy the session directory (persisted `Starting`
    /// before it moves), mounts it, starts the instance with its calls held.
    async fn promote_and_start(
        self: &Arc<Self>,
        id: &str,
        p: &Pulled,
        owner: &Peer,
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
            epoch: p.meta.epoch.max(1) + 1,
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
        tokio::task::spawn_blocking(move || {
            super::write_durable(&record, &json)?;
            std::fs::rename(&st2, &dir2)?;
            super::layout::sync_dir(&parent)
        })
        .await
        .map_err(|e| EdgeError::Io(std::io::Error::other(e)))??;
        let layout = Layout { dir: dir.clone() };
        for d in [layout.mnt(), layout.run()] {
            tokio::fs::create_dir_all(d).await?;
        }
        let runtime = self.runtime(&p.meta.app).await?;
        let session = Arc::new(self.build_session(&rec, hash, runtime)?);
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
        self.mount_volume(&session).await?;
        session.ensure_running(&self.cfg).await?;
        Ok(session)
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
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
}

fn reply_of(id: &str, acts: Vec<OwnerAction>) -> Result<(), EdgeError> {
    for a in acts {
        if let OwnerAction::Reply(r) = a {
            return r.map_err(|r| {
                EdgeError::Refused(
                    format!("session {id}: that handover attempt is not under way here"),
                    r,
                )
            });
        }
    }
    Err(EdgeError::Refused(
        format!("session {id}: no answer"),
        Refusal::NotGiving,
    ))
}

impl Session {
    /// Freezes the instance (if one runs).
    async fn freeze(&self) -> Result<(), String> {
        if let Some((id, _)) = self.instance.lock().await.as_ref() {
            self.runtime.pause(id).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Thaws the instance (if one runs).
    async fn thaw(&self) {
        if let Some((id, _)) = self.instance.lock().await.as_ref() {
            if let Err(e) = self.runtime.resume(id).await {
                tracing::error!(session = %self.id, error = %e, "could not thaw the instance");
            }
        }
    }
}

/// A scratch directory inside the session directory.
fn tempfile_dir(dir: &std::path::Path) -> Result<PathBuf, Status> {
    let t = dir.join("handover");
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).map_err(io_status)?;
    Ok(t)
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

    /// The session, for a peer: the client's token, or the one-time ticket
    /// of an operator-started move.
    fn session_for_peer(&self, id: &str, token: &[u8]) -> Result<Arc<Session>, EdgeError> {
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
                self.sessions
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .cloned()
                    .ok_or_else(|| EdgeError::UnknownSession(id.to_string()))
            }
            r => r,
        }
    }

    /// Operator side (the owner): moves session `id` to neighbour `to`.
    pub async fn migrate(&self, id: &str, to: &str) -> Result<pb::MigrateResponse, Status> {
        let n = self
            .cfg
            .neighbours
            .iter()
            .find(|n| n.id == to)
            .ok_or_else(|| {
                Status::invalid_argument(format!("{to:?} is not a neighbour of this edge"))
            })?;
        if !self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
        {
            return Err(EdgeError::UnknownSession(id.to_string()).status());
        }
        let ticket: [u8; 32] = super::random_bytes();
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), blake3::hash(&ticket));
        tracing::info!(session = %id, to = %to, "operator moves the session");
        let r = async {
            let mut p = peer_client(&n.addr).await?;
            p.adopt(pb::AdoptRequest {
                session_id: id.into(),
                ticket: ticket.to_vec(),
                from_addr: self.cfg.advertised(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|st| peer_status("move", to, st))
        }
        .await;
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        r
    }

    /// New-edge side of an operator's move: pull with the ticket.
    pub async fn adopt(
        self: &Arc<Self>,
        req: pb::AdoptRequest,
    ) -> Result<pb::MigrateResponse, Status> {
        let (tx, mut rx) = mpsc::channel::<Result<pb::HandoverProgress, Status>>(64);
        let last = tokio::spawn(async move {
            let mut last = pb::MigrateResponse::default();
            while let Some(Ok(p)) = rx.recv().await {
                last = pb::MigrateResponse {
                    bytes: p.bytes_received,
                    downtime_micros: p.downtime_micros,
                };
            }
            last
        });
        let r = self
            .take(&req.session_id, &req.ticket, &req.from_addr, &tx)
            .await;
        drop(tx);
        let last = last.await.unwrap_or_default();
        r.map(|()| last)
    }
}

#[cfg(test)]
mod tests {
    //! The owner's shell with a recording runtime: what the machine says
    //! is done, in order, and persisted before it takes effect.

    use super::*;
    use crate::config::{Config, DEFAULT_TOML};
    use crate::runtime::fake::{Call, FakeRuntime};
    use crate::runtime::{InstanceId, Runtime};

    async fn edge_with_session() -> (Arc<Edge>, Arc<Session>, Arc<FakeRuntime>, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let toml = DEFAULT_TOML.replace(
            "data_dir = \"/var/lib/edgeshift\"",
            &format!("data_dir = {:?}", d.path().display().to_string()),
        );
        let edge = Edge::new(Config::from_toml(&toml, "test").unwrap()).unwrap();
        let fake = Arc::new(FakeRuntime::default());
        let rec = SessionRecord {
            id: "s1".into(),
            app: "list".into(),
            client_id: "c".into(),
            token_hash: blake3::hash(b"t").to_hex().to_string(),
            created: 0,
            instance: None,
            volfs_pid: None,
            epoch: 1,
            role: Role::Serving,
        };
        std::fs::create_dir_all(edge.sessions_dir().join("s1")).unwrap();
        let s = Arc::new(
            edge.build_session(&rec, blake3::hash(b"t"), fake.clone() as Arc<dyn Runtime>)
                .unwrap(),
        );
        // An instance "runs" without starting anything.
        let client =
            crate::forward::AppClient::lazy(&std::path::PathBuf::from("/nonexistent"), 1024);
        *s.instance.lock().await = Some((InstanceId::Pid(7), client));
        edge.sessions
            .write()
            .unwrap()
            .insert("s1".into(), s.clone());
        (edge, s, fake, d)
    }

    fn peer(id: &str) -> Peer {
        Peer {
            edge_id: id.into(),
            addr: format!("{id}:1"),
        }
    }

    fn persisted(s: &Session) -> Role {
        let rec: SessionRecord =
            serde_json::from_slice(&std::fs::read(s.layout().record()).unwrap()).unwrap();
        rec.role
    }

    async fn to_final_sent(edge: &Arc<Edge>, s: &Arc<Session>, attempt: Attempt) {
        edge.owner_event(
            s,
            OwnerEvent::Pull {
                attempt,
                to: peer("b"),
            },
        )
        .await;
        edge.owner_event(s, OwnerEvent::LiveSent { attempt }).await;
        assert_eq!(
            *s.gate.borrow(),
            Gate::Held,
            "calls are held from the quiesce"
        );
        edge.owner_event(s, OwnerEvent::OpsDrained { attempt })
            .await;
        edge.owner_event(s, OwnerEvent::FinalSent { attempt }).await;
    }

    #[tokio::test]
    async fn the_freeze_is_persisted_first_and_an_abort_thaws_and_reopens_calls() {
        let (edge, s, fake, _d) = edge_with_session().await;
        to_final_sent(&edge, &s, 3).await;
        assert_eq!(fake.calls(), vec![Call::Pause(InstanceId::Pid(7))]);
        assert!(matches!(persisted(&s), Role::Frozen { attempt: 3, .. }));
        let acts = edge
            .owner_event(
                &s,
                OwnerEvent::Abort {
                    attempt: 3,
                    from: "b".into(),
                },
            )
            .await;
        assert_eq!(acts, vec![OwnerAction::Reply(Ok(()))]);
        assert_eq!(
            fake.calls(),
            vec![
                Call::Pause(InstanceId::Pid(7)),
                Call::Resume(InstanceId::Pid(7))
            ]
        );
        assert_eq!(persisted(&s), Role::Serving);
        assert_eq!(*s.gate.borrow(), Gate::Open);
    }

    #[tokio::test]
    async fn a_release_persists_the_tombstone_redirects_calls_and_frees_the_session() {
        let (edge, s, _fake, _d) = edge_with_session().await;
        to_final_sent(&edge, &s, 5).await;
        edge.release("s1", 5, "b").await.unwrap();
        assert_eq!(*s.gate.borrow(), Gate::Moved(peer("b")));
        let t = edge.tombstones.load();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].1.attempt, t[0].1.to.edge_id.as_str()), (5, "b"));
        assert_eq!(edge.session_count(), 0);
        // Asked again (the answer was lost): answered from the tombstone.
        edge.release("s1", 5, "b").await.unwrap();
        assert!(edge.release("s1", 4, "b").await.is_err());
        assert!(matches!(
            edge.session("s1", b"t"),
            Err(EdgeError::Moved(..))
        ));
    }

    #[tokio::test]
    async fn a_second_pull_is_refused_without_touching_the_first() {
        let (edge, s, fake, _d) = edge_with_session().await;
        edge.owner_event(
            &s,
            OwnerEvent::Pull {
                attempt: 1,
                to: peer("b"),
            },
        )
        .await;
        edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
            .await;
        edge.owner_event(&s, OwnerEvent::OpsDrained { attempt: 1 })
            .await;
        let acts = edge
            .owner_event(
                &s,
                OwnerEvent::Pull {
                    attempt: 2,
                    to: peer("c"),
                },
            )
            .await;
        assert_eq!(
            acts,
            vec![OwnerAction::RefusePull(Refusal::Moving(peer("b")))]
        );
        assert_eq!(
            fake.calls(),
            vec![Call::Pause(InstanceId::Pid(7))],
            "no thaw"
        );
        assert_eq!(*s.gate.borrow(), Gate::Held);
    }

    #[tokio::test]
    async fn a_stale_timer_changes_nothing_and_a_retry_starts_clean() {
        let (edge, s, fake, _d) = edge_with_session().await;
        to_final_sent(&edge, &s, 1).await;
        edge.owner_event(
            &s,
            OwnerEvent::Abort {
                attempt: 1,
                from: "b".into(),
            },
        )
        .await;
        to_final_sent(&edge, &s, 2).await;
        let before = fake.calls().len();
        edge.owner_event(
            &s,
            OwnerEvent::Timer {
                attempt: 1,
                timer: OwnerTimer::Release,
            },
        )
        .await;
        assert_eq!(
            fake.calls().len(),
            before,
            "the old attempt's timer did nothing"
        );
        assert!(matches!(
            *s.owner.lock().await,
            OwnerState::FinalSent { attempt: 2, .. }
        ));
    }

    #[tokio::test]
    async fn a_failed_freeze_gives_the_attempt_up_and_calls_run_again() {
        let (edge, s, fake, _d) = edge_with_session().await;
        fake.fail_pause.store(true, Ordering::SeqCst);
        edge.owner_event(
            &s,
            OwnerEvent::Pull {
                attempt: 1,
                to: peer("b"),
            },
        )
        .await;
        edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
            .await;
        let acts = edge
            .owner_event(&s, OwnerEvent::OpsDrained { attempt: 1 })
            .await;
        assert!(
            !acts.contains(&OwnerAction::SendFinal),
            "nothing more is sent"
        );
        assert_eq!(*s.owner.lock().await, OwnerState::Serving);
        assert_eq!(*s.gate.borrow(), Gate::Open);
    }

    #[tokio::test]
    async fn a_thaw_never_overtakes_a_freeze() {
        let (edge, s, fake, _d) = edge_with_session().await;
        edge.owner_event(
            &s,
            OwnerEvent::Pull {
                attempt: 1,
                to: peer("b"),
            },
        )
        .await;
        edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
            .await;
        // The freeze (slow) and an abort race.
        let (e2, s2) = (edge.clone(), s.clone());
        let freeze = tokio::spawn(async move {
            e2.owner_event(&s2, OwnerEvent::OpsDrained { attempt: 1 })
                .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        edge.owner_event(
            &s,
            OwnerEvent::Abort {
                attempt: 1,
                from: "b".into(),
            },
        )
        .await;
        freeze.await.unwrap();
        let calls = fake.calls();
        if let Some(p) = calls.iter().position(|c| matches!(c, Call::Pause(_))) {
            assert!(
                calls[p..].iter().any(|c| matches!(c, Call::Resume(_))),
                "a freeze is always followed by its thaw: {calls:?}"
            );
        }
        assert_eq!(*s.owner.lock().await, OwnerState::Serving);
    }
}
