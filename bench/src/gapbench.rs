//! The gap a client sees while its session moves: a writer adds 4 KB items
//! to the List app at a steady rate while the session moves back and forth
//! between two edges on loopback; for each move the longest time no call
//! completed is set beside the downtime the edges report, and the moments
//! of the handover's phases show where the rest of the gap goes.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/gapbench [--moves 20] [--rate 120] [--seed-mb 16]
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgeshift_tests::list;

#[derive(Parser)]
struct Args {
    /// Moves (alternately A → B and B → A).
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
    /// Both edges in `insecure_plaintext` (what TLS costs, side by side).
    #[arg(long)]
    plaintext: bool,
    /// Keep the working directory (edged logs).
    #[arg(long)]
    keep: bool,
    /// Where to write the CSV.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

/// One completed write: when it was sent and when its answer came.
#[derive(Clone, Copy)]
struct Done {
    sent: Instant,
    answered: Instant,
}

/// One move, as the client saw it.
struct Move {
    asked: Instant,
    ready: Instant,
    downtime: Duration,
    /// When each phase was reported, after `asked`.
    phases: Vec<(&'static str, Duration)>,
}

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "gapbench mounts FUSE volumes: run it as root"
    );
    anyhow::ensure!(a.rate > 0 && a.item_bytes <= edgeshift_examples::list::MAX_ITEM);
    let work = tempfile::Builder::new()
        .prefix("gapbench")
        .tempdir_in("/var/tmp")?;
    if a.keep {
        eprintln!("working directory: {}", work.path().display());
    }
    let base = work.path().join("base");
    std::fs::create_dir_all(&base)?;
    let mode = if a.plaintext {
        "insecure_plaintext = true\n"
    } else {
        ""
    };
    let a_addr = edgeshift_tests::free_addr("127.0.0.1");
    let b_addr = edgeshift_tests::free_addr("127.0.0.2");
    let ea = edgeshift_tests::start_list_edge_in(
        work.path(),
        "a",
        &a_addr.to_string(),
        &base,
        None,
        &format!("{mode}{}", edgeshift_tests::neighbour("b", b_addr)),
    );
    let eb = edgeshift_tests::start_list_edge_in(
        work.path(),
        "b",
        &b_addr.to_string(),
        &base,
        None,
        &format!("{mode}{}", edgeshift_tests::neighbour("a", a_addr)),
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
    eprintln!("seeding {seed_items} items of {} bytes", a.item_bytes);
    for i in 0..seed_items {
        s.invoke(
            list::ADD,
            list::add(&edgeshift_tests::noise(i, a.item_bytes)),
        )
        .await
        .context("seeding")?;
    }

    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (s, done, stop) = (s.clone(), done.clone(), stop.clone());
        let (period, n) = (Duration::from_secs(1) / a.rate, a.item_bytes);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let sent = Instant::now();
                s.invoke(list::ADD, list::add(&edgeshift_tests::noise(i, n)))
                    .await
                    .context("a write")?;
                done.lock().unwrap().push(Done {
                    sent,
                    answered: Instant::now(),
                });
            }
            anyhow::Ok(())
        })
    };

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
        eprintln!("move {m}: downtime {:.1} ms", ms(downtime));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await??;
    s.close().await?;

    let done = done.lock().unwrap().clone();
    std::fs::create_dir_all(&a.out)?;
    let mut csv = String::from(
        "move,downtime_ms,gap_ms,gap_minus_downtime_ms,total_ms,gap_start_ms,gap_end_ms,quiesced_ms,final_ms,apply_ms,start_ms,ready_ms\n",
    );
    println!(
        "| move | downtime | client-seen gap | gap − downtime | gap from → to (after the ask) | phases reported (after the ask) |\n|---:|---:|---:|---:|---|---|"
    );
    let (mut gaps, mut downs, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    for (i, m) in moves.iter().enumerate() {
        let (gap, ended) = longest_gap(&done, m.asked, m.ready + Duration::from_secs(1));
        let rel = |t: Instant| {
            if t >= m.asked {
                ms(t - m.asked)
            } else {
                -ms(m.asked - t)
            }
        };
        let (g0, g1, sent) = match ended {
            Some(d) => (rel(d.answered) - ms(gap), rel(d.answered), rel(d.sent)),
            None => (f64::NAN, f64::NAN, f64::NAN),
        };
        let at = |name: &str| {
            m.phases
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map_or(f64::NAN, |(_, d)| ms(*d))
        };
        let phases: Vec<String> = m
            .phases
            .iter()
            .filter(|(n, _)| *n != "pull")
            .map(|(n, d)| format!("{n} {:.0}", ms(*d)))
            .collect();
        println!(
            "| {i} | {:.1} ms | {:.1} ms | {:.1} ms | {g0:.0} → {g1:.0} ms (its call sent at {sent:.0}) | {} |",
            ms(m.downtime),
            ms(gap),
            ms(gap) - ms(m.downtime),
            phases.join(", ")
        );
        csv += &format!(
            "{i},{:.2},{:.2},{:.2},{:.2},{g0:.2},{g1:.2},{:.2},{:.2},{:.2},{:.2},{:.2}\n",
            ms(m.downtime),
            ms(gap),
            ms(gap) - ms(m.downtime),
            ms(m.ready - m.asked),
            at("quiesced"),
            at("final"),
            at("apply"),
            at("start"),
            at("ready"),
        );
        gaps.push(ms(gap));
        downs.push(ms(m.downtime));
        extra.push(ms(gap) - ms(m.downtime));
    }
    let steady: Vec<f64> = done
        .windows(2)
        .map(|w| ms(w[1].answered - w[1].sent))
        .collect();
    println!(
        "\n{} moves, {} writes at {}/s of {} B ({}): gap p50 {:.1} / p99 {:.1} / max {:.1} ms; downtime p50 {:.1} / max {:.1} ms; gap − downtime p50 {:.1} / max {:.1} ms; a write's latency p50 {:.2} ms",
        moves.len(),
        done.len(),
        a.rate,
        a.item_bytes,
        if a.plaintext { "plaintext" } else { "TLS" },
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.99),
        percentile(&gaps, 1.0),
        percentile(&downs, 0.5),
        percentile(&downs, 1.0),
        percentile(&extra, 0.5),
        percentile(&extra, 1.0),
        percentile(&steady, 0.5),
    );
    let file = a.out.join("gapbench.csv");
    std::fs::write(&file, csv)?;
    eprintln!("wrote {}", file.display());
    drop((ea, eb));
    if a.keep {
        let _ = work.keep();
    }
    Ok(())
}
