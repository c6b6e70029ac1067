//! Handover of a session between edges (the user moved from A to B).
//!
//! B pulls: the client asks B (`Edge.Handover`), B asks A (`Peer.Handover`)
//! with the manifest it already holds for the session (from an earlier
//! attempt). A streams one live round of the volume while the app runs, then
//! refuses new calls, waits for running ops to finish (their results are
//! journaled), stops the instance, flushes the volume and streams the final
//! delta and the op results. B applies each round to a staging directory
//! (every block and the root hash verified), then mounts, starts and waits
//! for the instance, and only then asks A to `Release`. Until that answer, A
//! owns the session: any failure makes B `Abort`, and A serves again (its
//! instance restarts on the next call). A retry resumes from what B staged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::handover_chunk::Chunk;
use edge_proto::v1::peer_client::PeerClient;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use super::{Edge, EdgeError, Layout, Session, SessionRecord, State, now_unix};
use crate::journal::Outcome;
use crate::volume;

/// How often the new edge pulls when what arrives is damaged.
pub const PULL_ATTEMPTS: u32 = 3;

/// How long the old edge waits for running ops before it gives up the handover.
pub const OPS_WAIT: Duration = Duration::from_secs(120);

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

impl Edge {
    pub(super) fn staging_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("staging").join(id)
    }

    /// A side: streams session `req.session_id` to the edge that asked.
    pub async fn give(
        self: &Arc<Self>,
        req: pb::PeerHandoverRequest,
        tx: mpsc::Sender<Result<pb::HandoverChunk, Status>>,
    ) {
        let span = tracing::info_span!("give", session = %req.session_id, to = %req.to_edge);
        let r = self.give_inner(&req, &tx).instrument(span).await;
        if let Err(st) = r {
            if let Ok(s) = self.session_for_peer(&req.session_id, &req.token) {
                s.serve_again().await;
            }
            let _ = tx.send(Err(st)).await;
        }
    }

    async fn give_inner(
        &self,
        req: &pb::PeerHandoverRequest,
        tx: &mpsc::Sender<Result<pb::HandoverChunk, Status>>,
    ) -> Result<(), Status> {
        let s = self
            .session_for_peer(&req.session_id, &req.token)
            .map_err(|e| e.status())?;
        *s.moving_to_addr.lock().unwrap_or_else(|p| p.into_inner()) = req.to_addr.clone();
        if s.migrating.swap(true, Ordering::SeqCst) {
            return Err(Status::failed_precondition(
                "a handover of this session is already under way",
            ));
        }
        *s.moving_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(req.to_edge.clone());
        // No pre-copy round of this session may run during the handover
        // (it would change what the new edge holds under its feet).
        let _precopy = s.precopy.lock().await;
        tracing::info!("handover requested");
        let send = |c: Chunk| async {
            tx.send(Ok(pb::HandoverChunk { chunk: Some(c) }))
                .await
                .map_err(|_| Status::cancelled("peer went away"))
        };
        let tmp = tempfile_dir(&s.dir)?;
        send(Chunk::Meta(pb::SessionMeta {
            session_id: s.id.clone(),
            app: s.app.clone(),
            client_id: s.client_id.clone(),
            token_hash: s.token_hash.to_hex().to_string(),
            created_unix: s.created,
            block_size: self.cfg.block_size,
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
        // Quiesce: no new calls (refused since `migrating`), running ones finish.
        let t = Instant::now();
        while s.journal.has_running() {
            if t.elapsed() > OPS_WAIT {
                return Err(Status::deadline_exceeded(
                    "ops still running; handover given up",
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let waited = t.elapsed();
        // Freeze the instance (it keeps its state and can go on if the move fails).
        if let Some((id, _)) = s.instance.lock().await.as_ref() {
            s.runtime.pause(id).await.map_err(io_status)?;
            *s.paused.lock().unwrap_or_else(|p| p.into_inner()) = true;
        }
        send(Chunk::Quiesced(pb::Quiesced {
            waited_ops_micros: waited.as_micros() as u64,
        }))
        .await?;
        // The final round: the instance is stopped, the control request flushes volfs.
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
        send(Chunk::Final(pb::Final {
            root: root.to_vec(),
        }))
        .await?;
        tracing::info!(root = %volfs::hex(&root), "final delta sent; owner until released");
        // Without a Release or Abort within a while, serve again.
        let pending = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if pending.state() == State::Serving && pending.migrating.load(Ordering::SeqCst) {
                tracing::warn!(session = %pending.id, "no release from the new edge; serving again");
                pending.serve_again().await;
            }
        });
        Ok(())
    }

    /// A side: the new edge serves the session now.
    pub async fn release(&self, id: &str, token: &[u8]) -> Result<(), EdgeError> {
        if self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
        {
            return Ok(());
        }
        let s = self.session_for_peer(id, token)?;
        if !s.migrating.load(Ordering::SeqCst) {
            return Err(EdgeError::Invalid(
                "release of a session that is not being handed over".into(),
            ));
        }
        // Tombstone first: a call arriving now is told "moving", never "not found".
        let whereto = s
            .moving_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let addr = s
            .moving_to_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (whereto, addr));
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        // The new edge owns the session from here: answer at once and clean
        // up behind (the teardown is not part of anyone's downtime).
        let gone = s.clone();
        tokio::spawn(async move { gone.teardown().await });
        let to = s
            .moving_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        self.tell_candidates_to_drop(id, &to);
        tracing::info!(session = %id, to = %to, "released to the new edge");
        Ok(())
    }

    /// A side: the new edge failed; serve again.
    pub async fn abort_handover(&self, id: &str, token: &[u8]) -> Result<(), EdgeError> {
        let s = self.session_for_peer(id, token)?;
        s.serve_again().await;
        tracing::warn!(session = %id, "handover aborted by the new edge; serving again");
        Ok(())
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
        if let Ok(s) = self.session(id, token) {
            let _ = s;
            return Err(Status::already_exists(
                "this edge already serves the session",
            ));
        }
        let url = if from.contains("://") {
            from.to_string()
        } else {
            format!("http://{from}")
        };
        let mut peer = PeerClient::connect(url.clone())
            .await
            .map_err(|e| Status::unavailable(format!("old edge {from} unreachable: {e}")))?
            .max_decoding_message_size(64 << 20);
        let hello = peer
            .hello(pb::HelloRequest {
                version: edge_proto::PROTOCOL_VERSION,
                edge_id: self.cfg.edge_id.clone(),
            })
            .await?
            .into_inner();
        if hello.version != edge_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "peer speaks edge.v{}, this edge v{}",
                hello.version,
                edge_proto::PROTOCOL_VERSION
            )));
        }
        let span = tracing::info_span!("take", session = %id, from = %from);
        let _pulling = PullingGuard(self, id.to_string());
        // A block that does not hash to its name (damaged in transit) fails
        // its round; the old edge serves on (abort) and the pull starts again
        // from what is staged, so the damaged blocks are sent again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self
                .pull(&mut peer, id, token, progress)
                .instrument(span.clone())
                .await;
            if r.is_err() {
                let _ = peer
                    .abort(pb::ReleaseRequest {
                        session_id: id.into(),
                        token: token.to_vec(),
                    })
                    .await;
            }
            match r {
                Err(st) if st.code() == tonic::Code::DataLoss && attempt < PULL_ATTEMPTS => {
                    tracing::warn!(parent: &span, error = %st.message(), attempt, "damaged in transit; pulling again");
                }
                r => return r,
            }
        }
    }

    async fn pull(
        self: &Arc<Self>,
        peer: &mut PeerClient<tonic::transport::Channel>,
        id: &str,
        token: &[u8],
        progress: &mpsc::Sender<Result<pb::HandoverProgress, Status>>,
    ) -> Result<(), Status> {
        let staging = self.staging_dir(id);
        let vol = staging.join("volume");
        tokio::fs::create_dir_all(&vol).await.map_err(io_status)?;
        // What is staged, read under the staging lock; from here on pre-copy
        // rounds for this session are refused, so it stays what we said.
        let held = {
            let lock = self.staging_lock(id);
            let _g = lock.lock().await;
            self.pulling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string());
            if vol.join(".volfs/manifest.pb").exists() {
                let v = vol.clone();
                tokio::task::spawn_blocking(move || volfs::offline::manifest(&v))
                    .await
                    .map_err(io_status)?
                    .map_err(io_status)?
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
            .await?
            .into_inner();
        let report = |phase: &str, round: u32, bytes: u64, down: u64| {
            let p = pb::HandoverProgress {
                phase: phase.into(),
                round,
                bytes_received: bytes,
                downtime_micros: down,
                edge_id: self.cfg.edge_id.clone(),
            };
            let tx = progress.clone();
            async move {
                let _ = tx.send(Ok(p)).await;
            }
        };
        let mut meta = None;
        let mut round = 1u32;
        let mut buf: Vec<u8> = Vec::new();
        let bytes = AtomicU64::new(0);
        let quiesced_at = AtomicI64::new(0);
        let mut t_quiesce: Option<Instant> = None;
        let mut ops = Vec::new();
        let mut root = None;
        while let Some(chunk) = stream.message().await? {
            match chunk.chunk {
                Some(Chunk::Meta(m)) => meta = Some(m),
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
                        .map_err(io_status)?
                        .map_err(|e| Status::data_loss(format!("round {round}: {e}")))?;
                        let down = t_quiesce
                            .map(|t| t.elapsed().as_micros() as u64)
                            .unwrap_or(0);
                        report(
                            if t_quiesce.is_some() { "final" } else { "pull" },
                            round,
                            bytes.load(Ordering::Relaxed),
                            down,
                        )
                        .await;
                        round += 1;
                    }
                }
                Some(Chunk::Quiesced(_)) => {
                    t_quiesce = Some(Instant::now());
                    quiesced_at.store(now_unix(), Ordering::Relaxed);
                    report("quiesced", round, bytes.load(Ordering::Relaxed), 0).await;
                }
                Some(Chunk::Op(o)) => ops.push(o),
                Some(Chunk::Final(f)) => root = Some(f.root),
                None => {}
            }
        }
        let (Some(meta), Some(root), Some(t_q)) = (meta, root, t_quiesce) else {
            return Err(Status::unavailable("the old edge ended the handover early"));
        };
        // The staged volume must be what the old edge sent.
        let v = vol.clone();
        let have = tokio::task::spawn_blocking(move || volfs::offline::hash(&v, None))
            .await
            .map_err(io_status)?
            .map_err(io_status)?
            .0;
        if have.as_slice() != root.as_slice() {
            return Err(Status::data_loss(format!(
                "staged volume hashes to {}, the old edge sent {}",
                volfs::hex(&have),
                volfs::hex(&root)
            )));
        }
        report(
            "apply",
            round,
            bytes.load(Ordering::Relaxed),
            t_q.elapsed().as_micros() as u64,
        )
        .await;

        // Become the owner in waiting: session directory, journal, shim, instance.
        let dir = self.sessions_dir().join(id);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        tokio::fs::rename(&staging, &dir).await.map_err(io_status)?;
        let layout = Layout { dir: dir.clone() };
        for d in [layout.mnt(), layout.run()] {
            tokio::fs::create_dir_all(d).await.map_err(io_status)?;
        }
        let hash = blake3::Hash::from_hex(&meta.token_hash).map_err(io_status)?;
        let rec = SessionRecord {
            id: id.into(),
            app: meta.app.clone(),
            client_id: meta.client_id.clone(),
            token_hash: meta.token_hash.clone(),
            created: meta.created_unix,
            instance: None,
            volfs_pid: None,
        };
        let started = async {
            let runtime = self.runtime(&meta.app).await?;
            let session = Arc::new(self.build_session(&rec, hash, runtime)?);
            for o in &ops {
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
            session.save_record().await?;
            self.mount_volume(&session).await?;
            report(
                "start",
                round,
                bytes.load(Ordering::Relaxed),
                t_q.elapsed().as_micros() as u64,
            )
            .await;
            session.ensure_running(&self.cfg).await?;
            Ok::<_, EdgeError>(session)
        }
        .await;
        let session = match started {
            Ok(s) => s,
            Err(e) => {
                // Keep the volume staged for a retry; the old edge serves on.
                let _ = tokio::fs::rename(&dir, &staging).await;
                volume::detach(&staging.join("mnt"));
                return Err(e.status());
            }
        };
        // Only with the old edge's release is this edge the owner. The session
        // is listed already, as moving: a client redirected here early is
        // told to wait, not that the session is unknown.
        session.migrating.store(true, Ordering::SeqCst);
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), session.clone());
        let mut released = Err(Status::unavailable("release not sent"));
        for _ in 0..3 {
            released = peer
                .release(pb::ReleaseRequest {
                    session_id: id.into(),
                    token: token.to_vec(),
                })
                .await
                .map(drop);
            if released.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Err(e) = released {
            tracing::error!(error = %e, "the old edge did not release; giving the session back");
            self.sessions
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            session.teardown_keep_volume(&staging).await;
            return Err(Status::unavailable(format!(
                "the old edge did not release the session: {}",
                e.message()
            )));
        }
        session.set_state(State::Serving);
        session.migrating.store(false, Ordering::SeqCst);
        let down = t_q.elapsed();
        tracing::info!(
            downtime_ms = down.as_secs_f64() * 1e3,
            bytes = bytes.load(Ordering::Relaxed),
            "session taken over"
        );
        report(
            "ready",
            round,
            bytes.load(Ordering::Relaxed),
            down.as_micros() as u64,
        )
        .await;
        Ok(())
    }
}

impl Session {
    /// Ends a handover that did not happen: thaws the instance, takes calls again.
    async fn serve_again(&self) {
        let was_paused =
            std::mem::take(&mut *self.paused.lock().unwrap_or_else(|p| p.into_inner()));
        if was_paused {
            if let Some((id, _)) = self.instance.lock().await.as_ref() {
                if let Err(e) = self.runtime.resume(id).await {
                    tracing::error!(session = %self.id, error = %e, "could not thaw the instance");
                }
            }
        }
        self.migrating.store(false, Ordering::SeqCst);
    }

    /// Stops the instance and the shim but keeps the volume, moved to `to`.
    async fn teardown_keep_volume(&self, to: &Path) {
        if let Some((id, _)) = self.instance.lock().await.take() {
            let _ = self.runtime.stop(&id).await;
        }
        if let Some(shim) = self.shim.lock().await.take() {
            shim.unmount().await;
        }
        let _ = tokio::fs::rename(&self.dir, to).await;
    }
}

/// A scratch directory inside the session directory.
fn tempfile_dir(dir: &Path) -> Result<PathBuf, Status> {
    let t = dir.join("handover");
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).map_err(io_status)?;
    Ok(t)
}

/// Clears the "pulling" mark of a session when a pull ends, however it ends.
struct PullingGuard<'a>(&'a Edge, String);

impl Drop for PullingGuard<'_> {
    fn drop(&mut self) {
        self.0
            .pulling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
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
}

impl Edge {
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
            let mut p = PeerClient::connect(format!("http://{}", n.addr))
                .await
                .map_err(|e| Status::unavailable(format!("{to} unreachable: {e}")))?;
            p.adopt(pb::AdoptRequest {
                session_id: id.into(),
                ticket: ticket.to_vec(),
                from_addr: self.cfg.advertised(),
            })
            .await
            .map(|r| r.into_inner())
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
