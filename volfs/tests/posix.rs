//! POSIX behaviours that a filesystem test suite checks, each run on a plain
//! directory of the host (the reference) and on a volfs mount, asserting
//! both give the same errno and the same resulting modes, owners and times.
//!
//! Operations by other users run in a forked child that changes its
//! credentials and makes raw system calls only.

mod common;

use std::ffi::CString;
use std::fmt::Debug;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::Mounted;

/// An unprivileged user and its primary group.
const USER: u32 = 65534;
/// A group `USER` is not in.
const OTHER_GROUP: u32 = 4242;
/// `CAP_FSETID`: keep setuid/setgid on write, truncate and chown.
const CAP_FSETID: u32 = 4;

/// Who runs an operation.
#[derive(Clone, Copy, Debug)]
struct Cred {
    uid: u32,
    gid: u32,
    /// Whether the caller holds `CAP_FSETID` (root without it, or a user with it).
    fsetid: bool,
}

/// The unprivileged user, in its own group only.
const NOBODY: Cred = Cred {
    uid: USER,
    gid: USER,
    fsetid: false,
};
/// The unprivileged user, also holding `CAP_FSETID`.
const NOBODY_FSETID: Cred = Cred {
    uid: USER,
    gid: USER,
    fsetid: true,
};
/// Root without `CAP_FSETID`.
const ROOT_NO_FSETID: Cred = Cred {
    uid: 0,
    gid: 0,
    fsetid: false,
};

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// Runs `op` in a forked child with `cred`; its result is the child's exit
/// status (an errno, 0 for success). The child makes system calls only.
fn as_cred(cred: Cred, op: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes system calls and exits with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: plain system calls on valid pointers in the child.
        unsafe {
            let fail = |step: i32| -> ! { libc::_exit(200 + step) };
            let groups = [cred.gid];
            if libc::setgroups(1, groups.as_ptr()) != 0 {
                fail(1);
            }
            if libc::setresgid(cred.gid, cred.gid, cred.gid) != 0 {
                fail(2);
            }
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
                fail(3);
            }
            if libc::setresuid(cred.uid, cred.uid, cred.uid) != 0 {
                fail(4);
            }
            let mut hdr = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) != 0 {
                fail(5);
            }
            if cred.uid != 0 || !cred.fsetid {
                // Root keeps everything but (maybe) CAP_FSETID; a user gets
                // CAP_FSETID at most.
                let keep = if cred.fsetid { 1 << CAP_FSETID } else { 0 };
                let mask = if cred.uid == 0 {
                    !(1 << CAP_FSETID) | keep
                } else {
                    keep
                };
                data[0].effective = data[0].permitted & mask;
                data[0].permitted &= mask;
                data[0].inheritable = 0;
                data[1] = CapData::default();
                if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                    fail(6);
                }
            }
            libc::_exit(op());
        }
    }
    let mut status = 0;
    // SAFETY: `pid` is our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert!(
        code < 200,
        "child could not take its credentials (step {code})"
    );
    code
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// 0 when `r` is not negative, else errno.
fn err_of(r: i64) -> i32 {
    if r < 0 { last_errno() } else { 0 }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// A directory of the host, the reference for every comparison.
struct Native {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Native {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("native");
        fs::create_dir(&root).unwrap();
        Native { _dir: dir, root }
    }
}

/// A fresh volfs mount that other users can reach.
fn mounted() -> Mounted {
    let m = Mounted::new();
    fs::set_permissions(m.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    m
}

/// The cases of one test where volfs and native differ.
#[derive(Default)]
struct Diffs(Vec<String>);

impl Diffs {
    /// Prepares a native directory and a volfs mount with `setup`, runs
    /// `op` on each root and records a difference.
    fn check<T: PartialEq + Debug>(
        &mut self,
        what: &str,
        setup: impl Fn(&Path),
        op: impl Fn(&Path) -> T,
    ) {
        let native = Native::new();
        let m = mounted();
        setup(&native.root);
        setup(&m.mnt);
        let want = op(&native.root);
        let got = op(&m.mnt);
        if got != want {
            self.0
                .push(format!("{what}: volfs gave {got:?}, native {want:?}"));
        }
    }

    /// Fails listing every difference.
    fn assert_none(self) {
        assert!(self.0.is_empty(), "\n{}", self.0.join("\n"));
    }
}

/// A file `f` owned by root with `perm`, in a root directory open to all.
fn file_with(perm: u32, gid: u32) -> impl Fn(&Path) {
    move |root: &Path| {
        fs::set_permissions(root, fs::Permissions::from_mode(0o777)).unwrap();
        let f = root.join("f");
        fs::write(&f, b"data").unwrap();
        std::os::unix::fs::chown(&f, Some(0), Some(gid)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(perm)).unwrap();
    }
}

/// Writes one byte to `root/f` as `cred`; the errno and the mode after.
fn write_as(cred: Cred) -> impl Fn(&Path) -> (i32, u32) {
    move |root: &Path| {
        let f = root.join("f");
        let p = c(&f);
        let e = as_cred(cred, || {
            // SAFETY: system calls on a valid C string and buffer.
            unsafe {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return last_errno();
                }
                let r = libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0);
                let e = err_of(r as i64);
                libc::close(fd);
                e
            }
        });
        (e, mode(&f))
    }
}

/// Truncates `root/f` as `cred` with `how`; the errno and the mode after.
fn truncate_as(cred: Cred, how: Truncate) -> impl Fn(&Path) -> (i32, u32) {
    move |root: &Path| {
        let f = root.join("f");
        let p = c(&f);
        let e = as_cred(cred, || {
            // SAFETY: system calls on a valid C string.
            unsafe {
                match how {
                    Truncate::Path => err_of(libc::truncate(p.as_ptr(), 1).into()),
                    Truncate::Fd => {
                        let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                        if fd < 0 {
                            return last_errno();
                        }
                        let e = err_of(libc::ftruncate(fd, 1).into());
                        libc::close(fd);
                        e
                    }
                    Truncate::Open => {
                        let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_TRUNC);
                        if fd < 0 {
                            return last_errno();
                        }
                        libc::close(fd);
                        0
                    }
                }
            }
        });
        (e, mode(&f))
    }
}

#[derive(Clone, Copy, Debug)]
enum Truncate {
    Path,
    Fd,
    Open,
}

/// Changes the group of `root/f` (owned by `USER`) to `gid` as `cred`.
fn chgrp_as(cred: Cred, gid: u32) -> impl Fn(&Path) -> (i32, u32, u32) {
    move |root: &Path| {
        let f = root.join("f");
        let p = c(&f);
        let e = as_cred(cred, || {
            // SAFETY: a system call on a valid C string.
            err_of(unsafe { libc::chown(p.as_ptr(), u32::MAX, gid) }.into())
        });
        let md = fs::metadata(&f).unwrap();
        (e, md.mode() & 0o7777, md.gid())
    }
}

#[test]
fn an_unprivileged_write_clears_setuid_and_group_executable_setgid() {
    let mut d = Diffs::default();
    for perm in [0o4777, 0o6777, 0o2777, 0o4666] {
        d.check(
            &format!("write to {perm:o} by a user"),
            file_with(perm, USER),
            write_as(NOBODY),
        );
    }
    d.assert_none();
}

#[test]
fn a_write_keeps_setgid_without_group_exec_for_a_group_member_and_drops_it_for_others() {
    let mut d = Diffs::default();
    d.check(
        "write to 2766 by a member of its group",
        file_with(0o2766, USER),
        write_as(NOBODY),
    );
    d.check(
        "write to 2766 by a user outside its group",
        file_with(0o2766, OTHER_GROUP),
        write_as(NOBODY),
    );
    d.assert_none();
}

#[test]
fn a_write_by_a_holder_of_cap_fsetid_keeps_setuid_and_by_root_without_it_clears_it() {
    let mut d = Diffs::default();
    d.check(
        "write to 6777 by a user with CAP_FSETID",
        file_with(0o6777, USER),
        write_as(NOBODY_FSETID),
    );
    d.check(
        "write to 6777 by root without CAP_FSETID",
        file_with(0o6777, USER),
        write_as(ROOT_NO_FSETID),
    );
    d.assert_none();
}

#[test]
fn truncation_clears_setuid_unless_the_caller_holds_cap_fsetid() {
    let mut d = Diffs::default();
    for how in [Truncate::Path, Truncate::Fd, Truncate::Open] {
        for cred in [NOBODY, NOBODY_FSETID, ROOT_NO_FSETID] {
            for perm in [0o6777, 0o2766] {
                d.check(
                    &format!("{how:?} truncation of {perm:o} by {cred:?}"),
                    file_with(perm, USER),
                    truncate_as(cred, how),
                );
            }
        }
    }
    d.assert_none();
}

#[test]
fn chown_by_the_owner_clears_setuid_and_setgid_as_on_the_host() {
    let mut d = Diffs::default();
    for (perm, gid) in [(0o6755, USER), (0o2745, USER), (0o2745, OTHER_GROUP)] {
        d.check(
            &format!("chgrp of {perm:o} (group {gid}) by its owner"),
            |root: &Path| {
                let f = root.join("f");
                fs::write(&f, b"data").unwrap();
                std::os::unix::fs::chown(&f, Some(USER), Some(gid)).unwrap();
                fs::set_permissions(&f, fs::Permissions::from_mode(perm)).unwrap();
            },
            chgrp_as(NOBODY, USER),
        );
    }
    d.assert_none();
}

#[test]
fn chown_by_root_clears_setuid_and_group_executable_setgid() {
    let mut d = Diffs::default();
    d.check(
        "chown of 6755 by root",
        |root: &Path| {
            let f = root.join("f");
            fs::write(&f, b"data").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o6755)).unwrap();
        },
        |root: &Path| {
            let f = root.join("f");
            std::os::unix::fs::chown(&f, Some(USER), Some(USER)).unwrap();
            mode(&f)
        },
    );
    d.assert_none();
}

#[test]
fn a_file_created_in_a_setgid_directory_by_a_user_outside_its_group_takes_its_group_and_no_executable_setgid()
 {
    let mut d = Diffs::default();
    let setup = |root: &Path| {
        let d = root.join("d");
        fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(0), Some(OTHER_GROUP)).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o2777)).unwrap();
    };
    for (name, perm, dir) in [
        ("exe", 0o2755, false),
        ("plain", 0o2644, false),
        ("suid", 0o6755, false),
        ("sub", 0o2755, true),
        ("subplain", 0o755, true),
    ] {
        d.check(
            &format!("creating {name} ({perm:o}) in a setgid directory"),
            setup,
            |root: &Path| {
                let p = root.join("d").join(name);
                let cp = c(&p);
                let e = as_cred(NOBODY, || {
                    // SAFETY: system calls on a valid C string.
                    unsafe {
                        libc::umask(0);
                        if dir {
                            err_of(libc::mkdir(cp.as_ptr(), perm).into())
                        } else {
                            let fd = libc::open(
                                cp.as_ptr(),
                                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                                perm,
                            );
                            if fd < 0 {
                                return last_errno();
                            }
                            libc::close(fd);
                            0
                        }
                    }
                });
                let md = fs::metadata(&p).unwrap();
                (e, md.mode() & 0o7777, md.uid(), md.gid())
            },
        );
    }
    d.assert_none();
}

/// open(2) of `path` with `flags` as root: the errno.
fn open_errno(path: &[u8], flags: i32) -> i32 {
    let p = CString::new(path).unwrap();
    // SAFETY: a system call on a valid C string.
    let fd = unsafe { libc::open(p.as_ptr(), flags, 0o644) };
    if fd < 0 {
        return last_errno();
    }
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    0
}

#[test]
fn a_name_longer_than_name_max_or_a_path_longer_than_path_max_is_enametoolong() {
    let mut d = Diffs::default();
    let long = "n".repeat(256);
    let max = "m".repeat(255);
    let create = libc::O_CREAT | libc::O_WRONLY;
    for (what, rel, flags) in [
        ("create a 256-byte name", long.clone(), create),
        ("open a 256-byte name", long.clone(), libc::O_RDONLY),
        ("create a 255-byte name", max.clone(), create),
        (
            "create under a 256-byte directory name",
            format!("{long}/f"),
            create,
        ),
        (
            "open a 256-byte name in a directory",
            format!("d/{long}"),
            libc::O_RDONLY,
        ),
        (
            "create a 256-byte name in a directory",
            format!("d/{long}"),
            create,
        ),
    ] {
        d.check(
            what,
            |root: &Path| fs::create_dir(root.join("d")).unwrap(),
            |root: &Path| {
                let mut p = root.as_os_str().as_bytes().to_vec();
                p.push(b'/');
                p.extend_from_slice(rel.as_bytes());
                open_errno(&p, flags)
            },
        );
    }
    // A path of 4096 bytes or more (PATH_MAX counts the NUL), made of
    // names that exist.
    d.check(
        "a path longer than PATH_MAX",
        |root: &Path| fs::create_dir(root.join("d")).unwrap(),
        |root: &Path| {
            let mut p = root.as_os_str().as_bytes().to_vec();
            while p.len() < 4200 {
                p.extend_from_slice(b"/d/..");
            }
            let mut create = p.clone();
            create.extend_from_slice(b"/new");
            (
                open_errno(&p, libc::O_RDONLY),
                open_errno(&create, libc::O_CREAT | libc::O_WRONLY),
            )
        },
    );
    d.assert_none();
}

/// Renames `root/a/d` to `root/b/d` as `USER`: the errno.
fn move_dir_as_user(root: &Path) -> (i32, bool) {
    let from = c(&root.join("a/d"));
    let to = c(&root.join("b/d"));
    let e = as_cred(NOBODY, || {
        // SAFETY: a system call on valid C strings.
        err_of(unsafe { libc::rename(from.as_ptr(), to.as_ptr()) }.into())
    });
    (e, root.join("a/d").is_dir())
}

/// Parents `a` and `b` owned by `USER`; `a/d` owned by `owner` with `perm`.
fn parents_with_dir(owner: u32, perm: u32) -> impl Fn(&Path) {
    move |root: &Path| {
        for p in ["a", "b"] {
            fs::create_dir(root.join(p)).unwrap();
            std::os::unix::fs::chown(root.join(p), Some(USER), Some(USER)).unwrap();
        }
        let d = root.join("a/d");
        fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(perm)).unwrap();
    }
}

#[test]
fn moving_a_directory_to_another_parent_needs_write_permission_on_the_directory() {
    let mut d = Diffs::default();
    d.check(
        "moving a root-owned 755 directory",
        parents_with_dir(0, 0o755),
        move_dir_as_user,
    );
    d.check(
        "moving an own 555 directory",
        parents_with_dir(USER, 0o555),
        move_dir_as_user,
    );
    d.check(
        "moving an own 755 directory",
        parents_with_dir(USER, 0o755),
        move_dir_as_user,
    );
    d.check(
        "moving a root-owned 777 directory",
        parents_with_dir(0, 0o777),
        move_dir_as_user,
    );
    // Within one parent `..` stays: no write permission on the directory needed.
    d.check(
        "renaming a root-owned 755 directory in place",
        parents_with_dir(0, 0o755),
        |root: &Path| {
            let from = c(&root.join("a/d"));
            let to = c(&root.join("a/e"));
            as_cred(NOBODY, || {
                // SAFETY: a system call on valid C strings.
                err_of(unsafe { libc::rename(from.as_ptr(), to.as_ptr()) }.into())
            })
        },
    );
    d.assert_none();
}

const OLD: i64 = 1_000_000_000;

/// What one utimensat call asks for a time.
#[derive(Clone, Copy, Debug)]
enum T {
    Now,
    Omit,
    At(i64),
}

fn ts(t: T) -> libc::timespec {
    match t {
        T::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        T::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        T::At(s) => libc::timespec {
            tv_sec: s,
            tv_nsec: 0,
        },
    }
}

/// utimensat on `root/f` as `cred` (`None`: a null times pointer): the
/// errno, and whether atime and mtime are still the old ones.
fn utimens_as(cred: Cred, times: Option<(T, T)>) -> impl Fn(&Path) -> (i32, bool, bool) {
    move |root: &Path| {
        let f = root.join("f");
        let p = c(&f);
        let e = as_cred(cred, || {
            let t = times.map(|(a, m)| [ts(a), ts(m)]);
            let ptr = t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
            // SAFETY: a system call on a valid C string and null or two timespecs.
            err_of(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ptr, 0) }.into())
        });
        let md = fs::metadata(&f).unwrap();
        (e, md.atime() == OLD, md.mtime() == OLD)
    }
}

/// `root/f` owned by `owner` with `perm` and both times old.
fn timed_file(owner: u32, perm: u32) -> impl Fn(&Path) {
    move |root: &Path| {
        let f = root.join("f");
        fs::write(&f, b"data").unwrap();
        std::os::unix::fs::chown(&f, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(perm)).unwrap();
        let old = ts(T::At(OLD));
        let p = c(&f);
        // SAFETY: a system call on a valid C string and two timespecs.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), [old, old].as_ptr(), 0) };
        assert_eq!(r, 0);
    }
}

const TIME_CASES: [Option<(T, T)>; 8] = [
    None,
    Some((T::Now, T::Now)),
    Some((T::Omit, T::Omit)),
    Some((T::Now, T::Omit)),
    Some((T::Omit, T::Now)),
    Some((T::At(OLD + 5), T::At(OLD + 5))),
    Some((T::At(OLD + 5), T::Omit)),
    Some((T::Omit, T::At(OLD + 5))),
];

#[test]
fn utimensat_to_now_needs_ownership_or_write_access_and_explicit_times_need_ownership() {
    let mut d = Diffs::default();
    for (who, owner, perm) in [
        ("a writer who is not the owner", 0, 0o666),
        ("a reader who is not the owner", 0, 0o644),
        ("the owner without write access", USER, 0o444),
    ] {
        for times in TIME_CASES {
            d.check(
                &format!("utimensat {times:?} by {who}"),
                timed_file(owner, perm),
                utimens_as(NOBODY, times),
            );
        }
    }
    d.assert_none();
}

#[test]
fn utimensat_with_one_time_omitted_leaves_that_time_alone() {
    let mut d = Diffs::default();
    for times in TIME_CASES {
        d.check(
            &format!("utimensat {times:?} by root"),
            timed_file(0, 0o644),
            utimens_as(
                Cred {
                    uid: 0,
                    gid: 0,
                    fsetid: true,
                },
                times,
            ),
        );
    }
    d.assert_none();
}

#[test]
fn utimensat_without_following_sets_the_times_of_a_symlink() {
    let mut d = Diffs::default();
    let times = [ts(T::At(OLD)), ts(T::At(OLD + 5))];
    d.check(
        "utimensat AT_SYMLINK_NOFOLLOW on a symlink",
        |root: &Path| {
            fs::write(root.join("target"), b"t").unwrap();
            std::os::unix::fs::symlink("target", root.join("l")).unwrap();
        },
        |root: &Path| {
            let p = c(&root.join("l"));
            // SAFETY: a system call on a valid C string and two timespecs.
            let r = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            let link = fs::symlink_metadata(root.join("l")).unwrap();
            let target = fs::metadata(root.join("target")).unwrap();
            (
                err_of(r.into()),
                (link.atime(), link.mtime()),
                target.mtime() == OLD + 5,
            )
        },
    );
    d.assert_none();
}

#[test]
fn mkdir_symlink_link_and_rename_to_a_name_longer_than_name_max_are_enametoolong() {
    let mut d = Diffs::default();
    let long = "n".repeat(256);
    let setup = |root: &Path| {
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("f"), b"f").unwrap();
    };
    d.check("mkdir, symlink, link, rename", setup, |root: &Path| {
        let f = c(&root.join("f"));
        let to = c(&root.join(&long));
        let sub = c(&root.join("d").join(&long));
        // SAFETY: system calls on valid C strings.
        unsafe {
            [
                err_of(libc::mkdir(to.as_ptr(), 0o755).into()),
                err_of(libc::mkdir(sub.as_ptr(), 0o755).into()),
                err_of(libc::symlink(f.as_ptr(), to.as_ptr()).into()),
                err_of(libc::link(f.as_ptr(), to.as_ptr()).into()),
                err_of(libc::rename(f.as_ptr(), to.as_ptr()).into()),
                err_of(libc::rename(f.as_ptr(), sub.as_ptr()).into()),
                err_of(libc::unlink(to.as_ptr()).into()),
            ]
        }
    });
    d.assert_none();
}

/// Whether `p` carries file capabilities.
fn has_caps(p: &Path) -> bool {
    let cp = c(p);
    // SAFETY: a system call on valid C strings and a null, empty buffer.
    let r = unsafe {
        libc::getxattr(
            cp.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    r >= 0
}

/// `root/f`, open to all, with file capabilities (CAP_FSETID permitted).
fn file_with_caps(root: &Path) {
    let f = root.join("f");
    fs::write(&f, b"data").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << CAP_FSETID, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    let cp = c(&f);
    // SAFETY: a system call on valid C strings and a buffer of its length.
    let r = unsafe {
        libc::setxattr(
            cp.as_ptr(),
            c"security.capability".as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn truncation_and_a_write_remove_file_capabilities() {
    let mut d = Diffs::default();
    let root_cred = Cred {
        uid: 0,
        gid: 0,
        fsetid: true,
    };
    for (how, cred) in [
        (Truncate::Path, root_cred),
        (Truncate::Open, root_cred),
        (Truncate::Fd, NOBODY),
        (Truncate::Open, NOBODY),
    ] {
        d.check(
            &format!("{how:?} truncation by {cred:?}"),
            file_with_caps,
            |root: &Path| {
                let (e, _) = truncate_as(cred, how)(root);
                (e, has_caps(&root.join("f")))
            },
        );
    }
    for cred in [NOBODY, root_cred] {
        d.check(
            &format!("a write by {cred:?}"),
            file_with_caps,
            |root: &Path| {
                let (e, _) = write_as(cred)(root);
                (e, has_caps(&root.join("f")))
            },
        );
    }
    d.assert_none();
}
