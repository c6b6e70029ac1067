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
//! daemon runs as root and gives new objects the caller's owner.
//!
//! POSIX and BSD locks are not sent to the daemon: without `FUSE_POSIX_LOCKS`
//! the kernel keeps them itself, which is exact for a volume mounted on one
//! host (SQLite's locking works as on ext4).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::dirty::DirtyMap;
use crate::scan::META_DIR;
use crate::sys;

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

/// The filesystem; see the module docs.
pub struct VolFs {
    root: PathBuf,
    root_ino: u64,
    dev: u64,
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEnt>>>>,
    next_dir: AtomicU64,
    dirty: Arc<DirtyMap>,
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
        })
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
    /// when an unprivileged caller writes or truncates: drop setuid, setgid
    /// (when group-executable) and file capabilities. The daemon writes as
    /// root, so the backing filesystem would not do it by itself.
    fn kill_privs(&self, fd: RawFd) -> R<()> {
        let st = sys::fstat(fd).map_err(errno)?;
        let mut mode = st.st_mode & 0o7777;
        if mode & libc::S_ISUID != 0 {
            mode &= !libc::S_ISUID;
        }
        if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode != st.st_mode & 0o7777 {
            sys::chmod_fd(fd, mode).map_err(errno)?;
            self.dirty.mark_metadata();
        }
        let p = sys::proc_path(fd);
        match sys::xattr::remove(&p, c"security.capability", true) {
            Ok(()) => self.dirty.mark_metadata(),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) => {}
            Err(e) => return Err(errno(e)),
        }
        Ok(())
    }

    /// Truncates an open file to zero, marking what was cut.
    fn truncate_marked(&self, ino: INodeNo, fd: RawFd) -> R<()> {
        let st = sys::fstat(fd).map_err(errno)?;
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
            sys::fchown_fd(fd, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)).map_err(errno)?;
        }
        if let Some(m) = mode {
            sys::chmod_fd(fd, m & 0o7777).map_err(errno)?;
        }
        if let Some(s) = size {
            if req.uid() != 0 {
                self.kill_privs(fd)?;
            }
            let old = sys::fstat(fd).map_err(errno)?.st_size as u64;
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
            let st = sys::fstat(fd).map_err(errno)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(Errno::from_i32(libc::EOPNOTSUPP));
            }
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

impl Filesystem for VolFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_WRITEBACK_CACHE,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_SPLICE_READ,
            // We clear setuid/setgid/capabilities ourselves (see `kill_privs`),
            // so the kernel sets SB_NOSEC and stops asking for
            // security.capability before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "kernel lacks capability");
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_child(parent, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_one(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = match fh {
            Some(h) => sys::fstat(h.0 as RawFd).map_err(errno),
            None => self
                .inode(ino)
                .and_then(|i| sys::fstat(i.fd.as_raw_fd()).map_err(errno)),
        };
        match r {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(
            req,
            ino,
            SetAttr {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                fh,
            },
        ) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .inode(ino)
            .and_then(|i| sys::readlink_fd(i.fd.as_raw_fd()).map_err(errno))
        {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            if self.hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let p = self.inode(parent)?;
            let setgid = self.parent_setgid(&p)?;
            let c = sys::cstr(name).map_err(errno)?;
            let mode = mode & !(umask & 0o777);
            sys::mknodat(p.fd.as_raw_fd(), &c, mode, u64::from(rdev)).map_err(errno)?;
            self.created(req, parent, name, setgid, mode)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            if self.hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let p = self.inode(parent)?;
            let setgid = self.parent_setgid(&p)?;
            let c = sys::cstr(name).map_err(errno)?;
            let mode = (mode & 0o7777) & !(umask & 0o777);
            sys::mkdirat(p.fd.as_raw_fd(), &c, mode).map_err(errno)?;
            self.created(req, parent, name, setgid, mode | libc::S_IFDIR)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            if self.hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let p = self.inode(parent)?;
            let c = sys::cstr(name).map_err(errno)?;
            sys::unlinkat(p.fd.as_raw_fd(), &c, 0).map_err(errno)?;
            self.dirty.mark_metadata();
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            if self.hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let p = self.inode(parent)?;
            let c = sys::cstr(name).map_err(errno)?;
            sys::unlinkat(p.fd.as_raw_fd(), &c, libc::AT_REMOVEDIR).map_err(errno)?;
            self.dirty.mark_metadata();
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            if self.hidden(parent, link_name) {
                return Err(Errno::EPERM);
            }
            let p = self.inode(parent)?;
            let setgid = self.parent_setgid(&p)?;
            let c = sys::cstr(link_name).map_err(errno)?;
            let t = sys::cstr(target.as_os_str()).map_err(errno)?;
            sys::symlinkat(&t, p.fd.as_raw_fd(), &c).map_err(errno)?;
            self.created(req, parent, link_name, setgid, libc::S_IFLNK)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if self.hidden(parent, name) || self.hidden(newparent, newname) {
                return Err(Errno::EPERM);
            }
            if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            let p = self.inode(parent)?;
            let np = self.inode(newparent)?;
            let a = sys::cstr(name).map_err(errno)?;
            let b = sys::cstr(newname).map_err(errno)?;
            sys::renameat2(p.fd.as_raw_fd(), &a, np.fd.as_raw_fd(), &b, flags.bits())
                .map_err(errno)?;
            self.dirty.mark_metadata();
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            if self.hidden(newparent, newname) {
                return Err(Errno::EPERM);
            }
            let i = self.inode(ino)?;
            let np = self.inode(newparent)?;
            let c = sys::cstr(newname).map_err(errno)?;
            sys::link_fd(i.fd.as_raw_fd(), np.fd.as_raw_fd(), &c).map_err(errno)?;
            self.dirty.mark_metadata();
            self.lookup_child(newparent, newname)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let i = self.inode(ino)?;
            let fd = sys::open(&sys::proc_path(i.fd.as_raw_fd()), open_flags(flags.0), 0)
                .map_err(errno)?;
            if flags.0 & libc::O_TRUNC != 0 {
                if req.uid() != 0 {
                    self.kill_privs(fd.as_raw_fd())?;
                }
                self.truncate_marked(ino, fd.as_raw_fd())?;
            }
            Ok(fd.into_raw_fd())
        })();
        match r {
            Ok(fd) => reply.opened(FileHandle(fd as u64), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            match sys::pread_full(fh.0 as RawFd, &mut buf[..size as usize], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.kill_privs(fh.0 as RawFd) {
                return reply.error(e);
            }
        }
        match sys::pwrite_all(fh.0 as RawFd, data, offset) {
            Ok(()) => {
                // After the write landed: see the dirty-log protocol in `dirty`.
                self.dirty
                    .mark_range(self.swap(ino.0), offset, data.len() as u64);
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        sys::close(fh.0 as RawFd);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match sys::fsync(fh.0 as RawFd, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.read_dir(ino) {
            Ok(entries) => {
                let h = self.next_dir.fetch_add(1, Ordering::Relaxed);
                self.dirs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(h, Arc::new(entries));
                reply.opened(FileHandle(h), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.dir_handle(fh) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(e.ino),
                i as u64 + 1,
                e.kind,
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.dir_handle(fh) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let name = OsStr::from_bytes(&e.name);
            let dots = e.name == b"." || e.name == b"..";
            // The kernel takes no reference for "." and ".."; every other
            // entry counts as a lookup.
            let attr = if dots {
                let target = if e.name == b"." { ino } else { INodeNo::ROOT };
                match self
                    .inode(target)
                    .and_then(|i| sys::fstat(i.fd.as_raw_fd()).map_err(errno))
                {
                    Ok(st) => self.attr(&st),
                    Err(_) => continue,
                }
            } else {
                match self.lookup_child(ino, name) {
                    Ok(a) => a,
                    Err(_) => continue, // gone since opendir
                }
            };
            if reply.add(attr.ino, i as u64 + 1, name, &TTL, &attr, Generation(0)) {
                if !dots {
                    self.forget_one(attr.ino.0, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.inode(ino).and_then(|i| {
            let fd = sys::open(
                &sys::proc_path(i.fd.as_raw_fd()),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .map_err(errno)?;
            sys::fsync(fd.as_raw_fd(), datasync).map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sys::statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.inode(ino).and_then(|i| {
            let p = sys::proc_path(i.fd.as_raw_fd());
            let n = sys::cstr(name).map_err(errno)?;
            sys::xattr::set(&p, &n, value, flags, true).map_err(errno)?;
            self.dirty.mark_metadata();
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.xattr_reply(ino, Some(name), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.xattr_reply(ino, None, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.inode(ino).and_then(|i| {
            let p = sys::proc_path(i.fd.as_raw_fd());
            let n = sys::cstr(name).map_err(errno)?;
            sys::xattr::remove(&p, &n, true).map_err(errno)?;
            self.dirty.mark_metadata();
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has checked already.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            if self.hidden(parent, name) {
                return Err(Errno::EPERM);
            }
            let p = self.inode(parent)?;
            let setgid = self.parent_setgid(&p)?;
            let c = sys::cstr(name).map_err(errno)?;
            let mode = (mode & 0o7777) & !(umask & 0o777);
            let fl = open_flags(flags);
            // Create exclusively first, so only a really new inode is marked whole.
            match sys::openat(p.fd.as_fd(), &c, fl | libc::O_CREAT | libc::O_EXCL, mode) {
                Ok(fd) => {
                    let attr = self.created(req, parent, name, setgid, mode | libc::S_IFREG)?;
                    Ok((attr, fd))
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                    let fd = sys::openat(p.fd.as_fd(), &c, fl, 0).map_err(errno)?;
                    let attr = self.lookup_child(parent, name)?;
                    if flags & libc::O_TRUNC != 0 {
                        self.truncate_marked(attr.ino, fd.as_raw_fd())?;
                    }
                    let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
                    Ok((self.attr(&st), fd))
                }
                Err(e) => Err(errno(e)),
            }
        })();
        match r {
            Ok((a, fd)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(fd.into_raw_fd() as u64),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match sys::fallocate(fh.0 as RawFd, mode, offset, length) {
            Ok(()) => {
                let b = self.swap(ino.0);
                if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
                    self.dirty.mark_all(b); // everything after `offset` moved
                } else if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    self.dirty.mark_range(b, offset, length);
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match sys::lseek(fh.0 as RawFd, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match sys::copy_file_range(
            fh_in.0 as RawFd,
            offset_in,
            fh_out.0 as RawFd,
            offset_out,
            len,
        ) {
            Ok(n) => {
                self.dirty
                    .mark_range(self.swap(ino_out.0), offset_out, n as u64);
                reply.written(n as u32);
            }
            Err(e) => reply.error(errno(e)),
        }
    }
}
