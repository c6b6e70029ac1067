//! Edges for the benchmarks: `edged` processes on loopback serving the List
//! app, stopped and cleaned up on drop. Shared by `invokebench` and `migbench`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A binary of the workspace next to this one.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} missing: cargo build --release --workspace",
        p.display()
    );
    Ok(p)
}

/// A running `edged serve`.
pub struct Edge {
    child: Child,
    config: PathBuf,
    /// Its data directory.
    pub data: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Edge {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Ok(edged) = bin("edged") {
            let _ = Command::new(edged)
                .args(["cleanup", "--config"])
                .arg(&self.config)
                .output();
        }
    }
}

/// Starts edge `id` on `ip` in `dir` (config, data and log there), serving
/// the List app from `base` with the process runtime or, given an image,
/// Docker; `extra` is appended to the top level of the config.
pub fn start(
    dir: &Path,
    id: &str,
    ip: &str,
    base: &Path,
    docker_image: Option<&str>,
    extra: &str,
) -> anyhow::Result<Edge> {
    let addr = std::net::TcpListener::bind((ip, 0))?.local_addr()?;
    let data = dir.join(id);
    let runtime = match docker_image {
        Some(i) => format!("{{ kind = \"docker\", image = {i:?} }}"),
        None => format!(
            "{{ kind = \"process\", command = {:?} }}",
            bin("list-app")?.display().to_string()
        ),
    };
    let cfg = format!(
        "edge_id = {id:?}\nlisten = \"{addr}\"\ndata_dir = {:?}\nsession_ttl = 3600\nmax_payload = 1048576\nstart_timeout = 30\nblock_size = 65536\nvolfs_binary = {:?}\n{extra}\n[apps.list]\nbase_volume = {:?}\nruntime = {runtime}\n",
        data.display().to_string(),
        bin("volfs")?.display().to_string(),
        base.display().to_string(),
    );
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(&config, cfg)?;
    let log = std::fs::File::create(dir.join(format!("{id}.log")))?;
    let child = Command::new(bin("edged")?)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let e = Edge {
        child,
        config,
        data,
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "edged {id} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(e)
}
