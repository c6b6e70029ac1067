//! The gap a client sees while its session moves: a writer adds 4 KB items
//! to the List app at a steady rate while the session moves back and forth
//! between two places on loopback. For each move: the longest time no write
//! completed from the move asked until shortly after it ended (the
//! client-seen gap), beside the downtime the mover reports; and, apart, the
//! longest stall after that until the next move.
//!
//! Side by side in one run:
//! - edgeshift (two edges, TLS, the List app in the process runtime, a
//!   warm standby instance on the new edge);
//! - edgeshift without the standby (the instance starts in the downtime);
//! - edgeshift without the standby and without warming the pulled
//!   volume's mount (`[handover] warm_bytes = 0`; a standby is not warmed);
//! - with `--docker`: edgeshift with the Docker runtime, with and without
//!   the standby (the image is built from the List app's binary);
//! - with `--python`: edgeshift with the List app's Python server half
//!   (`examples/python/list_app.py`, grpcio), with and without the standby;
//! - the original framework's method done its way: the app as a plain
//!   process on a native directory, the client calling its socket
//!   directly; at the move `rsync` pass 1 with the app writing, the app
//!   stopped, pass 2, the app started on the target, the client
//!   reconnecting as soon as it answers.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/gapbench [--moves 20] [--rate 120] [--seed-mb 16] [--docker] [--python] [--bursty]
//! ```
//!
//! With `--bursty` the writer works in bursts of SQLite transactions
//! instead of at a steady rate: for half a second it adds items back to
//! back as fast as the app answers, then it is idle for half a second. A
//! probe calls the app's health check every 5 ms throughout, so the idle
//! half-seconds do not count as gaps: the gap is taken over the writes and
//! the probes together.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edged::forward::AppClient;
use edgeshift_tests::list;

mod rsync;

#[derive(Parser, Clone)]
struct Args {
    /// Moves per variant (alternately there and back).
    #[arg(long, default_value_t = 20)]
    moves: usize,
    /// Writes per second the writer aims at.
    #[arg(long, default_value_t = 120)]
    rate: u32,
    /// Size of each item written.
    #[arg(long, default_value_t = 4096)]
    item_bytes: usize,
    /// Megabytes of items in the database before the first move.
    #[arg(long, default_value_t = 16)]
    seed_mb: usize,
    /// Both edges in `insecure_plaintext`.
    #[arg(long)]
    plaintext: bool,
    /// Only the edgeshift variant with its defaults.
    #[arg(long)]
    only_edgeshift: bool,
    /// Also the Docker runtime (needs dockerd).
    #[arg(long)]
    docker: bool,
    /// Also the Python List app (needs python3-grpcio).
    #[arg(long)]
    python: bool,
    /// Bursts of transactions (back to back for `BURST`, then idle as
    /// long) instead of a steady rate, and a probe calling every 5 ms.
    #[arg(long)]
    bursty: bool,
    /// Keep the working directory (edged logs).
    #[arg(long)]
    keep: bool,
    /// Where to write the CSV.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

/// One way of running edgeshift.
struct Variant {
    name: &'static str,
    /// Laid over both edges' configuration.
    extra: &'static str,
    /// The Docker image of the List app; the process runtime when None.
    image: Option<String>,
    /// The Python List app instead of the Rust one (process runtime).
    python: bool,
    /// A warm standby instance on the new edge.
    standby: bool,
}

/// Builds the List app's image as `tag` (`edged image build`).
fn build_image(tag: &str) -> anyhow::Result<()> {
    let out = Command::new(edgeshift_tests::bin("edged"))
        .args(["image", "build", "--binary"])
        .arg(edgeshift_tests::bin("list-app"))
        .args(["--tag", tag])
        .output()
        .context("edged image build")?;
    anyhow::ensure!(
        out.status.success(),
        "edged image build (is dockerd running?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One completed call: when it was sent and when its answer came.
#[derive(Clone, Copy)]
struct Done {
    sent: Instant,
    answered: Instant,
    /// A probe's health check, not a write.
    probe: bool,
}

/// How long a burst of writes lasts, and the idle time after it (`--bursty`).
const BURST: Duration = Duration::from_millis(500);

/// How often the probe calls (`--bursty`).
const PROBE_EVERY: Duration = Duration::from_millis(5);

/// The health check every edge-app serves (the probe's call).
const CHECK: &str = "/grpc.health.v1.Health/Check";

/// One move, as the mover saw it.
struct Move {
    asked: Instant,
    ready: Instant,
    downtime: Duration,
    /// When each phase was reported, after `asked` (edgeshift only).
    phases: Vec<(&'static str, Duration)>,
}

/// What a variant measured.
struct Run {
    moves: Vec<Move>,
    done: Vec<Done>,
}

/// How long after a move ends its gap may still be counted.
const SETTLE: Duration = Duration::from_millis(250);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The longest time without a completed write in `[from, to]`, counted
/// from the last write answered before `from`; with the write that ended
/// it.
fn longest_gap(done: &[Done], from: Instant, to: Instant) -> (Duration, Option<Done>) {
    let mut last = done
        .iter()
        .filter(|d| d.answered <= from)
        .map(|d| d.answered)
        .max()
        .unwrap_or(from);
    let mut best = (Duration::ZERO, None);
    let mut inside: Vec<Done> = done
        .iter()
        .copied()
        .filter(|d| d.answered > from && d.answered <= to)
        .collect();
    inside.sort_by_key(|d| d.answered);
    for d in inside {
        let g = d.answered - last;
        if g > best.0 {
            best = (g, Some(d));
        }
        last = d.answered;
    }
    best
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A writer adding items through `call` until `stop`: at `rate` per
/// second, or in bursts with `--bursty` (then `probe` is called every
/// `PROBE_EVERY` too). Both kinds of call land in the one list.
fn writer<F, Fut, P, PFut>(
    a: &Args,
    call: F,
    probe: P,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    Arc<Mutex<Vec<Done>>>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)
where
    F: Fn(bytes::Bytes) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
    P: Fn() -> PFut + Send + 'static,
    PFut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let (d2, period, n) = (done.clone(), Duration::from_secs(1) / a.rate, a.item_bytes);
    let bursty = a.bursty;
    let probing = bursty.then(|| {
        let (d3, stop) = (done.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let sent = Instant::now();
                probe().await.context("a probe")?;
                d3.lock().unwrap().push(Done {
                    sent,
                    answered: Instant::now(),
                    probe: true,
                });
            }
            anyhow::Ok(())
        })
    });
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(if bursty { 2 * BURST } else { period });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i = 1_000_000;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let burst = Instant::now();
            loop {
                i += 1;
                let sent = Instant::now();
                call(list::add(&edgeshift_tests::noise(i, n)))
                    .await
                    .context("a write")?;
                d2.lock().unwrap().push(Done {
                    sent,
                    answered: Instant::now(),
                    probe: false,
                });
                if !bursty || burst.elapsed() >= BURST {
                    break;
                }
            }
        }
        if let Some(p) = probing {
            p.await??;
        }
        anyhow::Ok(())
    });
    (done, task)
}

/// Two edges; the session moves between them with `handover_to`.
async fn edgeshift(a: &Args, work: &Path, v: &Variant) -> anyhow::Result<Run> {
    let extra = v.extra;
    let base = work.join("base");
    std::fs::create_dir_all(&base)?;
    let mode = if a.plaintext {
        "insecure_plaintext = true\n"
    } else {
        ""
    };
    let a_addr = edgeshift_tests::free_addr("127.0.0.1");
    let b_addr = edgeshift_tests::free_addr("127.0.0.2");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/list_app.py");
    let standby = |c: &mut edged::config::Config| {
        for app in c.apps.values_mut() {
            app.standby = v.standby;
            if v.python {
                app.runtime = edged::config::RuntimeConfig::Process {
                    command: "/usr/bin/python3".into(),
                    args: vec![python.display().to_string()],
                };
            }
        }
    };
    let ea = edgeshift_tests::start_list_edge_with(
        work,
        "a",
        &a_addr.to_string(),
        &base,
        v.image.as_deref(),
        &format!("{mode}{}{extra}", edgeshift_tests::neighbour("b", b_addr)),
        standby,
    );
    let eb = edgeshift_tests::start_list_edge_with(
        work,
        "b",
        &b_addr.to_string(),
        &base,
        v.image.as_deref(),
        &format!("{mode}{}{extra}", edgeshift_tests::neighbour("a", a_addr)),
        standby,
    );
    let connect = |url: String| async move {
        if url.starts_with("http://") {
            edge_client::connect(&url).await
        } else {
            edgeshift_tests::connect(&url).await
        }
    };
    let clients = [connect(ea.url()).await?, connect(eb.url()).await?];
    let s = clients[0].open_session("list", "gapbench").await?;
    let seed_items = (a.seed_mb << 20) / a.item_bytes.max(1);
    for i in 0..seed_items {
        s.invoke(
            list::ADD,
            list::add(&edgeshift_tests::noise(i, a.item_bytes)),
        )
        .await
        .context("seeding")?;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s2, s3) = (s.clone(), s.clone());
    let (done, task) = writer(
        a,
        move |item| {
            let s = s2.clone();
            async move {
                s.invoke(list::ADD, item).await?;
                Ok(())
            }
        },
        move || {
            let s = s3.clone();
            async move {
                s.invoke(CHECK, bytes::Bytes::new()).await?;
                Ok(())
            }
        },
        stop.clone(),
    );
    let mut moves = Vec::new();
    for m in 0..a.moves {
        // Pre-copy rounds run between moves (one per MiB dirtied).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let to = &clients[(m + 1) % 2];
        let asked = Instant::now();
        let mut phases = Vec::new();
        let mut downtime = Duration::ZERO;
        s.handover_to(to, |p| {
            phases.push((edge_proto::phase_name(p.phase()), asked.elapsed()));
            downtime = Duration::from_micros(p.downtime_micros);
        })
        .await
        .with_context(|| format!("move {m}"))?;
        moves.push(Move {
            asked,
            ready: Instant::now(),
            downtime,
            phases,
        });
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    task.await??;
    s.close().await?;
    drop((ea, eb));
    let done = done.lock().unwrap().clone();
    Ok(Run { moves, done })
}

/// Calls `method` on whichever socket the app answers on now; a call that
/// fails goes again once the app answers there (30 s at most).
async fn call_current(
    current: Arc<Mutex<(PathBuf, AppClient)>>,
    method: &'static str,
    body: bytes::Bytes,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = current.lock().unwrap().1.clone();
        if client.call(method, body.clone()).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no answer for 30 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
        let path = current.lock().unwrap().0.clone();
        if let Ok(c) = AppClient::connect(&path, 1 << 20).await {
            *current.lock().unwrap() = (path, c);
        }
    }
}

/// The original framework's method: rsync, stop, rsync, start, reconnect.
async fn thesis(a: &Args, work: &Path) -> anyhow::Result<Run> {
    let sites: Vec<(PathBuf, PathBuf)> = ["site-a", "site-b"]
        .iter()
        .map(|n| (work.join(n).join("data"), work.join(n).join("run")))
        .collect();
    let mut daemons = Vec::new();
    let mut addrs = Vec::new();
    for (data, run) in &sites {
        std::fs::create_dir_all(data)?;
        std::fs::create_dir_all(run)?;
        let (d, addr) = rsync::daemon(work, data)?;
        daemons.push(d);
        addrs.push(addr);
    }
    let mut app = rsync::start_app(&sites[0].0, &sites[0].1, &[])?;
    let first = rsync::answering(&sites[0].1.join("app.sock")).await?;
    let seed_items = (a.seed_mb << 20) / a.item_bytes.max(1);
    for i in 0..seed_items {
        first
            .call(
                list::ADD,
                list::add(&edgeshift_tests::noise(i, a.item_bytes)),
            )
            .await
            .context("seeding")?;
    }
    // The client calls whichever socket the app answers on now; a call
    // that fails goes again once the app answers there.
    let current: Arc<Mutex<(PathBuf, AppClient)>> =
        Arc::new(Mutex::new((sites[0].1.join("app.sock"), first)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c2, c3) = (current.clone(), current.clone());
    let (done, task) = writer(
        a,
        move |item| call_current(c2.clone(), list::ADD, item),
        move || call_current(c3.clone(), CHECK, bytes::Bytes::new()),
        stop.clone(),
    );
    let mut moves = Vec::new();
    for m in 0..a.moves {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (from, to) = (m % 2, (m + 1) % 2);
        let asked = Instant::now();
        // Pass 1 while the app writes.
        let (src, addr) = (sites[from].0.clone(), addrs[to]);
        tokio::task::spawn_blocking(move || rsync::pass(&src, addr)).await??;
        // Stop (SIGTERM, as `docker stop`): the downtime starts.
        let t = Instant::now();
        // SAFETY: kill with a pid this process spawned and has not reaped.
        unsafe { libc::kill(app.id() as i32, libc::SIGTERM) };
        let _ = app.wait();
        let src = sites[from].0.clone();
        tokio::task::spawn_blocking(move || rsync::pass(&src, addr)).await??;
        let _ = std::fs::remove_file(sites[to].1.join("app.sock"));
        app = rsync::start_app(&sites[to].0, &sites[to].1, &[])?;
        let socket = sites[to].1.join("app.sock");
        let c = rsync::answering(&socket).await?;
        let downtime = t.elapsed();
        *current.lock().unwrap() = (socket, c);
        moves.push(Move {
            asked,
            ready: Instant::now(),
            downtime,
            phases: Vec::new(),
        });
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    task.await??;
    let _ = app.kill();
    let _ = app.wait();
    for mut d in daemons {
        let _ = d.kill();
        let _ = d.wait();
    }
    let done = done.lock().unwrap().clone();
    Ok(Run { moves, done })
}

/// Summary numbers of a run, ms: gaps, downtimes, gap − downtime, stalls after.
struct Summary {
    gaps: Vec<f64>,
    downs: Vec<f64>,
    extra: Vec<f64>,
    after: Vec<f64>,
    /// Every write's latency.
    writes: Vec<f64>,
}

fn report(name: &str, run: &Run, csv: &mut String) -> Summary {
    println!(
        "\n### {name}\n\n| move | downtime | client-seen gap | gap − downtime | gap from → to (after the ask) | stall after | phases reported (after the ask) |\n|---:|---:|---:|---:|---|---:|---|"
    );
    let mut sum = Summary {
        gaps: Vec::new(),
        downs: Vec::new(),
        extra: Vec::new(),
        after: Vec::new(),
        writes: run
            .done
            .iter()
            .filter(|d| !d.probe)
            .map(|d| ms(d.answered - d.sent))
            .collect(),
    };
    for (i, m) in run.moves.iter().enumerate() {
        let (gap, ended) = longest_gap(&run.done, m.asked, m.ready + SETTLE);
        let next = run
            .moves
            .get(i + 1)
            .map_or(m.ready + Duration::from_secs(1), |n| n.asked);
        let (after, _) = longest_gap(&run.done, m.ready + SETTLE, next);
        let rel = |t: Instant| {
            if t >= m.asked {
                ms(t - m.asked)
            } else {
                -ms(m.asked - t)
            }
        };
        let (g0, g1) = match ended {
            Some(d) => (rel(d.answered) - ms(gap), rel(d.answered)),
            None => (f64::NAN, f64::NAN),
        };
        let phases: Vec<String> = m
            .phases
            .iter()
            .filter(|(n, _)| *n != "pull")
            .map(|(n, d)| format!("{n} {:.0}", ms(*d)))
            .collect();
        println!(
            "| {i} | {:.1} ms | {:.1} ms | {:.1} ms | {g0:.0} → {g1:.0} ms | {:.1} ms | {} |",
            ms(m.downtime),
            ms(gap),
            ms(gap) - ms(m.downtime),
            ms(after),
            phases.join(", ")
        );
        *csv += &format!(
            "{name},{i},{:.2},{:.2},{:.2},{:.2}\n",
            ms(m.downtime),
            ms(gap),
            ms(m.ready - m.asked),
            ms(after),
        );
        sum.gaps.push(ms(gap));
        sum.downs.push(ms(m.downtime));
        sum.extra.push(ms(gap) - ms(m.downtime));
        sum.after.push(ms(after));
    }
    sum
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    anyhow::ensure!(uid == 0, "gapbench mounts FUSE volumes: run it as root");
    anyhow::ensure!(
        a.rate > 0 && a.item_bytes <= edgeshift_examples::list::MAX_ITEM,
        "--rate must be positive and --item-bytes at most {}",
        edgeshift_examples::list::MAX_ITEM
    );
    let work = tempfile::Builder::new()
        .prefix("gapbench")
        .tempdir_in("/var/tmp")?;
    if a.keep {
        eprintln!("working directory: {}", work.path().display());
    }
    let mut runs: Vec<(String, Run)> = Vec::new();
    let variant = |name, extra, image: Option<&str>, standby| Variant {
        name,
        extra,
        image: image.map(str::to_string),
        python: false,
        standby,
    };
    let mut variants = vec![variant("edgeshift", "", None, true)];
    if !a.only_edgeshift {
        variants.push(variant("edgeshift, no standby", "", None, false));
        variants.push(variant(
            "edgeshift, no standby, mount not warmed",
            "[handover]\nwarm_bytes = 0\n",
            None,
            false,
        ));
    }
    let image = format!("edgeshift-bench/list-app:gapbench-{}", std::process::id());
    if a.docker {
        build_image(&image)?;
        variants.push(variant("edgeshift, Docker", "", Some(&image), true));
        variants.push(variant(
            "edgeshift, Docker, no standby",
            "",
            Some(&image),
            false,
        ));
    }
    if a.python {
        for (name, standby) in [
            ("edgeshift, Python app", true),
            ("edgeshift, Python app, no standby", false),
        ] {
            variants.push(Variant {
                python: true,
                ..variant(name, "", None, standby)
            });
        }
    }
    for (i, v) in variants.iter().enumerate() {
        eprintln!("{}: {} moves", v.name, a.moves);
        let dir = work.path().join(format!("edgeshift-{i}"));
        std::fs::create_dir_all(&dir)?;
        runs.push((v.name.to_string(), edgeshift(&a, &dir, v).await?));
    }
    if a.docker {
        let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    }
    if !a.only_edgeshift {
        eprintln!("rsync, stop, rsync, start: {} moves", a.moves);
        runs.push((
            "the original method (rsync, stop, rsync, start)".into(),
            thesis(&a, work.path()).await?,
        ));
    }
    let pace = if a.bursty {
        format!(
            "in bursts ({} ms back to back, {} ms idle; a probe every {} ms)",
            BURST.as_millis(),
            BURST.as_millis(),
            PROBE_EVERY.as_millis()
        )
    } else {
        format!("at {}/s", a.rate)
    };
    println!(
        "{} moves per variant on loopback; a writer adds {} B items {pace} to the List app, {} MB seeded; {}.",
        a.moves,
        a.item_bytes,
        a.seed_mb,
        if a.plaintext { "plaintext" } else { "TLS" }
    );
    let mut csv = String::from("variant,move,downtime_ms,gap_ms,total_ms,stall_after_ms\n");
    let mut table = String::from(
        "\n| variant | gap p50 | gap p99 | gap max | downtime p50 | downtime max | gap − downtime p50 / max | stall after p50 / max | a write, p50 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, run) in &runs {
        let s = report(name, run, &mut csv);
        table += &format!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.2} ms |\n",
            percentile(&s.gaps, 0.5),
            percentile(&s.gaps, 0.99),
            percentile(&s.gaps, 1.0),
            percentile(&s.downs, 0.5),
            percentile(&s.downs, 1.0),
            percentile(&s.extra, 0.5),
            percentile(&s.extra, 1.0),
            percentile(&s.after, 0.5),
            percentile(&s.after, 1.0),
            percentile(&s.writes, 0.5),
        );
    }
    println!("{table}");
    std::fs::create_dir_all(&a.out)?;
    let file = a.out.join("gapbench.csv");
    std::fs::write(&file, csv)?;
    eprintln!("wrote {}", file.display());
    if a.keep {
        let _ = work.keep();
    }
    Ok(())
}
