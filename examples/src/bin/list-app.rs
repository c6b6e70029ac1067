//! The List app's server binary: run by edged inside a session's instance.
//!
//! `--churn BYTES_PER_SEC` adds a steady writer, for load tests: once the
//! volume holds a file `churn.go`, a thread overwrites 64 KiB blocks of the
//! volume's file `blob` at random places at that rate, syncing every 100 ms
//! (as a database does). It is part of the app: frozen with it, and going
//! on wherever the session moves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeshift_examples::list::ListService;
use edgeshift_examples::pb::list::list_server::ListServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let churn = churn_rate(std::env::args().skip(1))?;
    let dir = edge_app::data_dir();
    let svc = ListService::open(&dir)?;
    if let Some(rate) = churn {
        std::thread::spawn(move || {
            if let Err(e) = churn_loop(&dir, rate) {
                tracing::warn!(error = %e, "churn stopped");
            }
        });
    }
    let router = tonic::transport::Server::builder().add_service(ListServer::new(svc));
    edge_app::serve(router).await?;
    Ok(())
}

fn churn_rate(mut args: impl Iterator<Item = String>) -> anyhow::Result<Option<u64>> {
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(None),
        (Some("--churn"), Some(r)) => match r.parse::<u64>() {
            Ok(r) if r > 0 => Ok(Some(r)),
            _ => anyhow::bail!("--churn wants bytes per second, got {r:?}"),
        },
        _ => anyhow::bail!("usage: list-app [--churn BYTES_PER_SEC]"),
    }
}

const BLOCK: u64 = 64 << 10;

fn churn_loop(dir: &Path, rate: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (go, file): (PathBuf, PathBuf) = (dir.join("churn.go"), dir.join("blob"));
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let f = std::fs::OpenOptions::new().write(true).open(&file)?;
    let blocks = (f.metadata()?.len() / BLOCK).max(1);
    let mut buf = vec![0u8; BLOCK as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut next = Instant::now();
    let mut synced = Instant::now();
    loop {
        // A steady writer: one block per tick, no catching up after a stall.
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = next.max(now) + Duration::from_secs_f64(BLOCK as f64 / rate as f64);
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, (x % blocks) * BLOCK)?;
        if synced.elapsed() >= Duration::from_millis(100) {
            f.sync_data()?;
            synced = Instant::now();
        }
    }
}
