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
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    let client = edgeshift_tests::connect(url).await?;
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
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base)?;
    let edge =
        edgeshift_tests::start_list_edge_in(tmp.path(), "bench", "127.0.0.1", &base, None, "");
    let url = edge.url();
    let client = edgeshift_tests::connect(&url).await?;
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
    let sock = edge
        .data_dir
        .join("sessions")
        .join(session.id())
        .join("run/app.sock");
    let app = edged::forward::AppClient::connect(&sock, 1 << 20).await?;
    // The same hop without TLS (an edge in insecure_plaintext): what TLS costs.
    let plain = edgeshift_tests::start_list_edge_in(
        tmp.path(),
        "plain",
        "127.0.0.2",
        &base,
        None,
        "insecure_plaintext = true",
    );
    let plain_session = edge_client::connect(&plain.url())
        .await?
        .open_session("list", "bench")
        .await?;
    let via_plain: Call = {
        let (s, req) = (plain_session.clone(), req.clone());
        Arc::new(move || {
            let (s, req) = (s.clone(), req.clone());
            Box::pin(async move {
                s.invoke(CHECK, req).await?;
                Ok(())
            })
        })
    };
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
    let lp = latency(&via_plain, a.calls).await?;
    eprintln!(
        "throughput: {} callers for {} s each",
        a.concurrency, a.seconds
    );
    let td = throughput(&direct, a.concurrency, a.seconds).await?;
    let te = throughput(&via_edge, a.concurrency, a.seconds).await?;
    let tp = throughput(&via_plain, a.concurrency, a.seconds).await?;
    session.close().await?;
    plain_session.close().await?;
    drop(plain);

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
        ("client → edged (TLS) → app socket", &le, te),
        ("client → edged (plaintext) → app socket", &lp, tp),
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
    writeln!(
        out,
        "\np50 overhead of the edged hop (TLS): {overhead:.0} µs"
    )?;
    let tls = pct(&le, 0.5).as_secs_f64() * 1e6 - pct(&lp, 0.5).as_secs_f64() * 1e6;
    writeln!(out, "p50 cost of TLS on that hop: {tls:.0} µs")?;

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
        let st = Command::new(edgeshift_tests::bin("edged"))
            .args(["image", "build", "--binary"])
            .arg(edgeshift_tests::bin("list-app"))
            .args(["--tag", tag])
            .status()?;
        anyhow::ensure!(st.success(), "image build failed");
        let tmp2 = tempfile::tempdir()?;
        let base = tmp2.path().join("base");
        std::fs::create_dir_all(&base)?;
        let edge = edgeshift_tests::start_list_edge_in(
            tmp2.path(),
            "bench",
            "127.0.0.1",
            &base,
            Some(tag),
            "",
        );
        let url = edge.url();
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
