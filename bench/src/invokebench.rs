//! Invocation latency and throughput, side by side in one run: a no-op
//! method (`grpc.health.v1.Health/Check`, served by every edge-app) called
//! client → edged → app socket, and the same call made straight to the
//! app's socket; plus session open time with its phases, process and Docker
//! runtimes.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/invokebench [--calls 5000] [--concurrency 32] [--seconds 5] [--docker]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use prost::Message;

const CHECK: &str = "/grpc.health.v1.Health/Check";

#[derive(Parser)]
struct Args {
    /// Sequential calls for the latency percentiles.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Concurrent callers for the throughput run.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Sessions opened per runtime for the open-time table.
    #[arg(long, default_value_t = 8)]
    opens: usize,
    /// Also measure session opens with the Docker runtime.
    #[arg(long)]
    docker: bool,
    /// Where to write the CSV.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
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

struct EdgeProc(Child, PathBuf);

impl Drop for EdgeProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        let _ = Command::new(bin("edged").unwrap())
            .args(["cleanup", "--config"])
            .arg(&self.1)
            .output();
    }
}

fn start_edge(dir: &Path, docker_image: Option<&str>) -> anyhow::Result<(EdgeProc, String)> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let base = dir.join("base");
    std::fs::create_dir_all(&base)?;
    let rt = match docker_image {
        Some(i) => format!("{{ kind = \"docker\", image = {i:?} }}"),
        None => format!(
            "{{ kind = \"process\", command = {:?} }}",
            bin("list-app")?.display().to_string()
        ),
    };
    let cfg = format!(
        "edge_id = \"bench\"\nlisten = \"{addr}\"\ndata_dir = {:?}\nsession_ttl = 3600\nmax_payload = 1048576\nstart_timeout = 30\nblock_size = 65536\nvolfs_binary = {:?}\n[apps.list]\nbase_volume = {:?}\nruntime = {rt}\n",
        dir.join("data").display().to_string(),
        bin("volfs")?.display().to_string(),
        base.display().to_string()
    );
    let path = dir.join("edged.toml");
    std::fs::write(&path, cfg)?;
    let child = Command::new(bin("edged")?)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "edged=warn")
        .stdout(Stdio::null())
        .spawn()?;
    let e = EdgeProc(child, path);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("edged did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((e, format!("http://{addr}")))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

type Call = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>
        + Send
        + Sync,
>;

async fn latency(call: &Call, n: usize) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..200 {
        call().await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        call().await?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

async fn throughput(call: &Call, conc: usize, secs: u64) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (call, done) = (call.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                call().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let t = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64())
}

async fn open_times(url: &str, n: usize) -> anyhow::Result<Vec<(String, Duration)>> {
    let client = edge_client::connect(url).await?;
    let mut per_phase: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
    for i in 0..n {
        let t = Instant::now();
        let s = client.open_session("list", &format!("bench-{i}")).await?;
        per_phase
            .entry("total (client)".into())
            .or_default()
            .push(t.elapsed());
        for (name, d) in s.open_phases() {
            per_phase.entry(name.clone()).or_default().push(*d);
        }
        s.close().await?;
    }
    Ok(per_phase
        .into_iter()
        .map(|(k, mut v)| {
            v.sort();
            (k, v[v.len() / 2])
        })
        .collect())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = tempfile::tempdir()?;
    let (edge, url) = start_edge(tmp.path(), None)?;
    let client = edge_client::connect(&url).await?;
    let session = client.open_session("list", "bench").await?;
    let req: Bytes = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }
    .encode_to_vec()
    .into();

    let via_edge: Call = {
        let (s, req) = (session.clone(), req.clone());
        Arc::new(move || {
            let (s, req) = (s.clone(), req.clone());
            Box::pin(async move {
                s.invoke(CHECK, req).await?;
                Ok(())
            })
        })
    };
    let sock = tmp
        .path()
        .join("data/sessions")
        .join(session.id())
        .join("run/app.sock");
    let app = edged::forward::AppClient::connect(&sock, 1 << 20).await?;
    let direct: Call = {
        let req = req.clone();
        Arc::new(move || {
            let (app, req) = (app.clone(), req.clone());
            Box::pin(async move {
                app.call(CHECK, req).await?;
                Ok(())
            })
        })
    };

    eprintln!("latency: {} sequential calls each", a.calls);
    let ld = latency(&direct, a.calls).await?;
    let le = latency(&via_edge, a.calls).await?;
    eprintln!(
        "throughput: {} callers for {} s each",
        a.concurrency, a.seconds
    );
    let td = throughput(&direct, a.concurrency, a.seconds).await?;
    let te = throughput(&via_edge, a.concurrency, a.seconds).await?;
    session.close().await?;

    let mut out = String::new();
    let mut csv = String::from("path,p50_us,p90_us,p99_us,calls_per_s\n");
    writeln!(
        out,
        "| path | p50 | p90 | p99 | calls/s ({} callers) |",
        a.concurrency
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, l, t) in [
        ("client → app socket (direct)", &ld, td),
        ("client → edged → app socket", &le, te),
    ] {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            out,
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} |",
            us(pct(l, 0.5)),
            us(pct(l, 0.9)),
            us(pct(l, 0.99)),
            t
        )?;
        writeln!(
            csv,
            "{name},{:.1},{:.1},{:.1},{:.0}",
            us(pct(l, 0.5)),
            us(pct(l, 0.9)),
            us(pct(l, 0.99)),
            t
        )?;
    }
    let overhead = pct(&le, 0.5).as_secs_f64() * 1e6 - pct(&ld, 0.5).as_secs_f64() * 1e6;
    writeln!(out, "\np50 overhead of the edged hop: {overhead:.0} µs")?;

    writeln!(
        out,
        "\nsession open, median of {} (process runtime):",
        a.opens
    )?;
    for (k, d) in open_times(&url, a.opens).await? {
        writeln!(out, "- {k}: {:.1} ms", d.as_secs_f64() * 1e3)?;
        writeln!(csv, "open process {k},{:.1},,,", d.as_secs_f64() * 1e6)?;
    }
    drop(edge);

    if a.docker {
        let tag = "edgeshift-bench/list-app:latest";
        let st = Command::new(bin("edged")?)
            .args(["image", "build", "--binary"])
            .arg(bin("list-app")?)
            .args(["--tag", tag])
            .status()?;
        anyhow::ensure!(st.success(), "image build failed");
        let tmp2 = tempfile::tempdir()?;
        let (edge, url) = start_edge(tmp2.path(), Some(tag))?;
        writeln!(
            out,
            "\nsession open, median of {} (Docker runtime):",
            a.opens
        )?;
        for (k, d) in open_times(&url, a.opens).await? {
            writeln!(out, "- {k}: {:.1} ms", d.as_secs_f64() * 1e3)?;
            writeln!(csv, "open docker {k},{:.1},,,", d.as_secs_f64() * 1e6)?;
        }
        drop(edge);
    }
    print!("{out}");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("invokebench.csv"), csv)?;
    Ok(())
}
