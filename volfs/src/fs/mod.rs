//! The passthrough FUSE filesystem over a backing directory.
//!
//! Each inode the kernel knows is held as an `O_PATH` fd of the backing
//! object (as libfuse's `passthrough_hp` does), so renames and hard links
//! need no path bookkeeping and a backing inode number cannot be reused while
//! the kernel still refers to it. FUSE inode numbers are the backing ones,
//! with the backing root swapped with 1 (the FUSE root).
//!
//! Every write marks its blocks in the [`DirtyMap`] *after* it reached the
//! backing file; a new inode is marked whole; truncation marks the range it
//! cut or grew. Open files are plain fds handed to the kernel as file
//! handles. Permissions are the kernel's job (`default_permissions`); the
//! daemon runs as root and gives new objects the caller's owner. Dropping
//! setuid/setgid on write, truncate and chown is the daemon's job
//! (`FUSE_HANDLE_KILLPRIV_V2`), decided by the caller's `CAP_FSETID` and
//! groups as the kernel would (`caller`).
//!
//! POSIX and BSD locks are not sent to the daemon: without `FUSE_POSIX_LOCKS`
//! the kernel keeps them itself, which is exact for a volume mounted on one
//! host (SQLite's locking works as on ext4).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileHandle, FileType, INodeNo, ReplyXattr, Request, TimeOrNow};

use self::caller::{Caller, setid_bits_to_drop};
pub use self::quota::Quota;
use crate::dirty::DirtyMap;
use crate::scan::META_DIR;
use crate::sys;
use crate::throttle::Pacer;

/// How long the kernel may cache entries and attributes. Every change goes
/// through this daemon, so the cache is never stale for long reasons.
const TTL: Duration = Duration::from_secs(10);

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

struct Inode {
    fd: OwnedFd,
    nlookup: AtomicU64,
}

struct DirEnt {
    name: Vec<u8>,
    ino: u64,
    kind: FileType,
}

/// A page-cache writeback at least this large starts the backing file's
/// writeback at once (see `write`); smaller ones are left to the kernel, so
/// random small writes are not pushed to the disk one by one.
const EARLY_WRITEBACK: usize = 256 << 10;

/// The filesystem; see the module docs.
pub struct VolFs {
    root: PathBuf,
    root_ino: u64,
    dev: u64,
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEnt>>>>,
    next_dir: AtomicU64,
    dirty: Arc<DirtyMap>,
    quota: Option<Quota>,
    pacer: Option<Pacer>,
    /// Flushes of the mount that volfs makes itself (a round's refresh) in
    /// progress. While one runs no writeback of the mount starts the disk's
    /// early (the app's own fsyncs in that window lose the hint too).
    own_flushes: Arc<AtomicUsize>,
}

impl std::fmt::Debug for VolFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolFs")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

type R<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn mode_of(t: &std::fs::FileType) -> u32 {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        libc::S_IFDIR
    } else if t.is_symlink() {
        libc::S_IFLNK
    } else if t.is_fifo() {
        libc::S_IFIFO
    } else if t.is_char_device() {
        libc::S_IFCHR
    } else if t.is_block_device() {
        libc::S_IFBLK
    } else if t.is_socket() {
        libc::S_IFSOCK
    } else {
        libc::S_IFREG
    }
}

/// Flags for reopening a file: with the writeback cache the kernel may read
/// from a file opened write-only and handles O_APPEND itself; O_TRUNC is
/// done by [`VolFs::truncate_marked`] so the cut range is marked.
fn open_flags(flags: i32) -> i32 {
    // O_NOFOLLOW: the kernel resolved the path; reopening through the
    // /proc/self/fd magic link must follow it.
    let mut f =
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_NOFOLLOW);
    if f & libc::O_ACCMODE == libc::O_WRONLY {
        f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
    }
    f & !libc::O_APPEND
}

impl VolFs {
    /// A filesystem over `root` that marks writes in `dirty`.
    pub fn new(root: &Path, dirty: Arc<DirtyMap>) -> io::Result<Self> {
        let fd = sys::open_path(root)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let mut inodes = HashMap::new();
        inodes.insert(
            1,
            Arc::new(Inode {
                fd,
                nlookup: AtomicU64::new(2),
            }),
        );
        Ok(VolFs {
            root: root.to_path_buf(),
            root_ino: st.st_ino,
            dev: st.st_dev,
            inodes: RwLock::new(inodes),
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
            dirty,
            quota: None,
            pacer: None,
            own_flushes: Arc::default(),
        })
    }

    /// Limits the sum of the files' sizes (see [`quota`]).
    pub fn with_quota(mut self, q: Quota) -> Self {
        self.quota = Some(q);
        self
    }

    /// The count of volfs's own flushes in progress, for the mount to raise
    /// around each (see `write`).
    pub fn own_flushes(&self) -> Arc<AtomicUsize> {
        self.own_flushes.clone()
    }

    /// Whether a writeback should start the backing file's own at once: a
    /// large one, and not one of volfs's own flushes (a round only reads
    /// the backing files back; the disk has no part in it).
    fn early_writeback(&self, len: usize) -> bool {
        len >= EARLY_WRITEBACK && self.own_flushes.load(Ordering::Relaxed) == 0
    }

    /// Answers writes through `pacer`, which holds the replies while a
    /// handover throttles the app (see [`crate::throttle`]).
    pub fn with_pacer(mut self, pacer: Pacer) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Answers a write of `len` bytes that landed.
    fn written(&self, reply: fuser::ReplyWrite, len: u32) {
        match &self.pacer {
            Some(p) => p.written(reply, len),
            None => reply.written(len),
        }
    }

    /// A file `st` grows to at least `end` bytes: within the quota, or ENOSPC.
    fn grow(&self, st: &libc::stat, end: u64) -> R<()> {
        match &self.quota {
            Some(q) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                q.grow_to(st.st_ino, st.st_size as u64, end)
            }
            _ => Ok(()),
        }
    }

    /// A file `st` is set to `size` bytes: within the quota, or ENOSPC.
    fn resize(&self, st: &libc::stat, size: u64) -> R<()> {
        match &self.quota {
            Some(q) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                q.set_size(st.st_ino, st.st_size as u64, size)
            }
            _ => Ok(()),
        }
    }

    /// The entry `name` in `dir` if it is a regular file whose last name
    /// an unlink or a rename over it takes: its room comes back after.
    fn last_name(&self, dir: RawFd, name: &std::ffi::CStr) -> Option<libc::stat> {
        self.quota.as_ref()?;
        let st = sys::statat(dir, name).ok()?;
        (st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1).then_some(st)
    }

    /// A handle `fd` of a file was opened (the quota keeps its size while
    /// it is open).
    fn handle_opened(&self, fd: RawFd) {
        if let Some(q) = &self.quota {
            if let Ok(st) = sys::fstat(fd) {
                if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                    q.opened(st.st_ino);
                }
            }
        }
    }

    /// Handle `fd` is about to close.
    fn handle_closing(&self, fd: RawFd) {
        if let Some(q) = &self.quota {
            if let Ok(st) = sys::fstat(fd) {
                if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                    q.closed(st.st_ino, st.st_size as u64);
                }
            }
        }
    }

    fn freed(&self, st: Option<libc::stat>) {
        if let (Some(q), Some(st)) = (&self.quota, st) {
            q.removed(st.st_ino, st.st_size as u64);
        }
    }

    /// Backing inode ↔ FUSE inode (the same swap both ways).
    fn swap(&self, ino: u64) -> u64 {
        if ino == self.root_ino {
            1
        } else if ino == 1 {
            self.root_ino
        } else {
            ino
        }
    }

    fn inode(&self, ino: INodeNo) -> R<Arc<Inode>> {
        self.inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ESTALE)
    }

    fn attr(&self, st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.swap(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// The metadata directory is invisible and cannot be created.
    fn hidden(&self, parent: INodeNo, name: &OsStr) -> bool {
        parent == INodeNo::ROOT && name.as_bytes() == META_DIR.as_bytes()
    }

    /// Looks `name` up in `parent`, counting one kernel reference.
    fn lookup_child(&self, parent: INodeNo, name: &OsStr) -> R<FileAttr> {
        if self.hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        let p = self.inode(parent)?;
        let c = sys::cstr(name).map_err(errno)?;
        let fd =
            sys::openat(p.fd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(errno)?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
        if st.st_dev != self.dev {
            tracing::warn!(?name, "a mount inside the backing directory is not served");
            return Err(Errno::EXDEV);
        }
        let ino = self.swap(st.st_ino);
        let mut map = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&ino) {
            Some(i) => {
                i.nlookup.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                map.insert(
                    ino,
                    Arc::new(Inode {
                        fd,
                        nlookup: AtomicU64::new(1),
                    }),
                );
            }
        }
        Ok(self.attr(&st))
    }

    fn forget_one(&self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        let mut map = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = map.get(&ino) {
            let prev = i
                .nlookup
                .fetch_sub(n.min(i.nlookup.load(Ordering::Relaxed)), Ordering::Relaxed);
            if prev <= n {
                map.remove(&ino);
            }
        }
    }

    /// Gives a freshly created object the caller's owner. Where the parent
    /// is setgid the backing filesystem already chose the group.
    fn own(&self, fd: RawFd, req: &Request, parent_setgid: bool, mode: u32) -> R<()> {
        let gid = if parent_setgid { u32::MAX } else { req.gid() };
        if req.uid() != 0 || gid != 0 && gid != u32::MAX {
            sys::fchown_fd(fd, req.uid(), gid).map_err(errno)?;
            if mode & 0o6000 != 0 && mode & libc::S_IFMT != libc::S_IFLNK {
                // chown clears setuid/setgid; the caller asked for them.
                sys::chmod_fd(fd, mode & 0o7777).map_err(errno)?;
            }
        }
        Ok(())
    }

    /// What creating `name` in `parent` needs: the parent, whether it is
    /// setgid, the name as a C string. The metadata directory cannot be made.
    fn new_in(&self, parent: INodeNo, name: &OsStr) -> R<(Arc<Inode>, bool, std::ffi::CString)> {
        if self.hidden(parent, name) {
            return Err(Errno::EPERM);
        }
        let p = self.inode(parent)?;
        let setgid = self.parent_setgid(&p)?;
        Ok((p, setgid, sys::cstr(name).map_err(errno)?))
    }

    /// `unlink` (`flags` 0) or `rmdir` (`AT_REMOVEDIR`).
    fn remove(&self, parent: INodeNo, name: &OsStr, flags: i32) -> R<()> {
        if self.hidden(parent, name) {
            return Err(Errno::EPERM);
        }
        let p = self.inode(parent)?;
        let c = sys::cstr(name).map_err(errno)?;
        let last = self.last_name(p.fd.as_raw_fd(), &c);
        sys::unlinkat(p.fd.as_raw_fd(), &c, flags).map_err(errno)?;
        self.freed(last);
        self.dirty.mark_metadata();
        Ok(())
    }

    fn parent_setgid(&self, p: &Inode) -> R<bool> {
        Ok(sys::fstat(p.fd.as_raw_fd()).map_err(errno)?.st_mode & libc::S_ISGID != 0)
    }

    /// Finishes a create-like operation: owner, lookup, metadata mark.
    fn created(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        setgid: bool,
        mode: u32,
    ) -> R<FileAttr> {
        let p = self.inode(parent)?;
        let c = sys::cstr(name).map_err(errno)?;
        let fd =
            sys::openat(p.fd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(errno)?;
        self.own(fd.as_raw_fd(), req, setgid, mode)?;
        drop(fd);
        let attr = self.lookup_child(parent, name)?;
        self.dirty.mark_all(self.swap(attr.ino.0));
        Ok(attr)
    }

    /// What the kernel expects of a filesystem with `FUSE_HANDLE_KILLPRIV_V2`
    /// when a caller without `CAP_FSETID` writes to or truncates a regular
    /// file: drop setuid, setgid (when group-executable, or when the caller
    /// is not in the file's group: `in_group`) and file capabilities. The
    /// daemon writes as root, so the backing filesystem would not do it by
    /// itself.
    fn kill_privs(&self, fd: RawFd, in_group: impl FnOnce(u32) -> bool) -> R<()> {
        let st = sys::fstat(fd).map_err(errno)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(());
        }
        let mode = st.st_mode & 0o7777;
        let drop = setid_bits_to_drop(mode, st.st_gid, in_group);
        if drop != 0 {
            sys::chmod_fd(fd, mode & !drop).map_err(errno)?;
            self.dirty.mark_metadata();
        }
        self.kill_caps(fd)
    }

    /// Removes file capabilities, as any write or truncation does.
    fn kill_caps(&self, fd: RawFd) -> R<()> {
        let p = sys::proc_path(fd);
        match sys::xattr::remove(&p, c"security.capability", true) {
            Ok(()) => self.dirty.mark_metadata(),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) => {}
            Err(e) => return Err(errno(e)),
        }
        Ok(())
    }

    /// Before truncating `fd` for `req`: drops setuid/setgid unless the
    /// caller holds `CAP_FSETID`, and file capabilities.
    fn kill_privs_for_truncate(&self, req: &Request, fd: RawFd) -> R<()> {
        let st = sys::fstat(fd).map_err(errno)?;
        if st.st_mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
            return self.kill_caps(fd);
        }
        let caller = Caller::of(req);
        if caller.fsetid() {
            self.kill_caps(fd)
        } else {
            self.kill_privs(fd, |g| caller.in_group(g))
        }
    }

    /// Changes the owner of `fd` for `req`. The backing chown, made by
    /// root, drops setuid and a group-executable setgid; a setgid that is
    /// not group-executable goes too when the caller is neither in the
    /// file's group nor holds `CAP_FSETID` (as the kernel's `chown_common`).
    fn chown_for(&self, req: &Request, fd: RawFd, uid: u32, gid: u32) -> R<()> {
        let st = sys::fstat(fd).map_err(errno)?;
        let mode = st.st_mode & 0o7777;
        let drop_setgid = st.st_mode & libc::S_IFMT != libc::S_IFDIR
            && mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID
            && {
                let caller = Caller::of(req);
                !caller.fsetid() && !caller.in_group(st.st_gid)
            };
        sys::fchown_fd(fd, uid, gid).map_err(errno)?;
        if drop_setgid {
            let now = sys::fstat(fd).map_err(errno)?.st_mode & 0o7777;
            sys::chmod_fd(fd, now & !libc::S_ISGID).map_err(errno)?;
        }
        Ok(())
    }

    /// Truncates an open file to zero, marking what was cut.
    fn truncate_marked(&self, ino: INodeNo, fd: RawFd) -> R<()> {
        let st = sys::fstat(fd).map_err(errno)?;
        self.resize(&st, 0)?;
        sys::ftruncate(fd, 0).map_err(errno)?;
        self.dirty
            .mark_range(self.swap(ino.0), 0, st.st_size as u64);
        self.dirty.mark_metadata();
        Ok(())
    }

    fn do_setattr(&self, req: &Request, ino: INodeNo, a: SetAttr) -> R<FileAttr> {
        let SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        } = a;
        let i = self.inode(ino)?;
        let fd = i.fd.as_raw_fd();
        if uid.is_some() || gid.is_some() {
            self.chown_for(req, fd, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(m) = mode {
            sys::chmod_fd(fd, m & 0o7777).map_err(errno)?;
        }
        if let Some(s) = size {
            self.kill_privs_for_truncate(req, fd)?;
            let st = sys::fstat(fd).map_err(errno)?;
            self.resize(&st, s)?;
            let old = st.st_size as u64;
            match fh {
                Some(h) => sys::ftruncate(h.0 as RawFd, s),
                None => sys::truncate_fd(fd, s),
            }
            .map_err(errno)?;
            self.dirty
                .mark_range(self.swap(ino.0), old.min(s), old.abs_diff(s));
        }
        if atime.is_some() || mtime.is_some() {
            let conv = |t: Option<TimeOrNow>| -> sys::TimeSpec {
                t.map(|t| match t {
                    TimeOrNow::Now => None,
                    TimeOrNow::SpecificTime(st) => Some(match st.duration_since(UNIX_EPOCH) {
                        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                        Err(e) => {
                            let d = e.duration();
                            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
                            if n == 0 {
                                (-s, 0)
                            } else {
                                (-s - 1, 1_000_000_000 - n)
                            }
                        }
                    }),
                })
            };
            sys::utimens_fd(fd, conv(atime), conv(mtime)).map_err(errno)?;
        }
        self.dirty.mark_metadata();
        let st = sys::fstat(fd).map_err(errno)?;
        Ok(self.attr(&st))
    }

    fn read_dir(&self, ino: INodeNo) -> R<Vec<DirEnt>> {
        let i = self.inode(ino)?;
        let path = format!("/proc/self/fd/{}", i.fd.as_raw_fd());
        let mut out = vec![
            DirEnt {
                name: b".".to_vec(),
                ino: ino.0,
                kind: FileType::Directory,
            },
            DirEnt {
                name: b"..".to_vec(),
                ino: 1,
                kind: FileType::Directory,
            },
        ];
        for e in std::fs::read_dir(path).map_err(errno)? {
            let e = e.map_err(errno)?;
            let name = e.file_name().into_encoded_bytes();
            if ino == INodeNo::ROOT && name == META_DIR.as_bytes() {
                continue;
            }
            let kind = file_type(mode_of(&e.file_type().map_err(errno)?));
            out.push(DirEnt {
                name,
                ino: self.swap(e.ino()),
                kind,
            });
        }
        Ok(out)
    }

    fn dir_handle(&self, fh: FileHandle) -> R<Arc<Vec<DirEnt>>> {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn xattr_reply(&self, ino: INodeNo, name: Option<&OsStr>, size: u32, reply: ReplyXattr) {
        let r = (|| {
            let i = self.inode(ino)?;
            let p = sys::proc_path(i.fd.as_raw_fd());
            let n = name.map(sys::cstr).transpose().map_err(errno)?;
            let mut buf = vec![0u8; size as usize];
            let len = sys::xattr::raw(&p, n.as_deref(), &mut buf).map_err(errno)?;
            buf.truncate(len);
            Ok::<_, Errno>((len, buf))
        })();
        match r {
            Ok((len, _)) if size == 0 => reply.size(len as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }
}

/// The changes of one `setattr` request.
struct SetAttr {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

use std::os::fd::AsFd;

mod caller;
mod ops;
pub mod quota;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_large_writeback_outside_volfs_own_flushes_reaches_the_disk_early() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VolFs::new(dir.path(), Arc::new(DirtyMap::new(64 << 10))).unwrap();
        assert!(!fs.early_writeback(EARLY_WRITEBACK - 1), "a small write");
        assert!(fs.early_writeback(EARLY_WRITEBACK));
        let own = fs.own_flushes();
        own.fetch_add(1, Ordering::Relaxed);
        assert!(!fs.early_writeback(1 << 20), "during a round's flush");
        own.fetch_sub(1, Ordering::Relaxed);
        assert!(fs.early_writeback(1 << 20));
    }
}
