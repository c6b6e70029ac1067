//! FUSE throughput, side by side in one run: real `fio` against a plain
//! directory, bindfs over a directory, and volfs; plus the blake3 hashing
//! throughput of volfs's manifest update; plus metadata-heavy work on a
//! source-like tree (11,000 files, 150 MB, from a tar made once): extract
//! and sync, a cold walk reading every file, `rm -rf`.
//!
//! ```text
//! cargo run --release -p edgeshift-bench --bin fsbench -- [--size-mib 512] [--metadata-only] [--out bench/out]
//! ```
//!
//! Reads run after `drop_caches` (cold: the bytes come through the
//! filesystem under test from the disk), writes end with an fsync.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// File size per fio job, MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Seconds per random job (time-based).
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Rounds over all targets; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to write the CSV.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
    /// Only the metadata workload (no fio jobs, no hashing).
    #[arg(long)]
    metadata_only: bool,
    /// Scratch directory (on the disk under test).
    #[arg(long, default_value = "/var/tmp")]
    scratch: PathBuf,
}

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    write: bool,
    timed: bool,
}

const JOBS: [Job; 4] = [
    Job {
        name: "seq write 1M",
        rw: "write",
        bs: "1m",
        write: true,
        timed: false,
    },
    Job {
        name: "rand write 4K",
        rw: "randwrite",
        bs: "4k",
        write: true,
        timed: true,
    },
    Job {
        name: "seq read 1M",
        rw: "read",
        bs: "1m",
        write: false,
        timed: false,
    },
    Job {
        name: "rand read 4K",
        rw: "randread",
        bs: "4k",
        write: false,
        timed: true,
    },
];

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Runs one fio job in `dir`; returns MiB/s.
fn fio(dir: &Path, job: &Job, a: &Args) -> anyhow::Result<f64> {
    if !job.write {
        drop_caches();
    }
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir).args([
        "--name=bench",
        "--filename=bench.dat",
        &format!("--rw={}", job.rw),
        &format!("--bs={}", job.bs),
        &format!("--size={}m", a.size_mib),
        "--ioengine=psync",
        "--output-format=json",
    ]);
    if job.write {
        cmd.arg("--end_fsync=1");
    }
    if job.timed {
        cmd.args([&format!("--runtime={}", a.runtime), "--time_based"]);
    }
    let out = cmd.output().context("fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio {}: {}", job.name, String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let key = if job.write {
        "\"write\" : {"
    } else {
        "\"read\" : {"
    };
    let at = text.find(key).context("fio json has no section")?;
    let bw = text[at..].find("\"bw_bytes\"").context("no bw_bytes")? + at;
    let num: String = text[bw + 11..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Ok(num.parse::<f64>()? / (1 << 20) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn umount(p: &Path) {
    let _ = Command::new("umount").arg(p).status();
}

/// Files of the source-like tree.
const TREE_FILES: usize = 11_000;
/// Its total size.
const TREE_BYTES: u64 = 150 << 20;

/// A tar of a tree like a source checkout: directories of 40 files, sizes
/// spread from a few hundred bytes to a few hundred kB (most small).
fn make_tree_tar(scratch: &Path) -> anyhow::Result<PathBuf> {
    let src = scratch.join("tree-src");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Sizes ~ exponential, scaled to the total.
    let raw: Vec<f64> = (0..TREE_FILES)
        .map(|_| -((next() % 1_000_000) as f64 / 1e6 + 1e-6).ln())
        .collect();
    let scale = TREE_BYTES as f64 / raw.iter().sum::<f64>();
    for (i, r) in raw.iter().enumerate() {
        let dir = src.join(format!("d{:03}/s{:02}", i / 400, (i / 40) % 10));
        fs::create_dir_all(&dir)?;
        let n = (r * scale) as usize;
        const TEXT: &[u8] = b"fn main() { let x = 1; }\n// text\n";
        let body: Vec<u8> = (0..n).map(|k| TEXT[(k * 7 + i) % TEXT.len()]).collect();
        fs::write(dir.join(format!("f{i}.c")), body)?;
    }
    let tar = scratch.join("tree.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .context("tar")?;
    if !st.success() {
        bail!("tar -c failed");
    }
    fs::remove_dir_all(&src)?;
    Ok(tar)
}

/// Seconds to extract `tar` into `dir/tree` and sync it; to walk and read it
/// all cold; to remove it.
fn metadata_work(dir: &Path, tar: &Path) -> anyhow::Result<[f64; 3]> {
    let tree = dir.join("tree");
    fs::create_dir(&tree)?;
    let t = Instant::now();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(&tree)
        .status()?;
    if !st.success() {
        bail!("tar -x failed in {}", dir.display());
    }
    let st = Command::new("sync").arg("-f").arg(&tree).status()?;
    if !st.success() {
        bail!("sync -f failed");
    }
    let extract = t.elapsed().as_secs_f64();
    drop_caches();
    let t = Instant::now();
    let (mut files, mut bytes) = (0usize, 0u64);
    let mut stack = vec![tree.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                bytes += fs::read(e.path())?.len() as u64;
                files += 1;
            }
        }
    }
    let walk = t.elapsed().as_secs_f64();
    anyhow::ensure!(files == TREE_FILES, "walked {files} files of {TREE_FILES}");
    anyhow::ensure!(bytes > TREE_BYTES / 2, "read only {bytes} bytes");
    let t = Instant::now();
    let st = Command::new("rm").arg("-rf").arg(&tree).status()?;
    if !st.success() {
        bail!("rm -rf failed");
    }
    let st = Command::new("sync").arg("-f").arg(dir).status()?;
    if !st.success() {
        bail!("sync -f failed");
    }
    Ok([extract, walk, t.elapsed().as_secs_f64()])
}

/// The three filesystems under test, each mounted for one round at a time.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Native,
    Bindfs,
    Volfs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("fsbench mounts FUSE filesystems and drops caches: run it as root");
    }
    let tmp = tempfile::Builder::new()
        .prefix("fsbench")
        .tempdir_in(&a.scratch)?;
    let mk = |n: &str| -> anyhow::Result<PathBuf> {
        let p = tmp.path().join(n);
        fs::create_dir(&p)?;
        Ok(p)
    };
    let (native, bind_src, bind_mnt, vol_src, vol_mnt) = (
        mk("native")?,
        mk("bind-src")?,
        mk("bind-mnt")?,
        mk("vol-src")?,
        mk("vol-mnt")?,
    );

    // Rounds interleave the targets so that drift of the disk (a VM's
    // host cache) hits all three alike; each number is a median.
    let mut results = vec![vec![Vec::new(); JOBS.len()]; 3];
    let tar = make_tree_tar(tmp.path())?;
    let mut meta: Vec<Vec<[f64; 3]>> = vec![Vec::new(); 3];
    for round in 0..a.rounds {
        for (t, target) in [Target::Native, Target::Bindfs, Target::Volfs]
            .into_iter()
            .enumerate()
        {
            let (dir, handle) = match target {
                Target::Native => (native.clone(), None),
                Target::Bindfs => {
                    let st = Command::new("bindfs")
                        .args([&bind_src, &bind_mnt])
                        .status()
                        .context("bindfs (apt-get install bindfs)")?;
                    if !st.success() {
                        bail!("bindfs failed to mount");
                    }
                    (bind_mnt.clone(), None)
                }
                Target::Volfs => (
                    vol_mnt.clone(),
                    Some(volfs::mount(
                        &vol_src,
                        &vol_mnt,
                        &volfs::MountOptions::default(),
                    )?),
                ),
            };
            let m = metadata_work(&dir, &tar);
            if target == Target::Bindfs && m.is_err() {
                umount(&bind_mnt);
            }
            let m = m?;
            eprintln!(
                "round {round} {:<7} extract+sync {:.2} s, cold walk+read {:.2} s, rm -rf {:.2} s",
                ["native", "bindfs", "volfs"][t],
                m[0],
                m[1],
                m[2]
            );
            meta[t].push(m);
            let jobs = if a.metadata_only {
                &JOBS[..0]
            } else {
                &JOBS[..]
            };
            for (j, job) in jobs.iter().enumerate() {
                let r = fio(&dir, job, &a);
                if target == Target::Bindfs && r.is_err() {
                    umount(&bind_mnt);
                }
                let r = r?;
                eprintln!(
                    "round {round} {:<7} {:<14} {r:>9.1} MiB/s",
                    ["native", "bindfs", "volfs"][t],
                    job.name
                );
                results[t][j].push(r);
            }
            let _ = fs::remove_file(dir.join("bench.dat"));
            match target {
                Target::Bindfs => umount(&bind_mnt),
                Target::Volfs => drop(handle),
                Target::Native => {}
            }
        }
    }
    let mut mtable = String::from(
        "| work (11,000 files, 150 MB) | native s | bindfs s | volfs s | volfs / native |\n|---|---:|---:|---:|---:|\n",
    );
    let mut mcsv = String::from("work,native_s,bindfs_s,volfs_s,volfs_vs_native\n");
    for (k, name) in [
        "extract (tar) + sync",
        "cold walk, read every file",
        "rm -rf + sync",
    ]
    .iter()
    .enumerate()
    {
        let m: Vec<f64> = (0..3)
            .map(|t| median(meta[t].iter().map(|r| r[k]).collect()))
            .collect();
        writeln!(
            mtable,
            "| {name} | {:.2} | {:.2} | {:.2} | {:.1}x |",
            m[0],
            m[1],
            m[2],
            m[2] / m[0]
        )?;
        writeln!(
            mcsv,
            "{name},{:.3},{:.3},{:.3},{:.3}",
            m[0],
            m[1],
            m[2],
            m[2] / m[0]
        )?;
    }
    fs::create_dir_all(&a.out)?;
    fs::write(a.out.join("fsbench-metadata.csv"), &mcsv)?;
    if a.metadata_only {
        print!("{mtable}");
        return Ok(());
    }
    let med: Vec<Vec<f64>> = results
        .into_iter()
        .map(|t| t.into_iter().map(median).collect())
        .collect();
    let (n, b, v) = (&med[0], &med[1], &med[2]);
    let handle = volfs::mount(&vol_src, &vol_mnt, &volfs::MountOptions::default())?;

    // Hashing throughput of the manifest update: dirty N MiB, time the refresh.
    handle.live().refresh()?;
    let f = vol_mnt.join("hash.dat");
    let data: Vec<u8> = (0..(a.size_mib << 20))
        .map(|i| ((i * 2_654_435_761) >> 17) as u8)
        .collect();
    fs::write(&f, &data)?;
    handle.live().flush()?;
    let t = Instant::now();
    let (_, stats) = handle.live().refresh()?;
    let wall = t.elapsed();
    let mib = stats.hashed_bytes as f64 / (1 << 20) as f64;
    let hash_rate = mib / stats.hash_time.as_secs_f64();
    let refresh_rate = mib / wall.as_secs_f64();
    drop(handle);

    let mut table = String::new();
    let mut csv =
        String::from("job,native_mib_s,bindfs_mib_s,volfs_mib_s,volfs_vs_native,volfs_vs_bindfs\n");
    writeln!(
        table,
        "| job | native MiB/s | bindfs MiB/s | volfs MiB/s | volfs / native | volfs / bindfs |"
    )?;
    writeln!(table, "|---|---:|---:|---:|---:|---:|")?;
    for (i, j) in JOBS.iter().enumerate() {
        writeln!(
            table,
            "| {} | {:.1} | {:.1} | {:.1} | {:.0} % | {:.2}x |",
            j.name,
            n[i],
            b[i],
            v[i],
            100.0 * v[i] / n[i],
            v[i] / b[i]
        )?;
        writeln!(
            csv,
            "{},{:.1},{:.1},{:.1},{:.3},{:.3}",
            j.name,
            n[i],
            b[i],
            v[i],
            v[i] / n[i],
            v[i] / b[i]
        )?;
    }
    writeln!(
        table,
        "\nmanifest update: {mib:.0} MiB dirty rehashed at {hash_rate:.0} MiB/s (blake3, one core); whole refresh {refresh_rate:.0} MiB/s incl. reads"
    )?;
    writeln!(
        csv,
        "blake3 manifest hash MiB/s per core,,,{hash_rate:.1},,"
    )?;
    print!("{table}\n{mtable}");
    fs::write(a.out.join("fsbench.csv"), csv)?;
    eprintln!("CSV written to {}", a.out.join("fsbench.csv").display());
    Ok(())
}
