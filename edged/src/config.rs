//! The edge's configuration (`edged.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors of loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {0}: {1}")]
    Read(String, std::io::Error),
    /// The TOML does not parse or has unknown keys.
    #[error("config {0}: {1}")]
    Parse(String, toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole configuration of one edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This edge's id, unique among its neighbours.
    pub edge_id: String,
    /// Address the Edge (clients) and Peer (other edges) services listen on.
    pub listen: SocketAddr,
    /// Address clients and peers use to reach this edge; default `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where sessions (volumes, sockets, journals) live.
    pub data_dir: PathBuf,
    /// The operator's Admin socket (mode 0600); default `DATA_DIR/admin.sock`.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// A session without a call for this long is closed.
    #[serde(with = "secs")]
    pub session_ttl: Duration,
    /// Largest payload of one call, bytes.
    pub max_payload: usize,
    /// Most sessions this edge holds at once.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Most sessions one client id may hold on this edge.
    #[serde(default = "default_max_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// Bytes of finished calls' results a session keeps for `Result` and
    /// retries (the oldest go first); also what a handover carries at most.
    #[serde(default = "default_journal_bytes")]
    pub journal_bytes: u64,
    /// How long an app may take to answer on its socket after start.
    #[serde(with = "secs")]
    pub start_timeout: Duration,
    /// The `volfs` binary; default: next to `edged`, else on `PATH`.
    pub volfs_binary: Option<PathBuf>,
    /// Block size of session volumes.
    pub block_size: u32,
    /// The apps this edge serves, by name.
    pub apps: BTreeMap<String, AppConfig>,
    /// Edges sessions may move to next: pre-copy candidates.
    #[serde(default)]
    pub neighbours: Vec<Neighbour>,
    /// Pre-copy to the neighbours.
    #[serde(default)]
    pub precopy: PrecopyConfig,
    /// How a handover decides when to quiesce.
    #[serde(default)]
    pub handover: HandoverConfig,
    /// How long this edge remembers where a session it released went (a
    /// late call is redirected, a repeated release answered).
    #[serde(with = "secs", default = "default_tombstone_ttl")]
    pub tombstone_ttl: Duration,
    /// The fleet's certificates (see `edged pki`); required unless
    /// `insecure_plaintext`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve and dial without TLS: nothing encrypted, no peer identity.
    /// Refused unless every address is loopback.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Also serve the Admin service on this TCP address, to operators
    /// presenting a certificate of the fleet CA (`edged pki issue
    /// --operator`). Requires `[tls]`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
}

/// The certificate files of an edge (PEM).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The fleet CA's certificate: peers, operators (and clients) trust it.
    pub ca: PathBuf,
    /// This edge's certificate, issued by the CA for its id.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
}

fn default_journal_bytes() -> u64 {
    crate::journal::DEFAULT_MAX_BYTES
}

fn default_max_sessions() -> usize {
    1000
}

fn default_max_sessions_per_client() -> usize {
    8
}

fn default_tombstone_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// A neighbour edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbour {
    /// Its edge id.
    pub id: String,
    /// Its address, `host:port`.
    pub addr: String,
}

/// How a handover decides when to quiesce: live rounds repeat while what
/// is left to send shrinks, until the final round is predicted to fit the
/// downtime budget at the rate the previous rounds went out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoverConfig {
    /// The downtime a final round should fit, seconds.
    #[serde(with = "secs")]
    pub max_downtime: Duration,
    /// At most this many live rounds before the quiesce (unless throttled).
    pub max_live_rounds: u32,
    /// Throttle the app's writes when the live rounds stop converging
    /// (see `migration::converge`).
    pub auto_converge: bool,
    /// Bytes of a pulled volume's most recently modified files the new edge
    /// reads through the volume's mount while the instance starts, so the
    /// app's first calls there do not each cross the FUSE daemon; 0: none.
    pub warm_bytes: u64,
}

impl Default for HandoverConfig {
    fn default() -> Self {
        HandoverConfig {
            max_downtime: Duration::from_millis(100),
            max_live_rounds: 8,
            auto_converge: true,
            warm_bytes: 64 << 20,
        }
    }
}

/// How sessions are pre-copied to the neighbours.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecopyConfig {
    /// Pre-copy at all (when there are neighbours).
    pub enabled: bool,
    /// A session that changed gets a round this often.
    #[serde(with = "secs")]
    pub interval: Duration,
    /// ... or as soon as this many bytes are dirty.
    pub dirty_threshold: u64,
    /// Cap on pre-copy traffic of the whole edge, Mbit/s; 0 for none.
    pub bandwidth_mbit: f64,
    /// A staged copy nobody took over is dropped after this long.
    #[serde(with = "secs")]
    pub staged_ttl: Duration,
    /// Bytes all staged copies on this edge may take on disk; a pre-copy
    /// round past it is refused (a handover pull is not: a client is moving).
    pub staging_budget: u64,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            enabled: true,
            interval: Duration::from_secs(5),
            dirty_threshold: 1 << 20,
            bandwidth_mbit: 0.0,
            staged_ttl: Duration::from_secs(3600),
            staging_budget: 8 << 30,
        }
    }
}

/// One offloadable application.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Directory whose contents seed every new session's volume.
    pub base_volume: PathBuf,
    /// How instances run.
    pub runtime: RuntimeConfig,
    /// Memory limit per instance, MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Process/thread limit per instance.
    #[serde(default = "default_pids")]
    pub pids_limit: i64,
    /// CPUs an instance may use, e.g. 0.5.
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    /// Most MiB the files of one session's volume may sum to: the app's
    /// writes past it get ENOSPC (a handover is not held to it).
    #[serde(default = "default_volume_mib")]
    pub volume_mib: u64,
    /// The user an instance runs as, `UID:GID` (numeric: a FROM scratch
    /// image has no user database; never 0). The volume and socket
    /// directory of each session are given to this user. Default:
    /// 65534:65534 (nobody).
    #[serde(default = "default_user")]
    pub user: String,
    /// The app waits for its activation (`EDGE_ACTIVATION`; edge-app's
    /// `data_dir()` does): a handover to this edge then starts its
    /// instance while the volume is still being pulled, so the downtime
    /// holds no instance start. Off by default: an app that does not wait
    /// would find an empty, read-only data directory (the handover then
    /// falls back to starting it after the volume is there).
    #[serde(default)]
    pub standby: bool,
}

fn default_volume_mib() -> u64 {
    1024
}

fn default_cpus() -> f64 {
    1.0
}

fn default_user() -> String {
    "65534:65534".into()
}

impl AppConfig {
    /// The instance user as numbers.
    pub fn uid_gid(&self) -> Option<(u32, u32)> {
        let (u, g) = self.user.split_once(':')?;
        Some((u.parse().ok()?, g.parse().ok()?))
    }
}

fn default_memory() -> u64 {
    256
}

fn default_pids() -> i64 {
    128
}

/// The runtime of an app's instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RuntimeConfig {
    /// A child process of edged (the embedded default: no container engine).
    Process {
        /// Program to run.
        command: PathBuf,
        /// Its arguments.
        #[serde(default)]
        args: Vec<String>,
    },
    /// A Docker container (network none, read-only root, no capabilities).
    Docker {
        /// Image to run (e.g. built by `edged image build`).
        image: String,
    },
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(0.0..=1e9).contains(&v) {
            return Err(serde::de::Error::custom("seconds out of range"));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

/// A commented default configuration: one edge on loopback serving the two
/// example apps with the process runtime.
pub const DEFAULT_TOML: &str = r#"# edged configuration.

# This edge's id, unique among its neighbours.
edge_id = "edge-a"
# Address of the Edge (clients) and Admin (operator) gRPC services.
listen = "127.0.0.1:50051"
# Sessions live here: <data_dir>/sessions/<id>/{volume,mnt,run,ops.log}.
data_dir = "/var/lib/edgeshift"
# The operator's Admin service listens only on this Unix socket (mode 0600),
# never on the address above. Default: <data_dir>/admin.sock.
# admin_socket = "/var/lib/edgeshift/admin.sock"
# A session with no call for this long is closed and its volume removed (s).
session_ttl = 3600
# Largest payload of one call (bytes).
max_payload = 4194304
# Most sessions this edge holds, and most sessions one client id may hold.
max_sessions = 1000
max_sessions_per_client = 8
# Bytes of finished calls' results each session keeps (oldest dropped first).
journal_bytes = 67108864
# How long an app may take to answer on its socket after it started (s).
start_timeout = 20
# Block size of session volumes (dirty tracking and hashing).
block_size = 65536
# How long a released session's new address is remembered (s): late calls
# are redirected there.
tombstone_ttl = 86400
# volfs_binary = "/usr/local/bin/volfs"   # default: next to edged, else PATH
# The Admin service on TCP too, for operators with a certificate of the fleet
# CA (edged pki issue --operator NAME). Off by default.
# admin_listen = "127.0.0.1:50052"
# Without TLS nothing is encrypted and peers are not authenticated; allowed
# only when every address (listen, advertise, neighbours) is loopback.
# insecure_plaintext = false

# The fleet's certificates, made with `edged pki init DIR` (once per fleet)
# and `edged pki issue --ca DIR --edge ID --addr HOST` (once per edge).
# Clients verify the edge against the CA; edges verify each other (mutual
# TLS: a peer's id is read from its certificate).
[tls]
ca = "/var/lib/edgeshift/pki/ca.pem"
cert = "/var/lib/edgeshift/pki/edge-a.pem"
key = "/var/lib/edgeshift/pki/edge-a.key"

# Each app: a base volume (copied into every new session's volume) and a
# runtime. The process runtime runs a child process in its own mount
# namespace and cgroups; the docker runtime a container with network none, a
# read-only root, all capabilities dropped. Either runs as the app's
# unprivileged `user` (default "65534:65534") with its memory_mib, pids_limit
# and cpus (default 256, 128, 1.0); the files of each session's volume may sum
# to volume_mib (default 1024; writes past it get ENOSPC). An app that waits
# for its activation (edge-app's data_dir() does) sets standby = true: a
# handover to this edge starts it before the quiesce, off the downtime.
[apps.list]
base_volume = "/var/lib/edgeshift/base/list"
runtime = { kind = "process", command = "/usr/local/bin/list-app" }
standby = true

[apps.search]
base_volume = "/var/lib/edgeshift/base/search"
runtime = { kind = "process", command = "/usr/local/bin/search-app" }
standby = true
memory_mib = 256
pids_limit = 128

# Neighbour edges: sessions are pre-copied to them, so a move sends only
# the last changes.
# [[neighbours]]
# id = "edge-b"
# addr = "127.0.0.2:50051"

[precopy]
enabled = true
# A session that changed gets a round this often (s) ...
interval = 5
# ... or as soon as this many bytes are dirty.
dirty_threshold = 1048576
# Cap on pre-copy traffic of the whole edge (Mbit/s), 0 for none.
bandwidth_mbit = 0
# Staged copies nobody took over are dropped after this long (s).
staged_ttl = 3600
# Bytes all copies staged here may take on disk; pre-copy rounds past it
# are refused (handovers are not).
staging_budget = 8589934592

[handover]
# Live rounds repeat while what is left shrinks, until the last round is
# predicted to fit this downtime (s) at the rate earlier rounds went out ...
max_downtime = 0.1
# ... or this many live rounds went out.
max_live_rounds = 8
# When the rounds stop shrinking (the app writes as fast as the link
# drains), hold the app's writes to a rate that lets the last round fit,
# for up to 8 more rounds; false: quiesce and send what is left.
auto_converge = true
# The new edge reads this many bytes of the volume's newest files through
# its mount while the instance starts (a warm page cache for the first
# calls); 0 for none.
warm_bytes = 67108864

# A Docker app: the same limits, no swap beyond its memory limit.
# [apps.list-docker]
# base_volume = "/var/lib/edgeshift/base/list"
# runtime = { kind = "docker", image = "edgeshift/list-app:latest" }
# user = "65534:65534"
# cpus = 1.0
# standby = true
"#;

impl Config {
    /// Where others reach this edge.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Parses and validates TOML.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(origin.into(), e))?;
        c.validate()?;
        Ok(c)
    }

    /// Loads a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Checks names and ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !valid_name(&self.edge_id) {
            return bad(format!(
                "edge_id {:?}: use 1-64 of [a-zA-Z0-9._-]",
                self.edge_id
            ));
        }
        for (name, app) in &self.apps {
            if !valid_name(name) {
                return bad(format!("app name {name:?}: use 1-64 of [a-zA-Z0-9._-]"));
            }
            if app.uid_gid().is_none_or(|(u, g)| u == 0 || g == 0) {
                return bad(format!(
                    "apps.{name}.user {:?}: use a numeric, unprivileged UID:GID, e.g. \"65534:65534\"",
                    app.user
                ));
            }
            if !(16..=1 << 20).contains(&app.memory_mib) {
                return bad(format!(
                    "apps.{name}.memory_mib {} is outside 16 ..= 1048576",
                    app.memory_mib
                ));
            }
            if !(1..=1 << 22).contains(&app.pids_limit) {
                return bad(format!(
                    "apps.{name}.pids_limit {} is outside 1 ..= 4194304",
                    app.pids_limit
                ));
            }
            if !(1..=1 << 30).contains(&app.volume_mib) {
                return bad(format!(
                    "apps.{name}.volume_mib {} is outside 1 MiB ..= 1 PiB",
                    app.volume_mib
                ));
            }
            if !(app.cpus > 0.0 && app.cpus <= 1024.0) {
                return bad(format!(
                    "apps.{name}.cpus {} is outside (0, 1024]",
                    app.cpus
                ));
            }
        }
        self.validate_transport()?;
        if !(512..=16 << 20).contains(&self.block_size) {
            return bad(format!(
                "block_size {} is outside 512 ..= 16 MiB",
                self.block_size
            ));
        }
        if self.max_payload == 0 || self.max_payload > 64 << 20 {
            return bad(format!(
                "max_payload {} is outside 1 ..= 64 MiB",
                self.max_payload
            ));
        }
        let admin = crate::admin::socket_path(self);
        let admin = std::path::absolute(&admin).unwrap_or(admin);
        if admin.as_os_str().len() > SOCKET_PATH_MAX {
            return bad(format!(
                "the Admin socket {} is {} bytes long, and a Unix socket's path holds at most {SOCKET_PATH_MAX}: set admin_socket to a shorter path, or use a shorter data_dir",
                admin.display(),
                admin.as_os_str().len(),
            ));
        }
        Ok(())
    }
}

/// Bytes of a Unix socket's path (`sun_path` less its NUL).
const SOCKET_PATH_MAX: usize = 107;

impl Config {
    /// TLS or plaintext, and what each needs.
    fn validate_transport(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        match (&self.tls, self.insecure_plaintext) {
            (Some(_), true) => {
                return bad("both [tls] and insecure_plaintext = true: choose one".into());
            }
            (None, false) => {
                return bad("no [tls] table: make the fleet's certificates with `edged pki init` and `edged pki issue`, or set insecure_plaintext = true (loopback only)".into());
            }
            (Some(_), false) => {
                let ids =
                    std::iter::once(&self.edge_id).chain(self.neighbours.iter().map(|n| &n.id));
                for id in ids {
                    if !crate::pki::valid_label(id) {
                        return bad(format!(
                            "edge id {id:?}: with TLS an edge id is a DNS label (1-63 of a-z, 0-9, '-'), as its certificate names it"
                        ));
                    }
                }
            }
            (None, true) => {
                let mut addrs = vec![self.listen.to_string(), self.advertised()];
                addrs.extend(self.neighbours.iter().map(|n| n.addr.clone()));
                for a in addrs {
                    if !loopback(&a) {
                        return bad(format!(
                            "insecure_plaintext with the non-loopback address {a}: tokens and volumes would cross the network in the clear; configure [tls]"
                        ));
                    }
                }
                if self.admin_listen.is_some() {
                    return bad(
                        "admin_listen needs [tls] (operators authenticate by certificate)".into(),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Whether `host:port` (or `host`) is a loopback address or `localhost`.
pub fn loopback(addr: &str) -> bool {
    let host = crate::tls::host_of(addr);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Names of apps, edges and sessions: 1-64 characters of `[a-zA-Z0-9._-]`,
/// not starting with a dot.
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// [`DEFAULT_TOML`] without its `[tls]` table and in plaintext (for unit
/// tests that need no certificates).
#[cfg(test)]
pub(crate) fn plaintext_default() -> String {
    let head = DEFAULT_TOML.split("\n[tls]").next().unwrap();
    let apps = &DEFAULT_TOML[DEFAULT_TOML.find("\n[apps.list]").unwrap()..];
    (head.to_string() + apps).replace("# insecure_plaintext = false", "insecure_plaintext = true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let c = Config::from_toml(DEFAULT_TOML, "default").unwrap();
        assert_eq!(c.apps.len(), 2);
        assert!(matches!(
            c.apps["list"].runtime,
            RuntimeConfig::Process { .. }
        ));
    }

    #[test]
    fn bad_values_are_refused() {
        let t = DEFAULT_TOML.replace("edge-a", "../x");
        assert!(matches!(
            Config::from_toml(&t, "t"),
            Err(ConfigError::Invalid(_))
        ));
        let t = DEFAULT_TOML.replace("pids_limit = 128", "pids_limit = 128\nuser = \"nobody\"");
        let e = Config::from_toml(&t, "t").unwrap_err().to_string();
        assert!(e.contains("unprivileged UID:GID"), "{e}");
        let t = DEFAULT_TOML.replace("pids_limit = 128", "pids_limit = 128\ncpus = 0");
        assert!(Config::from_toml(&t, "t").is_err());
        // Plaintext only on loopback, never with [tls], never by default.
        let plain = plaintext_default();
        Config::from_toml(&plain, "t").unwrap();
        let no_tls = plain.replace("insecure_plaintext = true", "");
        let e = Config::from_toml(&no_tls, "t").unwrap_err().to_string();
        assert!(e.contains("no [tls] table"), "{e}");
        let e = Config::from_toml(&plain.replace("127.0.0.1:50051", "0.0.0.0:50051"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-loopback"), "{e}");
        let both =
            DEFAULT_TOML.replace("# insecure_plaintext = false", "insecure_plaintext = true");
        assert!(Config::from_toml(&both, "t").is_err());
        let e = Config::from_toml(&DEFAULT_TOML.replace("\"edge-a\"", "\"Edge_A\""), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("DNS label"), "{e}");
        // The Admin socket (by default in data_dir) must fit a Unix
        // socket's path.
        let deep = format!("/var/lib/{}", "x".repeat(87));
        let t = DEFAULT_TOML.replace("\"/var/lib/edgeshift\"", &format!("{deep:?}"));
        Config::from_toml(&t, "t").expect("a 96-byte data_dir holds a 107-byte admin.sock");
        let t = DEFAULT_TOML.replace("\"/var/lib/edgeshift\"", &format!("\"{deep}y\""));
        let e = Config::from_toml(&t, "t").unwrap_err().to_string();
        assert!(e.contains("set admin_socket to a shorter path"), "{e}");
        let t = t.replace(
            "# admin_socket = \"/var/lib/edgeshift/admin.sock\"",
            "admin_socket = \"/run/edgeshift-admin.sock\"",
        );
        Config::from_toml(&t, "t").expect("the socket elsewhere");
        let t = DEFAULT_TOML.replace("session_ttl", "session_tl");
        assert!(matches!(
            Config::from_toml(&t, "t"),
            Err(ConfigError::Parse(..))
        ));
    }
}
