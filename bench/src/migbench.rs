//! Migration deltas, fio-style: a volume of a given size is written through
//! volfs on edge A while pre-copy sends it to edge B; then some bytes are
//! dirtied and the session is handed over to B. In the same run, the same
//! volume and the same dirty bytes move the way the original framework
//! moved them, at move time: rsync to the empty target while the app runs,
//! rsync again after it stopped, the app started on the target. Both cross
//! the same shaped link (a relay with a rate and a one-way delay in each
//! direction).
//!
//! ```text
//! cargo build --release --workspace
//! target/release/migbench [--quick] [--out bench/out]
//! ```
//!
//! Reported per case: bytes sent at the move, downtime (A's quiesce → B
//! serving; rsync's second pass → the app answering), total time (the move
//! asked → serving on the target), the extra latency of a call running at
//! the move.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod link;
mod rsync;
use clap::Parser;
use link::{LINKS, Link, fill, human, relay, write_volume};

#[derive(Parser)]
struct Args {
    /// Smaller cases only (no 1 GB volume).
    #[arg(long)]
    quick: bool,
    /// Run only the cases whose volume size reads like this (e.g. "1 GB").
    #[arg(long)]
    only: Option<String>,
    /// Keep the working directories (edged logs) of each case.
    #[arg(long)]
    keep: bool,
    /// Where to write the CSV and the SVG.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
    /// Moves with no pre-copy instead: the whole volume goes in the
    /// handover's live rounds, edgeshift only (30 MB and 1 GB, `--repeat`
    /// times each; `--only` picks one).
    #[arg(long)]
    cold: bool,
    /// Moves of each volume with `--cold`.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
}

/// Dirties `bytes` of `file` in 64 KiB blocks spread over it.
fn dirty(file: &Path, size: u64, bytes: u64, seed: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file)?;
    let block = 65536u64;
    let blocks = bytes.div_ceil(block);
    let total_blocks = size.div_ceil(block).max(1);
    let mut buf = vec![0u8; block as usize];
    for k in 0..blocks {
        let b = (k * 7919 + seed) % total_blocks;
        let len = block.min(size - b * block).min(bytes - k * block) as usize;
        fill(&mut buf[..len], seed * 1000 + k + 99);
        f.write_all_at(&buf[..len], b * block)?;
    }
    f.sync_all()?;
    Ok(())
}

fn dir_file_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

struct Case {
    size: u64,
    dirty: u64,
    link: Link,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    bytes: u64,
    /// Bytes of blocks dirtied since the last pre-copy round.
    dirty_since_round: u64,
    downtime: Duration,
    total: Duration,
    extra_latency: Duration,
}

/// A client of the edge at `url` (`https://` trusting the bench fleet's CA,
/// or `http://`).
async fn client(url: &str) -> anyhow::Result<edge_client::EdgeClient> {
    Ok(if url.starts_with("http://") {
        edge_client::connect(url).await?
    } else {
        edgeshift_tests::connect(url).await?
    })
}

/// Waits until B staged all of session `id`'s volume (and one more round
/// found nothing new), then cuts the pre-copy link: exactly the bytes
/// dirtied after are "dirty since the last round".
async fn catch_up(
    b: &edgeshift_tests::Edge,
    id: &str,
    size: u64,
    precopy_link: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let staged = b.data_dir.join("staging").join(id).join("volume/blob");
    let deadline = Instant::now() + Duration::from_secs(600);
    while dir_file_bytes(&staged) != size {
        anyhow::ensure!(Instant::now() < deadline, "pre-copy did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    precopy_link.store(true, Ordering::SeqCst);
    // A round already past its refresh fails on the cut link; let it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// The bytes volfs counts as dirty in the live volume at `backing`.
async fn dirty_bytes(backing: &Path) -> anyhow::Result<u64> {
    let Some(mut c) = volfs::service::connect(backing).await? else {
        bail!("no volfs answers for A's volume");
    };
    let st = c
        .status(edge_proto::v1::StatusRequest { no_flush: false })
        .await?
        .into_inner();
    Ok(st.bytes)
}

/// One move with edgeshift; `plain`: both edges in `insecure_plaintext`
/// (what TLS costs, side by side).
async fn edgeshift_case(work: &Path, c: &Case, plain: bool, cold: bool) -> anyhow::Result<Outcome> {
    let base = work.join("base");
    std::fs::create_dir_all(&base)?;
    let mode = if plain {
        "insecure_plaintext = true\n"
    } else {
        ""
    };
    let precopy = if cold {
        "enabled = false\n"
    } else {
        "interval = 2\ndirty_threshold = 1099511627776\n"
    };
    // Neighbours are mutual: B takes pre-copies from A because it lists A.
    let a_addr = edgeshift_tests::free_addr("127.0.0.1");
    let b = edgeshift_tests::start_list_edge_in(
        work,
        "b",
        "127.0.0.2",
        &base,
        None,
        &format!("{mode}{}", edgeshift_tests::neighbour("a", a_addr)),
    );
    let (ab, ab_task, precopy_link) = relay(b.addr, c.link).await?;
    // Pre-copy rounds every 2 s; the dirty bytes below land right before the move.
    let extra = format!("{mode}[[neighbours]]\nid = \"b\"\naddr = \"{ab}\"\n[precopy]\n{precopy}");
    let a =
        edgeshift_tests::start_list_edge_in(work, "a", &a_addr.to_string(), &base, None, &extra);
    let (ba, ba_task, _) = relay(a.addr, c.link).await?;
    let ca = client(&a.url()).await?;
    let cb = client(&b.url()).await?;
    let s = ca.open_session("list", "bench").await?;
    let blob = a.data_dir.join("sessions").join(s.id()).join("mnt/blob");
    let f = blob.clone();
    let size = c.size;
    tokio::task::spawn_blocking(move || write_volume(&f, size)).await??;
    if !cold {
        catch_up(&b, s.id(), c.size, &precopy_link).await?;
    }
    // Dirty, then move, with a call running.
    let (f, size, d) = (blob.clone(), c.size, c.dirty);
    tokio::task::spawn_blocking(move || dirty(&f, size, d, 3)).await??;
    // What volfs counts as dirty since the last pre-copy round (its refresh).
    let backing = a.data_dir.join("sessions").join(s.id()).join("volume");
    let since_round = dirty_bytes(&backing).await?;
    let scheme = if plain { "http" } else { "https" };
    let via = client(&format!("{scheme}://{ba}")).await?;
    let moving =
        edge_client::Session::attach(&via, s.id().into(), s.token().clone(), "a".into(), vec![]);
    let items = prost::Message::encode_to_vec(&edgeshift_examples::pb::list::ItemsRequest {
        delay_ms_per_item: 0,
    });
    let op = moving.next_op_id();
    let t = Instant::now();
    let call = {
        let m = moving.clone();
        let items = items.clone();
        tokio::spawn(async move { m.invoke_op(op, "/list.v1.List/Items", items.into()).await })
    };
    let mut out = Outcome {
        dirty_since_round: since_round,
        ..Outcome::default()
    };
    moving
        .handover_to(&cb, |p| {
            out.bytes = p.bytes_received;
            out.downtime = Duration::from_micros(p.downtime_micros);
        })
        .await?;
    out.total = t.elapsed();
    let _ = call.await;
    moving.result(op).await?;
    out.extra_latency = t.elapsed();
    moving.close().await?;
    drop((ab_task, ba_task));
    drop(a);
    drop(b);
    Ok(out)
}

async fn rsync_case(work: &Path, c: &Case) -> anyhow::Result<Outcome> {
    let src = work.join("rsync-src");
    let dst = work.join("rsync-dst");
    let sock = work.join("rsync-run");
    for d in [&src, &dst, &sock] {
        std::fs::create_dir_all(d)?;
    }
    let (mut daemon, addr) = rsync::daemon(work, &dst)?;
    let (r, task, _) = relay(addr, c.link).await?;
    let size = c.size;
    let f = src.join("blob");
    tokio::task::spawn_blocking(move || write_volume(&f, size)).await??;
    // The same writes as the edgeshift case, before the move.
    let (f, d) = (src.join("blob"), c.dirty);
    tokio::task::spawn_blocking(move || dirty(&f, size, d, 3)).await??;
    // The move, the thesis's way: pass 1 at move time while the app runs
    // (not downtime; the target holds nothing yet), the app stops, pass 2
    // (what changed during pass 1: nothing, the app is idle here), the app
    // starts on the target.
    let t_move = Instant::now();
    let s2 = src.clone();
    let pass1 = tokio::task::spawn_blocking(move || rsync::pass(&s2, r)).await??;
    // The app stops: downtime runs from here to the app serving on the target.
    let t = Instant::now();
    let s2 = src.clone();
    let bytes = pass1 + tokio::task::spawn_blocking(move || rsync::pass(&s2, r)).await??;
    let mut app = rsync::start_app(&dst, &sock, &[])?;
    rsync::answering(&sock.join("app.sock")).await?;
    let downtime = t.elapsed();
    let total = t_move.elapsed();
    let _ = app.kill();
    let _ = app.wait();
    let _ = daemon.kill();
    let _ = daemon.wait();
    drop(task);
    for d in [&src, &dst, &sock] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(Outcome {
        bytes,
        dirty_since_round: 0,
        downtime,
        total,
        extra_latency: Duration::ZERO,
    })
}

fn svg(points: &[(u64, f64, f64)], title: &str) -> String {
    // x: volume size (log), y: downtime ms (log).
    let (w, h, l, b) = (640.0, 400.0, 70.0, 50.0);
    let xs: Vec<f64> = points.iter().map(|p| (p.0 as f64).log10()).collect();
    let ys: Vec<f64> = points
        .iter()
        .flat_map(|p| [p.1.max(0.1).log10(), p.2.max(0.1).log10()])
        .collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min) - 0.3,
        xs.iter().cloned().fold(f64::MIN, f64::max) + 0.3,
    );
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::MAX, f64::min).floor(),
        ys.iter().cloned().fold(f64::MIN, f64::max).ceil(),
    );
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - 20.0);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0).max(1e-9) * (h - b - 30.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        w / 2.0
    );
    s += &format!(
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{l}\" y1=\"30\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - b,
        w - 20.0,
        h - b,
        h - b
    );
    let mut y = y0;
    while y <= y1 + 1e-9 {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} ms</text>\n<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#ddd\"/>\n",
            l - 5.0,
            py(y) + 4.0,
            10f64.powf(y),
            py(y),
            w - 20.0,
            py(y)
        );
        y += 1.0;
    }
    for (i, p) in points.iter().enumerate() {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            px(xs[i]),
            h - b + 18.0,
            human(p.0)
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">volume size</text>\n",
        w / 2.0,
        h - 10.0
    );
    for (k, (color, name)) in [
        ("#1f77b4", "edgeshift (pre-copy + final delta)"),
        ("#d62728", "rsync, two passes + app start"),
    ]
    .iter()
    .enumerate()
    {
        let pts: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "{:.1},{:.1}",
                    px(xs[i]),
                    py(if k == 0 { p.1 } else { p.2 }.max(0.1).log10())
                )
            })
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for pt in &pts {
            let (x, y) = pt.split_once(',').unwrap();
            s += &format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>\n");
        }
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            l + 10.0,
            40.0 + 16.0 * k as f64,
            l + 28.0,
            45.0 + 16.0 * k as f64
        );
    }
    s + "</svg>\n"
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    anyhow::ensure!(uid == 0, "migbench mounts FUSE volumes: run it as root");
    const KB: u64 = 1 << 10;
    const MB: u64 = 1 << 20;
    let mut cases = Vec::new();
    if a.cold {
        return cold(&a).await;
    }
    for link in LINKS {
        for (size, dirties) in [
            (10 * KB, vec![0, 10 * KB]),
            (MB, vec![0, MB]),
            (30 * MB, vec![0, MB, 10 * MB]),
        ] {
            for d in dirties {
                cases.push(Case {
                    size,
                    dirty: d,
                    link,
                });
            }
        }
    }
    if !a.quick {
        for d in [MB, 10 * MB] {
            cases.push(Case {
                size: 1 << 30,
                dirty: d,
                link: LINKS[1],
            });
        }
    }
    let mut table = String::from(
        "| link | volume | dirty written | dirty since last round | edgeshift bytes | bytes / dirty since round | edgeshift downtime | edgeshift total | call's extra latency | plaintext bytes | plaintext downtime | rsync bytes (both passes) | rsync downtime | rsync total | rsync / edgeshift downtime |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut csv = String::from(
        "link,volume_bytes,dirty_bytes,dirty_since_round,edgeshift_bytes,edgeshift_downtime_ms,edgeshift_total_ms,call_extra_ms,plaintext_bytes,plaintext_downtime_ms,rsync_bytes,rsync_downtime_ms,rsync_total_ms\n",
    );
    let mut plot: Vec<(u64, f64, f64)> = Vec::new();
    for c in cases
        .iter()
        .filter(|c| a.only.as_ref().is_none_or(|o| *o == human(c.size)))
    {
        let work = tempfile::Builder::new()
            .prefix("migbench")
            .tempdir_in("/var/tmp")?;
        if a.keep {
            eprintln!("case directory: {}", work.path().display());
        }
        let e = edgeshift_case(work.path(), c, false, false)
            .await
            .with_context(|| format!("edgeshift {} {}", human(c.size), c.link.name))?;
        let plain_work = tempfile::Builder::new()
            .prefix("migbench")
            .tempdir_in("/var/tmp")?;
        let p = edgeshift_case(plain_work.path(), c, true, false)
            .await
            .with_context(|| format!("edgeshift plaintext {} {}", human(c.size), c.link.name))?;
        let r = rsync_case(work.path(), c)
            .await
            .with_context(|| format!("rsync {} {}", human(c.size), c.link.name))?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ratio = if e.dirty_since_round > 0 {
            format!("{:.2}", e.bytes as f64 / e.dirty_since_round as f64)
        } else {
            "-".into()
        };
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {:.0} ms | {} | {:.0} ms | {:.0} ms | {:.1}x |",
            c.link.name,
            human(c.size),
            human(c.dirty),
            e.dirty_since_round,
            e.bytes,
            ratio,
            ms(e.downtime),
            ms(e.total),
            ms(e.extra_latency),
            p.bytes,
            ms(p.downtime),
            r.bytes,
            ms(r.downtime),
            ms(r.total),
            ms(r.downtime) / ms(e.downtime).max(0.001)
        );
        eprintln!("{line}");
        writeln!(table, "{line}")?;
        writeln!(
            csv,
            "{},{},{},{},{},{:.1},{:.1},{:.1},{},{:.1},{},{:.1},{:.1}",
            c.link.name,
            c.size,
            c.dirty,
            e.dirty_since_round,
            e.bytes,
            ms(e.downtime),
            ms(e.total),
            ms(e.extra_latency),
            p.bytes,
            ms(p.downtime),
            r.bytes,
            ms(r.downtime),
            ms(r.total)
        )?;
        if a.keep {
            // Leave the logs for a look.
            std::mem::forget(work);
        }
        if c.link.name == LINKS[1].name && c.dirty == MB.min(c.size) {
            plot.push((c.size, ms(e.downtime), ms(r.downtime)));
        }
    }
    print!("{table}");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("migbench.csv"), csv)?;
    plot.sort_by_key(|p| p.0);
    std::fs::write(
        a.out.join("migbench.svg"),
        svg(
            &plot,
            "Downtime vs volume size (1 MB dirty, 1 Gbit/s, 1 ms)",
        ),
    )?;
    eprintln!("CSV and SVG in {}", a.out.display());
    Ok(())
}

/// Moves with no pre-copy (`--cold`): the whole volume in the handover's
/// live rounds.
async fn cold(a: &Args) -> anyhow::Result<()> {
    const MB: u64 = 1 << 20;
    let mut table =
        String::from("| volume | edgeshift bytes | downtime | total |\n|---:|---:|---:|---:|\n");
    let mut csv = String::from("volume_bytes,edgeshift_bytes,downtime_ms,total_ms\n");
    let sizes = [30 * MB, 1 << 30];
    let chosen = sizes
        .into_iter()
        .filter(|s| a.only.as_deref().is_none_or(|o| human(*s) == o));
    for size in chosen {
        for _ in 0..a.repeat {
            let c = Case {
                size,
                dirty: 0,
                link: LINKS[1],
            };
            let work = tempfile::Builder::new()
                .prefix("migbench")
                .tempdir_in("/var/tmp")?;
            let e = edgeshift_case(work.path(), &c, false, true)
                .await
                .with_context(|| format!("edgeshift cold {}", human(size)))?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let line = format!(
                "| {} | {} | {:.0} ms | {:.0} ms |",
                human(size),
                e.bytes,
                ms(e.downtime),
                ms(e.total)
            );
            eprintln!("{line}");
            writeln!(table, "{line}")?;
            writeln!(
                csv,
                "{size},{},{:.1},{:.1}",
                e.bytes,
                ms(e.downtime),
                ms(e.total)
            )?;
        }
    }
    print!("{table}");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("migbench-cold.csv"), csv)?;
    Ok(())
}
