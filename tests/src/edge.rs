//! One running `edged serve` of a test, its configuration, and what a
//! test reads of it (sessions, pids, mounts, fds).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{App, Runtime, bin, connect, edge_certs, require_fuse};

/// A `[[neighbours]]` entry naming edge `id` at `addr`. Neighbours are
/// mutual: an edge takes pre-copies and operator moves only from edges it
/// lists too.
pub fn neighbour(id: &str, addr: SocketAddr) -> String {
    format!("[[neighbours]]\nid = {id:?}\naddr = \"{addr}\"\n")
}

/// A free TCP port on `ip`.
pub fn free_addr(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// A running `edged serve`.
#[derive(Debug)]
pub struct Edge {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// The configuration of a test edge as edged reads it: edged's commented
/// default, with the edge's id, address, data directory and `apps`, and
/// `extra` (TOML, e.g. `max_sessions = 3` or a `[precopy]` table) laid over
/// it. Validated like `edged config check` validates a file.
pub fn config(
    id: &str,
    addr: SocketAddr,
    data_dir: &Path,
    apps: &[App],
    extra: &str,
) -> edged::config::Config {
    use edged::config::{AppConfig, Config, DEFAULT_TOML, RuntimeConfig};
    let mut cfg = Config::from_toml(DEFAULT_TOML, "default").unwrap();
    cfg.edge_id = id.into();
    cfg.listen = addr;
    cfg.data_dir = data_dir.to_path_buf();
    cfg.session_ttl = Duration::from_secs(3600);
    cfg.max_payload = 1 << 20;
    cfg.volfs_binary = Some(bin("volfs"));
    let pki = data_dir
        .parent()
        .unwrap_or(data_dir)
        .join(format!("pki-{id}"));
    cfg.tls = Some(edge_certs(&pki, id, addr.ip()));
    cfg.apps = apps
        .iter()
        .map(|a| {
            let runtime = match &a.runtime {
                Runtime::Process(p) => RuntimeConfig::Process {
                    command: p.clone(),
                    args: Vec::new(),
                },
                Runtime::Docker(i) => RuntimeConfig::Docker { image: i.clone() },
            };
            let app = AppConfig {
                base_volume: a.base.clone(),
                runtime,
                ..cfg.apps["list"].clone()
            };
            (a.name.clone(), app)
        })
        .collect();
    // Lay `extra` over the typed value, then read the whole back through
    // edged's own parser and checks.
    let mut table: toml::Table = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    let over: toml::Table = toml::from_str(extra).expect("extra config is TOML");
    if over.get("insecure_plaintext") == Some(&toml::Value::Boolean(true)) {
        table.remove("tls");
    }
    for (k, v) in over {
        match (table.get_mut(&k), v) {
            (Some(toml::Value::Table(t)), toml::Value::Table(o)) => t.extend(o),
            (_, v) => {
                table.insert(k, v);
            }
        }
    }
    Config::from_toml(&toml::to_string(&table).unwrap(), "test edge")
        .unwrap_or_else(|e| panic!("test edge config: {e}"))
}

impl Edge {
    /// Starts an edge on `ip` serving `apps`, with `extra` laid over its
    /// configuration (see [`config`]).
    pub fn start(id: &str, ip: &str, apps: &[App], extra: &str) -> Edge {
        let addr = free_addr(ip);
        Edge::start_at(id, addr, apps, extra)
    }

    /// [`Edge::start`] on a given address.
    pub fn start_at(id: &str, addr: SocketAddr, apps: &[App], extra: &str) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(id, addr, &dir.path().join("data"), apps, extra);
        Edge::launch(dir, cfg)
    }

    /// Starts `edged serve` on a typed configuration, in `dir` (its config
    /// file and log go there).
    pub fn launch(dir: tempfile::TempDir, cfg: edged::config::Config) -> Edge {
        let mut e = Edge::launch_in(dir.path(), cfg);
        e._dir = Some(dir);
        e
    }

    /// Starts `edged serve` on a typed configuration, its config file and
    /// log as `ID.toml` and `ID.log` in `dir`, which the caller keeps.
    pub fn launch_in(dir: &Path, cfg: edged::config::Config) -> Edge {
        require_fuse();
        let config = dir.join(format!("{}.toml", cfg.edge_id));
        std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
        let mut e = Edge {
            child: None,
            addr: cfg.listen,
            config,
            data_dir: cfg.data_dir.clone(),
            _dir: None,
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        // Appended: the log of a restarted edge follows the earlier run's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.with_extension("log"))
            .unwrap();
        let child = Command::new(bin("edged"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_serving();
    }

    /// Waits until edged answers gRPC (it binds its port before it recovers
    /// its sessions, and serves after).
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("edged exited ({st}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "edged did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the Admin service answers.
    fn answers(&self) -> bool {
        if TcpStream::connect(self.addr).is_err() {
            return false;
        }
        let sock = self.admin_socket();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let ask = async {
                    match edged::admin::connect(&sock).await {
                        Ok(mut c) => c
                            .list_sessions(edge_proto::v1::ListSessionsRequest {})
                            .await
                            .is_ok(),
                        Err(_) => false,
                    }
                };
                tokio::time::timeout(Duration::from_secs(5), ask)
                    .await
                    .unwrap_or(false)
            })
        })
        .join()
        .unwrap_or(false)
    }

    /// The operator's Admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join(edged::admin::SOCKET_NAME)
    }

    /// A client of the Admin service.
    pub async fn admin(
        &self,
    ) -> edge_proto::v1::admin_client::AdminClient<tonic::transport::Channel> {
        edged::admin::connect(&self.admin_socket()).await.unwrap()
    }

    /// edged's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }

    /// `https://addr` (`http://` for an edge in `insecure_plaintext`).
    pub fn url(&self) -> String {
        let plain = std::fs::read_to_string(&self.config)
            .is_ok_and(|c| c.contains("insecure_plaintext = true"));
        let scheme = if plain { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// A client of this edge (trusting the test fleet's CA).
    pub async fn client(&self) -> edge_client::EdgeClient {
        if self.url().starts_with("http://") {
            return edge_client::connect(&self.url()).await.unwrap();
        }
        connect(&self.url()).await.unwrap()
    }

    /// Kills edged with SIGKILL (sessions, shims and instances live on).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts edged again on the same configuration.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Session directories on disk.
    pub fn session_dirs(&self) -> Vec<PathBuf> {
        self.sessions_entries()
            .into_iter()
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".removing-"))
            })
            .collect()
    }

    /// Everything under the sessions directory, directories being removed
    /// (`.removing-ID`) included.
    pub fn sessions_entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data_dir.join("sessions"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    /// Mounts under the data directory, from /proc/self/mountinfo.
    pub fn mounts(&self) -> Vec<String> {
        let d = self.data_dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&d))
            .collect()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // Sessions outlive edged by design: remove them.
        let _ = Command::new(bin("edged"))
            .args(["cleanup", "--config"])
            .arg(&self.config)
            .output();
        // Whatever cleanup could not reach (a test left the config broken):
        // the instances of this edge, then its mounts, so no test leaves a
        // mount behind.
        if let Ok(rd) = std::fs::read_dir(self.data_dir.join("sessions")) {
            for e in rd.flatten() {
                let run = e.path().join("run").display().to_string();
                for pid in edged::runtime::process::find_by_env(edged::runtime::ENV_INSTANCE, &run)
                {
                    // SAFETY: kill has no memory-safety preconditions; the
                    // negative pid names the instance's process group.
                    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                }
            }
        }
        for m in self.mounts() {
            edged::volume::detach(Path::new(&m));
        }
    }
}

/// Whether a pid runs (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with(['Z', 'X']))
    })
}

/// The operator's view of an edge.
pub async fn sessions(edge: &Edge) -> Vec<edge_proto::v1::SessionInfo> {
    let mut c = edge.admin().await;
    c.list_sessions(edge_proto::v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
}

/// The pid of a session's process instance.
pub async fn instance_pid(edge: &Edge, session: &str) -> u32 {
    let s = sessions(edge)
        .await
        .into_iter()
        .find(|s| s.session_id == session)
        .expect("session listed");
    s.container_id
        .strip_prefix("pid:")
        .expect("a process instance")
        .parse()
        .unwrap()
}

impl Edge {
    /// Waits (up to 10 s) until the edge holds no session directory and no
    /// mount: a released session is torn down in the background.
    pub async fn wait_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.sessions_entries().is_empty() && self.mounts().is_empty()) {
            assert!(
                Instant::now() < deadline,
                "edge kept {:?} and mounts {:?}",
                self.sessions_entries(),
                self.mounts()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Edge {
    /// edged's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops edged the way an operator retires an edge: a run with
    /// `--close-sessions` that recovers every session and closes it at
    /// SIGTERM.
    pub fn stop_closing_sessions(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config.with_extension("log"))
            .unwrap();
        let mut child = Command::new(bin("edged"))
            .args(["serve", "--close-sessions", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "edged did not serve: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }

    /// Where this edge keeps the tombstone of a released session.
    pub fn tombstone(&self, session: &str) -> PathBuf {
        self.data_dir
            .join("tombstones")
            .join(format!("{session}.json"))
    }

    /// Open file descriptors of edged.
    pub fn fds(&self) -> usize {
        self.pid()
            .and_then(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
            .map(|rd| rd.count())
            .unwrap_or(0)
    }

    /// Resident memory of edged, bytes.
    pub fn rss(&self) -> u64 {
        self.pid()
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }
}

/// The state letter of a process (`R`, `S`, `T` for stopped, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Pids of live processes whose environment holds `EDGE_SESSION_ID=session`:
/// app instances of that session, wherever they came from.
pub fn instances_of(session: &str) -> Vec<u32> {
    edged::runtime::process::find_by_env("EDGE_SESSION_ID", session)
}

/// An edge `id` on `ip` serving the List app from `base` (the process
/// runtime, or Docker given an image), its config and log in `dir` (which
/// the caller keeps), `extra` laid over its configuration: the benchmarks'
/// edge.
pub fn start_list_edge_in(
    dir: &Path,
    id: &str,
    ip: &str,
    base: &Path,
    docker_image: Option<&str>,
    extra: &str,
) -> Edge {
    start_list_edge_with(dir, id, ip, base, docker_image, extra, |_| {})
}

/// [`start_list_edge_in`], with `tweak` applied to the configuration last.
pub fn start_list_edge_with(
    dir: &Path,
    id: &str,
    ip: &str,
    base: &Path,
    docker_image: Option<&str>,
    extra: &str,
    tweak: impl FnOnce(&mut edged::config::Config),
) -> Edge {
    let runtime = match docker_image {
        Some(i) => Runtime::Docker(i.into()),
        None => Runtime::Process(bin("list-app")),
    };
    let apps = [App {
        name: "list".into(),
        base: base.to_path_buf(),
        runtime,
    }];
    // `ip` alone, or a chosen `ip:port`.
    let addr = ip.parse().unwrap_or_else(|_| free_addr(ip));
    let mut cfg = config(id, addr, &dir.join(id), &apps, extra);
    cfg.start_timeout = Duration::from_secs(30);
    // Benchmark volumes go up to 1 GiB and more.
    for app in cfg.apps.values_mut() {
        app.volume_mib = 16 << 10;
    }
    tweak(&mut cfg);
    Edge::launch_in(dir, cfg)
}
