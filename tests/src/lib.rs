//! Harness of the end-to-end tests: real `edged` processes on loopback
//! (127.0.0.x), their configuration and base volumes, cleaned up on drop.
//!
//! The binaries (`edged`, `volfs`, `list-app`, `search-app`) come from the
//! same target directory as the test executable: `cargo build --workspace`
//! first (the README's test command does).
//!
//! # Layout
//! - `edge`: one `edged serve` ([`Edge`]), its configuration ([`config`]),
//!   what a test reads of it (sessions, pids, mounts, fds).
//! - `cluster`: several edges ([`Cluster::mesh`], [`Pair`]) and who holds a
//!   session ([`holders`], [`sole_owner`]).
//! - `relay`: a link that slows, cuts or tampers ([`Relay`], [`Faults`]).
//! - `writer`: a client writing through moves ([`Writer`], [`check_items`]).
//! - [`list`]: raw calls of the List app.
//! - `pki`: the test fleet's CA and clients that trust it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

mod cluster;
mod edge;
pub mod list;
mod pki;
mod relay;
mod writer;

pub use cluster::{Cluster, Pair, holders, sole_owner};
pub use edge::{
    Edge, config, free_addr, instance_pid, instances_of, neighbour, pid_alive, proc_state,
    sessions, start_list_edge_in, start_list_edge_with,
};
pub use pki::{channel, connect, edge_certs, fleet_ca, trust};
pub use relay::{Faults, Relay};
pub use writer::{Writer, check_items, noise};
