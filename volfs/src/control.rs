//! The control socket of a live mount, `BACKING/.volfs/control.sock`.
//!
//! One request line, one response line; text so an operator can use `socat`.
//! Responses are `ok key=value ...` or `err message`. Requests:
//!
//! | request                 | does                                                    |
//! |-------------------------|---------------------------------------------------------|
//! | `status [noflush]`      | dirty files, blocks, bytes (after flushing the kernel's cache, unless `noflush`) |
//! | `hash`                  | flush, rehash dirty blocks, root hash                  |
//! | `manifest OUT`          | flush, refresh, write the manifest to OUT               |
//! | `diff OUT [BASE [RESULT]]` | flush, refresh, write the delta since manifest file BASE (`-` or none: since empty) to OUT; RESULT receives the manifest the receiver will hold |
//! | `throttle RATE [TTL_MS]` | hold the app's write replies to RATE bytes/s for TTL_MS (default 10 s; renew to keep it); `throttle 0` ends it |
//! | `unmount`               | unmount (lazily if busy)                                |
//!
//! The socket is created mode 0600 in a root-owned directory: only the
//! volume's owner talks to it.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::backing::Backing;
use crate::manifest::{Manifest, hex, write_atomic};
use crate::mount::{LiveVolume, Unmounter};
use crate::throttle::MAX_TTL;

/// How long a throttle holds when its request names no TTL.
const DEFAULT_THROTTLE_TTL: Duration = Duration::from_secs(10);

/// Starts serving the control socket of `live` on a background thread.
pub fn serve(live: Arc<LiveVolume>, unmounter: Unmounter) -> io::Result<PathBuf> {
    let path = Backing::control_path(live.backing_dir());
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("volfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let live = live.clone();
                let unmounter = unmounter.clone();
                std::thread::spawn(move || {
                    if let Err(e) = handle(conn, &live, &unmounter) {
                        tracing::debug!(error = %e, "control connection");
                    }
                });
            }
        })?;
    Ok(path)
}

fn handle(conn: UnixStream, live: &LiveVolume, unmounter: &Unmounter) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let reply = match execute(line.trim_end(), live, unmounter) {
        Ok(s) => format!("ok {s}\n"),
        Err(e) => format!("err {}\n", e.replace('\n', " ")),
    };
    (&conn).write_all(reply.as_bytes())
}

fn execute(req: &str, live: &LiveVolume, unmounter: &Unmounter) -> Result<String, String> {
    let words: Vec<&str> = req.split(' ').filter(|w| !w.is_empty()).collect();
    let e = |x: &dyn std::fmt::Display| x.to_string();
    match words.as_slice() {
        ["status", rest @ ..] => {
            if rest != ["noflush"] {
                live.flush().map_err(|x| e(&x))?;
            }
            let s = live.dirty_stats();
            Ok(format!(
                "files={} blocks={} bytes={} whole_files={} metadata_changes={} block_size={} throttle={}",
                s.files,
                s.blocks,
                s.bytes,
                s.whole_files,
                s.metadata_changes,
                live.block_size(),
                live.throttle().rate()
            ))
        }
        ["hash"] => {
            let (root, st) = live.refresh().map_err(|x| e(&x))?;
            Ok(format!(
                "root={} paths={} hashed_blocks={} hashed_bytes={} ms={}",
                hex(&root),
                st.paths,
                st.hashed_blocks,
                st.hashed_bytes,
                st.elapsed.as_millis()
            ))
        }
        ["manifest", out] => {
            let (root, _) = live.refresh().map_err(|x| e(&x))?;
            write_atomic(Path::new(out), &live.manifest().to_bytes()).map_err(|x| e(&x))?;
            Ok(format!("root={}", hex(&root)))
        }
        ["diff", out, rest @ ..] => {
            let (base, result) = match rest {
                [] | ["-"] => (Manifest::empty(live.block_size()), None),
                ["-", r] => (Manifest::empty(live.block_size()), Some(*r)),
                [b] | [b, _] => (
                    Manifest::from_bytes(&fs::read(b).map_err(|x| format!("base {b}: {x}"))?)
                        .map_err(|x| format!("base {b}: {x}"))?,
                    rest.get(1).copied(),
                ),
                _ => return Err("usage: diff OUT [BASE|- [RESULT]]".into()),
            };
            let tmp = format!("{out}.partial");
            let f = fs::File::create(&tmp).map_err(|x| format!("{tmp}: {x}"))?;
            let r = live.write_delta(&base, io::BufWriter::new(f));
            let s = match r {
                Ok(s) => s,
                Err(x) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(e(&x));
                }
            };
            fs::rename(&tmp, out).map_err(|x| e(&x))?;
            if let Some(r) = result {
                // What the receiver holds once it applied the delta: the base of the next round.
                write_atomic(Path::new(r), &s.manifest.to_bytes()).map_err(|x| e(&x))?;
            }
            Ok(summary(&s))
        }
        ["throttle", rate, rest @ ..] => {
            let rate: u64 = rate
                .parse()
                .map_err(|_| format!("throttle: bad rate {rate:?} (bytes per second)"))?;
            let ttl = match rest {
                [] => DEFAULT_THROTTLE_TTL,
                [ms] => Duration::from_millis(
                    ms.parse()
                        .map_err(|_| format!("throttle: bad ttl {ms:?} (milliseconds)"))?,
                ),
                _ => return Err("usage: throttle RATE [TTL_MS]".into()),
            };
            if ttl > MAX_TTL {
                return Err(format!("throttle: ttl past {} s", MAX_TTL.as_secs()));
            }
            let r = live.throttle().set(rate, ttl);
            Ok(format!("rate={r} ttl_ms={}", ttl.as_millis()))
        }
        ["unmount"] => {
            // The unmount's own writeback is not held to a handover's rate.
            live.throttle().clear();
            unmounter.unmount().map_err(|x| e(&x))?;
            Ok("unmounting".into())
        }
        _ => Err(format!("unknown request {req:?}")),
    }
}

/// `key=value` form of a delta summary.
pub fn summary(s: &crate::delta::DeltaSummary) -> String {
    format!(
        "entries={} removed={} blocks={} block_bytes={} wire_bytes={} raced_blocks={} root={}",
        s.entries,
        s.removed,
        s.blocks,
        s.block_bytes,
        s.wire_bytes,
        s.raced_blocks,
        hex(&s.manifest.root())
    )
}

/// Sends one request to the control socket of the volume at `backing_dir`.
/// `Ok(None)` when no live mount answers.
pub fn request(backing_dir: &Path, req: &str) -> io::Result<Option<Result<String, String>>> {
    let path = Backing::control_path(backing_dir);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    (&conn).write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let line = line.trim_end();
    Ok(Some(match line.split_once(' ') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        Some(("err", rest)) => Err(rest.to_string()),
        _ if line == "ok" => Ok(String::new()),
        _ => Err(format!("bad control reply {line:?}")),
    }))
}
