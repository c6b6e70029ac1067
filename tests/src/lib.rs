//! Harness of the end-to-end tests: real `edged` processes on loopback
//! (127.0.0.x), their configuration and base volumes, cleaned up on drop.
//!
//! The binaries (`edged`, `volfs`, `list-app`, `search-app`) come from the
//! same target directory as the test executable: `cargo build --workspace`
//! first (the README's test command does).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A binary of the workspace: next to this executable (a benchmark in
/// `target/<profile>/`) or one directory up (a test in `target/<profile>/deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let here = exe.parent().expect("executable directory");
    let found = [here.join(name), here.join("..").join(name)]
        .into_iter()
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: run `cargo build --workspace` (or `--release` for benchmarks) first",
            here.display()
        )
    })
}

/// Fails (never skips) without FUSE or root.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "these tests mount volfs volumes: /dev/fuse is missing (install fuse3)"
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these tests mount FUSE and run containers: run them as root"
    );
}

/// Fails (never skips) when no Docker engine answers.
pub fn require_docker() {
    let ok = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Docker runtime tests need a Docker engine: install docker.io and start dockerd (scripts/setup.sh does)"
    );
}

/// How one app runs on the test edge.
#[derive(Debug, Clone)]
pub enum Runtime {
    /// A child process of edged running this binary.
    Process(PathBuf),
    /// A Docker container of this image.
    Docker(String),
}

/// One app of the test edge.
#[derive(Debug, Clone)]
pub struct App {
    /// Name clients open.
    pub name: String,
    /// Base volume.
    pub base: PathBuf,
    /// Runtime.
    pub runtime: Runtime,
}

/// Base volumes of the example apps, built once per test.
#[derive(Debug)]
pub struct Bases {
    _dir: tempfile::TempDir,
    /// Empty base of the List app.
    pub list: PathBuf,
    /// Base of the Search app, with `dictionary.db`.
    pub search: PathBuf,
}

impl Bases {
    /// Builds the bases in a temporary directory.
    pub fn new() -> Bases {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list");
        let search = dir.path().join("search");
        std::fs::create_dir_all(&list).unwrap();
        std::fs::create_dir_all(&search).unwrap();
        let words: Vec<String> = edgeshift_examples::search::word_list()
            .into_iter()
            .take(20_000)
            .collect();
        edgeshift_examples::search::build_dictionary(&search.join("dictionary.db"), &words)
            .unwrap();
        Bases {
            _dir: dir,
            list,
            search,
        }
    }

    /// The two example apps with the process runtime.
    pub fn process_apps(&self) -> Vec<App> {
        vec![
            App {
                name: "list".into(),
                base: self.list.clone(),
                runtime: Runtime::Process(bin("list-app")),
            },
            App {
                name: "search".into(),
                base: self.search.clone(),
                runtime: Runtime::Process(bin("search-app")),
            },
        ]
    }
}

impl Default for Bases {
    fn default() -> Self {
        Self::new()
    }
}

/// The fleet CA of this test process: every test edge gets a certificate
/// of it, and clients trust it. Made once, in memory.
pub fn fleet_ca() -> &'static edged::pki::Ca {
    static CA: std::sync::OnceLock<edged::pki::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| edged::pki::Ca::generate().expect("a test CA"))
}

/// What a test client trusts: the test fleet's CA.
pub fn trust() -> edge_client::Trust {
    edge_client::Trust::Ca(fleet_ca().cert_pem.clone())
}

/// A client of the edge at `url` (`https://host:port`), trusting the test
/// fleet's CA.
pub async fn connect(url: &str) -> Result<edge_client::EdgeClient, edge_client::ConnectError> {
    edge_client::connect_with(url, &trust()).await
}

/// A raw gRPC channel to `url` (`https://host:port`) trusting the test
/// fleet's CA and presenting `identity` (a certificate and key) if given:
/// for calling a service the way a stranger, an operator or a peer would.
pub async fn channel(
    url: &str,
    identity: Option<&edged::pki::Issued>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&fleet_ca().cert_pem));
    if let Some(i) = identity {
        tls = tls.identity(Identity::from_pem(&i.cert_pem, &i.key_pem));
    }
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

/// Writes a certificate of the test CA for edge `id` (naming `ip`,
/// 127.0.0.1 and localhost, where the tests and the relay dial it) into
/// `dir`; returns the `[tls]` table.
pub fn edge_certs(dir: &Path, id: &str, ip: std::net::IpAddr) -> edged::config::TlsConfig {
    use std::os::unix::fs::PermissionsExt;
    let issued = fleet_ca()
        .issue_edge(
            id,
            &[ip.to_string(), "127.0.0.1".into(), "localhost".into()],
            30,
        )
        .expect("a test edge certificate");
    std::fs::create_dir_all(dir).unwrap();
    let t = edged::config::TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{id}.pem")),
        key: dir.join(format!("{id}.key")),
    };
    std::fs::write(&t.ca, &fleet_ca().cert_pem).unwrap();
    std::fs::write(&t.cert, &issued.cert_pem).unwrap();
    std::fs::write(&t.key, &issued.key_pem).unwrap();
    std::fs::set_permissions(&t.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    t
}

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

/// A TCP relay on 127.0.0.1 to a target, for faults: on every connection
/// it can flip one byte of what the target sends, or cut the connection
/// after some bytes from the target.
#[derive(Debug)]
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`Relay`] does to the bytes coming back from the target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Flip the byte at this offset of a connection's return stream (once,
    /// on the first connection that gets that far).
    pub corrupt_at: Option<u64>,
    /// Close each connection after this many bytes came back.
    pub cut_after: Option<u64>,
    /// Wait this long after every chunk (up to 16 KiB) that comes back: a slow link.
    pub throttle: Option<Duration>,
}

impl Relay {
    /// Starts relaying to `target`.
    pub async fn start(target: SocketAddr, faults: Faults) -> Relay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let corrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let corrupted = corrupted.clone();
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let f = faults;
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    let mut seen = 0u64;
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(at) = f.corrupt_at {
                            if at >= seen
                                && at < seen + n as u64
                                && !corrupted.swap(true, std::sync::atomic::Ordering::SeqCst)
                            {
                                buf[(at - seen) as usize] ^= 0x5a;
                            }
                        }
                        seen += n as u64;
                        if f.cut_after.is_some_and(|c| seen >= c) {
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if let Some(t) = f.throttle {
                            tokio::time::sleep(t).await;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Relay { addr, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Edge {
    /// Waits (up to 10 s) until the edge holds no session directory and no
    /// mount: a released session is torn down in the background.
    pub async fn wait_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.session_dirs().is_empty() && self.mounts().is_empty()) {
            assert!(
                Instant::now() < deadline,
                "edge kept {:?} and mounts {:?}",
                self.session_dirs(),
                self.mounts()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Raw calls of the List app, for tests that go through `Session::invoke`.
pub mod list {
    use bytes::Bytes;
    use edgeshift_examples::pb::list::{AddReply, AddRequest, ItemsReply, ItemsRequest};
    use prost::Message;

    /// `List/Add`.
    pub const ADD: &str = "/list.v1.List/Add";
    /// `List/Items`.
    pub const ITEMS: &str = "/list.v1.List/Items";

    /// An encoded `AddRequest`.
    pub fn add(item: &str) -> Bytes {
        AddRequest { item: item.into() }.encode_to_vec().into()
    }

    /// An encoded `ItemsRequest`.
    pub fn items_req(delay_ms_per_item: u32) -> Bytes {
        ItemsRequest { delay_ms_per_item }.encode_to_vec().into()
    }

    /// The items of an encoded `ItemsReply`.
    pub fn items_of(b: Bytes) -> Vec<String> {
        ItemsReply::decode(b).expect("an ItemsReply").items
    }

    /// The count of an encoded `AddReply`.
    pub fn count_of(b: Bytes) -> u64 {
        AddReply::decode(b).expect("an AddReply").count
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

/// Random letters, so the volume does not compress into few distinct blocks.
pub fn noise(i: usize, n: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
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

/// The edges (by index) that list `session`, with the state they list.
pub async fn holders(edges: &[&Edge], session: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let Ok(mut c) = edged::admin::connect(&e.admin_socket()).await else {
            continue;
        };
        if let Ok(r) = c
            .list_sessions(edge_proto::v1::ListSessionsRequest {})
            .await
        {
            for s in r.into_inner().sessions {
                if s.session_id == session {
                    out.push((i, s.state));
                }
            }
        }
    }
    out
}

/// Waits (up to `limit`) until exactly one of `edges` lists `session`, as
/// serving, and returns its index.
pub async fn sole_owner(edges: &[&Edge], session: &str, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let h = holders(edges, session).await;
        if let [(i, state)] = h.as_slice() {
            if state == "serving" {
                return *i;
            }
        }
        if Instant::now() > deadline {
            for e in edges {
                eprintln!("---- log of {}\n{}", e.addr, e.log());
            }
            panic!("session {session} is not served by exactly one edge: {h:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that adds items to a List session without pause, each with its
/// own op id, retrying an op (same id) until it is answered: what it
/// acknowledged must be in the list exactly once; what it gave up on may be
/// there at most once.
#[derive(Debug)]
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl Writer {
    /// Starts writing items `{prefix}{n}`.
    pub fn start(s: edge_client::Session, prefix: &str) -> Writer {
        Self::start_sized(s, prefix, 0)
    }

    /// Starts writing items `{prefix}{n}` followed by `pad` bytes of noise
    /// (a writer that dirties the volume fast).
    pub fn start_sized(s: edge_client::Session, prefix: &str, pad: usize) -> Writer {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop2, prefix) = (stop.clone(), prefix.to_string());
        let task = tokio::spawn(async move {
            let (mut acked, mut unsure) = (Vec::new(), Vec::new());
            let mut n = 0;
            while !stop2.load(Ordering::SeqCst) {
                let item = match pad {
                    0 => format!("{prefix}{n}"),
                    _ => format!("{prefix}{n}:{}", noise(n, pad)),
                };
                n += 1;
                let op = s.next_op_id();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match s.invoke_op(op, list::ADD, list::add(&item)).await {
                        Ok(_) => {
                            acked.push(item);
                            break;
                        }
                        // The op was cut by an edge restart: it may or may not have run.
                        Err(st) if st.code() == tonic::Code::Aborted => {
                            unsure.push(item);
                            break;
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => {
                            unsure.push(item);
                            break;
                        }
                    }
                }
            }
            (acked, unsure)
        });
        Writer { stop, task }
    }

    /// Stops and returns (acknowledged, uncertain) items.
    pub async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("writer task")
    }
}

/// Checks a List's items against a [`Writer`]'s outcome: every acknowledged
/// item exactly once, uncertain ones at most once, nothing else.
pub fn check_items(items: &[String], acked: &[String], unsure: &[String]) {
    let mut count: std::collections::HashMap<&str, usize> = Default::default();
    for i in items {
        *count.entry(i.as_str()).or_default() += 1;
    }
    for a in acked {
        assert_eq!(
            count.get(a.as_str()).copied().unwrap_or(0),
            1,
            "acknowledged item {a:?} must be in the list exactly once"
        );
    }
    for u in unsure {
        assert!(
            count.get(u.as_str()).copied().unwrap_or(0) <= 1,
            "item {u:?} twice"
        );
    }
    let known: std::collections::HashSet<&str> =
        acked.iter().chain(unsure).map(String::as_str).collect();
    for i in items {
        assert!(known.contains(i.as_str()), "item {i:?} was never written");
    }
}

/// Edges `a`, `b`, `c`, ... on 127.0.0.1, 127.0.0.2, ..., each a neighbour of
/// every other, serving the same apps.
#[derive(Debug)]
pub struct Cluster {
    /// The edges, in order of their ids.
    pub edges: Vec<Edge>,
}

impl Cluster {
    /// Starts `n` edges; `extra` is laid over each one's configuration.
    pub fn mesh(n: usize, apps: &[App], extra: &str) -> Cluster {
        let ids: Vec<String> = (0..n)
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| free_addr(&format!("127.0.0.{}", i + 1)))
            .collect();
        let edges = (0..n)
            .map(|i| {
                let mut neighbours = String::new();
                for j in (0..n).filter(|j| *j != i) {
                    neighbours += &format!(
                        "[[neighbours]]\nid = {:?}\naddr = \"{}\"\n",
                        ids[j], addrs[j]
                    );
                }
                // `extra` first: its top-level keys must precede any table.
                Edge::start_at(&ids[i], addrs[i], apps, &format!("{extra}\n{neighbours}"))
            })
            .collect();
        Cluster { edges }
    }

    /// A client connection to each edge.
    pub async fn clients(&self) -> Vec<edge_client::EdgeClient> {
        let mut out = Vec::new();
        for e in &self.edges {
            out.push(e.client().await);
        }
        out
    }

    /// The edges, borrowed (for [`sole_owner`] and [`holders`]).
    pub fn refs(&self) -> Vec<&Edge> {
        self.edges.iter().collect()
    }
}
