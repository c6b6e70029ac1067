//! The `Volume` service of a live mount (`edge/v1/shim.proto`), served by
//! the shim on `BACKING/.volfs/volume.sock`, and its client.
//!
//! gRPC over a Unix socket: typed and versioned (every status carries
//! [`edge_proto::VOLUME_API_VERSION`]), one parser (prost) for edged, the
//! `volfs` CLI and the shim. A delta leaves as a stream of frames: the scan
//! runs on a blocking thread and hands each frame through a bounded channel
//! (a few frames deep) to the response stream, so a round of any size is
//! never held whole in memory, and a client that goes away stops the scan.
//!
//! The socket is created mode 0600 in the volume's root-owned `.volfs/`:
//! only the volume's owner talks to it. The shim writes nothing at a path a
//! client names (the text protocol before it did): manifests and deltas go
//! back over the socket.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::volume_client::VolumeClient;
use edge_proto::v1::volume_server::{Volume, VolumeServer};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::backing::Backing;
use crate::delta::DeltaSummary;
use crate::manifest::Manifest;
use crate::mount::{LiveVolume, Unmounter};
use crate::throttle::MAX_TTL;

/// Largest message either side takes: a `Diff`'s base, the manifest of a
/// volume of some 800 GiB at 64 KiB blocks (a base that came from another
/// edge is bounded by the peer protocol's 64 MiB first, and a puller whose
/// staged copy's manifest is larger asks for everything).
pub const MAX_MESSAGE: usize = 512 << 20;

/// Largest part of a `Diff`'s result manifest.
pub const RESULT_PART: usize = 4 << 20;

/// How long a throttle holds when its request names no TTL.
const DEFAULT_THROTTLE_TTL: Duration = Duration::from_secs(10);

/// Frames a `Diff` scan may be ahead of its reader.
const DIFF_QUEUE: usize = 8;

/// The address of a Unix socket at `path`, short whatever the length of
/// `path`: `/proc/self/fd/N/NAME`, through an `O_PATH` handle of the
/// socket's directory that lives as long as the address. A socket's path
/// holds at most 107 bytes, and a volume's `.volfs/` lies deep under an
/// edge's data directory.
struct ProcSocketPath {
    _dir: OwnedFd,
    path: PathBuf,
}

impl ProcSocketPath {
    fn of(path: &Path) -> std::io::Result<ProcSocketPath> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} names no socket in a directory", path.display()),
            ));
        };
        let dir = crate::sys::cstr(dir.as_os_str()).and_then(|c| {
            crate::sys::open(&c, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
        })?;
        let proc = crate::sys::proc_path(dir.as_raw_fd());
        let path = Path::new(std::ffi::OsStr::from_bytes(proc.as_bytes())).join(name);
        Ok(ProcSocketPath { _dir: dir, path })
    }
}

/// Starts serving the `Volume` service of `live` on its socket, on a thread
/// of its own (with its own small runtime). Returns the socket's path.
pub fn serve(live: Arc<LiveVolume>, unmounter: Unmounter) -> std::io::Result<PathBuf> {
    let path = Backing::socket_path(live.backing_dir());
    // Bound under a private name, made 0600, then given its name: no
    // moment where the socket answers at its path with a looser mode.
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&ProcSocketPath::of(&tmp)?.path)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &path)?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("volfs-service".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "volume socket");
                        return;
                    }
                };
                let svc = VolumeServer::new(Service { live, unmounter })
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!(error = %e, "volume service stopped");
                }
            });
        })?;
    Ok(path)
}

struct Service {
    live: Arc<LiveVolume>,
    unmounter: Unmounter,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Service {
    /// Runs `f` on the live volume on a blocking thread (it flushes, reads
    /// and hashes files).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LiveVolume) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let live = self.live.clone();
        tokio::task::spawn_blocking(move || f(&live))
            .await
            .map_err(internal)?
    }
}

/// The dirty state of `live`, as the service says it.
pub fn status_of(live: &LiveVolume) -> pb::VolumeStatus {
    let s = live.dirty_stats();
    pb::VolumeStatus {
        api_version: edge_proto::VOLUME_API_VERSION,
        files: s.files,
        blocks: s.blocks,
        bytes: s.bytes,
        whole_files: s.whole_files,
        metadata_changes: s.metadata_changes,
        block_size: live.block_size(),
        throttle_bytes_per_sec: live.throttle().rate(),
        refreshes: live.refreshes(),
    }
}

/// (entries, bytes) a manifest of `(entries, blocks)` takes in memory, as
/// [`crate::wire`] counts.
fn cost_of((n, blocks): (u64, u64)) -> (u64, u64) {
    (
        n,
        n * crate::wire::PER_ENTRY + blocks * (crate::wire::PER_ELEMENT + 34),
    )
}

/// The last message of a `Diff`.
pub fn done_of(s: &DeltaSummary) -> pb::DiffDone {
    pb::DiffDone {
        entries: s.entries,
        removed: s.removed,
        blocks: s.blocks,
        block_bytes: s.block_bytes,
        wire_bytes: s.wire_bytes,
        raced_blocks: s.raced_blocks,
        root: s.manifest.root().to_vec(),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Volume for Service {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::VolumeStatus>, Status> {
        let flush = !req.into_inner().no_flush;
        self.blocking(move |live| {
            if flush {
                live.flush().map_err(internal)?;
            }
            Ok(status_of(live))
        })
        .await
        .map(Response::new)
    }

    type WatchStream = Streamed<pb::VolumeStatus>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let interval = match r.interval_ms {
            0 => Duration::from_millis(200),
            ms => Duration::from_millis(u64::from(ms.max(20))),
        };
        let flush_every =
            (r.flush_ms != 0).then(|| Duration::from_millis(u64::from(r.flush_ms.max(100))));
        let (tx, rx) = mpsc::channel(1);
        let live = self.live.clone();
        tokio::spawn(async move {
            let mut last: Option<pb::VolumeStatus> = None;
            let mut flushed = Instant::now();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tx.closed() => return,
                }
                if flush_every.is_some_and(|f| flushed.elapsed() >= f) {
                    let l = live.clone();
                    // A flush that fails (the mount is going) shows in the next status.
                    let _ = tokio::task::spawn_blocking(move || l.flush()).await;
                    flushed = Instant::now();
                }
                let now = status_of(&live);
                if last.as_ref() != Some(&now) {
                    last = Some(now);
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn hash(
        &self,
        _: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.blocking(|live| {
            let (root, st) = live.refresh().map_err(internal)?;
            Ok(pb::HashResponse {
                root: root.to_vec(),
                paths: st.paths,
                hashed_blocks: st.hashed_blocks,
                hashed_bytes: st.hashed_bytes,
                micros: st.elapsed.as_micros() as u64,
            })
        })
        .await
        .map(Response::new)
    }

    async fn manifest(
        &self,
        _: Request<pb::ManifestRequest>,
    ) -> Result<Response<pb::ManifestResponse>, Status> {
        self.blocking(|live| {
            let (root, _) = live.refresh().map_err(internal)?;
            Ok(pb::ManifestResponse {
                manifest: live.manifest().to_bytes(),
                root: root.to_vec(),
            })
        })
        .await
        .map(Response::new)
    }

    type DiffStream = Streamed<pb::DiffChunk>;

    async fn diff(
        &self,
        req: Request<pb::DiffRequest>,
    ) -> Result<Response<Self::DiffStream>, Status> {
        let r = req.into_inner();
        // The base may come from another edge: counted before it is
        // decoded, off this runtime (it serves the volume's other calls).
        let live = self.live.clone();
        let base = tokio::task::spawn_blocking(move || {
            if r.base.is_empty() {
                return Ok(Manifest::empty(live.block_size()));
            }
            // A base is an earlier state of this volume: up to twice what
            // this volume's own manifest takes, or the delta format's
            // budget when that is more. A base past it (a volume that
            // shrank a lot) is refused; the client sends a full delta.
            let own = cost_of(live.manifest_counts());
            let d = crate::delta::Limits::default();
            let limits = crate::delta::Limits {
                max_entries: d.max_entries.max(2 * own.0),
                max_manifest_bytes: d.max_manifest_bytes.max(2 * own.1),
                ..d
            };
            Manifest::from_untrusted(&r.base, &limits)
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::invalid_argument(format!("base manifest: {e}")))?;
        let want_result = r.want_result;
        let (tx, rx) = mpsc::channel::<Result<pb::DiffChunk, Status>>(DIFF_QUEUE);
        let live = self.live.clone();
        // The scan is synchronous (it reads and hashes files); each frame
        // waits for room in the channel, and a reader that went away ends it.
        tokio::task::spawn_blocking(move || {
            let send = |c: pb::diff_chunk::Chunk| {
                tx.blocking_send(Ok(pb::DiffChunk { chunk: Some(c) }))
                    .map_err(|_| std::io::Error::other("the reader of the delta went away"))
            };
            let s = match live.delta_frames(&base, |f| send(pb::diff_chunk::Chunk::Frame(f))) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.blocking_send(Err(internal(e)));
                    return;
                }
            };
            if want_result {
                for part in s.manifest.to_bytes().chunks(RESULT_PART) {
                    if send(pb::diff_chunk::Chunk::ResultPart(part.to_vec())).is_err() {
                        return;
                    }
                }
            }
            let _ = send(pb::diff_chunk::Chunk::Done(done_of(&s)));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn throttle(
        &self,
        req: Request<pb::ThrottleRequest>,
    ) -> Result<Response<pb::ThrottleResponse>, Status> {
        let r = req.into_inner();
        let ttl = match r.ttl_ms {
            0 => DEFAULT_THROTTLE_TTL,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if ttl > MAX_TTL {
            return Err(Status::invalid_argument(format!(
                "throttle: a lease past {} s",
                MAX_TTL.as_secs()
            )));
        }
        let rate = self.live.throttle().set(r.bytes_per_sec, ttl);
        Ok(Response::new(pb::ThrottleResponse {
            bytes_per_sec: rate,
            ttl_ms: ttl.as_millis() as u32,
        }))
    }

    async fn unmount(
        &self,
        _: Request<pb::UnmountRequest>,
    ) -> Result<Response<pb::UnmountResponse>, Status> {
        // The unmount's own writeback is not held to a handover's rate.
        self.live.throttle().clear();
        let u = self.unmounter.clone();
        tokio::task::spawn_blocking(move || u.unmount())
            .await
            .map_err(internal)?
            .map_err(internal)?;
        Ok(Response::new(pb::UnmountResponse {}))
    }
}

/// A client of the live mount of the volume at `backing_dir`; `Ok(None)`
/// when no shim listens there.
pub async fn connect(backing_dir: &Path) -> std::io::Result<Option<VolumeClient<Channel>>> {
    let addr = match ProcSocketPath::of(&Backing::socket_path(backing_dir)) {
        Ok(a) => Arc::new(a),
        // No `.volfs/` yet: never mounted.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // Connected here, so "not mounted" is told from a shim that fails; the
    // channel takes this stream, and dials again only to reconnect.
    let first = match tokio::net::UnixStream::connect(&addr.path).await {
        Ok(s) => std::sync::Mutex::new(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let first = Arc::new(first);
    let channel = Endpoint::from_static("http://volfs.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let (addr, first) = (addr.clone(), first.clone());
            async move {
                let taken = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                let s = match taken {
                    Some(s) => s,
                    None => tokio::net::UnixStream::connect(&addr.path).await?,
                };
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(std::io::Error::other)?;
    Ok(Some(
        VolumeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    ))
}
