//! Thin safe wrappers over the `*at` system calls the passthrough filesystem
//! and the apply path need. Every function returns `io::Result` with the raw
//! errno preserved, so the FUSE layer can hand it to the kernel unchanged.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Turns a `-1` return into the thread's errno.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A name as a C string; a name with an interior NUL is `EINVAL`.
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: reopens or addresses the object behind an `O_PATH` fd.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

const EMPTY: &CStr = c"";

/// `openat(dir, name, flags, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string and `dir` a live fd.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    // SAFETY: openat returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `open(path, flags)` for an absolute path (e.g. a `/proc/self/fd` path).
pub fn open(path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: open returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `path` as an `O_PATH` handle without following a final symlink.
pub fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    open(&c, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: stat of the object itself.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of a stat; EMPTY is NUL-terminated.
    check(unsafe {
        libc::fstatat(
            fd,
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn statat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of a stat; `name` is NUL-terminated.
    check(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// `linkat(olddir, oldname, newdir, newname, 0)`: never follows a symlink.
pub fn linkat(olddir: RawFd, oldname: &CStr, newdir: RawFd, newname: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated.
    check(unsafe { libc::linkat(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), 0) }).map(drop)
}

/// `mkdirat`.
pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

/// `mknodat`.
pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }).map(drop)
}

/// `symlinkat(target, dir, name)`.
pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// `linkat(fd, "", dir, name, AT_EMPTY_PATH)`: a new name for the object behind `fd`.
pub fn link_fd(fd: RawFd, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    check(unsafe { libc::linkat(fd, EMPTY.as_ptr(), dir, name.as_ptr(), libc::AT_EMPTY_PATH) })
        .map(drop)
}

/// `unlinkat`.
pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

/// `renameat2`.
pub fn renameat2(
    olddir: RawFd,
    oldname: &CStr,
    newdir: RawFd,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated.
    check(unsafe { libc::renameat2(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), flags) })
        .map(drop)
}

/// `readlinkat(fd, "")`: the target of the symlink behind an `O_PATH` fd.
pub fn readlink_fd(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = check_size(unsafe {
        libc::readlinkat(fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`; `u32::MAX` keeps a value.
pub fn fchown_fd(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: EMPTY is NUL-terminated.
    check(unsafe {
        libc::fchownat(
            fd,
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `chmod` of the object behind an fd, through its `/proc/self/fd` path.
pub fn chmod_fd(fd: RawFd, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// `truncate` of the object behind an fd, through its `/proc/self/fd` path.
pub fn truncate_fd(fd: RawFd, size: u64) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated.
    check(unsafe { libc::truncate(p.as_ptr(), size as libc::off_t) }).map(drop)
}

/// `ftruncate` of an open file.
pub fn ftruncate(fd: RawFd, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd.
    check(unsafe { libc::ftruncate(fd, size as libc::off_t) }).map(drop)
}

/// A time for [`utimens_fd`]: `None` leaves it, `Some(None)` is now.
pub type TimeSpec = Option<Option<(i64, u32)>>;

fn timespec(t: TimeSpec) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some((s, ns))) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns as i64,
        },
    }
}

/// Sets atime/mtime of the object behind an fd (an `O_PATH` fd of a
/// symlink sets the symlink's own times).
pub fn utimens_fd(fd: RawFd, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: EMPTY is NUL-terminated and `ts` holds two timespecs.
    check(unsafe { libc::utimensat(fd, EMPTY.as_ptr(), ts.as_ptr(), libc::AT_EMPTY_PATH) })
        .map(drop)
}

/// Sets atime/mtime of `name` in `dir` without following a symlink.
pub fn utimensat_nofollow(dir: RawFd, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
    let ts = [timespec(None), timespec(Some(Some(mtime)))];
    // SAFETY: `name` is NUL-terminated and `ts` holds two timespecs.
    check(unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// `pread` that retries on short reads until `buf` is full or EOF; returns bytes read.
pub fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is valid for writes of its length.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match check_size(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `pwrite` of the whole buffer.
pub fn pwrite_all(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is valid for reads of its length.
        let n = unsafe {
            libc::pwrite(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match check_size(n) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Closes a raw fd that was handed to the kernel as a file handle.
pub fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and does not use it again.
    unsafe { libc::close(fd) };
}

/// `fsync` or `fdatasync`.
pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on an fd.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

/// Starts the disk writeback of a range of a file's dirty pages without
/// waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
pub fn start_writeback(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: a plain syscall on an fd.
    check(unsafe {
        libc::sync_file_range(
            fd,
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    })
    .map(drop)
}

/// `fallocate`.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd.
    check(unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) }).map(drop)
}

/// `lseek`.
pub fn lseek(fd: RawFd, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on an fd.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `copy_file_range` between two open files.
pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
) -> io::Result<usize> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    // SAFETY: the offsets point at live locals.
    check_size(
        unsafe { libc::copy_file_range(fd_in, &mut oi, fd_out, &mut oo, len as usize, 0) }
            as libc::ssize_t,
    )
}

/// `statvfs` of a path.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = cstr(path.as_os_str())?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is valid for writes; `c` is NUL-terminated.
    check(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: statvfs succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// `syncfs` of the filesystem holding `fd`.
pub fn syncfs(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an fd.
    check(unsafe { libc::syncfs(fd) }).map(drop)
}

/// Extended attributes of a path (`l*xattr`: never follows a final symlink, so
/// `/proc/self/fd/N` paths must not be passed here).
pub mod xattr {
    use super::*;

    fn size_loop(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
        loop {
            let need = check_size(call(std::ptr::null_mut(), 0))?;
            if need == 0 {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; need];
            match check_size(call(buf.as_mut_ptr().cast(), buf.len())) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Raw `getxattr`/`listxattr` with a caller buffer (size 0 asks for the size).
    pub fn raw(path: &CStr, name: Option<&CStr>, buf: &mut [u8]) -> io::Result<usize> {
        let (p, l) = if buf.is_empty() {
            (std::ptr::null_mut(), 0)
        } else {
            (buf.as_mut_ptr().cast::<libc::c_void>(), buf.len())
        };
        // SAFETY: strings are NUL-terminated; `p`/`l` describe `buf` or nothing.
        check_size(unsafe {
            match name {
                Some(n) => libc::getxattr(path.as_ptr(), n.as_ptr(), p, l),
                None => libc::listxattr(path.as_ptr(), p.cast(), l),
            }
        })
    }

    /// `setxattr` / `lsetxattr`.
    pub fn set(path: &CStr, name: &CStr, value: &[u8], flags: i32, follow: bool) -> io::Result<()> {
        // SAFETY: strings are NUL-terminated and `value` is a valid slice.
        check(unsafe {
            if follow {
                libc::setxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            } else {
                libc::lsetxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            }
        })
        .map(drop)
    }

    /// Names of the object behind an open (not `O_PATH`) fd, NUL-separated.
    pub fn flist(fd: RawFd) -> io::Result<Vec<u8>> {
        // SAFETY: `buf`/`len` describe a valid buffer.
        size_loop(|buf, len| unsafe { libc::flistxattr(fd, buf.cast(), len) })
    }

    /// One value of the object behind an open fd.
    pub fn fget(fd: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
        // SAFETY: `name` is NUL-terminated and `buf`/`len` describe a valid buffer.
        size_loop(|buf, len| unsafe { libc::fgetxattr(fd, name.as_ptr(), buf, len) })
    }

    /// `fsetxattr`.
    pub fn fset(fd: RawFd, name: &CStr, value: &[u8]) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and `value` is a valid slice.
        check(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
            .map(drop)
    }

    /// `fremovexattr`.
    pub fn fremove(fd: RawFd, name: &CStr) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        check(unsafe { libc::fremovexattr(fd, name.as_ptr()) }).map(drop)
    }

    /// `removexattr` / `lremovexattr`.
    pub fn remove(path: &CStr, name: &CStr, follow: bool) -> io::Result<()> {
        // SAFETY: strings are NUL-terminated.
        check(unsafe {
            if follow {
                libc::removexattr(path.as_ptr(), name.as_ptr())
            } else {
                libc::lremovexattr(path.as_ptr(), name.as_ptr())
            }
        })
        .map(drop)
    }
}
