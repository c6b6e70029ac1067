//! The transfer of a give (A): what the owner streams to the puller — the
//! session's identity, live rounds while the app runs (until what is left
//! fits the downtime budget, the app's writes throttled if they would not
//! let it: `migration::converge`), then the quiesce, the final round, the
//! results of the ops that ran, and the final root hash. It feeds its
//! progress to the owner machine as events and stops as soon as the
//! machine has moved on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::handover_chunk::Chunk;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use super::migrate::io_status;
use super::{Edge, Session};
use crate::journal::Outcome;
use crate::migration::owner::{OwnerAction, OwnerEvent};
use crate::migration::{Attempt, converge};
use crate::volume;

/// Longest wait, from its last frame sent, for the new edge to say it
/// applied a live round.
const ACK_WAIT: Duration = Duration::from_secs(600);

/// Shortest lease of a write throttle (renewed every live round, and while
/// a round's acknowledgement is awaited).
const THROTTLE_LEASE: Duration = Duration::from_secs(10);

/// Longest lease of a write throttle: how long an owner that died could
/// leave its app slowed.
const MAX_LEASE: Duration = Duration::from_secs(60);

impl Edge {
    pub(super) async fn give_attempt(
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
        // One round: the delta from what B holds, streamed out of volfs
        // frame by frame onto the handover stream (never a file, never whole
        // in memory). Returns its bytes and what B then holds.
        let round = async |base: Vec<u8>,
                           next: bool|
               -> Result<(u64, pb::DiffDone, Vec<u8>), Status> {
            let mut diff = match volume::Diff::start(&backing, base, next).await {
                Ok(d) => d,
                // A base volfs will not take (what B says it holds is far
                // larger than this volume): everything, against nothing.
                Err(volume::VolumeError::BadBase(why)) => {
                    tracing::warn!(error = %why, "the new edge's base is refused; sending the whole volume");
                    volume::Diff::start(&backing, Vec::new(), next)
                        .await
                        .map_err(io_status)?
                }
                Err(e) => return Err(io_status(e)),
            };
            let mut bytes = 0u64;
            loop {
                match diff.next().await.map_err(io_status)? {
                    volume::DiffItem::Frame(f) => {
                        bytes += f.encoded_len() as u64;
                        send(Chunk::Frame(f)).await?;
                    }
                    volume::DiffItem::Done(d, held) => return Ok((bytes, d, held)),
                }
            }
        };
        // Live rounds while the app runs, until the rest fits the downtime
        // budget; the app's writes are throttled if they would not
        // (migration::converge).
        let cfg = &self.cfg.handover;
        let mut policy = converge::Policy {
            max_downtime: cfg.max_downtime,
            max_live_rounds: cfg.max_live_rounds,
            auto_converge: cfg.auto_converge,
            overhead: Duration::ZERO,
        };
        let mut throttle = volume::WriteThrottle::new(&backing);
        // Round 1, live: what B lacks of the volume as it is now.
        let mut base = req.held_manifest.clone();
        let mut n = 1u32;
        let held1 = loop {
            let t = Instant::now();
            let (bytes, _, held) = round(base, true).await?;
            // Timed by delivery when the puller acknowledges rounds: sent is
            // not yet there (socket and link buffers hold seconds), and the
            // final round must not queue behind a live one.
            let mut acked = !req.acks_rounds;
            if req.acks_rounds {
                let sent = Instant::now();
                let mut rx = s.applied.subscribe();
                let mut renewed = Instant::now();
                loop {
                    let wait = rx.wait_for(|(a, r, _)| *a == attempt && *r >= n);
                    tokio::select! {
                        r = tokio::time::timeout(Duration::from_millis(200), wait) => {
                            if let Ok(Ok(v)) = r {
                                // What the puller needs after the final round
                                // comes out of the budget (at most half of it:
                                // a puller cannot make the owner throttle the
                                // app to a stop).
                                policy.overhead = v.2.min(cfg.max_downtime / 2);
                                acked = true;
                                break;
                            }
                        }
                        _ = tx.closed() => {
                            return Err(Status::cancelled("the new edge went away"));
                        }
                    }
                    if s.owner.lock().await.attempt() != Some(attempt) {
                        return Err(given_up());
                    }
                    if throttle.rate() != 0 && renewed.elapsed() > THROTTLE_LEASE / 4 {
                        let rate = throttle.rate();
                        throttle.set(rate, THROTTLE_LEASE).await;
                        renewed = Instant::now();
                    }
                    if sent.elapsed() > ACK_WAIT {
                        tracing::warn!(
                            round = n,
                            "the new edge did not acknowledge the round; quiescing"
                        );
                        break;
                    }
                }
            }
            let took = t.elapsed();
            let left = volume::dirty_bytes(&backing).await;
            let r = converge::Round {
                n,
                sent: bytes,
                took,
                left,
                throttle: throttle.rate(),
            };
            // A round whose delivery nobody confirmed says nothing of the link.
            let next = if acked {
                converge::after(&policy, &r)
            } else {
                converge::Next::Quiesce(converge::Why::OutOfRounds)
            };
            if let converge::Next::Round { throttle: rate } = next {
                if rate != 0 {
                    // The lease outlives the next round (renewed while an
                    // acknowledgement is awaited).
                    let lease = (took * 2).clamp(THROTTLE_LEASE, MAX_LEASE);
                    throttle.set(rate, lease).await;
                }
            }
            let another = matches!(next, converge::Next::Round { .. });
            send(Chunk::RoundSent(pb::RoundSent {
                round: n,
                bytes,
                remaining_bytes: left,
                // Lifted before the quiesce.
                throttle_bytes_per_sec: if another { throttle.rate() } else { 0 },
                another,
            }))
            .await?;
            tracing::debug!(
                round = n,
                bytes,
                left,
                predicted_ms = r.predicted().as_millis() as u64,
                throttle = throttle.rate(),
                ?next,
                "live round sent"
            );
            if let converge::Next::Quiesce(why) = next {
                if throttle.rate() != 0 || why != converge::Why::Fits {
                    tracing::info!(
                        rounds = n,
                        left,
                        ?why,
                        throttled = throttle.rate(),
                        "live rounds done"
                    );
                }
                break held;
            }
            base = held;
            n += 1;
        };
        // Running ops finish at full speed; new calls are held from here.
        throttle.clear().await;
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
            held_micros: t.elapsed().as_micros() as u64,
        }))
        .await?;
        // The final round: the instance is frozen; the diff flushes volfs
        // first. What B then holds is not asked for: on the downtime path,
        // it would be the whole manifest's bytes.
        let (_, done2, _) = round(held1, false).await?;
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
        let root = done2.root;
        // The machine waits for the release from here on, before B can ask.
        self.owner_event(s, OwnerEvent::FinalSent { attempt }).await;
        if s.owner.lock().await.attempt() != Some(attempt) {
            return Err(given_up());
        }
        let root_hex = root.iter().map(|b| format!("{b:02x}")).collect::<String>();
        send(Chunk::Final(pb::Final { root })).await?;
        drop(_precopy);
        tracing::info!(root = %root_hex, "final delta sent; owner until released");
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
}
