//! The transfer of a pull (B): the owner's rounds streamed in, each applied
//! to the staged copy as its frames arrive (`crate::incoming`), until the
//! final delta and the owner's results of the ops that ran before the
//! quiesce.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::handover_chunk::Chunk;
use edge_proto::v1::peer_client::PeerClient;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use super::migrate::{io_status, progress_event};
use super::{Edge, peer_status};
use crate::incoming::Incoming;
use crate::migration::puller::PullerEvent;
use crate::migration::{Attempt, Peer};
/// The most of the old edge's hold before its quiesce a new edge counts
/// into the downtime it reports (the old edge says how long it held).
pub(super) const MAX_HELD_BEFORE_QUIESCED: Duration = Duration::from_secs(60);

/// What a pull brought: everything needed to start serving.
pub(super) struct Pulled {
    /// The handover stream, kept open until the release is answered: the
    /// owner takes its end as the puller giving up.
    pub(super) stream: Option<tonic::Streaming<pb::HandoverChunk>>,
    pub(super) meta: pb::SessionMeta,
    pub(super) ops: std::collections::VecDeque<pb::OpResult>,
    pub(super) attempt: Attempt,
    /// The root hash the owner sent with the final round: what the staged
    /// copy must hash to.
    pub(super) root: Vec<u8>,
    pub(super) quiesced: Instant,
    /// When the final chunk arrived.
    pub(super) final_at: Instant,
    pub(super) bytes: u64,
    pub(super) round: u32,
}

/// What a takeover is expected to need from the final round to serving
/// before this edge measured one.
const DEFAULT_FINISH: Duration = Duration::from_millis(30);

impl Edge {
    /// How long this edge expects to need from a final round received to
    /// serving: as long as its last takeover took.
    fn finish_estimate(&self) -> Duration {
        self.last_finish
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(DEFAULT_FINISH)
    }

    pub(super) async fn pull(
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
            // A full pre-copy round a crash cut short left its copy here.
            let _ = tokio::fs::remove_dir_all(staging.join("volume.new")).await;
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
        // A manifest the peer link cannot carry: everything, against nothing.
        let held = if held.len() + 4096 > crate::peers::MAX_MESSAGE {
            tracing::warn!(
                bytes = held.len(),
                "the staged copy's manifest is too large to send; pulling everything"
            );
            Vec::new()
        } else {
            held
        };
        let mut stream = peer
            .handover(pb::PeerHandoverRequest {
                session_id: id.into(),
                token: token.to_vec(),
                held_manifest: held,
                to_edge: self.cfg.edge_id.clone(),
                to_addr: self.cfg.advertised(),
                acks_rounds: true,
            })
            .await
            .map_err(|st| fail(peer_status("handover", &owner.edge_id, st)))?
            .into_inner();
        // Acknowledges an applied live round (the owner times its rounds by
        // delivery); not awaited, a lost one only delays the owner's decision.
        let finish = self.finish_estimate();
        let ack = |attempt: Attempt, round: u32| {
            let mut peer = peer.clone();
            let req = pb::RoundAppliedRequest {
                session_id: id.to_string(),
                attempt,
                round,
                from_edge: self.cfg.edge_id.clone(),
                finish_micros: finish.as_micros() as u64,
            };
            tokio::spawn(async move {
                // Repeated (it is idempotent) if it does not get through.
                for _ in 0..3 {
                    let r = tokio::time::timeout(
                        Duration::from_secs(5),
                        peer.round_applied(req.clone()),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => return,
                        // Refused: the owner moved on, or does not know it.
                        Ok(Err(st)) if st.code() != tonic::Code::Unavailable => {
                            tracing::debug!(error = %st.message(), "round acknowledgement refused");
                            return;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            });
        };
        // What the owner said of its last live round: left, throttle.
        let (left, throttled) = (AtomicU64::new(0), AtomicU64::new(0));
        let report = |phase, round: u32, bytes: u64, down: u64| {
            let mut p = progress_event(phase, round, bytes, down, &self.cfg.edge_id);
            p.remaining_bytes = left.load(Ordering::Relaxed);
            p.throttle_bytes_per_sec = throttled.load(Ordering::Relaxed);
            let tx = progress_tx.clone();
            async move {
                let _ = tx.send(Ok(p)).await;
            }
        };
        let mut meta: Option<pb::SessionMeta> = None;
        let mut round = 1u32;
        // The round being applied as it arrives (crate::incoming).
        let mut applying: Option<Incoming> = None;
        let bytes = AtomicU64::new(0);
        let mut t_quiesce: Option<Instant> = None;
        // Op results are kept within this edge's journal budget (the oldest
        // go first), whatever the old edge sends.
        let mut ops = std::collections::VecDeque::new();
        let mut ops_bytes = 0u64;
        let mut root = None;
        let mut final_at = Instant::now();
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
                    let len = f.encoded_len();
                    bytes.fetch_add(
                        (prost::length_delimiter_len(len) + len) as u64,
                        Ordering::Relaxed,
                    );
                    let inc = applying.get_or_insert_with(|| Incoming::start(&vol));
                    // A false push: the apply failed already; finish says why.
                    if !inc.push(&f).await || trailer {
                        let inc = applying.take().expect("started above");
                        inc.finish()
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
                            if let Some(a) = attempt_of(&meta) {
                                ack(a, round);
                            }
                            pb::HandoverPhase::Pull
                        };
                        report(phase, round, bytes.load(Ordering::Relaxed), down).await;
                        round += 1;
                    }
                }
                Some(Chunk::Quiesced(q)) => {
                    // Downtime counts from when the old edge began holding
                    // calls (as it says, within reason).
                    let held = Duration::from_micros(q.held_micros).min(MAX_HELD_BEFORE_QUIESCED);
                    let now = Instant::now();
                    t_quiesce = Some(now.checked_sub(held).unwrap_or(now));
                    // Downtime so far: the hold on the old edge, including
                    // its wait for the calls that were running.
                    report(
                        pb::HandoverPhase::Quiesced,
                        round,
                        bytes.load(Ordering::Relaxed),
                        held.as_micros() as u64,
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
                Some(Chunk::RoundSent(r)) => {
                    left.store(r.remaining_bytes, Ordering::Relaxed);
                    throttled.store(r.throttle_bytes_per_sec, Ordering::Relaxed);
                    if r.another {
                        // The round was reported when it was applied; this
                        // says what is left and whether the app is slowed.
                        report(
                            pb::HandoverPhase::Pull,
                            round.saturating_sub(1).max(1),
                            bytes.load(Ordering::Relaxed),
                            0,
                        )
                        .await;
                    }
                }
                Some(Chunk::Final(f)) => {
                    if let Some(inc) = applying.take() {
                        // A round without its trailer: nothing of it applies.
                        let _ = inc.finish().await;
                        return Err((
                            Status::data_loss("the old edge ended the handover inside a round"),
                            attempt_of(&meta),
                        ));
                    }
                    root = Some(f.root);
                    final_at = Instant::now();
                }
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
        Ok(Pulled {
            stream: Some(stream),
            attempt: meta.attempt,
            meta,
            ops,
            root,
            quiesced: t_q,
            final_at,
            bytes: bytes.load(Ordering::Relaxed),
            round,
        })
    }
}
