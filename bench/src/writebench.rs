//! The handover under a steady writer: the List app writes 64 KiB blocks at
//! random places of a volume file at a steady rate (its `--churn`, part of
//! the app: frozen with it, going on wherever it moves) while the session
//! moves from edge A to edge B over a shaped link. A client calls the app
//! every 5 ms throughout; the client-seen gap is the longest time no call
//! completed around the move.
//!
//! Side by side, for each link, volume and write rate:
//! - edgeshift with auto-converge (the app's writes throttled when the live
//!   rounds stop shrinking);
//! - edgeshift without it (`[handover] auto_converge = false`);
//! - the original framework's method done its way: at move time rsync pass 1
//!   while the app writes, the app stopped (SIGTERM), pass 2, the app
//!   started on the target, the client calling whichever socket answers.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/writebench [--quick] [--big] [--moves 5] [--rate MB/s]... [--link 100Mbit] [--phases] [--out bench/out]
//! ```
//!
//! Each case moves the session `--moves` times, back and forth. Writes
//! `writebench.csv` (one line per move) and, per link, two plots of the
//! worst move's gap drawn with plotters (`writebench-gap-rate-LINK.svg`:
//! against the write rate at the largest volume;
//! `writebench-gap-volume-LINK.svg`: against the volume at the highest
//! rate) under `--out`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edged::config::RuntimeConfig;
use edged::forward::AppClient;
use edgeshift_tests::list;

mod link;
mod measure;
mod plot;
mod rsync;
use link::{LINKS, Link, human, relay, write_volume};
use measure::{Outcome, Summary, gap, ms, prober};
use plot::plot;

#[derive(Parser)]
struct Args {
    /// The 16 MB volume only.
    #[arg(long)]
    quick: bool,
    /// Add a 1 GB volume.
    #[arg(long)]
    big: bool,
    /// Only these app write rates, MB/s (default: 0, 1, 5 and 10).
    #[arg(long = "rate")]
    rates: Vec<f64>,
    /// Only the link whose name starts so (e.g. "100Mbit").
    #[arg(long)]
    link: Option<String>,
    /// Print the downtime at each phase of every move.
    #[arg(long)]
    phases: bool,
    /// Moves per case (back and forth).
    #[arg(long, default_value_t = 5)]
    moves: usize,
    /// Only draw the plots from this CSV (of an earlier run) into `--out`.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Where to write the CSV and the plots.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

const MB: u64 = 1 << 20;

/// Write rates of the app, bytes/s: idle, up to half the slower link,
/// and past it (10 MB/s is 80 % of 100 Mbit/s: auto-converge's case).
const RATES: [u64; 4] = [0, MB, 5 * MB, 10 * MB];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Converge,
    NoConverge,
    Thesis,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Converge => "edgeshift",
            Variant::NoConverge => "edgeshift, no auto-converge",
            Variant::Thesis => "original method (rsync)",
        }
    }

    /// Its name in the CSV.
    fn slug(self) -> &'static str {
        match self {
            Variant::Converge => "edgeshift",
            Variant::NoConverge => "edgeshift-no-converge",
            Variant::Thesis => "rsync",
        }
    }

    fn from_slug(s: &str) -> Option<Variant> {
        [Variant::Converge, Variant::NoConverge, Variant::Thesis]
            .into_iter()
            .find(|v| v.slug() == s)
    }
}

#[derive(Debug, Clone, Copy)]
struct Case {
    link: Link,
    size: u64,
    rate: u64,
}

fn churn_args(rate: u64) -> Vec<String> {
    if rate == 0 {
        Vec::new()
    } else {
        vec!["--churn".into(), rate.to_string()]
    }
}

/// What one move saw.
fn record(out: &mut Outcome, p: &edge_client::HandoverProgress, quiesced: &mut u64, fin: &mut u64) {
    use edge_client::HandoverPhase as P;
    out.bytes = p.bytes_received;
    out.downtime = Duration::from_micros(p.downtime_micros);
    out.throttle = out.throttle.max(p.throttle_bytes_per_sec);
    out.rounds = out.rounds.max(p.round);
    match p.phase() {
        P::Quiesced => *quiesced = p.bytes_received,
        P::Final => *fin = p.bytes_received,
        _ => {}
    }
}

/// `moves` moves back and forth between two edges, each reaching the
/// other (pre-copy, pulls) over the shaped link.
async fn edgeshift_case(
    work: &Path,
    c: &Case,
    v: Variant,
    moves: usize,
    phases: bool,
) -> anyhow::Result<Vec<Outcome>> {
    let base = work.join("base");
    std::fs::create_dir_all(&base)?;
    let tweak = |cfg: &mut edged::config::Config| {
        cfg.handover.auto_converge = v == Variant::Converge;
        for app in cfg.apps.values_mut() {
            app.runtime = RuntimeConfig::Process {
                command: edgeshift_tests::bin("list-app"),
                args: churn_args(c.rate),
            };
        }
    };
    let addrs = [
        edgeshift_tests::free_addr("127.0.0.1"),
        edgeshift_tests::free_addr("127.0.0.2"),
    ];
    // to[i]: edge i over the shaped link.
    let (to_a, _ta, _) = relay(addrs[0], c.link).await?;
    let (to_b, _tb, _) = relay(addrs[1], c.link).await?;
    let edges = [("a", "b", to_b), ("b", "a", to_a)].map(|(id, other, via)| {
        let i = usize::from(id == "b");
        edgeshift_tests::start_list_edge_with(
            work,
            id,
            &addrs[i].to_string(),
            &base,
            None,
            &format!(
                "{}[precopy]\ninterval = 1\n",
                edgeshift_tests::neighbour(other, via)
            ),
            tweak,
        )
    });
    let ca = edgeshift_tests::connect(&edges[0].url()).await?;
    let s = ca.open_session("list", "writebench").await?;
    let mnt = edges[0].data_dir.join("sessions").join(s.id()).join("mnt");
    let (f, size) = (mnt.join("blob"), c.size);
    tokio::task::spawn_blocking(move || write_volume(&f, size)).await??;
    // The app runs as nobody (the default `user`) and writes the file.
    std::os::unix::fs::chown(mnt.join("blob"), Some(65534), Some(65534))?;
    let staged = edges[1]
        .data_dir
        .join("staging")
        .join(s.id())
        .join("volume/blob");
    let deadline = Instant::now() + Duration::from_secs(900);
    while std::fs::metadata(&staged).map(|m| m.len()).unwrap_or(0) != c.size {
        anyhow::ensure!(Instant::now() < deadline, "pre-copy did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The app starts writing; pre-copy rounds go on meanwhile.
    std::fs::write(mnt.join("churn.go"), b"")?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = s.clone();
    let (done, task) = prober(
        move || {
            let s = probe.clone();
            async move { s.invoke(list::ITEMS, list::items_req(0)).await.is_ok() }
        },
        stop.clone(),
    );
    let mut outs = Vec::new();
    for m in 0..moves {
        // Pre-copy (back) catches up with the writer between moves.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (from, to) = (m % 2, (m + 1) % 2);
        // The client reaches the owner over the shaped link to ask.
        let via_owner = [&to_a, &to_b][from];
        let via = edgeshift_tests::connect(&format!("https://{via_owner}")).await?;
        let moving = edge_client::Session::attach(
            &via,
            s.id().into(),
            s.token().clone(),
            ["a", "b"][from].into(),
            vec![],
        );
        let target = edgeshift_tests::connect(&edges[to].url()).await?;
        let mut out = Outcome::default();
        let (mut quiesced, mut fin) = (0, 0);
        let t0 = Instant::now();
        moving
            .handover_to(&target, |p| {
                if phases {
                    eprintln!(
                        "move {m}: {:<9} round {} {:>9} B in, {:>9} B left, down {:.1} ms",
                        edge_proto::phase_name(p.phase()),
                        p.round,
                        p.bytes_received,
                        p.remaining_bytes,
                        p.downtime_micros as f64 / 1e3
                    );
                }
                record(&mut out, p, &mut quiesced, &mut fin)
            })
            .await
            .with_context(|| format!("move {m}\n{}", edges[from].log()))?;
        out.total = t0.elapsed();
        out.last = fin.saturating_sub(quiesced);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if phases {
            // The new edge's timings of this move (debug lines with `ms=`).
            for e in [&edges[from], &edges[to]] {
                for l in e.log().lines().filter(|l| {
                    l.contains("mounted")
                        || l.contains("promoted")
                        || l.contains("activated")
                        || l.contains("answered")
                        || l.contains("taken over")
                }) {
                    eprintln!("move {m}: {l}");
                }
            }
        }
        out.gap = gap(
            &done.lock().unwrap(),
            t0,
            t0 + out.total + Duration::from_secs(1),
        );
        outs.push(out);
    }
    stop.store(true, Ordering::Relaxed);
    task.await?;
    s.close().await?;
    Ok(outs)
}

/// The original method, `moves` times back and forth between two sites,
/// each with an rsync daemon reached over the shaped link.
async fn thesis_case(work: &Path, c: &Case, moves: usize) -> anyhow::Result<Vec<Outcome>> {
    let sites: Vec<(PathBuf, PathBuf)> = ["site-a", "site-b"]
        .iter()
        .map(|n| (work.join(n).join("data"), work.join(n).join("run")))
        .collect();
    let mut daemons = Vec::new();
    let mut relays = Vec::new();
    for (data, run) in &sites {
        std::fs::create_dir_all(data)?;
        std::fs::create_dir_all(run)?;
        let (d, addr) = rsync::daemon(work, data)?;
        daemons.push(d);
        relays.push(relay(addr, c.link).await?);
    }
    let (f, size) = (sites[0].0.join("blob"), c.size);
    tokio::task::spawn_blocking(move || write_volume(&f, size)).await??;
    let mut app = rsync::start_app(&sites[0].0, &sites[0].1, &churn_args(c.rate))?;
    let first = rsync::answering(&sites[0].1.join("app.sock")).await?;
    std::fs::write(sites[0].0.join("churn.go"), b"")?;
    // The client calls the app where it answers; a failed call makes it
    // look where the app is to be.
    let current = Arc::new(Mutex::new(first));
    let wanted = Arc::new(Mutex::new(sites[0].1.join("app.sock")));
    let stop = Arc::new(AtomicBool::new(false));
    let (cur, want) = (current.clone(), wanted.clone());
    let (done, task) = prober(
        move || {
            let (cur, want) = (cur.clone(), want.clone());
            async move {
                let c = cur.lock().unwrap().clone();
                if c.call(list::ITEMS, list::items_req(0)).await.is_ok() {
                    return true;
                }
                let path = want.lock().unwrap().clone();
                if let Ok(n) = AppClient::connect(&path, 1 << 20).await {
                    *cur.lock().unwrap() = n;
                }
                false
            }
        },
        stop.clone(),
    );
    let mut outs = Vec::new();
    for m in 0..moves {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (from, to) = (m % 2, (m + 1) % 2);
        let (src, r) = (sites[from].0.clone(), relays[to].0);
        let t0 = Instant::now();
        let s2 = src.clone();
        let pass1 = tokio::task::spawn_blocking(move || rsync::pass(&s2, r)).await??;
        let t_stop = Instant::now();
        // SAFETY: a pid this process spawned and has not reaped.
        unsafe { libc::kill(app.id() as i32, libc::SIGTERM) };
        let _ = app.wait();
        let s2 = src.clone();
        let pass2 = tokio::task::spawn_blocking(move || rsync::pass(&s2, r)).await??;
        let socket = sites[to].1.join("app.sock");
        let _ = std::fs::remove_file(&socket);
        *wanted.lock().unwrap() = socket.clone();
        app = rsync::start_app(&sites[to].0, &sites[to].1, &churn_args(c.rate))?;
        rsync::answering(&socket).await?;
        let total = t0.elapsed();
        let downtime = t_stop.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        outs.push(Outcome {
            gap: gap(
                &done.lock().unwrap(),
                t0,
                t0 + total + Duration::from_secs(1),
            ),
            downtime,
            total,
            bytes: pass1 + pass2,
            last: pass2,
            throttle: 0,
            rounds: 2,
        });
    }
    stop.store(true, Ordering::Relaxed);
    task.await?;
    let _ = app.kill();
    let _ = app.wait();
    for mut d in daemons {
        let _ = d.kill();
        let _ = d.wait();
    }
    Ok(outs)
}

/// Per link, the worst move's gap against the write rate (at the largest
/// volume) and against the volume (at the highest rate), from the CSV.
fn plots(csv: &str, out: &Path) -> anyhow::Result<()> {
    // (link, volume, rate, variant) -> worst gap, ms.
    let mut worst: std::collections::BTreeMap<(String, u64, u64, &str), f64> = Default::default();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        anyhow::ensure!(f.len() == 12, "not a writebench CSV line: {line:?}");
        let v = Variant::from_slug(f[3]).with_context(|| format!("variant {:?}", f[3]))?;
        let key = (f[0].to_string(), f[1].parse()?, f[2].parse()?, v.slug());
        let g: f64 = f[5].parse()?;
        let w = worst.entry(key).or_insert(0.0);
        *w = w.max(g);
    }
    let set = |k: fn(&(String, u64, u64, &str)) -> u64| {
        let mut v: Vec<u64> = worst.keys().map(k).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (sizes, rates) = (set(|k| k.1), set(|k| k.2));
    let mut links: Vec<String> = worst.keys().map(|k| k.0.clone()).collect();
    links.dedup();
    let variants = [Variant::Converge, Variant::NoConverge, Variant::Thesis];
    let (Some(&largest), Some(&top)) = (sizes.last(), rates.last()) else {
        anyhow::bail!("no moves in the CSV");
    };
    for link in &links {
        let pick = |v: Variant, size: u64, rate: u64| {
            worst
                .get(&(link.clone(), size, rate, v.slug()))
                .copied()
                .unwrap_or(0.0)
        };
        let slug = link.replace('/', "-");
        let xs: Vec<String> = rates.iter().map(|r| format!("{}/s", human(*r))).collect();
        let lines: Vec<(&str, Vec<f64>)> = variants
            .iter()
            .map(|v| {
                (
                    v.name(),
                    rates.iter().map(|r| pick(*v, largest, *r)).collect(),
                )
            })
            .collect();
        plot(
            &out.join(format!("writebench-gap-rate-{slug}.svg")),
            &format!("Gap vs write rate, {} volume, {link}", human(largest)),
            "app write rate",
            &xs,
            &lines,
        )?;
        let xs: Vec<String> = sizes.iter().map(|s| human(*s)).collect();
        let lines: Vec<(&str, Vec<f64>)> = variants
            .iter()
            .map(|v| (v.name(), sizes.iter().map(|s| pick(*v, *s, top)).collect()))
            .collect();
        plot(
            &out.join(format!("writebench-gap-volume-{slug}.svg")),
            &format!("Gap vs volume, app writing {}/s, {link}", human(top)),
            "volume",
            &xs,
            &lines,
        )?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(csv) = &args.plot {
        std::fs::create_dir_all(&args.out)?;
        return plots(&std::fs::read_to_string(csv)?, &args.out);
    }
    let mut sizes = vec![16 * MB];
    if !args.quick {
        sizes.push(256 * MB);
    }
    if args.big {
        sizes.push(1024 * MB);
    }
    let variants = [Variant::Converge, Variant::NoConverge, Variant::Thesis];
    std::fs::create_dir_all(&args.out)?;
    let mut csv = String::from(
        "link,volume_bytes,write_bytes_per_sec,variant,move,gap_ms,downtime_ms,total_ms,bytes,last_round_bytes,max_throttle_bytes_per_sec,rounds\n",
    );
    println!(
        "| link | volume | app writes | variant | gap p50 / max | downtime p50 / max | total p50 | bytes p50 | last round max | throttle max |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let rates: Vec<u64> = if args.rates.is_empty() {
        RATES.to_vec()
    } else {
        args.rates.iter().map(|r| (r * MB as f64) as u64).collect()
    };
    let links: Vec<Link> = LINKS
        .into_iter()
        .filter(|l| {
            args.link
                .as_ref()
                .is_none_or(|n| l.name.starts_with(n.as_str()))
        })
        .collect();
    for &link in &links {
        for &size in &sizes {
            for &rate in &rates {
                for v in variants {
                    let c = Case { link, size, rate };
                    let dir = tempfile::Builder::new()
                        .prefix("writebench")
                        .tempdir_in("/var/tmp")?;
                    let outs = match v {
                        Variant::Thesis => thesis_case(dir.path(), &c, args.moves).await,
                        _ => edgeshift_case(dir.path(), &c, v, args.moves, args.phases).await,
                    }
                    .with_context(|| {
                        format!(
                            "{} {} {}/s {}",
                            link.name,
                            human(size),
                            human(rate),
                            v.name()
                        )
                    })?;
                    for (m, o) in outs.iter().enumerate() {
                        writeln!(
                            csv,
                            "{},{size},{rate},{},{m},{:.1},{:.1},{:.1},{},{},{},{}",
                            link.name,
                            v.slug(),
                            ms(o.gap),
                            ms(o.downtime),
                            ms(o.total),
                            o.bytes,
                            o.last,
                            o.throttle,
                            o.rounds
                        )?;
                    }
                    let o = Summary::of(&outs);
                    println!(
                        "| {} | {} | {}/s | {} | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} ms | {} | {} | {} |",
                        link.name,
                        human(size),
                        human(rate),
                        v.name(),
                        o.gap_p50,
                        o.gap_max,
                        o.down_p50,
                        o.down_max,
                        o.total_p50,
                        human(o.bytes_p50),
                        human(o.last_max),
                        if o.throttle == 0 {
                            "-".into()
                        } else {
                            format!("{}/s", human(o.throttle))
                        }
                    );
                }
            }
        }
    }
    std::fs::write(args.out.join("writebench.csv"), &csv)?;
    plots(&csv, &args.out)?;
    println!("\nCSV and plots in {}", args.out.display());
    Ok(())
}
