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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;
use tracing::Instrument;

use crate::config::{AppConfig, Config, RuntimeConfig, valid_name};
use crate::forward::{AppClient, SOCKET_NAME, valid_method};
use crate::journal::{Begin, Journal, Outcome};
use crate::migration::Peer;
use crate::migration::owner::OwnerState;
use crate::migration::puller::PullerState;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{InstanceId, InstanceSpec, Runtime};
use crate::volume::{self, Shim};

mod error;
mod give;
mod layout;
pub mod migrate;
pub mod precopy;
mod recover;
mod take;

pub use error::{EdgeError, moved_status, moving_status, peer_status};
pub use layout::{Layout, Role, SessionRecord, Tombstone, Tombstones, write_durable};
pub use recover::{cleanup_all, cleanup_dir};

/// How long a call waits while its session is quiescing for a handover
/// before it is told "moving" (and tries again).
pub const HOLD_WAIT: Duration = Duration::from_secs(30);

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
    /// Pre-copy bookkeeping (async mutex, held for a whole round; a
    /// handover holds it too, so no round runs during one).
    precopy: tokio::sync::Mutex<precopy::PrecopyState>,
    /// Neighbours the client named as its next edges; `None`: all.
    candidates: Mutex<Option<Vec<String>>>,
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

    /// The socket directory belongs to the instance's user and nobody else.
    fn prepare_socket_dir(&self, app: &AppConfig) -> Result<(), EdgeError> {
        use std::os::unix::fs::PermissionsExt;
        let run = self.layout().run();
        std::fs::create_dir_all(&run)?;
        if let Some((uid, gid)) = app.uid_gid() {
            std::os::unix::fs::lchown(&run, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
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

    /// Waits until the instance answers on its socket, or fails with its output.
    async fn wait_ready(
        &self,
        id: &InstanceId,
        timeout: Duration,
        max_message: usize,
    ) -> Result<AppClient, EdgeError> {
        let socket = self.spec.socket_dir.join(SOCKET_NAME);
        let deadline = Instant::now() + timeout;
        loop {
            if socket.exists() {
                if let Ok(c) = AppClient::connect(&socket, max_message).await {
                    return Ok(c);
                }
            }
            let reason = if !self.runtime.alive(id).await {
                "it exited".to_string()
            } else if Instant::now() > deadline {
                format!("no answer on its socket within {timeout:?}")
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let logs = self.runtime.logs(id, &self.spec, 10).await.join(" | ");
            return Err(EdgeError::NotReady { reason, logs });
        }
    }

    /// Starts the instance (or restarts a dead one) and returns a client of it.
    async fn ensure_running(&self, cfg: &Config) -> Result<AppClient, EdgeError> {
        let mut inst = self.instance.lock().await;
        // Liveness is checked when a call fails (see `mark_failed`), not on
        // every call: for Docker it is a round trip to the engine.
        if let Some((_, client)) = inst.as_ref() {
            return Ok(client.clone());
        }
        let _ = std::fs::remove_file(self.spec.socket_dir.join(SOCKET_NAME));
        // The instance's user owns its socket directory and its volume, also
        // for a session made before (or on an edge with) another `user`.
        if let Some(app) = cfg.apps.get(&self.app) {
            self.prepare_socket_dir(app)?;
            if let Some((uid, gid)) = app.uid_gid() {
                let backing = self.layout().backing();
                let owned = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&backing)?);
                if owned != uid {
                    tracing::info!(session = %self.id, uid, "giving the volume to the app's user");
                    tokio::task::spawn_blocking(move || volume::give_to(&backing, uid, gid))
                        .await
                        .map_err(|e| EdgeError::Io(std::io::Error::other(e)))??;
                }
            }
        }
        let id = self.runtime.start(&self.spec).await?;
        if let Err(e) = self.save_record_with(Some(id.clone())).await {
            let _ = self.runtime.stop(&id).await;
            return Err(e);
        }
        match self
            .wait_ready(&id, cfg.start_timeout, cfg.max_payload + 1024)
            .await
        {
            Ok(client) => {
                *inst = Some((id, client.clone()));
                drop(inst);
                self.save_record().await?;
                Ok(client)
            }
            Err(e) => {
                let _ = self.runtime.stop(&id).await;
                Err(e)
            }
        }
    }

    /// After a failed call: if the instance is gone, forget it (the next
    /// call starts a new one) and say so with its last output.
    async fn check_after_failure(&self, st: &Status) -> Option<String> {
        let mut inst = self.instance.lock().await;
        let id = inst.as_ref().map(|(i, _)| i.clone())?;
        // A dying process closes its socket a moment before it is seen to
        // exit: after a transport failure, look a little longer.
        let transport = matches!(
            st.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
        );
        let deadline = Instant::now()
            + if transport {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
        while self.runtime.alive(&id).await {
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let logs = self.runtime.logs(&id, &self.spec, 5).await.join(" | ");
        tracing::warn!(session = %self.id, instance = %id, "instance exited; the next call restarts it");
        let _ = self.runtime.stop(&id).await;
        *inst = None;
        Some(logs)
    }

    /// Stops the instance, unmounts and removes the session directory.
    async fn teardown(&self) {
        self.set_state(State::Closing);
        if let Some((id, _)) = self.instance.lock().await.take() {
            if let Err(e) = self.runtime.stop(&id).await {
                tracing::error!(session = %self.id, error = %e, "stopping the instance failed");
            }
        }
        crate::runtime::cgroup::remove_instance(&self.spec.edge_id, &self.id).await;
        if let Some(shim) = self.shim.lock().await.take() {
            shim.unmount().await;
        }
        volume::detach(&self.layout().mnt());
        self.gate.send_if_modified(|g| {
            let open = matches!(g, Gate::Open | Gate::Held);
            if open {
                *g = Gate::Gone;
            }
            open
        });
        self.journal.close();
        if let Err(e) = tokio::fs::remove_dir_all(&self.dir).await {
            tracing::error!(session = %self.id, error = %e, "removing the session directory failed");
        }
    }

    /// Session info for the Admin service.
    async fn info(&self) -> edge_proto::v1::SessionInfo {
        let backing = self.layout().backing();
        let dirty = volume::control(&backing, "status")
            .await
            .ok()
            .and_then(|r| volume::field(&r, "bytes"));
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

/// Room held for an open under way; released when the open ends.
struct Reservation<'a> {
    edge: &'a Edge,
    client: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut o = self.edge.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = o.iter().position(|c| *c == self.client) {
            o.swap_remove(i);
        }
    }
}

/// The timings of an open, phase by phase.
pub type Phases = Vec<(&'static str, Duration)>;

/// The edge: its configuration, its runtimes and its sessions.
pub struct Edge {
    /// Configuration.
    pub cfg: Config,
    volfs_bin: PathBuf,
    runtimes: tokio::sync::Mutex<HashMap<String, Arc<dyn Runtime>>>,
    /// Sessions this edge owns, gives, or pulled and waits to own.
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    /// Sessions released to another edge, with where they went: a repeated
    /// Release is answered, a late call redirected. Persisted in
    /// `tombstones`, pruned after `tombstone_ttl`.
    released: Mutex<HashMap<String, Tombstone>>,
    tombstones: Tombstones,
    /// One-time tickets of operator-started moves (blake3 of the ticket).
    tickets: Mutex<HashMap<String, blake3::Hash>>,
    /// The puller's side of each session this edge pulls (absent: idle).
    /// Pre-copy rounds of a session being pulled are refused.
    pulls: Mutex<HashMap<String, PullerState>>,
    /// Session directories that failed to recover, with why: kept on disk,
    /// retried by the reaper, listed for the operator.
    failed: Mutex<std::collections::BTreeMap<PathBuf, String>>,
    /// Clients of the opens under way (see [`Edge::reserve`]).
    opening: Mutex<Vec<String>>,
    /// One lock per staged session: a pre-copy apply and the read of what is
    /// staged never overlap. Pruned when nobody holds one.
    staging_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Dials other edges (verified by id under TLS).
    pub(crate) peers: crate::peers::Peers,
    /// Teardowns of released sessions still running, by id (true once
    /// done): a pull of the same session back waits for the old directory
    /// to go.
    leaving: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("edge_id", &self.cfg.edge_id)
            .finish_non_exhaustive()
    }
}

/// Finds the volfs binary: configured, next to this executable, or on PATH.
pub fn locate_volfs(cfg: &Config) -> PathBuf {
    if let Some(p) = &cfg.volfs_binary {
        return p.clone();
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        for d in [dir.clone(), dir.join("..")] {
            let p = d.join("volfs");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("volfs")
}

impl Edge {
    /// An edge with no sessions yet (see [`Edge::recover`]).
    pub fn new(cfg: Config) -> Result<Arc<Edge>, EdgeError> {
        // Sessions, staged copies and tombstones are root's alone.
        for d in ["sessions", "staging"] {
            let p = cfg.data_dir.join(d);
            std::fs::create_dir_all(&p)?;
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        }
        let tls = match &cfg.tls {
            Some(t) => {
                Some(crate::tls::Material::load(t).map_err(|e| EdgeError::Invalid(e.to_string()))?)
            }
            None => None,
        };
        let volfs_bin = locate_volfs(&cfg);
        let tombstones = Tombstones::open(&cfg.data_dir)?;
        let released = tombstones.load().into_iter().collect();
        Ok(Arc::new(Edge {
            cfg,
            volfs_bin,
            runtimes: tokio::sync::Mutex::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            released: Mutex::new(released),
            tombstones,
            tickets: Mutex::new(Default::default()),
            pulls: Mutex::new(Default::default()),
            opening: Mutex::new(Vec::new()),
            failed: Mutex::new(Default::default()),
            staging_locks: Mutex::new(Default::default()),
            peers: crate::peers::Peers::new(tls),
            leaving: Mutex::new(HashMap::new()),
        }))
    }

    /// Where a released session went, if it was released from here.
    pub fn tombstone(&self, id: &str) -> Option<Tombstone> {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Drops tombstones older than the TTL and staging locks nobody holds.
    pub fn prune(&self) {
        let cutoff = now_unix() - self.cfg.tombstone_ttl.as_secs() as i64;
        let old: Vec<String> = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| t.at < cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            self.released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            self.tombstones.remove(&id);
        }
        self.staging_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, l| Arc::strong_count(l) > 1);
    }

    /// The session `id`, if this edge holds it (whatever its role).
    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Sessions known to this edge (tests and the soak benchmark watch it).
    pub fn session_count(&self) -> usize {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn app(&self, name: &str) -> Result<&AppConfig, EdgeError> {
        self.cfg
            .apps
            .get(name)
            .ok_or_else(|| EdgeError::UnknownApp(name.to_string()))
    }

    async fn runtime(&self, app: &str) -> Result<Arc<dyn Runtime>, EdgeError> {
        let mut rts = self.runtimes.lock().await;
        if let Some(r) = rts.get(app) {
            return Ok(r.clone());
        }
        let r: Arc<dyn Runtime> = match &self.app(app)?.runtime {
            RuntimeConfig::Process { command, args } => {
                Arc::new(ProcessRuntime::new(command.clone(), args.clone()))
            }
            RuntimeConfig::Docker { image } => Arc::new(DockerRuntime::new(
                crate::runtime::docker::connect().await?,
                image.clone(),
            )),
        };
        rts.insert(app.to_string(), r.clone());
        Ok(r)
    }

    fn sessions_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("sessions")
    }

    fn build_session(
        &self,
        rec: &SessionRecord,
        token_hash: blake3::Hash,
        runtime: Arc<dyn Runtime>,
    ) -> Result<Session, EdgeError> {
        let app = self.app(&rec.app)?;
        let dir = self.sessions_dir().join(&rec.id);
        let layout = Layout { dir: dir.clone() };
        let gate = match rec.role {
            Role::Serving | Role::Frozen { .. } => Gate::Open,
            Role::Starting { .. } | Role::AwaitingRelease { .. } => Gate::Held,
        };
        let spec = InstanceSpec {
            edge_id: self.cfg.edge_id.clone(),
            session_id: rec.id.clone(),
            app: rec.app.clone(),
            volume: layout.mnt(),
            socket_dir: layout.run(),
            log_file: dir.join("app.log"),
            memory_mib: app.memory_mib,
            pids_limit: app.pids_limit,
            cpus: app.cpus,
            user: app.user.clone(),
        };
        Ok(Session {
            id: rec.id.clone(),
            app: rec.app.clone(),
            client_id: rec.client_id.clone(),
            token_hash,
            journal: Journal::open(&layout.journal(), self.cfg.journal_bytes)?,
            dir,
            spec,
            created: rec.created,
            last_used: AtomicI64::new(now_unix()),
            state: Mutex::new(State::Starting),
            instance: tokio::sync::Mutex::new(None),
            shim: tokio::sync::Mutex::new(None),
            ops: AtomicU64::new(0),
            runtime,
            epoch: AtomicU64::new(rec.epoch),
            role: Mutex::new(rec.role.clone()),
            owner: tokio::sync::Mutex::new(OwnerState::Serving),
            gate: watch::channel(gate).0,
            precopy: tokio::sync::Mutex::new(Default::default()),
            candidates: Mutex::new(None),
        })
    }

    /// Opens a session: returns it, its token and the phase timings.
    pub async fn open(
        &self,
        app: &str,
        client_id: &str,
    ) -> Result<(Arc<Session>, [u8; 32], Phases), EdgeError> {
        if !valid_name(app) {
            return Err(EdgeError::Invalid(format!(
                "app name {app:?}: use 1-64 of [a-zA-Z0-9._-]"
            )));
        }
        if client_id.is_empty() || client_id.len() > 128 || client_id.chars().any(char::is_control)
        {
            return Err(EdgeError::Invalid(
                "client_id must be 1-128 printable characters".into(),
            ));
        }
        let app_cfg = self.app(app)?.clone();
        // Bounded before anything is allocated; a reservation counts the
        // opens under way, so concurrent opens cannot overshoot.
        let _reserved = self.reserve(client_id)?;
        let runtime = self.runtime(app).await?;
        let token: [u8; 32] = random_bytes();
        let id = blake3::Hash::from(random_bytes::<32>()).to_hex()[..32].to_string();
        let rec = SessionRecord {
            id: id.clone(),
            app: app.to_string(),
            client_id: client_id.to_string(),
            token_hash: String::new(),
            created: now_unix(),
            instance: None,
            volfs_pid: None,
            epoch: 1,
            role: Role::Serving,
        };
        let dir = self.sessions_dir().join(&id);
        let layout = Layout { dir: dir.clone() };
        for d in [layout.backing(), layout.mnt(), layout.run()] {
            tokio::fs::create_dir_all(d).await?;
        }
        tokio::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .await?;
        let session = Arc::new(self.build_session(&rec, blake3::hash(&token), runtime)?);
        let span = tracing::info_span!("open", session = %id, app, client = client_id);
        let mut phases = Phases::new();
        let result = async {
            session.save_record().await?;
            let t = Instant::now();
            volume::seed(&app_cfg.base_volume, &layout.backing()).await?;
            if let Some((uid, gid)) = app_cfg.uid_gid() {
                let b = layout.backing();
                tokio::task::spawn_blocking(move || volume::give_to(&b, uid, gid))
                    .await
                    .map_err(|e| EdgeError::Io(std::io::Error::other(e)))??;
            }
            session.prepare_socket_dir(&app_cfg)?;
            phases.push(("seed", t.elapsed()));
            let t = Instant::now();
            self.mount_volume(&session).await?;
            phases.push(("mount", t.elapsed()));
            let t = Instant::now();
            session.ensure_running(&self.cfg).await?;
            phases.push(("start+ready", t.elapsed()));
            Ok::<_, EdgeError>(())
        }
        .instrument(span.clone())
        .await;
        if let Err(e) = result {
            tracing::warn!(parent: &span, error = %e, "open failed; cleaning up");
            session.teardown().await;
            return Err(e);
        }
        session.set_state(State::Serving);
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), session.clone());
        tracing::info!(parent: &span, phases = ?phases, "session open");
        Ok((session, token, phases))
    }

    /// Reserves room for one more session of `client_id`, or says which
    /// limit it hits.
    fn reserve(&self, client_id: &str) -> Result<Reservation<'_>, EdgeError> {
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        let total = sessions.len() + opening.len();
        if total >= self.cfg.max_sessions {
            return Err(EdgeError::Limit(format!(
                "this edge serves its limit of {} sessions",
                self.cfg.max_sessions
            )));
        }
        let mine = sessions
            .values()
            .filter(|s| s.client_id == client_id)
            .count()
            + opening.iter().filter(|c| *c == client_id).count();
        if mine >= self.cfg.max_sessions_per_client {
            return Err(EdgeError::Limit(format!(
                "client {client_id:?} has its limit of {} sessions on this edge",
                self.cfg.max_sessions_per_client
            )));
        }
        opening.push(client_id.to_string());
        Ok(Reservation {
            edge: self,
            client: client_id.to_string(),
        })
    }

    /// Starts the volfs shim of a session's volume.
    async fn start_shim(&self, session: &Session) -> Result<Shim, EdgeError> {
        let layout = session.layout();
        let log = session.dir.join("volfs.log");
        let quota = self.app(&session.app)?.volume_mib << 20;
        Ok(volume::mount(
            &self.volfs_bin,
            &layout.backing(),
            &layout.mnt(),
            self.cfg.block_size,
            quota,
            &log,
        )
        .await?)
    }

    /// Mounts a session's volume and records the shim.
    async fn mount_volume(&self, session: &Session) -> Result<(), EdgeError> {
        let shim = self.start_shim(session).await?;
        *session.shim.lock().await = Some(shim);
        session.save_record().await
    }

    /// The session, if the token matches.
    pub fn session(&self, id: &str, token: &[u8]) -> Result<Arc<Session>, EdgeError> {
        let s = self.get(id);
        if s.is_none() {
            if let Some(t) = self.tombstone(id) {
                return Err(EdgeError::Moved(id.to_string(), t.to));
            }
        }
        let s = s.ok_or_else(|| EdgeError::UnknownSession(id.to_string()))?;
        s.check_token(token)?;
        Ok(s)
    }

    /// Runs (or joins) op `op_id`: the app's method with the payload.
    pub async fn invoke(
        &self,
        id: &str,
        token: &[u8],
        op_id: u64,
        method: &str,
        payload: Bytes,
    ) -> Result<Bytes, Status> {
        let s = self.session(id, token).map_err(|e| e.status())?;
        if !valid_method(method) {
            return Err(EdgeError::Invalid(format!(
                "method {method:?} is not a gRPC path /pkg.Service/Method"
            ))
            .status());
        }
        if payload.len() > self.cfg.max_payload {
            return Err(EdgeError::TooLarge(payload.len(), self.cfg.max_payload).status());
        }
        s.touch();
        // Calls wait while a handover quiesces the session (and learn where
        // it went); the journal refuses a new op from the moment the
        // quiesce began, so none slips past it.
        let tx = loop {
            s.admit().await.map_err(|e| e.status())?;
            match s.journal.begin(op_id, method) {
                Begin::Existing(w) => return w.wait().await.into_result(),
                Begin::New(tx) => break tx,
                Begin::Held => tokio::task::yield_now().await,
            }
        };
        let waiter = s.journal.waiter(op_id).expect("just begun");
        // The op runs in its own task: a client that goes away does not cancel it.
        let cfg = self.cfg.clone();
        let method = method.to_string();
        let s2 = s.clone();
        tokio::spawn(async move {
            let outcome = match s2.ensure_running(&cfg).await {
                Err(e) => Outcome::Err {
                    code: e.status().code() as i32,
                    message: e.to_string(),
                },
                Ok(client) => match client.call(&method, payload).await {
                    Ok(b) => Outcome::Ok(b),
                    Err(st) => match s2.check_after_failure(&st).await {
                        Some(logs) => Outcome::Err {
                            code: tonic::Code::Unavailable as i32,
                            message: format!(
                                "app instance exited during the call ({}); last output: {logs}",
                                st.message()
                            ),
                        },
                        None => Outcome::Err {
                            code: st.code() as i32,
                            message: st.message().to_string(),
                        },
                    },
                },
            };
            s2.ops.fetch_add(1, Ordering::Relaxed);
            s2.journal.finish(op_id, tx, outcome);
        });
        waiter.wait().await.into_result()
    }

    /// The result of op `op_id` (waits while it runs).
    pub async fn result(&self, id: &str, token: &[u8], op_id: u64) -> Result<Bytes, Status> {
        let s = self.session(id, token).map_err(|e| e.status())?;
        s.touch();
        if let Gate::Moved(to) = &*s.gate.borrow() {
            return Err(moved_status(to));
        }
        let w = s
            .journal
            .waiter(op_id)
            .ok_or_else(|| EdgeError::UnknownOp(op_id, id.to_string()).status())?;
        w.wait().await.into_result()
    }

    /// Closes a session; `token` is `None` for the operator.
    pub async fn close(&self, id: &str, token: Option<&[u8]>) -> Result<(), EdgeError> {
        if token.is_none() && valid_name(id) && self.remove_failed(id).await {
            tracing::info!(session = %id, "a session that failed to recover was removed by the operator");
            return Ok(());
        }
        let s = self
            .get(id)
            .ok_or_else(|| EdgeError::UnknownSession(id.to_string()))?;
        if let Some(t) = token {
            s.check_token(t)?;
        }
        {
            // Under the handover lock: a session being handed over (or
            // pulled here and not yet released) is not closed from under the
            // handover; once closed, a late Release finds nothing to release.
            let owner = s.owner.lock().await;
            if *owner != OwnerState::Serving || s.role() != Role::Serving {
                return Err(EdgeError::Moving(id.to_string()));
            }
            let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            if !map.get(id).is_some_and(|x| Arc::ptr_eq(x, &s)) {
                return Err(EdgeError::UnknownSession(id.to_string()));
            }
            map.remove(id);
        }
        s.teardown().await;
        self.tell_candidates_to_drop(id, "");
        tracing::info!(session = %id, "session closed");
        Ok(())
    }

    /// Closes every session (operator shutdown with `--close-sessions`).
    pub async fn close_all(&self) {
        let ids: Vec<String> = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            let _ = self.close(&id, None).await;
        }
    }

    /// Closes sessions idle for longer than the TTL.
    pub async fn reap_idle(&self) {
        let cutoff = now_unix() - self.cfg.session_ttl.as_secs() as i64;
        let idle: Vec<String> = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| {
                s.last_used.load(Ordering::Relaxed) < cutoff
                    && s.state() == State::Serving
                    && s.role() == Role::Serving
                    && s.owner.try_lock().is_ok_and(|o| *o == OwnerState::Serving)
            })
            .map(|s| s.id.clone())
            .collect();
        for id in idle {
            tracing::info!(session = %id, "closing idle session");
            let _ = self.close(&id, None).await;
        }
    }

    /// Every session, for the Admin service.
    pub async fn list(&self) -> Vec<edge_proto::v1::SessionInfo> {
        let all: Vec<Arc<Session>> = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out = Vec::new();
        for s in all {
            out.push(s.info().await);
        }
        out.extend(self.failed_infos());
        out.sort_by(|a, b| {
            a.created_unix
                .cmp(&b.created_unix)
                .then(a.session_id.cmp(&b.session_id))
        });
        out
    }
}
