//! The puller's side of a handover (B): the async shell around
//! [`PullerState`]. B asks the owner for the session with the manifest of
//! its staged copy, applies each round to that copy (every block and the
//! root hash verified), promotes the copy to a session directory
//! (persisted `Starting`), starts the instance with its calls held,
//! persists `AwaitingRelease` and asks the owner to release that attempt,
//! keeping the handover stream open until the answer. Released: it serves.
//! Refused: the instance stops and the copy is staged again.

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

use super::migrate::{PULL_ATTEMPTS, RELEASE_ANSWER_WAIT, io_status, progress_event};
use super::{Edge, EdgeError, Gate, Layout, Role, Session, SessionRecord, State, peer_status};
use crate::journal::Outcome;
use crate::migration::puller::{PullerAction, PullerEvent, PullerState};
use crate::migration::{Attempt, Peer};
use crate::volume;

/// What a pull brought: everything needed to start serving.
struct Pulled {
    /// The handover stream, kept open until the release is answered: the
    /// owner takes its end as the puller giving up.
    stream: tonic::Streaming<pb::HandoverChunk>,
    meta: pb::SessionMeta,
    ops: std::collections::VecDeque<pb::OpResult>,
    attempt: Attempt,
    quiesced: Instant,
    bytes: u64,
    round: u32,
}

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
            if sessions.len() >= self.cfg.max_sessions {
                return Err(Status::resource_exhausted(format!(
                    "this edge serves its limit of {} sessions",
                    self.cfg.max_sessions
                )));
            }
        }
        // The session may come back while its last copy here is still
        // being torn down: wait for the directory to go.
        let leaving = self
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        if let Some(mut done) = leaving {
            let gone = tokio::time::timeout(Duration::from_secs(60), done.wait_for(|d| *d)).await;
            if gone.is_err() {
                return Err(Status::unavailable(
                    "this edge is still removing its earlier copy of the session; try again",
                ));
            }
        }
        if self.sessions_dir().join(id).exists() {
            return Err(Status::unavailable(
                "an earlier copy of the session is still on this edge (being removed); try again",
            ));
        }
        if self.peers.authenticated() && !crate::pki::valid_label(from_edge) {
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
        let r = self
            .take_inner(id, token, &owner, progress)
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
        claimed: &Peer,
        progress: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<(), Status> {
        let from = claimed.addr.as_str();
        // Under TLS the handshake proves the peer is `claimed.edge_id`
        // before this edge sends anything.
        let mut peer = self.peers.dial(&claimed.edge_id, from).await?;
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
                peer = self.peers.dial(&owner.edge_id, &owner.addr).await.ok();
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
        let nonce: [u8; 8] = super::random_bytes();
        let spool = self.staging_dir(id).join(format!(
            "incoming-handover-{:016x}.delta",
            u64::from_le_bytes(nonce)
        ));
        // Gone when the pull ends, however it ends.
        let _spool = RemoveOnDrop(spool.clone());
        let mut buf = Round::Memory(Vec::new());
        let bytes = AtomicU64::new(0);
        let mut t_quiesce: Option<Instant> = None;
        // Op results are kept within this edge's journal budget (the oldest
        // go first), whatever the old edge sends.
        let mut ops = std::collections::VecDeque::new();
        let mut ops_bytes = 0u64;
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
                    // Persisted and listed: bounded like an open's.
                    let client_ok = !m.client_id.is_empty()
                        && m.client_id.len() <= 128
                        && !m.client_id.chars().any(char::is_control);
                    if !client_ok || !crate::config::valid_name(&m.app) {
                        return Err((
                            Status::invalid_argument(
                                "the old edge sent a malformed session identity",
                            ),
                            Some(m.attempt),
                        ));
                    }
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
                    buf.push(&enc, &spool)
                        .await
                        .map_err(|e| (io_status(e), attempt_of(&meta)))?;
                    if trailer {
                        let data = std::mem::replace(&mut buf, Round::Memory(Vec::new()));
                        data.apply(&vol)
                        .await
                        .map_err(|e| (io_status(e), attempt_of(&meta)))?
                        .map_err(|e| {
                            if matches!(
                                e,
                                volfs::apply::ApplyError::Delta(
                                    volfs::delta::DeltaError::WrongBase { .. }
                                )
                            ) {
                                // The staged copy is not what it said it held
                                // (left half-applied by a crash): start it
                                // afresh, so the next pull sends everything.
                                tracing::warn!(error = %e, "staged copy does not match its manifest; dropping it");
                                let _ = std::fs::remove_dir_all(&vol);
                            }
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
                Some(Chunk::Op(o)) => {
                    ops_bytes += 16 + (o.payload.len() + o.message.len()) as u64;
                    ops.push_back(o);
                    while ops.len() > crate::journal::KEEP_DONE
                        || ops_bytes > self.cfg.journal_bytes
                    {
                        let Some(old) = ops.pop_front() else { break };
                        ops_bytes -= 16 + (old.payload.len() + old.message.len()) as u64;
                    }
                }
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

/// A handover round as it arrives: in memory while small (the final round,
/// on the downtime path), spooled to a file in the staging directory past
/// [`SPOOL_AT`], so a pull never holds a whole volume in memory.
enum Round {
    Memory(Vec<u8>),
    Spooled(tokio::io::BufWriter<tokio::fs::File>, std::path::PathBuf),
}

/// Bytes of a round kept in memory before it goes to disk.
const SPOOL_AT: usize = 8 << 20;

impl Round {
    async fn push(&mut self, enc: &[u8], spool: &std::path::Path) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if let Round::Memory(b) = self {
            if b.len() + enc.len() <= SPOOL_AT {
                b.extend_from_slice(enc);
                return Ok(());
            }
            tracing::info!(spool = %spool.display(), "a large handover round: spooled to disk");
            let mut w = tokio::io::BufWriter::new(tokio::fs::File::create(spool).await?);
            w.write_all(b).await?;
            *self = Round::Spooled(w, spool.to_path_buf());
        }
        match self {
            Round::Spooled(w, _) => w.write_all(enc).await,
            Round::Memory(_) => Ok(()),
        }
    }

    /// Applies the round to the staged volume `vol` (blocking work off the
    /// runtime); a spool file is removed after.
    async fn apply(
        self,
        vol: &std::path::Path,
    ) -> std::io::Result<Result<volfs::apply::ApplyReport, volfs::apply::ApplyError>> {
        use tokio::io::AsyncWriteExt;
        let v = vol.to_path_buf();
        match self {
            Round::Memory(data) => {
                tokio::task::spawn_blocking(move || volfs::offline::apply(&v, data.as_slice()))
                    .await
                    .map_err(std::io::Error::other)
            }
            Round::Spooled(mut w, path) => {
                w.flush().await?;
                drop(w);
                let p = path.clone();
                let r = tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&p)
                        .map(|f| volfs::offline::apply(&v, std::io::BufReader::new(f)))
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                let _ = tokio::fs::remove_file(&path).await;
                r
            }
        }
    }
}

/// Removes a file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
