//! Pre-copy: while a client stays put, its edge sends what changed in the
//! session's volume to the neighbour edges the client may move to next, so
//! a handover sends only the last dirty delta.
//!
//! Each session's volfs pushes its dirty state when it changes
//! (`Volume.Watch`, flushing the kernel's writeback cache every `interval`);
//! every tick the owner looks at the latest, and a session that changed
//! gets a round once `interval` passed since its last one, or at once past
//! `dirty_threshold`. A round is one delta per
//! candidate against the manifest that candidate holds (tracked per
//! candidate; a full delta when unknown), pushed over `Peer.Precopy` under a
//! bandwidth cap shared by every session of the edge. Candidates stage what
//! they receive in `DATA_DIR/staging/SESSION/`, verified like any delta, and
//! drop it after `staged_ttl` or when told the session went elsewhere (that
//! side is `session::staging`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use prost::Message;
use tokio::sync::Mutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Edge, EdgeError, Session, State};
use crate::config::{Neighbour, valid_name};
use crate::volume;

/// Per-session pre-copy bookkeeping.
#[derive(Debug, Default)]
pub struct PrecopyState {
    /// When the last round ended.
    last_round: Option<Instant>,
    /// Per candidate (edge id): the manifest file it holds.
    held: HashMap<String, PathBuf>,
    /// The volume's refresh count when the last round began.
    refreshes: Option<u64>,
}

/// A session's volume watched: the latest dirty state its volfs pushed
/// (`Volume.Watch`; `None` until the first).
#[derive(Debug)]
struct Watched {
    rx: tokio::sync::watch::Receiver<Option<pb::VolumeStatus>>,
    task: AbortOnDrop,
}

/// A task aborted when its handle goes.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Watched {
    /// Watches the volume of `s`; volfs flushes the kernel's writeback
    /// cache every `flush` so buffered writes show. The task ends when the
    /// shim does (a new one is started at the next tick).
    fn start(s: &Session, flush: Duration) -> Watched {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let backing = s.layout().backing();
        let task = tokio::spawn(async move {
            let Ok(mut c) = volume::client(&backing).await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            };
            let req = pb::WatchRequest {
                interval_ms: 200,
                flush_ms: u32::try_from(flush.as_millis()).unwrap_or(u32::MAX),
            };
            let Ok(stream) = c.watch(req).await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(st)) = stream.message().await {
                if tx.send(Some(st)).is_err() {
                    return;
                }
            }
        });
        Watched {
            rx,
            task: AbortOnDrop(task),
        }
    }
}

/// A token bucket over bytes, shared by all sessions of the edge.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A cap of `mbit` Mbit/s; 0 means none.
    pub fn new(mbit: f64) -> Self {
        RateLimiter {
            bytes_per_sec: mbit * 1e6 / 8.0,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Waits until `n` more bytes may go.
    pub async fn take(&self, n: usize) {
        if self.bytes_per_sec <= 0.0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            // Refill, with at most 100 ms of burst.
            let (tokens, last) = *st;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.bytes_per_sec)
                .min(self.bytes_per_sec / 10.0);
            let left = tokens - n as f64;
            *st = (left, now);
            if left < 0.0 {
                Duration::from_secs_f64(-left / self.bytes_per_sec)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Edge {
    /// Runs pre-copy rounds until the edge stops (spawned by `server::run`).
    pub async fn precopy_loop(self: Arc<Self>) {
        if !self.cfg.precopy.enabled || self.cfg.neighbours.is_empty() {
            return;
        }
        let limiter = Arc::new(RateLimiter::new(self.cfg.precopy.bandwidth_mbit));
        // Each session's dirty state as its volfs pushes it: a tick reads
        // memory, and an idle session costs no request at all.
        let mut watched: HashMap<String, Watched> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let sessions: Vec<Arc<Session>> = self
                .sessions
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            let live: std::collections::HashSet<&str> =
                sessions.iter().map(|s| s.id.as_str()).collect();
            watched.retain(|id, w| !w.task.is_finished() && live.contains(id.as_str()));
            for s in sessions {
                // Only sessions this edge serves with no handover under way.
                let idle = s
                    .owner
                    .try_lock()
                    .is_ok_and(|o| *o == crate::migration::owner::OwnerState::Serving);
                if s.state() != State::Serving || !idle || s.role() != super::Role::Serving {
                    continue;
                }
                let w = watched
                    .entry(s.id.clone())
                    .or_insert_with(|| Watched::start(&s, self.cfg.precopy.interval));
                let Some(status) = *w.rx.borrow() else {
                    continue;
                };
                if let Err(e) = self.maybe_round(&s, &status, &limiter).await {
                    tracing::debug!(session = %s.id, error = %e, "pre-copy round failed");
                }
            }
        }
    }

    async fn maybe_round(
        &self,
        s: &Arc<Session>,
        status: &pb::VolumeStatus,
        limiter: &Arc<RateLimiter>,
    ) -> Result<(), Status> {
        let mut st = s.precopy.lock().await;
        let since = st.last_round.map(|t| t.elapsed());
        let time_due = since.is_none_or(|d| d >= self.cfg.precopy.interval);
        // Counts from before the last round's own refresh say nothing new.
        let fresh = st.refreshes.is_none_or(|r| status.refreshes > r);
        let changed = fresh && (status.files > 0 || status.metadata_changes > 0);
        let targets = self.candidates_of(s);
        let missing = targets.iter().any(|n| !st.held.contains_key(&n.id));
        let due = since.is_none()
            || ((changed || missing)
                && (time_due || status.bytes >= self.cfg.precopy.dirty_threshold));
        if !due {
            return Ok(());
        }
        let mut refreshed = false;
        for n in &targets {
            let t = Instant::now();
            match self.round(s, n, &mut st, limiter).await {
                Ok(bytes) => {
                    // The round's diff took the marks the status counted.
                    refreshed = true;
                    tracing::debug!(session = %s.id, to = %n.id, bytes, ms = t.elapsed().as_millis() as u64, "pre-copy round")
                }
                // Refused before anything was applied: what it holds is
                // as it was (and a wrong guess is refused by its base
                // check, never applied).
                Err(e)
                    if matches!(
                        e.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::ResourceExhausted
                    ) =>
                {
                    tracing::debug!(session = %s.id, to = %n.id, error = %e.message(), "pre-copy round refused for now");
                    if edge_proto::lost_connection(&e) {
                        self.peers.forget(&n.id, &n.addr);
                    }
                }
                Err(e) => {
                    // Unknown state on the candidate: the next round sends everything.
                    st.held.remove(&n.id);
                    if edge_proto::lost_connection(&e) {
                        self.peers.forget(&n.id, &n.addr);
                    }
                    if e.code() == tonic::Code::PermissionDenied {
                        // A configuration to fix (neighbours are mutual), not a passing fault.
                        tracing::warn!(to = %n.id, error = %e.message(), "the neighbour refuses this edge's pre-copy: does it list this edge as a neighbour too?");
                    } else {
                        tracing::debug!(session = %s.id, to = %n.id, error = %e.message(), "pre-copy round failed");
                    }
                }
            }
        }
        if refreshed {
            st.refreshes = Some(status.refreshes);
        }
        st.last_round = Some(Instant::now());
        Ok(())
    }

    async fn round(
        &self,
        s: &Session,
        n: &Neighbour,
        st: &mut PrecopyState,
        limiter: &Arc<RateLimiter>,
    ) -> Result<u64, Status> {
        let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
        let dir = s.dir.join("precopy");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| internal(&e))?;
        let base = match st.held.get(&n.id) {
            Some(p) => tokio::fs::read(p).await.map_err(|e| internal(&e))?,
            None => Vec::new(),
        };
        let peer = self.peers.dial(&n.id, &n.addr).await?;
        let meta = pb::SessionMeta {
            session_id: s.id.clone(),
            app: s.app.clone(),
            client_id: s.client_id.clone(),
            token_hash: s.token_hash.to_hex().to_string(),
            created_unix: s.created,
            block_size: self.cfg.block_size,
            attempt: 0,
            epoch: 0,
        };
        // The delta streams out of volfs onto the wire frame by frame (no
        // file, never whole in memory); the cap is taken as each frame goes.
        let mut diff = volume::Diff::start(&s.layout().backing(), base, true)
            .await
            .map_err(|e| internal(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PrecopyChunk>(4);
        let _ = tx
            .send(pb::PrecopyChunk {
                chunk: Some(pb::precopy_chunk::Chunk::Meta(meta)),
            })
            .await;
        let limiter = limiter.clone();
        let feed = async move {
            let mut total = 0u64;
            loop {
                match diff.next().await.map_err(|e| internal(&e))? {
                    volume::DiffItem::Frame(f) => {
                        let c = pb::PrecopyChunk {
                            chunk: Some(pb::precopy_chunk::Chunk::Frame(f)),
                        };
                        limiter.take(c.encoded_len()).await;
                        total += c.encoded_len() as u64;
                        // The candidate refused: its answer says why.
                        if tx.send(c).await.is_err() {
                            return Ok((total, None));
                        }
                    }
                    volume::DiffItem::Done(_, held) => return Ok::<_, Status>((total, Some(held))),
                }
            }
        };
        let mut peer = peer;
        // A feed that fails drops its end: the candidate sees the delta cut
        // short and applies nothing.
        let (fed, sent) = tokio::join!(feed, peer.precopy(ReceiverStream::new(rx)));
        sent?;
        let (total, done) = fed?;
        let held_now = done.ok_or_else(|| Status::internal("the pre-copy stream closed early"))?;
        let next = dir.join(format!("{}.next", n.id));
        let held = dir.join(format!("{}.manifest", n.id));
        tokio::fs::write(&next, &held_now)
            .await
            .map_err(|e| internal(&e))?;
        tokio::fs::rename(&next, &held)
            .await
            .map_err(|e| internal(&e))?;
        st.held.insert(n.id.clone(), held);
        Ok(total)
    }

    /// Owner side, after a session moved to `to`: the other candidates drop their copies.
    pub fn tell_candidates_to_drop(&self, id: &str, to: &str) {
        for n in self.cfg.neighbours.iter().filter(|n| n.id != to) {
            let (n, id, peers) = (n.clone(), id.to_string(), self.peers.clone());
            tokio::spawn(async move {
                if let Ok(mut p) = peers.dial(&n.id, &n.addr).await {
                    let _ = p.drop(pb::DropRequest { session_id: id }).await;
                }
            });
        }
    }
}

/// Most edge ids a client may name as its candidates.
const MAX_CANDIDATES: usize = 64;

impl Edge {
    /// The neighbours a session is pre-copied to.
    fn candidates_of(&self, s: &Session) -> Vec<Neighbour> {
        let named = s
            .candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.cfg
            .neighbours
            .iter()
            .filter(|n| named.as_ref().is_none_or(|c| c.contains(&n.id)))
            .cloned()
            .collect()
    }

    /// The client names its next edges; neighbours no longer named drop
    /// what they staged. Returns the candidates in effect.
    pub fn set_candidates(
        &self,
        id: &str,
        token: &[u8],
        edge_ids: Vec<String>,
    ) -> Result<Vec<String>, EdgeError> {
        let s = self.session(id, token)?;
        if edge_ids.len() > MAX_CANDIDATES || !edge_ids.iter().all(|e| valid_name(e)) {
            return Err(EdgeError::Invalid(format!(
                "candidates: at most {MAX_CANDIDATES} edge ids of 1-64 [a-zA-Z0-9._-]"
            )));
        }
        let named = (!edge_ids.is_empty()).then_some(edge_ids);
        *s.candidates.lock().unwrap_or_else(|p| p.into_inner()) = named;
        let now = self.candidates_of(&s);
        for n in self
            .cfg
            .neighbours
            .iter()
            .filter(|n| !now.iter().any(|c| c.id == n.id))
        {
            let (n, id, peers) = (n.clone(), id.to_string(), self.peers.clone());
            tokio::spawn(async move {
                if let Ok(mut p) = peers.dial(&n.id, &n.addr).await {
                    let _ = p.drop(pb::DropRequest { session_id: id }).await;
                }
            });
        }
        Ok(now.into_iter().map(|n| n.id).collect())
    }
}

impl PrecopyState {
    /// Records that candidate `edge` holds the manifest in `file` (the
    /// next round to it is a delta from there).
    pub(super) fn assume_held(&mut self, edge: &str, file: PathBuf) {
        self.held.insert(edge.to_string(), file);
    }
}
