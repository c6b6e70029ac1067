//! Sessions: one client's instance of one app, over its own volume.
//!
//! Open seeds the volume from the app's base volume, mounts it with a volfs
//! shim, starts the instance and waits until its socket answers. Every call
//! checks the session token, is journaled by op id and runs in its own task,
//! so a client that disconnects mid-call finds the result later with
//! `Result`. Close (or the idle reaper) stops the instance, unmounts and
//! removes the volume. A record on disk lets a restarted edged recover every
//! session: the shim and the instance are re-attached when they still run,
//! restarted when not.
//!
//! # Layout
//! - this file: [`Session`] — its gate, role and record;
//! - [`registry`]: [`Edge`] — the sessions of an edge, open, invoke, close;
//! - `instance`: starting, watching and stopping a session's instance (the
//!   one teardown);
//! - `layout`: where a session keeps its files, and its durable records;
//! - `error`: [`EdgeError`], the only conversion to a gRPC status;
//! - `give`, `take` (with `pull`, the transfer, and `promote`, becoming
//!   the owner in waiting), [`migrate`]: the two sides of a handover, driving the
//!   state machines of [`crate::migration`];
//! - [`precopy`]: rounds of dirty blocks to candidate neighbours;
//! - `standby`: a warm standby, the instance of a session being pulled
//!   here started before the quiesce;
//! - `recover`: what a restarted edged finds on disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::forward::AppClient;
use crate::journal::Journal;
use crate::migration::owner::OwnerState;
use crate::migration::{Attempt, Peer};
use crate::runtime::{InstanceId, InstanceSpec, Runtime};
use crate::volume::{self, Shim};

mod error;
mod give;
#[cfg(test)]
mod give_tests;
mod instance;
mod layout;
pub mod migrate;
pub mod precopy;
mod promote;
mod pull;
mod recover;
#[cfg(test)]
mod recover_tests;
pub mod registry;
mod send;
mod staging;
mod standby;
mod take;

pub use error::{EdgeError, moved_status, moving_status, peer_status};
pub use layout::{Layout, Role, SessionRecord, Tombstone, Tombstones, write_durable};
pub use recover::{cleanup_all, cleanup_dir};
pub use registry::{Edge, Phases, locate_volfs};

/// How long a call waits while its session is quiescing for a handover
/// before it is told "moving" (and tries again).
pub const HOLD_WAIT: Duration = Duration::from_secs(30);

/// Characters of a session id (lowercase hex).
pub const ID_LEN: usize = 32;

/// Whether a session admits calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Calls run.
    Open,
    /// Calls wait: a handover is quiescing the session here, or this edge
    /// pulled it and waits for the old owner's release.
    Held,
    /// The session went to this edge: calls are redirected there.
    Moved(Peer),
    /// The session is closed.
    Gone,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// Lifecycle state, for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Being opened or recovered.
    Starting,
    /// Serving calls.
    Serving,
    /// Being closed.
    Closing,
}

impl State {
    /// Name shown by the Admin service.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Closing => "closing",
        }
    }
}

/// One session. Immutable fields are plain; each mutable one names its
/// guard.
pub struct Session {
    /// Session id.
    pub id: String,
    /// App name.
    pub app: String,
    /// Client id.
    pub client_id: String,
    token_hash: blake3::Hash,
    dir: PathBuf,
    spec: InstanceSpec,
    created: i64,
    /// Unix seconds of the last call (atomic; read by the idle reaper).
    last_used: AtomicI64,
    /// Open/serve/close lifecycle, for the operator (std mutex, never held
    /// across an await).
    state: Mutex<State>,
    /// The running instance and a client of its socket (async mutex: held
    /// while it starts, so one call starts it).
    instance: tokio::sync::Mutex<Option<(InstanceId, AppClient)>>,
    /// The volfs shim (async mutex).
    shim: tokio::sync::Mutex<Option<Shim>>,
    /// Op journal (its own lock; `hold_new` closes it to new ops).
    journal: Journal,
    /// Ops run (atomic counter).
    ops: AtomicU64,
    runtime: Arc<dyn Runtime>,
    /// Ownership epoch, persisted (atomic).
    epoch: AtomicU64,
    /// The handover role, as persisted in `session.json` (std mutex).
    role: Mutex<Role>,
    /// The owner's side of a handover. The async lock serializes each
    /// event's transition with its instance actions (freeze, thaw,
    /// persist), so a thaw never overtakes a freeze.
    owner: tokio::sync::Mutex<OwnerState>,
    /// Whether calls run, wait, or go elsewhere (a watch: waiters wake on change).
    gate: watch::Sender<Gate>,
    /// Since when a handover holds the calls here (std mutex): the
    /// downtime the client sees begins then.
    held_since: Mutex<Option<std::time::Instant>>,
    /// Pre-copy bookkeeping (async mutex, held for a whole round; a
    /// handover holds it too, so no round runs during one).
    precopy: tokio::sync::Mutex<precopy::PrecopyState>,
    /// Neighbours the client named as its next edges; `None`: all.
    candidates: Mutex<Option<Vec<String>>>,
    /// The last live round the puller of a handover said it applied, with
    /// the attempt and the time it expects to need to finish (a watch: the
    /// owner's rounds wait on it).
    applied: watch::Sender<(Attempt, u32, Duration)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl Session {
    fn layout(&self) -> Layout {
        Layout {
            dir: self.dir.clone(),
        }
    }

    /// The session's state.
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn touch(&self) {
        self.last_used.store(now_unix(), Ordering::Relaxed);
    }

    fn check_token(&self, token: &[u8]) -> Result<(), EdgeError> {
        // blake3::Hash compares in constant time.
        if blake3::hash(token) == self.token_hash {
            Ok(())
        } else {
            Err(EdgeError::BadToken(self.id.clone()))
        }
    }

    /// Persists the record, durably: a role change holds before it takes
    /// effect.
    async fn save_record(&self) -> Result<(), EdgeError> {
        let instance = self.instance.lock().await.as_ref().map(|(i, _)| i.clone());
        self.save_record_with(instance).await
    }

    /// [`Session::save_record`] naming `instance` (one that is starting,
    /// so a crash before it answers does not leave it unrecorded).
    async fn save_record_with(&self, instance: Option<InstanceId>) -> Result<(), EdgeError> {
        let rec = SessionRecord {
            id: self.id.clone(),
            app: self.app.clone(),
            client_id: self.client_id.clone(),
            token_hash: self.token_hash.to_hex().to_string(),
            created: self.created,
            instance,
            volfs_pid: self.shim.lock().await.as_ref().map(|s| s.pid),
            epoch: self.epoch.load(Ordering::SeqCst),
            role: self.role(),
        };
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| EdgeError::Io(e.into()))?;
        let path = self.layout().record();
        tokio::task::spawn_blocking(move || write_durable(&path, &json))
            .await
            .map_err(|e| EdgeError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// The persisted handover role.
    pub fn role(&self) -> Role {
        self.role.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets and persists the handover role.
    async fn set_role(&self, r: Role) -> Result<(), EdgeError> {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = r;
        self.save_record().await
    }

    /// Sets the gate (and wakes the calls waiting on it).
    fn set_gate(&self, g: Gate) {
        self.gate.send_replace(g);
    }

    /// Waits until the session admits calls: `Err` with where it went, or
    /// "moving" after [`HOLD_WAIT`].
    async fn admit(&self) -> Result<(), EdgeError> {
        let mut rx = self.gate.subscribe();
        let deadline = tokio::time::Instant::now() + HOLD_WAIT;
        loop {
            match &*rx.borrow_and_update() {
                Gate::Open => return Ok(()),
                Gate::Moved(to) => return Err(EdgeError::Moved(self.id.clone(), to.clone())),
                Gate::Gone => return Err(EdgeError::UnknownSession(self.id.clone())),
                Gate::Held => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(EdgeError::Moving(self.id.clone())),
            }
        }
    }

    /// Session info for the Admin service.
    async fn info(&self) -> edge_proto::v1::SessionInfo {
        let backing = self.layout().backing();
        let dirty = volume::status(&backing, true).await.ok().map(|s| s.bytes);
        let b2 = backing.clone();
        let size = tokio::task::spawn_blocking(move || volume::volume_bytes(&b2))
            .await
            .unwrap_or(0);
        edge_proto::v1::SessionInfo {
            session_id: self.id.clone(),
            app: self.app.clone(),
            client_id: self.client_id.clone(),
            state: if *self.gate.borrow() != Gate::Open || self.role() != Role::Serving {
                "moving".into()
            } else {
                self.state().name().into()
            },
            volume_bytes: size,
            dirty_bytes: dirty.unwrap_or(0),
            container_id: self
                .instance
                .lock()
                .await
                .as_ref()
                .map(|(i, _)| i.to_string())
                .unwrap_or_default(),
            created_unix: self.created,
            last_used_unix: self.last_used.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
        }
    }
}
