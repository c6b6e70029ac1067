//! Opening paths of a volume beneath its root, never through a symlink.
//!
//! An app names every path of its volume and may swap a file or a directory
//! for a symlink at any moment, also while volfs scans, diffs or applies. A
//! path opened the usual way follows that symlink, so a swap at the right
//! moment would put a host file's bytes into a delta, or let an apply write
//! outside the volume. Every open volfs makes in a backing directory on
//! behalf of a volume therefore resolves through [`VolumeRoot::open`]:
//! `openat2(2)` from a descriptor of the volume root with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, so the
//! kernel refuses any component that is a symlink (`ELOOP`) or leads out of
//! the root (`EXDEV`), atomically with the lookup. Operations on a name use
//! the `*at` calls relative to a parent directory opened this way, and never
//! follow a final symlink.
//!
//! A path that turns out to be a symlink, to be gone, or to be something
//! other than what the caller expected has *changed* ([`changed`]): a scan
//! leaves it for the next round, a diff sends zeros for the bytes it cannot
//! read (under the hash of those zeros, so the delta stays self-consistent;
//! the next round carries what the path is then), and an apply (whose target
//! no app writes to) fails cleanly.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys;

/// A descriptor of a volume's root directory, to resolve paths beneath it.
#[derive(Debug)]
pub struct VolumeRoot {
    fd: OwnedFd,
    path: PathBuf,
}

/// Whether an error from resolving a path beneath a root means the path
/// changed while it was being read: gone (`ENOENT`), a symlink or a
/// non-directory where a directory was (`ELOOP`, `ENOTDIR`), out of the
/// root (`EXDEV`), or not the kind of object expected (`ENXIO`, `EISDIR`).
pub fn changed(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR | libc::EXDEV | libc::ENXIO | libc::EISDIR)
    )
}

/// The error for an object that is not of the kind expected (it [`changed`]).
pub fn not_expected() -> io::Error {
    io::Error::from_raw_os_error(libc::ENXIO)
}

impl VolumeRoot {
    /// Opens the root directory at `path` (trusted: the operator names it).
    pub fn new(path: &Path) -> io::Result<Self> {
        let c = sys::cstr(path.as_os_str())?;
        let fd = sys::open(&c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok(VolumeRoot {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Where `rel` is, for messages (never opened by this path).
    pub fn abs(&self, rel: &[u8]) -> PathBuf {
        crate::scan::abs(&self.path, rel)
    }

    /// The root's descriptor (`O_PATH`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` (a path relative to the root, `""` for the root itself)
    /// with `flags`, never following a symlink at any component and never
    /// leaving the root. A final symlink opens (as itself) only with
    /// `O_PATH | O_NOFOLLOW`; otherwise it fails with `ELOOP`.
    pub fn open(&self, rel: &[u8], flags: i32) -> io::Result<OwnedFd> {
        let path = if rel.is_empty() {
            c".".to_owned()
        } else {
            CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?
        };
        openat2_beneath(self.fd.as_fd(), &path, flags)
    }

    /// Opens the regular file `rel` for reading; `Ok(None)` when it
    /// [`changed`] (gone, a symlink, no longer a regular file).
    pub fn read_file(&self, rel: &[u8]) -> io::Result<Option<fs::File>> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = match self.open(rel, flags | libc::O_NOATIME) {
            // O_NOATIME needs ownership (or CAP_FOWNER).
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.open(rel, flags),
            r => r,
        };
        match fd {
            Ok(fd) => {
                let f = fs::File::from(fd);
                Ok(f.metadata()?.is_file().then_some(f))
            }
            Err(e) if changed(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The parent directory of `rel` (opened beneath the root) and the final
    /// name, for the `*at` calls. The root itself is `(root, ".")`.
    pub fn parent(&self, rel: &[u8]) -> io::Result<(OwnedFd, CString)> {
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None if rel.is_empty() => (&b""[..], &b"."[..]),
            None => (&b""[..], rel),
        };
        let fd = self.open(dir, libc::O_PATH | libc::O_DIRECTORY)?;
        let name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok((fd, name))
    }
}

/// `openat2(dir, path, flags | O_CLOEXEC)` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`.
pub fn openat2_beneath(dir: BorrowedFd<'_>, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: open_how is three integers; all zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the
        // size passed, and `dir` is a live descriptor.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: openat2 returned a fresh descriptor nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a rename elsewhere raced the lookup; the kernel asks to retry.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

/// Opens `name` in `dir` for its extended attributes if it is a regular
/// file or a directory (the only objects that hold `user.*` xattrs);
/// `Ok(None)` for anything else. Never follows a symlink, and never opens a
/// FIFO or a device for I/O.
pub fn open_for_xattrs(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<OwnedFd>> {
    let fd = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let flags = match sys::fstat(fd.as_raw_fd())?.st_mode & libc::S_IFMT {
        libc::S_IFREG => libc::O_RDONLY | libc::O_NONBLOCK,
        libc::S_IFDIR => libc::O_RDONLY | libc::O_DIRECTORY,
        _ => return Ok(None),
    };
    // Reopening through /proc/self/fd opens the very object `fd` holds.
    sys::open(&sys::proc_path(fd.as_raw_fd()), flags, 0).map(Some)
}
