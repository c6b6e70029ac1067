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
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tracing::Instrument;

use crate::config::{AppConfig, Config, RuntimeConfig, valid_name};
use crate::forward::{AppClient, SOCKET_NAME, valid_method};
use crate::journal::{Begin, Journal, Outcome};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{InstanceId, InstanceSpec, Runtime, RuntimeError};
use crate::volume::{self, Shim, VolumeError};

pub mod migrate;
pub mod precopy;
mod recover;

pub use recover::{cleanup_all, cleanup_dir};

/// Errors of session handling; [`EdgeError::status`] maps them to gRPC.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// No such app on this edge.
    #[error("app {0:?} is not served by this edge")]
    UnknownApp(String),
    /// No such session (never opened, closed, or reaped).
    #[error("session {0:?} is not on this edge")]
    UnknownSession(String),
    /// The token does not match the session's.
    #[error("wrong token for session {0:?}")]
    BadToken(String),
    /// A malformed argument.
    #[error("{0}")]
    Invalid(String),
    /// A payload over the configured limit.
    #[error("payload of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// The session moved to another edge (calls go there).
    #[error("session {0:?} moved to edge {1:?}")]
    Moved(String, String, String),
    /// The op id is unknown to the journal.
    #[error("op {0} is unknown to session {1:?}")]
    UnknownOp(u64, String),
    /// The volume could not be prepared.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The instance started but never answered, or exited.
    #[error("app instance did not become ready: {reason}; last output: {logs}")]
    NotReady {
        /// Why.
        reason: String,
        /// Its last lines of output.
        logs: String,
    },
    /// Local I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl EdgeError {
    /// The gRPC status a client can act on.
    pub fn status(&self) -> Status {
        let m = self.to_string();
        match self {
            EdgeError::UnknownApp(_) | EdgeError::UnknownSession(_) | EdgeError::UnknownOp(..) => {
                Status::not_found(m)
            }
            EdgeError::BadToken(_) => Status::permission_denied(m),
            EdgeError::Moved(_, id, addr) => moved_status(id, addr),
            EdgeError::Invalid(_) => Status::invalid_argument(m),
            EdgeError::TooLarge(..) => Status::resource_exhausted(m),
            EdgeError::Volume(_) | EdgeError::Io(_) => Status::internal(m),
            EdgeError::Runtime(_) | EdgeError::NotReady { .. } => Status::unavailable(m),
        }
    }
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

/// What is persisted of a session in `session.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// App name.
    pub app: String,
    /// Client id.
    pub client_id: String,
    /// blake3 of the token (the token itself is never stored).
    pub token_hash: String,
    /// Unix seconds.
    pub created: i64,
    /// The running instance.
    pub instance: Option<InstanceId>,
    /// Pid of the volfs shim.
    pub volfs_pid: Option<u32>,
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

/// One session.
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
    last_used: AtomicI64,
    state: Mutex<State>,
    instance: tokio::sync::Mutex<Option<(InstanceId, AppClient)>>,
    shim: tokio::sync::Mutex<Option<Shim>>,
    journal: Journal,
    ops: AtomicU64,
    runtime: Arc<dyn Runtime>,
    /// Set while another edge pulls the session: new calls are refused
    /// (the client sends them to the new edge).
    migrating: AtomicBool,
    /// The edge pulling the session, while `migrating`.
    moving_to: Mutex<Option<String>>,
    /// Its address, as it said.
    moving_to_addr: Mutex<String>,
    /// The instance is frozen by a handover.
    paused: Mutex<bool>,
    /// Pre-copy bookkeeping.
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

/// Paths of a session directory.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn backing(&self) -> PathBuf {
        self.dir.join("volume")
    }
    fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
    fn record(&self) -> PathBuf {
        self.dir.join("session.json")
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

    async fn save_record(&self) -> Result<(), EdgeError> {
        let rec = SessionRecord {
            id: self.id.clone(),
            app: self.app.clone(),
            client_id: self.client_id.clone(),
            token_hash: self.token_hash.to_hex().to_string(),
            created: self.created,
            instance: self.instance.lock().await.as_ref().map(|(i, _)| i.clone()),
            volfs_pid: self.shim.lock().await.as_ref().map(|s| s.pid),
        };
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| EdgeError::Io(e.into()))?;
        let path = self.layout().record();
        let tmp = path.with_extension("tmp");
        tokio::fs::write(&tmp, json).await?;
        tokio::fs::rename(&tmp, &path).await?;
        Ok(())
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
        let id = self.runtime.start(&self.spec).await?;
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
        if let Some(shim) = self.shim.lock().await.take() {
            shim.unmount().await;
        }
        volume::detach(&self.layout().mnt());
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
            state: if self.migrating.load(Ordering::SeqCst) {
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

/// Metadata key on the status of a call refused because its session is
/// moving; the client retries it (same op id) on the new edge.
pub const MOVING_KEY: &str = "edgeshift-moving";

/// Metadata keys of a status telling where a session went.
pub const MOVED_TO_ADDR: &str = "edgeshift-moved-to";
/// See [`MOVED_TO_ADDR`].
pub const MOVED_TO_ID: &str = "edgeshift-moved-to-id";

fn moved_status(id: &str, addr: &str) -> Status {
    let mut st = moving_status();
    for (k, v) in [(MOVED_TO_ID, id), (MOVED_TO_ADDR, addr)] {
        if v.is_empty() {
            continue;
        }
        if let Ok(v) = v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>() {
            st.metadata_mut().insert(k, v);
        }
    }
    st
}

fn moving_status() -> Status {
    let mut st = Status::unavailable("session is moving to another edge");
    st.metadata_mut()
        .insert(MOVING_KEY, tonic::metadata::MetadataValue::from_static("1"));
    st
}

/// The timings of an open, phase by phase.
pub type Phases = Vec<(&'static str, Duration)>;

/// The edge: its configuration, its runtimes and its sessions.
pub struct Edge {
    /// Configuration.
    pub cfg: Config,
    volfs_bin: PathBuf,
    runtimes: tokio::sync::Mutex<HashMap<String, Arc<dyn Runtime>>>,
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    /// Sessions released to another edge, with where they went (edge id,
    /// address): a repeated Release answers OK, a late call is redirected.
    released: Mutex<HashMap<String, (String, String)>>,
    /// One-time tickets of operator-started moves (blake3 of the ticket).
    tickets: Mutex<HashMap<String, blake3::Hash>>,
    /// Sessions this edge is pulling: pre-copy rounds for them are refused.
    pulling: Mutex<std::collections::HashSet<String>>,
    /// One lock per staged session: a pre-copy apply and the read of what is
    /// staged never overlap.
    staging_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
        std::fs::create_dir_all(cfg.data_dir.join("sessions"))?;
        let volfs_bin = locate_volfs(&cfg);
        Ok(Arc::new(Edge {
            cfg,
            volfs_bin,
            runtimes: tokio::sync::Mutex::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            released: Mutex::new(Default::default()),
            tickets: Mutex::new(Default::default()),
            pulling: Mutex::new(Default::default()),
            staging_locks: Mutex::new(Default::default()),
        }))
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
        let spec = InstanceSpec {
            edge_id: self.cfg.edge_id.clone(),
            session_id: rec.id.clone(),
            app: rec.app.clone(),
            volume: layout.mnt(),
            socket_dir: layout.run(),
            log_file: dir.join("app.log"),
            memory_mib: app.memory_mib,
            pids_limit: app.pids_limit,
        };
        Ok(Session {
            id: rec.id.clone(),
            app: rec.app.clone(),
            client_id: rec.client_id.clone(),
            token_hash,
            journal: Journal::open(&dir.join("ops.log"))?,
            dir,
            spec,
            created: rec.created,
            last_used: AtomicI64::new(now_unix()),
            state: Mutex::new(State::Starting),
            instance: tokio::sync::Mutex::new(None),
            shim: tokio::sync::Mutex::new(None),
            ops: AtomicU64::new(0),
            runtime,
            migrating: AtomicBool::new(false),
            moving_to: Mutex::new(None),
            moving_to_addr: Mutex::new(String::new()),
            paused: Mutex::new(false),
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
        };
        let dir = self.sessions_dir().join(&id);
        let layout = Layout { dir: dir.clone() };
        for d in [layout.backing(), layout.mnt(), layout.run()] {
            tokio::fs::create_dir_all(d).await?;
        }
        let session = Arc::new(self.build_session(&rec, blake3::hash(&token), runtime)?);
        let span = tracing::info_span!("open", session = %id, app, client = client_id);
        let mut phases = Phases::new();
        let result = async {
            session.save_record().await?;
            let t = Instant::now();
            volume::seed(&app_cfg.base_volume, &layout.backing()).await?;
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

    /// Starts the volfs shim of a session's volume.
    async fn start_shim(&self, session: &Session) -> Result<Shim, EdgeError> {
        let layout = session.layout();
        let log = session.dir.join("volfs.log");
        Ok(volume::mount(
            &self.volfs_bin,
            &layout.backing(),
            &layout.mnt(),
            self.cfg.block_size,
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
        if let Some((to_id, to_addr)) = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Err(EdgeError::Moved(
                id.to_string(),
                to_id.clone(),
                to_addr.clone(),
            ));
        }
        let s = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| EdgeError::UnknownSession(id.to_string()))?;
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
        if s.migrating.load(Ordering::SeqCst) {
            return Err(moving_status());
        }
        let tx = match s.journal.begin(op_id, method) {
            Begin::Existing(w) => return w.wait().await.into_result(),
            Begin::New(tx) => tx,
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
        let w = s
            .journal
            .waiter(op_id)
            .ok_or_else(|| EdgeError::UnknownOp(op_id, id.to_string()).status())?;
        w.wait().await.into_result()
    }

    /// Closes a session; `token` is `None` for the operator.
    pub async fn close(&self, id: &str, token: Option<&[u8]>) -> Result<(), EdgeError> {
        let s = {
            let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            let s = map
                .get(id)
                .cloned()
                .ok_or_else(|| EdgeError::UnknownSession(id.to_string()))?;
            if let Some(t) = token {
                s.check_token(t)?;
            }
            map.remove(id);
            s
        };
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
            .filter(|s| s.last_used.load(Ordering::Relaxed) < cutoff && s.state() == State::Serving)
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
        out.sort_by(|a, b| {
            a.created_unix
                .cmp(&b.created_unix)
                .then(a.session_id.cmp(&b.session_id))
        });
        out
    }
}
