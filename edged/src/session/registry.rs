//! The registry of an edge: its sessions (owned, given or pulled), the
//! tombstones of released ones, the opens under way and the runtimes; the
//! calls of the `Edge` service that look a session up and run in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;
use tracing::Instrument;

use super::{
    EdgeError, Gate, Layout, Role, Session, SessionRecord, State, Tombstone, Tombstones,
    moved_status, now_unix, random_bytes,
};
use crate::config::{AppConfig, Config, RuntimeConfig, valid_name};
use crate::forward::valid_method;
use crate::journal::{Begin, Journal, Outcome};
use crate::migration::owner::OwnerState;
use crate::migration::puller::PullerState;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{InstanceSpec, Runtime};
use crate::volume::{self, Shim};

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
    pub(super) volfs_bin: PathBuf,
    pub(super) runtimes: tokio::sync::Mutex<HashMap<String, Arc<dyn Runtime>>>,
    /// Sessions this edge owns, gives, or pulled and waits to own.
    pub(super) sessions: RwLock<HashMap<String, Arc<Session>>>,
    /// Sessions released to another edge, with where they went: a repeated
    /// Release is answered, a late call redirected. Persisted in
    /// `tombstones`, pruned after `tombstone_ttl`.
    pub(super) released: Mutex<HashMap<String, Tombstone>>,
    pub(super) tombstones: Tombstones,
    /// One-time tickets of operator-started moves (blake3 of the ticket).
    pub(super) tickets: Mutex<HashMap<String, blake3::Hash>>,
    /// The puller's side of each session this edge pulls (absent: idle),
    /// tagged with the pull that began it (so a pull that ended removes
    /// its own entry only, never a later pull's). Pre-copy rounds of a
    /// session being pulled are refused.
    pub(super) pulls: Mutex<HashMap<String, (u64, PullerState)>>,
    /// Session directories that failed to recover, with why: kept on disk,
    /// retried by the reaper, listed for the operator.
    pub(super) failed: Mutex<std::collections::BTreeMap<PathBuf, String>>,
    /// Clients of the opens under way (see [`Edge::reserve`]).
    pub(super) opening: Mutex<Vec<String>>,
    /// One lock per staged session: a pre-copy apply and the read of what is
    /// staged never overlap. Pruned when nobody holds one.
    pub(super) staging_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Dials other edges (verified by id under TLS).
    pub(crate) peers: crate::peers::Peers,
    /// Teardowns of released sessions still running, by id (true once
    /// done): a pull of the same session back waits for the old directory
    /// to go.
    pub(super) leaving: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// Apps whose standby did not wait for its activation, and when: no
    /// standby is tried for them for a while (each try costs a start).
    pub(super) standby_failed: Mutex<HashMap<String, std::time::Instant>>,
    /// How long this edge took at its last takeover from the final round
    /// received to serving (told to owners with each live round's
    /// acknowledgement).
    pub(super) last_finish: Mutex<Option<Duration>>,
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
            standby_failed: Mutex::new(HashMap::new()),
            last_finish: Mutex::new(None),
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
    pub(super) fn get(&self, id: &str) -> Option<Arc<Session>> {
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

    pub(super) fn app(&self, name: &str) -> Result<&AppConfig, EdgeError> {
        self.cfg
            .apps
            .get(name)
            .ok_or_else(|| EdgeError::UnknownApp(name.to_string()))
    }

    pub(super) async fn runtime(&self, app: &str) -> Result<Arc<dyn Runtime>, EdgeError> {
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

    pub(super) fn sessions_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("sessions")
    }

    pub(super) fn build_session(
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
            standby: false,
            hidden: Some(self.cfg.data_dir.join("standby-mounts")),
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
            held_since: Mutex::new(None),
            precopy: tokio::sync::Mutex::new(Default::default()),
            candidates: Mutex::new(None),
            applied: watch::channel((0, 0, Duration::ZERO)).0,
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
        let id = blake3::Hash::from(random_bytes::<32>()).to_hex()[..super::ID_LEN].to_string();
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
    pub(super) async fn start_shim(&self, session: &Session) -> Result<Shim, EdgeError> {
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
    pub(super) async fn mount_volume(&self, session: &Session) -> Result<(), EdgeError> {
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
