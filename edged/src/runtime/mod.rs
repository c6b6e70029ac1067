//! Where app instances run: behind one trait, a child process (the embedded
//! default) or a Docker container.

pub mod cgroup;
pub mod docker;
#[cfg(test)]
pub mod fake;
pub mod image;
pub mod process;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// A boxed future, so the trait stays object-safe.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of a runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Spawning or signalling a process failed.
    #[error("process runtime: {0}")]
    Process(String),
    /// The Docker engine refused or is unreachable.
    #[error("docker: {0}")]
    Docker(String),
}

/// Everything a runtime needs to start one session's instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The edge running it (names the container with the session: edges
    /// on one host share an engine).
    #[serde(default)]
    pub edge_id: String,
    /// Session id (names the container).
    pub session_id: String,
    /// App name.
    pub app: String,
    /// The mounted volume (appears as `/data` in a container).
    pub volume: PathBuf,
    /// Directory of the app's Unix socket (appears as `/run/edge`).
    pub socket_dir: PathBuf,
    /// Where the process runtime writes the app's output.
    pub log_file: PathBuf,
    /// Memory limit, MiB.
    pub memory_mib: u64,
    /// Process/thread limit.
    pub pids_limit: i64,
    /// CPUs (Docker).
    #[serde(default)]
    pub cpus: f64,
    /// `UID:GID` the instance runs as (Docker).
    #[serde(default)]
    pub user: String,
    /// A warm standby: the instance starts before its volume is there and
    /// waits (told by [`ENV_ACTIVATION`]) until edged activates it; the
    /// volume appears at its mount point then (`volume` is a shared mount
    /// point, bound so that the activation propagates).
    #[serde(default)]
    pub standby: bool,
    /// A tree of edged's mount points the instance must not see (the
    /// standby mount points of other sessions): detached in its own mount
    /// namespace (the process runtime; a container has its own root).
    #[serde(default)]
    pub hidden: Option<PathBuf>,
}

/// A running instance, as persisted in the session record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceId {
    /// A child process.
    Pid(u32),
    /// A Docker container id.
    Container(String),
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceId::Pid(p) => write!(f, "pid:{p}"),
            InstanceId::Container(c) => write!(f, "{}", &c[..c.len().min(12)]),
        }
    }
}

/// Environment variable naming the app's data directory.
pub const ENV_DATA_DIR: &str = "EDGE_DATA_DIR";
/// Environment variable naming the directory of the app's socket.
pub const ENV_SOCKET_DIR: &str = "EDGE_SOCKET_DIR";
/// Environment variable with the session id.
pub const ENV_SESSION_ID: &str = "EDGE_SESSION_ID";
/// Environment variable of a warm standby instance: a FIFO the app opens
/// and reads one byte from before it touches its data directory. `1`: the
/// volume is there, go on; end of file: edged went away or gave up the
/// handover, exit. Set only when the app's config says it waits
/// (`standby = true`); edge-app's `data_dir()` does.
pub const ENV_ACTIVATION: &str = "EDGE_ACTIVATION";
/// The FIFO's name in the socket directory.
pub const ACTIVATION_NAME: &str = "activate";
/// Environment of a process instance: its socket directory on the host
/// (how edged finds an instance it started but did not live to record).
pub const ENV_INSTANCE: &str = "EDGESHIFT_INSTANCE";

/// A way to run app instances.
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Starts an instance; returns once it was started (not yet serving).
    fn start<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFut<'a, Result<InstanceId, RuntimeError>>;
    /// Stops and removes an instance; stopping a gone instance succeeds.
    fn stop<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>>;
    /// Ends a frozen instance without letting it run again and removes it
    /// (SIGKILL to what it runs, `docker rm -f`): how the old instance of a
    /// released session goes. Its session lives on another edge now, so
    /// none of its code runs here again — not even a SIGTERM handler,
    /// which could write to the volume after the final delta or act
    /// outside twice.
    fn discard<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>>;
    /// Whether the instance still runs.
    fn alive<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, bool>;
    /// Freezes the instance (SIGSTOP, `docker pause`): the quiesce of a
    /// handover. A frozen app writes nothing and keeps its state, so the
    /// final delta is a crash-consistent snapshot, and it can go on
    /// unchanged if the handover fails.
    fn pause<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>>;
    /// Thaws a paused instance.
    fn resume<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>>;
    /// The instance's data directory as seen from inside it
    /// (`/proc/PID/root/...`): how edged checks that a standby's volume
    /// reached it. `None`: this runtime cannot tell; an error: it could
    /// not look.
    fn data_in_instance<'a>(
        &'a self,
        id: &'a InstanceId,
    ) -> BoxFut<'a, Result<Option<PathBuf>, RuntimeError>>;
    /// The last `n` lines the instance printed.
    fn logs<'a>(
        &'a self,
        id: &'a InstanceId,
        spec: &'a InstanceSpec,
        n: usize,
    ) -> BoxFut<'a, Vec<String>>;
}

/// The last `n` lines of a text file.
pub fn tail(path: &std::path::Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
