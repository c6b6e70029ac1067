//! The `volfs` binary: a foreground mount stopped by signals, the inspection
//! commands, and clear failures (non-zero exit, target untouched) on bad input.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{contents, require_fuse};

fn volfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_volfs"))
}

fn run(args: &[&str]) -> Output {
    volfs().args(args).output().expect("volfs runs")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "volfs {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str], needle: &str) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "volfs {args:?} should fail");
    assert!(
        err.contains(needle),
        "volfs {args:?}: expected {needle:?} in {err:?}"
    );
}

fn is_mounted(mnt: &Path) -> bool {
    let mnt = fs::canonicalize(mnt).unwrap_or(mnt.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
}

struct Daemon(Child, PathBuf);

impl Daemon {
    fn start(backing: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        let child = volfs()
            .arg("mount")
            .args([backing, mnt])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(is_mounted(mnt) && backing.join(".volfs/volume.sock").exists()) {
            assert!(Instant::now() < deadline, "volfs mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child, mnt.to_path_buf())
    }

    fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
        self.0.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
        }
        let c = std::ffi::CString::new(self.1.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    require_fuse();
    let d = tempfile::tempdir().unwrap();
    let (b, m) = (d.path().join("b"), d.path().join("m"));
    fs::create_dir(&b).unwrap();
    fs::create_dir(&m).unwrap();
    (d, b, m)
}

#[test]
fn foreground_mount_reports_and_unmounts_cleanly_on_sigterm() {
    let (_d, b, m) = dirs();
    let mut daemon = Daemon::start(&b, &m, &["--block-size", "4K"]);
    fs::write(m.join("f"), vec![3u8; 10_000]).unwrap();
    let status = ok(&["status", b.to_str().unwrap()]);
    assert!(
        status.contains("blocks=3") && status.contains("block_size=4096"),
        "{status}"
    );
    let h1 = ok(&["hash", b.to_str().unwrap()]);
    assert!(ok(&["status", b.to_str().unwrap()]).contains("blocks=0"));
    fails(&["verify", b.to_str().unwrap()], "is mounted");

    let st = daemon.signal(libc::SIGTERM);
    assert!(st.success(), "volfs mount exits 0 on SIGTERM");
    assert!(!is_mounted(&m));
    assert!(!b.join(".volfs/volume.sock").exists());
    let v = ok(&["verify", b.to_str().unwrap()]);
    assert_eq!(v.trim(), format!("ok root={}", h1.trim()));
    assert_eq!(
        ok(&["hash", b.to_str().unwrap()]),
        h1,
        "offline hash equals the live one"
    );
}

#[test]
fn sigint_unmounts_too_and_a_crash_is_not_trusted() {
    let (_d, b, m) = dirs();
    let mut daemon = Daemon::start(&b, &m, &[]);
    fs::write(m.join("a"), b"a").unwrap();
    assert!(daemon.signal(libc::SIGINT).success());
    drop(daemon);

    let mut daemon = Daemon::start(&b, &m, &[]);
    fs::write(m.join("a"), b"changed while the daemon dies").unwrap();
    ok(&["status", b.to_str().unwrap()]); // flushes the kernel's cache to the backing file
    assert!(!daemon.signal(libc::SIGKILL).success());
    drop(daemon); // detaches the dead mount
    // The manifest on disk is marked unclean: the next open rehashes and gets it right.
    let h = ok(&["hash", b.to_str().unwrap()]);
    let v = ok(&["verify", b.to_str().unwrap()]);
    assert_eq!(v.trim(), format!("ok root={}", h.trim()));
    assert_eq!(
        fs::read(b.join("a")).unwrap(),
        b"changed while the daemon dies"
    );
}

#[test]
fn bad_backing_and_busy_mountpoints_are_refused() {
    let (d, b, m) = dirs();
    let missing = d.path().join("missing");
    fails(
        &["mount", missing.to_str().unwrap(), m.to_str().unwrap()],
        "backing directory",
    );
    let file = d.path().join("file");
    fs::write(&file, b"").unwrap();
    fails(
        &["mount", file.to_str().unwrap(), m.to_str().unwrap()],
        "not a directory",
    );
    fails(
        &["mount", b.to_str().unwrap(), file.to_str().unwrap()],
        "not a directory",
    );
    fails(
        &[
            "mount",
            b.to_str().unwrap(),
            b.join("inner").to_str().unwrap(),
        ],
        "mountpoint",
    );

    let _daemon = Daemon::start(&b, &m, &[]);
    let b2 = d.path().join("b2");
    fs::create_dir(&b2).unwrap();
    fails(
        &["mount", b2.to_str().unwrap(), m.to_str().unwrap()],
        "in use",
    );
    let m2 = d.path().join("m2");
    fs::create_dir(&m2).unwrap();
    fails(
        &["mount", b.to_str().unwrap(), m2.to_str().unwrap()],
        "in use",
    );
    fails(
        &["apply", b.to_str().unwrap(), file.to_str().unwrap()],
        "in use",
    );
    fails(
        &[
            "mount",
            b.to_str().unwrap(),
            m2.to_str().unwrap(),
            "--block-size",
            "7",
        ],
        "block size",
    );
}

#[test]
fn bad_deltas_fail_clearly_and_leave_the_target_untouched() {
    let (d, src, _m) = dirs();
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/data"), vec![5u8; 300_000]).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let full = d.path().join("full.delta");
    ok(&["diff", &s(&src), "-o", &s(&full)]);

    // A target that already holds something else.
    let target = d.path().join("target");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("mine"), b"keep me").unwrap();
    let before = contents(&target);
    let root_before = ok(&["hash", &s(&target)]);

    fails(&["apply", &s(&target), &s(&full)], "delta is for base");

    let bytes = fs::read(&full).unwrap();
    let truncated = d.path().join("truncated.delta");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let corrupt = d.path().join("corrupt.delta");
    let mut c = bytes.clone();
    c[bytes.len() / 3] ^= 0xff;
    fs::write(&corrupt, &c).unwrap();
    let empty = d.path().join("empty");
    fs::create_dir(&empty).unwrap();
    fails(&["apply", &s(&empty), &s(&truncated)], "truncated");
    fails(&["apply", &s(&empty), &s(&corrupt)], "corrupt");
    fails(
        &["apply", &s(&empty), &s(&d.path().join("no-such.delta"))],
        "no-such.delta",
    );
    assert!(
        contents(&empty).keys().all(|k| k.is_empty()),
        "nothing applied to the empty target"
    );

    // A delta made against the target's own manifest applies.
    let base = d.path().join("target.manifest");
    ok(&["manifest", &s(&target), "-o", &s(&base)]);
    let inc = d.path().join("inc.delta");
    ok(&["diff", &s(&src), "-o", &s(&inc), "--base", &s(&base)]);
    assert_eq!(contents(&target), before, "failed applies changed nothing");
    assert_eq!(ok(&["hash", &s(&target)]), root_before);
    let out = ok(&["apply", &s(&target), &s(&inc)]);
    assert!(out.contains("removed=1"), "{out}");
    assert_eq!(contents(&target), contents(&src));
    assert_eq!(ok(&["hash", &s(&target)]), ok(&["hash", &s(&src)]));
    // Applying the same delta again is for another base now.
    fails(&["apply", &s(&target), &s(&inc)], "delta is for base");
    fails(
        &["diff", &s(&src), "-o", &s(&inc), "--base", &s(&full)],
        "manifest",
    );
}
