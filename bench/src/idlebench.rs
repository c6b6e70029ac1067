//! What idle sessions cost an edge: N sessions of the List app open on
//! edge A, pre-copying to neighbour B, no call and no write. After the
//! first pre-copy rounds settle, the CPU time of A's edged and of its volfs
//! shims is counted over a window (utime + stime from /proc).
//!
//! Run it next to the edged and volfs binaries to measure (it starts the
//! ones beside itself), so two builds compare side by side:
//!
//! ```text
//! cargo build --release --workspace
//! target/release/idlebench [--sessions 100] [--seconds 30]
//! ```

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Idle sessions on edge A.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seconds to let the first pre-copy rounds settle.
    #[arg(long, default_value_t = 20)]
    settle: u64,
}

/// Clock ticks per second of /proc's times.
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// (ppid, comm, utime + stime in ticks) of process `pid`.
fn stat(pid: u32) -> Option<(u32, String, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = s.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let f: Vec<&str> = rest.split(' ').collect();
    // After "pid (comm) ": state(0) ppid(1) ... utime(11) stime(12).
    let ppid = f.get(1)?.parse().ok()?;
    let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ppid, comm, t))
}

/// CPU ticks of `edged` and of its children named `volfs`.
fn cpu(edged: u32) -> (u64, u64, usize) {
    let own = stat(edged).map_or(0, |s| s.2);
    let (mut shims, mut n) = (0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if let Some((ppid, comm, t)) = stat(pid) {
            if ppid == edged && comm == "volfs" {
                shims += t;
                n += 1;
            }
        }
    }
    (own, shims, n)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    anyhow::ensure!(uid == 0, "idlebench mounts FUSE volumes: run it as root");
    let work = tempfile::Builder::new()
        .prefix("idlebench")
        .tempdir_in("/var/tmp")?;
    let base = work.path().join("base");
    std::fs::create_dir_all(&base)?;
    let a_addr = edgeshift_tests::free_addr("127.0.0.1");
    let b = edgeshift_tests::start_list_edge_in(
        work.path(),
        "b",
        "127.0.0.2",
        &base,
        None,
        &edgeshift_tests::neighbour("a", a_addr),
    );
    let edge_a = edgeshift_tests::start_list_edge_in(
        work.path(),
        "a",
        &a_addr.to_string(),
        &base,
        None,
        &edgeshift_tests::neighbour("b", b.addr),
    );
    let client = edgeshift_tests::connect(&edge_a.url()).await?;
    let mut sessions = Vec::new();
    for i in 0..a.sessions {
        sessions.push(client.open_session("list", &format!("idle-{i}")).await?);
    }
    eprintln!("{} sessions open; {} s to settle", sessions.len(), a.settle);
    tokio::time::sleep(Duration::from_secs(a.settle)).await;
    let pid = edge_a.pid().expect("edged A runs");
    let t0 = cpu(pid);
    let b0 = stat(b.pid().expect("edged B runs")).map_or(0, |s| s.2);
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let t1 = cpu(pid);
    let b1 = stat(b.pid().expect("edged B runs")).map_or(0, |s| s.2);
    let secs = a.seconds as f64;
    let core = |d: u64| d as f64 / ticks() / secs;
    println!(
        "| sessions | shims | edged A (core) | volfs shims (core) | A in all (core) | edged B (core) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
        sessions.len(),
        t1.2,
        core(t1.0 - t0.0),
        core(t1.1 - t0.1),
        core(t1.0 + t1.1 - t0.0 - t0.1),
        core(b1 - b0)
    );
    for s in sessions {
        let _ = s.close().await;
    }
    Ok(())
}
