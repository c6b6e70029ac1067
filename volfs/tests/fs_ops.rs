//! Every filesystem operation an application's state needs, through a real
//! FUSE mount, checked against what ext4 would do; and the manifest kept by
//! dirty tracking equal to one hashed from scratch.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{Mounted, full_scan};

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The incrementally maintained manifest equals a from-scratch hash of the backing dir.
fn assert_manifest_exact(m: &Mounted) {
    let (root, _) = m.live().refresh().unwrap();
    let full = full_scan(&m.backing, m.live().block_size());
    assert_eq!(
        m.live().manifest(),
        full,
        "incremental manifest differs from a full scan"
    );
    assert_eq!(root, full.root());
}

#[test]
fn files_read_write_truncate_and_append() {
    let m = Mounted::new();
    let f = m.p("a.txt");
    fs::write(&f, b"hello").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"hello");
    let mut h = fs::OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b" world").unwrap();
    drop(h);
    assert_eq!(fs::read(&f).unwrap(), b"hello world");
    // Write in the middle, past the end (a hole), then read back.
    let mut h = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    h.seek(SeekFrom::Start(200_000)).unwrap();
    h.write_all(b"tail").unwrap();
    h.seek(SeekFrom::Start(0)).unwrap();
    let mut all = Vec::new();
    h.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 200_004);
    assert!(all[11..200_000].iter().all(|&b| b == 0));
    // Truncate down and up: the grown part reads as zeros.
    h.set_len(3).unwrap();
    h.set_len(70_000).unwrap();
    drop(h);
    let data = fs::read(&f).unwrap();
    assert_eq!(&data[..3], b"hel");
    assert!(data[3..].iter().all(|&b| b == 0));
    // Opening an existing file with O_NOFOLLOW (as SQLite does).
    let h = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&f)
        .expect("O_NOFOLLOW open of an existing file");
    drop(h);
    // O_TRUNC through open.
    fs::write(&f, b"x").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"x");
    assert_eq!(fs::metadata(&f).unwrap().len(), 1);
    assert_manifest_exact(&m);
}

#[test]
fn truncate_down_and_back_to_the_same_size_is_tracked() {
    let m = Mounted::new();
    let f = m.p("f");
    fs::write(&f, vec![9u8; 200_000]).unwrap();
    m.live().refresh().unwrap();
    let h = fs::OpenOptions::new().write(true).open(&f).unwrap();
    h.set_len(10).unwrap();
    h.set_len(200_000).unwrap();
    drop(h);
    assert_manifest_exact(&m);
    // The same through O_TRUNC and a write that ends at the old size.
    fs::write(&f, vec![9u8; 200_000]).unwrap();
    m.live().refresh().unwrap();
    let h = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&f)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&h, &[9u8; 10], 199_990).unwrap();
    drop(h);
    assert_manifest_exact(&m);
}

#[test]
fn attributes_modes_owners_and_times() {
    let m = Mounted::new();
    let f = m.p("f");
    fs::write(&f, b"data").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(
        fs::metadata(m.backing.join("f")).unwrap().uid(),
        1234,
        "owner reaches the backing file"
    );
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(fs::metadata(&f).unwrap().modified().unwrap(), t);
    // setuid survives a chmod after chown (as on ext4).
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o4755);
    assert_manifest_exact(&m);
}

#[test]
fn directories_links_and_renames() {
    let m = Mounted::new();
    fs::create_dir_all(m.p("d/e")).unwrap();
    fs::write(m.p("d/e/f"), b"1").unwrap();
    assert_eq!(errno_of(fs::create_dir(m.p("d"))), libc::EEXIST);
    assert_eq!(errno_of(fs::remove_dir(m.p("d"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::remove_file(m.p("d"))), libc::EISDIR);
    assert_eq!(errno_of(fs::read(m.p("nope"))), libc::ENOENT);

    // Symlink and readlink.
    std::os::unix::fs::symlink("d/e/f", m.p("s")).unwrap();
    assert_eq!(fs::read_link(m.p("s")).unwrap().as_os_str(), "d/e/f");
    assert_eq!(fs::read(m.p("s")).unwrap(), b"1");

    // Hard link: same inode, two links.
    fs::hard_link(m.p("d/e/f"), m.p("h")).unwrap();
    let (a, b) = (
        fs::metadata(m.p("d/e/f")).unwrap(),
        fs::metadata(m.p("h")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);

    // Plain rename over an existing file.
    fs::write(m.p("x"), b"x").unwrap();
    fs::write(m.p("y"), b"y").unwrap();
    fs::rename(m.p("x"), m.p("y")).unwrap();
    assert_eq!(fs::read(m.p("y")).unwrap(), b"x");
    assert!(!m.p("x").exists());

    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    fs::write(m.p("x"), b"new x").unwrap();
    let cwd = libc::AT_FDCWD;
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            cwd,
            c(&m.p("x")).as_ptr(),
            cwd,
            c(&m.p("y")).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(
        (r, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EEXIST))
    );
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            cwd,
            c(&m.p("x")).as_ptr(),
            cwd,
            c(&m.p("y")).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(fs::read(m.p("x")).unwrap(), b"x");
    assert_eq!(fs::read(m.p("y")).unwrap(), b"new x");
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            cwd,
            c(&m.p("x")).as_ptr(),
            cwd,
            c(&m.p("z")).as_ptr(),
            libc::RENAME_WHITEOUT,
        )
    };
    assert_eq!(r, -1, "whiteout is refused");

    // Directory rename moves the subtree.
    fs::rename(m.p("d"), m.p("d2")).unwrap();
    assert_eq!(fs::read(m.p("d2/e/f")).unwrap(), b"1");
    fs::remove_file(m.p("d2/e/f")).unwrap();
    fs::remove_dir(m.p("d2/e")).unwrap();
    assert_eq!(fs::metadata(m.p("h")).unwrap().nlink(), 1);

    // readdir (and readdirplus) list exactly the names; the metadata dir is hidden.
    let mut names: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d2", "h", "s", "x", "y"]);
    assert_eq!(errno_of(fs::metadata(m.p(".volfs"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(m.p(".volfs"))), libc::EPERM);
    assert_manifest_exact(&m);
}

#[test]
fn many_entries_in_one_directory() {
    let m = Mounted::new();
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..600 {
        fs::write(
            m.p(&format!("many/file-with-a-long-name-{i:04}")),
            i.to_string(),
        )
        .unwrap();
    }
    let n = fs::read_dir(m.p("many")).unwrap().count();
    assert_eq!(n, 600, "readdir pages through every entry once");
    assert_manifest_exact(&m);
}

#[test]
fn xattrs_statfs_fsync_fallocate_and_seek_data() {
    let m = Mounted::new();
    let f = m.p("f");
    fs::write(&f, vec![7u8; 3 * 65536]).unwrap();
    let cf = c(&f);
    let (name, val) = (c"user.color", b"blue");
    // SAFETY: valid C strings and buffers.
    unsafe {
        assert_eq!(
            libc::setxattr(
                cf.as_ptr(),
                name.as_ptr(),
                val.as_ptr().cast(),
                val.len(),
                0
            ),
            0
        );
        let mut buf = [0u8; 16];
        let n = libc::getxattr(
            cf.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        assert_eq!(&buf[..n as usize], val);
        let n = libc::listxattr(cf.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        assert_eq!(&buf[..n as usize], b"user.color\0");
        let n = libc::getxattr(
            cf.as_ptr(),
            c"user.none".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        assert_eq!(
            (n, std::io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::ENODATA))
        );
    }
    assert_manifest_exact(&m);
    // SAFETY: valid C strings.
    assert_eq!(unsafe { libc::removexattr(cf.as_ptr(), name.as_ptr()) }, 0);

    // statfs answers with the backing filesystem's numbers.
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    assert_eq!(unsafe { libc::statvfs(c(&m.mnt).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bsize > 0);

    // fsync, fdatasync; punch a hole and see zeros.
    let h = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    h.sync_all().unwrap();
    h.sync_data().unwrap();
    // SAFETY: plain syscall on an open fd.
    let r = unsafe {
        libc::fallocate(
            h.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            65536,
            65536,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    drop(h);
    let data = fs::read(&f).unwrap();
    assert_eq!(data.len(), 3 * 65536);
    assert!(data[65536..131072].iter().all(|&b| b == 0));
    assert!(data[..65536].iter().all(|&b| b == 7));
    assert_manifest_exact(&m);
}

#[test]
fn kernel_enforces_permissions_for_other_users() {
    let m = Mounted::new();
    fs::write(m.p("secret"), b"s").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("open"), b"o").unwrap();
    fs::set_permissions(m.p("open"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs")
    };
    assert!(
        !as_nobody(&["cat", m.p("secret").to_str().unwrap()])
            .status
            .success()
    );
    let out = as_nobody(&["cat", m.p("open").to_str().unwrap()]);
    assert_eq!(out.stdout, b"o", "{}", String::from_utf8_lossy(&out.stderr));
    // A file created by another user is owned by that user.
    let out = as_nobody(&["touch", m.p("mine").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = fs::metadata(m.p("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    // A write by an unprivileged user drops setuid (volfs handles killpriv).
    fs::write(m.p("suid"), b"#!/bin/true\n").unwrap();
    fs::set_permissions(m.p("suid"), fs::Permissions::from_mode(0o4777)).unwrap();
    let out = as_nobody(&[
        "sh",
        "-c",
        &format!("echo more >> {}", m.p("suid").display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(m.p("suid")).unwrap().mode() & 0o7777, 0o777);
    // Sticky directory: another user's file cannot be removed (as on ext4).
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o1777)).unwrap();
    assert!(
        !as_nobody(&["rm", "-f", m.p("secret").to_str().unwrap()])
            .status
            .success()
    );
    assert!(m.p("secret").exists());
    assert_manifest_exact(&m);
}

#[test]
fn posix_locks_conflict_between_processes() {
    let m = Mounted::new();
    let f = m.p("db");
    fs::write(&f, b"0").unwrap();
    let h = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: valid fd and lock struct.
    assert_eq!(unsafe { libc::fcntl(h.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
    let script = format!(
        "import fcntl,sys\nf=open({:?},'r+')\ntry:\n fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n print('got')\nexcept OSError:\n print('busy')",
        f.to_str().unwrap()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "busy");
    drop(h);
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "got");
}

#[test]
fn special_files() {
    let m = Mounted::new();
    let fifo = c(&m.p("pipe"));
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let md = fs::symlink_metadata(m.p("pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&md.file_type()));
    assert_manifest_exact(&m);
}

#[test]
fn concurrent_writers_lose_nothing() {
    let m = Mounted::new();
    let shared = m.p("shared");
    fs::File::create(&shared)
        .unwrap()
        .set_len(8 * 256 * 1024)
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let shared = &shared;
            let own = m.p(&format!("own-{t}"));
            s.spawn(move || {
                let f = fs::OpenOptions::new().write(true).open(shared).unwrap();
                let mut o = fs::File::create(own).unwrap();
                for i in 0..64u64 {
                    let chunk = vec![t.wrapping_mul(31).wrapping_add(i as u8); 4096];
                    std::os::unix::fs::FileExt::write_at(
                        &f,
                        &chunk,
                        (u64::from(t) * 64 + i) * 4096,
                    )
                    .unwrap();
                    o.write_all(&chunk).unwrap();
                }
            });
        }
    });
    let data = fs::read(&shared).unwrap();
    for t in 0..8u64 {
        for i in 0..64u64 {
            let at = ((t * 64 + i) * 4096) as usize;
            assert!(
                data[at..at + 4096]
                    .iter()
                    .all(|&b| b == (t as u8).wrapping_mul(31).wrapping_add(i as u8))
            );
        }
        assert_eq!(
            fs::metadata(m.p(&format!("own-{t}"))).unwrap().len(),
            64 * 4096
        );
    }
    assert_manifest_exact(&m);
}

#[test]
fn sqlite_style_workload_through_std() {
    // Journaled rewrite: write temp, fsync, rename over, as databases and editors do.
    let m = Mounted::new();
    for i in 0..20 {
        let tmp = m.p("state.tmp");
        let mut f = fs::File::create(&tmp).unwrap();
        f.write_all(format!("version {i}").as_bytes()).unwrap();
        f.sync_all().unwrap();
        fs::rename(&tmp, m.p("state")).unwrap();
    }
    assert_eq!(fs::read(m.p("state")).unwrap(), b"version 19");
    assert_manifest_exact(&m);
}
