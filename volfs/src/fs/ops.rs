//! The kernel's requests, one method each: [`fuser::Filesystem`] for [`VolFs`].

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::caller::Caller;
use super::{MAX_WRITE, READ_BUF, SetAttr, TTL, VolFs, errno, open_flags};
use crate::sys;

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
            // A volume holds data: no device nodes in a backing directory.
            if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
                return Err(Errno::EPERM);
            }
            let (p, setgid, c) = self.new_in(parent, name)?;
            let mode = mode & !(umask & 0o777);
            sys::mknodat(p.fd.as_raw_fd(), &c, mode, u64::from(rdev)).map_err(errno)?;
            self.created(req, parent, name, setgid, mode)
        })();
        reply_entry(reply, r);
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
            let (p, setgid, c) = self.new_in(parent, name)?;
            let mode = (mode & 0o7777) & !(umask & 0o777);
            sys::mkdirat(p.fd.as_raw_fd(), &c, mode).map_err(errno)?;
            self.created(req, parent, name, setgid, mode | libc::S_IFDIR)
        })();
        reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, 0));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, libc::AT_REMOVEDIR));
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
            let (p, setgid, c) = self.new_in(parent, link_name)?;
            let t = sys::cstr(target.as_os_str()).map_err(errno)?;
            sys::symlinkat(&t, p.fd.as_raw_fd(), &c).map_err(errno)?;
            self.created(req, parent, link_name, setgid, libc::S_IFLNK)
        })();
        reply_entry(reply, r);
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
            // A file renamed over loses its name (unless the two swap).
            let replaced = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                None
            } else {
                self.last_name(np.fd.as_raw_fd(), &b)
            };
            sys::renameat2(p.fd.as_raw_fd(), &a, np.fd.as_raw_fd(), &b, flags.bits())
                .map_err(errno)?;
            self.freed(replaced);
            self.dirty.mark_metadata();
            Ok(())
        })();
        reply_empty(reply, r);
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
        reply_entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let i = self.inode(ino)?;
            let fd = sys::open(&sys::proc_path(i.fd.as_raw_fd()), open_flags(flags.0), 0)
                .map_err(errno)?;
            if flags.0 & libc::O_TRUNC != 0 {
                self.kill_privs_for_truncate(req, fd.as_raw_fd())?;
                self.truncate_marked(ino, fd.as_raw_fd())?;
            }
            let fd = fd.into_raw_fd();
            self.handle_opened(fd);
            Ok(fd)
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
        req: &Request,
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
            // The kernel sets this for a caller without CAP_FSETID.
            let in_group = |g| Caller::of(req).in_group(g);
            if let Err(e) = self.kill_privs(fh.0 as RawFd, in_group) {
                return reply.error(e);
            }
        }
        if self.quota.is_some() {
            let grown = sys::fstat(fh.0 as RawFd)
                .map_err(errno)
                .and_then(|st| self.grow(&st, offset.saturating_add(data.len() as u64)));
            if let Err(e) = grown {
                return reply.error(e);
            }
        }
        match sys::pwrite_all(fh.0 as RawFd, data, offset) {
            Ok(()) => {
                // After the write landed: see the dirty-log protocol in `dirty`.
                self.dirty
                    .mark_range(self.swap(ino.0), offset, data.len() as u64);
                if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE)
                    && self.early_writeback(data.len())
                {
                    // The kernel is writing its page cache back, most often
                    // for the app's fsync: start the backing file's own
                    // writeback now, so the disk works while the rest
                    // arrives instead of after it. Only a hint (it does not
                    // wait for the disk); an error changes nothing. Before
                    // the reply: once answered, the kernel may release the
                    // file and its descriptor number be reused.
                    let _ = sys::start_writeback(fh.0 as RawFd, offset, data.len() as u64);
                }
                self.written(reply, data.len() as u32);
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
        self.handle_closing(fh.0 as RawFd);
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
        reply_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sys::statvfs(&self.root) {
            // Under a quota the volume looks as large as its quota.
            Ok(s) if self.quota.is_some() && s.f_frsize > 0 => {
                let q = self.quota.as_ref().expect("checked");
                let unit = s.f_frsize;
                let free = (q.limit().saturating_sub(q.used()) / unit).min(s.f_bavail);
                reply.statfs(
                    q.limit() / unit,
                    free,
                    free,
                    s.f_files,
                    s.f_ffree,
                    s.f_bsize as u32,
                    s.f_namemax as u32,
                    s.f_frsize as u32,
                )
            }
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
        reply_empty(reply, r);
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
        reply_empty(reply, r);
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
            let (p, setgid, c) = self.new_in(parent, name)?;
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
                        self.kill_privs_for_truncate(req, fd.as_raw_fd())?;
                        self.truncate_marked(attr.ino, fd.as_raw_fd())?;
                    }
                    let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
                    Ok((self.attr(&st), fd))
                }
                Err(e) => Err(errno(e)),
            }
        })();
        match r {
            Ok((a, fd)) => {
                let fd = fd.into_raw_fd();
                self.handle_opened(fd);
                reply.created(
                    &TTL,
                    &a,
                    Generation(0),
                    FileHandle(fd as u64),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
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
        let st = match sys::fstat(fh.0 as RawFd) {
            Ok(st) => st,
            Err(e) => return reply.error(errno(e)),
        };
        let size = st.st_size as u64;
        // Space allocated past the end counts even with KEEP_SIZE: the
        // blocks are real. A punched hole or a collapse frees.
        let counted = if mode & libc::FALLOC_FL_INSERT_RANGE != 0 {
            self.grow(&st, size.saturating_add(length))
        } else if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) == 0 {
            self.grow(&st, offset.saturating_add(length))
        } else {
            Ok(())
        };
        if let Err(e) = counted {
            return reply.error(e);
        }
        match sys::fallocate(fh.0 as RawFd, mode, offset, length) {
            Ok(()) => {
                if mode & libc::FALLOC_FL_COLLAPSE_RANGE != 0 {
                    let _ = self.resize(&st, size.saturating_sub(length));
                }
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
        if self.quota.is_some() {
            let grown = sys::fstat(fh_out.0 as RawFd)
                .map_err(errno)
                .and_then(|st| self.grow(&st, offset_out.saturating_add(len)));
            if let Err(e) = grown {
                return reply.error(e);
            }
        }
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

fn reply_entry(reply: ReplyEntry, r: Result<fuser::FileAttr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}
