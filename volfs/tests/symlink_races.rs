//! An app swapping its files and directories for symlinks to host paths
//! while diffs run: no delta ever carries a host file's bytes, no walk ever
//! lists a host directory, and every delta still applies.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Mounted;
use volfs::manifest::Manifest;

/// How long each race runs.
const RACE: Duration = Duration::from_secs(4);

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// Swaps `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let (a, b) = (c(a), c(b));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A root-only host directory outside the volume holding `secret`, whose
/// bytes are a marker no volume file holds.
fn host_secret(m: &Mounted) -> (PathBuf, Vec<u8>) {
    let host = m.dir.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::set_permissions(&host, fs::Permissions::from_mode(0o700)).unwrap();
    let marker = format!("HOST-ONLY-{}-{:?}", std::process::id(), Instant::now()).into_bytes();
    let secret = host.join("secret");
    fs::write(&secret, marker.repeat(8192 / marker.len() + 1)).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    (host, marker)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs `flip` on a thread while full diffs of the live volume run for
/// [`RACE`]; checks each delta with `check` and applies it to a fresh
/// directory. Returns how many diffs succeeded.
fn race(m: &Mounted, flip: impl Fn() + Send + Sync, check: impl Fn(&[u8], &Manifest)) -> u64 {
    /// Stops the flipper when the diffs end, also by a failed check.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    let flips = AtomicU64::new(0);
    let (mut ok, mut failed) = (0u64, 0u64);
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                flip();
                flips.fetch_add(1, Ordering::Relaxed);
            }
        });
        let deadline = Instant::now() + RACE;
        let mut round = 0;
        while Instant::now() < deadline {
            let mut delta = Vec::new();
            match m
                .live()
                .write_delta(&Manifest::empty(m.live().block_size()), &mut delta)
            {
                Ok(summary) => {
                    check(&delta, &summary.manifest);
                    let target = m.dir.path().join(format!("target{round}"));
                    fs::create_dir(&target).unwrap();
                    volfs::offline::apply(&target, delta.as_slice())
                        .expect("a delta made during the race applies");
                    fs::remove_dir_all(&target).unwrap();
                    ok += 1;
                }
                Err(e) => {
                    eprintln!("diff failed cleanly: {e}");
                    failed += 1;
                }
            }
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "{ok} diffs, {failed} failed, {} flips",
        flips.load(Ordering::Relaxed)
    );
    assert!(flips.load(Ordering::Relaxed) > 100, "the app kept flipping");
    ok
}

#[test]
fn a_file_flipped_to_a_symlink_to_a_host_file_never_leaks_it_into_a_delta() {
    let m = Mounted::new();
    let (host, marker) = host_secret(&m);
    fs::write(m.p("f"), vec![b'a'; 100_000]).unwrap();
    std::os::unix::fs::symlink(host.join("secret"), m.p("f.swap")).unwrap();
    let ok = race(
        &m,
        || exchange(&m.p("f"), &m.p("f.swap")).unwrap(),
        |delta, manifest| {
            assert!(!contains(delta, &marker), "a delta holds host bytes");
            // `f` is the app's file, the symlink, or (changed while read) absent.
            if let Some(f) = manifest.entries.get(&b"f"[..]) {
                let to_host = f
                    .link_target
                    .starts_with(host.as_os_str().as_encoded_bytes());
                assert!(f.size == 100_000 || to_host, "{f:?}");
            }
        },
    );
    assert!(ok > 0, "some diffs succeeded");
}

#[test]
fn a_directory_swapped_for_a_symlink_to_a_host_directory_is_never_walked_into() {
    let m = Mounted::new();
    let (host, marker) = host_secret(&m);
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/inner"), vec![b'i'; 20_000]).unwrap();
    std::os::unix::fs::symlink(&host, m.p("d.swap")).unwrap();
    let ok = race(
        &m,
        || exchange(&m.p("d"), &m.p("d.swap")).unwrap(),
        |delta, manifest| {
            assert!(!contains(delta, &marker), "a delta holds host bytes");
            let listed: Vec<_> = manifest
                .entries
                .keys()
                .filter(|p| p.ends_with(b"secret"))
                .collect();
            assert!(listed.is_empty(), "host paths in the manifest: {listed:?}");
            let walked = volfs::scan::walk(&m.backing).unwrap();
            assert!(
                !walked.keys().any(|p| p.ends_with(b"secret")),
                "the walk went into the host directory"
            );
        },
    );
    assert!(ok > 0, "some diffs succeeded");
}
