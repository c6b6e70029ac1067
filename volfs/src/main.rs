//! `volfs`: mount a volume, inspect it, and move it as deltas.

use std::fs;
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use edge_proto::v1 as pb;
use edge_proto::v1::volume_client::VolumeClient;
use prost::Message;
use std::io::Write;
use tonic::transport::Channel;
use volfs::backing::Backing;
use volfs::{hex, offline, service};

#[derive(Parser)]
#[command(
    name = "volfs",
    version,
    about = "A FUSE volume that knows its dirty blocks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING at MOUNTPOINT in the foreground; SIGINT/SIGTERM unmount cleanly.
    Mount {
        /// Directory holding the volume's files.
        backing: PathBuf,
        /// Empty directory to mount on.
        mountpoint: PathBuf,
        /// Block size of dirty tracking (e.g. 4K, 64K, 1M); default: the volume's, or 64K.
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u32>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Only the mounting user may access the mount (no allow_other).
        #[arg(long)]
        private: bool,
        /// Percent of the machine's dirty-page budget the mount's writeback
        /// cache may hold (the kernel's default for FUSE is 1).
        #[arg(long, default_value_t = 20)]
        writeback_share: u32,
        /// Most bytes the volume's files may sum to; writes past it get ENOSPC.
        #[arg(long)]
        quota: Option<u64>,
    },
    /// Dirty files, blocks and bytes of a mounted volume.
    Status {
        /// The volume's backing directory.
        backing: PathBuf,
    },
    /// Slow the app's writes to RATE bytes/s (0 ends it) for a while, as a
    /// handover's auto-converge does.
    Throttle {
        /// The volume's backing directory.
        backing: PathBuf,
        /// Bytes per second; 0 lifts the throttle.
        rate: u64,
        /// Seconds until the throttle lifts by itself.
        #[arg(long, default_value_t = 10)]
        ttl: u64,
    },
    /// The root hash (rehashing only what changed).
    Hash {
        /// The volume's backing directory.
        backing: PathBuf,
    },
    /// Write the current manifest to a file (a base for a later `diff`).
    Manifest {
        /// The volume's backing directory.
        backing: PathBuf,
        /// Output file.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Write the delta from a base manifest (default: an empty volume) to a file.
    Diff {
        /// The volume's backing directory.
        backing: PathBuf,
        /// Output file.
        #[arg(short, long)]
        out: PathBuf,
        /// Manifest file the receiver holds (from `volfs manifest` on its side).
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Apply a delta file to an (unmounted) volume; all or nothing.
    Apply {
        /// Target backing directory (may be new and empty).
        target: PathBuf,
        /// Delta file from `volfs diff`.
        delta: PathBuf,
    },
    /// Rehash every block and compare with the recorded manifest.
    Verify {
        /// The volume's backing directory.
        backing: PathBuf,
    },
}

fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mul) = match s.to_ascii_uppercase().chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let v = n * mul;
    if !(512..=16 << 20).contains(&v) {
        return Err(format!("block size {v} is outside 512 B ..= 16 MiB"));
    }
    Ok(v as u32)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "volfs=info".into()),
        )
        .with_writer(io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` against the live mount of `backing` if one owns the volume:
/// `Ok(None)` when it is not mounted.
fn live<T>(
    backing: &Path,
    f: impl AsyncFnOnce(VolumeClient<Channel>) -> Result<T, tonic::Status>,
) -> anyhow::Result<Option<T>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match service::connect(backing).await.context("volume socket")? {
            Some(c) => Ok(Some(
                f(c).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?,
            )),
            None if Backing::is_locked(backing) => {
                bail!(
                    "volume {} is locked by a process that does not answer",
                    backing.display()
                )
            }
            None => Ok(None),
        }
    })
}

/// `key=value` form of a delta's summary.
fn summary(d: &pb::DiffDone) -> String {
    format!(
        "entries={} removed={} blocks={} block_bytes={} wire_bytes={} raced_blocks={} root={}",
        d.entries,
        d.removed,
        d.blocks,
        d.block_bytes,
        d.wire_bytes,
        d.raced_blocks,
        hex_bytes(&d.root)
    )
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `bytes` to `out` whole or not at all (a `.partial` renamed).
fn write_whole(
    out: &Path,
    write: impl FnOnce(&mut BufWriter<fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = out.with_extension("partial");
    let f = fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut w = BufWriter::new(f);
    let r =
        write(&mut w).and_then(|()| Ok(w.into_inner().map_err(|e| e.into_error())?.sync_all()?));
    match r {
        Ok(()) => Ok(fs::rename(&tmp, out)?),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Mount {
            backing,
            mountpoint,
            block_size,
            threads,
            private,
            writeback_share,
            quota,
        } => mount(
            &backing,
            &mountpoint,
            volfs::MountOptions {
                block_size,
                threads,
                allow_other: !private,
                writeback_share: Some(writeback_share),
                quota,
            },
        ),
        Cmd::Status { backing } => {
            let st = live(&backing, async |mut c| {
                Ok(c.status(pb::StatusRequest::default()).await?.into_inner())
            })?;
            match st {
                Some(s) => println!(
                    "mounted files={} blocks={} bytes={} whole_files={} metadata_changes={} block_size={} throttle={}",
                    s.files,
                    s.blocks,
                    s.bytes,
                    s.whole_files,
                    s.metadata_changes,
                    s.block_size,
                    s.throttle_bytes_per_sec
                ),
                None => {
                    let (root, st) = offline::hash(&backing, None)?;
                    println!(
                        "unmounted root={} paths={} changed_while_unmounted={}",
                        hex(&root),
                        st.paths,
                        st.changed_behind_back.len()
                    );
                }
            }
            Ok(())
        }
        Cmd::Throttle { backing, rate, ttl } => {
            let ttl_ms = u32::try_from(ttl.saturating_mul(1000)).unwrap_or(u32::MAX);
            let r = live(&backing, async |mut c| {
                let req = pb::ThrottleRequest {
                    bytes_per_sec: rate,
                    ttl_ms,
                };
                Ok(c.throttle(req).await?.into_inner())
            })?;
            match r {
                Some(r) => println!("rate={} ttl_ms={}", r.bytes_per_sec, r.ttl_ms),
                None => bail!("volume {} is not mounted", backing.display()),
            }
            Ok(())
        }
        Cmd::Hash { backing } => {
            let r = live(&backing, async |mut c| {
                Ok(c.hash(pb::HashRequest {}).await?.into_inner())
            })?;
            match r {
                Some(r) => println!("{}", hex_bytes(&r.root)),
                None => println!("{}", hex(&offline::hash(&backing, None)?.0)),
            }
            Ok(())
        }
        Cmd::Manifest { backing, out } => {
            let r = live(&backing, async |mut c| {
                Ok(c.manifest(pb::ManifestRequest {}).await?.into_inner())
            })?;
            let bytes = match r {
                Some(r) => r.manifest,
                None => offline::manifest(&backing)?.to_bytes(),
            };
            volfs::manifest::write_atomic(&out, &bytes)?;
            Ok(())
        }
        Cmd::Diff { backing, out, base } => {
            let base = base
                .map(|b| offline::read_manifest_file(&b))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let base_bytes = base.as_ref().map(|m| m.to_bytes()).unwrap_or_default();
            let mut said = String::new();
            write_whole(&out, |w| {
                // Live: the frames come over the socket into the file.
                let d = live(&backing, async |mut c| {
                    let req = pb::DiffRequest {
                        base: base_bytes,
                        want_result: false,
                    };
                    let mut s = c.diff(req).await?.into_inner();
                    while let Some(chunk) = s.message().await? {
                        match chunk.chunk {
                            Some(pb::diff_chunk::Chunk::Frame(f)) => w
                                .write_all(&f.encode_length_delimited_to_vec())
                                .map_err(|e| tonic::Status::internal(e.to_string()))?,
                            Some(pb::diff_chunk::Chunk::Done(d)) => return Ok(d),
                            _ => {}
                        }
                    }
                    Err(tonic::Status::data_loss("the delta ended early"))
                })?;
                said = match d {
                    Some(d) => summary(&d),
                    // Not mounted: from the backing directory.
                    None => summary(&service::done_of(&offline::diff(
                        &backing,
                        base.as_ref(),
                        &mut *w,
                    )?)),
                };
                Ok(())
            })?;
            println!("{said}");
            Ok(())
        }
        Cmd::Apply { target, delta } => {
            let f = fs::File::open(&delta).with_context(|| format!("delta {}", delta.display()))?;
            let r = offline::apply(&target, BufReader::new(f))?;
            println!(
                "root={} changed={} removed={} blocks={} wire_bytes={}",
                hex(&r.root),
                r.changed,
                r.removed,
                r.blocks,
                r.wire_bytes
            );
            Ok(())
        }
        Cmd::Verify { backing } => {
            if Backing::is_locked(&backing) {
                bail!(
                    "volume {} is mounted; unmount it to verify",
                    backing.display()
                );
            }
            let v = offline::verify(&backing)?;
            if v.recorded == v.actual {
                println!("ok root={}", hex(&v.actual));
                Ok(())
            } else {
                for p in &v.differing {
                    println!("differs: {p:?}");
                }
                bail!(
                    "manifest root {} but the tree hashes to {}",
                    hex(&v.recorded),
                    hex(&v.actual)
                )
            }
        }
    }
}

/// Blocks SIGINT and SIGTERM in every thread and returns the set, for `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a local set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn mount(backing: &Path, mountpoint: &Path, opts: volfs::MountOptions) -> anyhow::Result<()> {
    // Before any thread starts, so they all inherit the mask.
    let set = block_signals();
    let handle = volfs::mount(backing, mountpoint, &opts)?;
    let unmounter = handle.unmounter();
    let sock = service::serve(handle.live().clone(), unmounter.clone())?;
    let live = handle.live().clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is a valid signal set; `sig` a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!(signal = sig, "unmounting");
        // The unmount's own writeback is not held to a handover's rate.
        live.throttle().clear();
        if let Err(e) = unmounter.unmount() {
            tracing::error!(error = %e, "unmount failed");
        }
    });
    tracing::info!(
        backing = %handle.live().backing_dir().display(),
        mountpoint = %handle.live().mountpoint().display(),
        socket = %sock.display(),
        block_size = handle.live().block_size(),
        "mounted"
    );
    let root = handle.join()?;
    tracing::info!(root = %hex(&root), "unmounted; manifest saved");
    Ok(())
}
