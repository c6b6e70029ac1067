//! The owner's side of a handover (A): the async shell around
//! [`OwnerState`]. Every event goes through [`Edge::owner_event`], which
//! steps the machine and performs what touches the session — persist,
//! freeze, thaw, the call gate, timers, teardown — under the machine's lock,
//! so a thaw never overtakes a freeze. The streaming (live rounds, final
//! delta, op results) is in `send`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use super::{Edge, EdgeError, Gate, Role, Session, Tombstone, now_unix};
use crate::migration::owner::{OwnerAction, OwnerEvent, OwnerState, OwnerTimer, Persist, Refusal};
use crate::migration::{Attempt, Peer, new_attempt};

impl Edge {
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
                    // Clearing "frozen" may fail harmlessly: a restart that
                    // finds it thaws and serves anyway. The calls must resume.
                    OwnerAction::Persist(Persist::Serving) => {
                        if let Err(e) = self.persist_owner(s, &Persist::Serving).await {
                            tracing::error!(session = %s.id, error = %e, "could not persist that the handover ended; serving on");
                        }
                        None
                    }
                    OwnerAction::Persist(p) => self.persist_owner(s, p).await.err(),
                    OwnerAction::Freeze => s.freeze().await.err(),
                    OwnerAction::Thaw => {
                        s.thaw().await;
                        None
                    }
                    OwnerAction::HoldCalls => {
                        *s.held_since.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Instant::now());
                        s.set_gate(Gate::Held);
                        s.journal.hold_new();
                        None
                    }
                    OwnerAction::ResumeCalls => {
                        *s.held_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
                    } else if let Some(attempt) = st.attempt().or(attempt) {
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
                tokio::task::spawn_blocking(move || {
                    let r = store.put(&id, &t2);
                    if r.is_err() {
                        // Not released: a half-written tombstone must not
                        // remove the session at the next start.
                        store.remove(&id);
                    }
                    r
                })
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
        let (gone, edge, id) = (s.clone(), self.clone(), s.id.clone());
        let (done, rx) = tokio::sync::watch::channel(false);
        // Leaving before it is gone from the map: a pre-copy round into
        // this id is refused from here until the teardown is done.
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), rx);
        {
            let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            if map.get(&s.id).is_some_and(|x| Arc::ptr_eq(x, s)) {
                map.remove(&s.id);
            }
        }
        let to_id = to.clone();
        tokio::spawn(async move {
            // The frozen instance goes first, whatever else waits.
            let discarded = gone.discard_instance().await;
            // The volume stays as a staged copy (as of the final delta,
            // which the new owner knows) when the new owner is a
            // neighbour: its pre-copy rounds back here, and a move back,
            // send only what changed since.
            let keep = match (&to_id, discarded) {
                (Some(to), true) => edge.room_to_keep(&gone, to).await,
                _ => None,
            };
            let lock = edge.staging_lock(&id);
            let staging = lock.lock().await;
            if discarded {
                gone.retire(keep).await;
            } else {
                // Left on disk with its record: a restart discards it again.
                tracing::error!(session = %id, "the released instance could not be discarded; its directory stays until edged restarts");
            }
            drop(staging);
            let _ = done.send(true);
            // Only this teardown's entry (a later one of the same id is not done).
            let mut leaving = edge.leaving.lock().unwrap_or_else(|p| p.into_inner());
            if leaving.get(&id).is_some_and(|rx| *rx.borrow()) {
                leaving.remove(&id);
            }
        });
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
        // Only an owner gives: a session pulled here and still waiting for
        // its old owner's release is not this edge's to hand on.
        if s.role() != Role::Serving || s.state() != super::State::Serving {
            let _ = tx
                .send(Err(Status::failed_precondition(format!(
                    "session {} is not owned by this edge yet (its handover here is not finished)",
                    s.id
                ))))
                .await;
            return;
        }
        // Both are persisted (role, tombstone) and told to clients.
        if !crate::config::valid_name(&req.to_edge)
            || req.to_addr.is_empty()
            || req.to_addr.len() > 255
            || req
                .to_addr
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "to_edge must be an edge id and to_addr a host:port",
                )))
                .await;
            return;
        }
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

    /// A side: the puller of `attempt` applied live round `round` and
    /// expects to need `finish` from the final round to serving. Only the
    /// puller of the live rounds under way is heard.
    pub async fn round_applied(
        &self,
        id: &str,
        attempt: Attempt,
        round: u32,
        finish: Duration,
        from: &str,
    ) -> Result<(), EdgeError> {
        let refused = || {
            EdgeError::Refused(
                format!("session {id} is not in the live rounds of attempt {attempt} to {from}"),
                Refusal::NotGiving,
            )
        };
        let s = self.get(id).ok_or_else(refused)?;
        match &*s.owner.lock().await {
            OwnerState::Giving { attempt: a, to } if *a == attempt && to.edge_id == from => {}
            _ => return Err(refused()),
        }
        // Acknowledgements may come out of order: the highest round stays.
        s.applied.send_if_modified(|v| {
            let newer = v.0 != attempt || round > v.1;
            if newer {
                *v = (attempt, round, finish);
            }
            newer
        });
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
    ) -> Result<Option<Duration>, EdgeError> {
        let live = self.get(id);
        let Some(s) = live else {
            // Released already (the answer was lost, or this edge restarted).
            return match self.tombstone(id) {
                Some(t) if t.attempt == attempt && t.to.edge_id == from => Ok(None),
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
        reply_of(id, acts)?;
        let held = *s.held_since.lock().unwrap_or_else(|p| p.into_inner());
        Ok(held.map(|t| t.elapsed()))
    }

    /// A side: the new edge gave up; serve again.
    pub async fn abort_handover(
        self: &Arc<Self>,
        id: &str,
        attempt: Attempt,
        from: &str,
    ) -> Result<(), EdgeError> {
        let s = self
            .get(id)
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
