//! The process runtime: each instance is a child process of edged, in its
//! own session (so it outlives an edged restart and is re-attached), and
//! confined the way a container would be, short of its own root:
//!
//! - it runs as the app's unprivileged `user` (no supplementary groups,
//!   `no_new_privs`), which owns its volume and socket directory;
//! - in its own mount namespace, where its volume and socket directory are
//!   bind-mounted at [`INSTANCE_DATA`] and [`INSTANCE_RUN`] (the session
//!   tree itself stays root-only: 0700 directories);
//! - in its own cgroups with the app's memory, pids and CPU limits
//!   ([`super::cgroup`]), joined before the app's first instruction.
//!
//! Instances of one user can still signal and trace each other: give apps
//! whose tenants must not reach each other distinct users, or the Docker
//! runtime.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use super::cgroup::{Cgroups, Group, Limits};
use super::{
    ACTIVATION_NAME, BoxFut, ENV_ACTIVATION, ENV_DATA_DIR, ENV_INSTANCE, ENV_SESSION_ID,
    ENV_SOCKET_DIR, InstanceId, InstanceSpec, Runtime, RuntimeError, tail,
};

/// Where an instance sees its volume (in its own mount namespace).
pub const INSTANCE_DATA: &str = "/run/edgeshift-instance/data";
/// Where an instance sees its socket directory.
pub const INSTANCE_RUN: &str = "/run/edgeshift-instance/run";

/// Runs instances as child processes.
#[derive(Debug)]
pub struct ProcessRuntime {
    command: std::path::PathBuf,
    args: Vec<String>,
    children: Mutex<HashMap<u32, tokio::process::Child>>,
    cgroups: Cgroups,
    groups: Mutex<HashMap<u32, Group>>,
}

impl ProcessRuntime {
    /// A runtime that starts `command args...`.
    pub fn new(command: std::path::PathBuf, args: Vec<String>) -> Self {
        ProcessRuntime {
            command,
            args,
            children: Mutex::new(HashMap::new()),
            cgroups: Cgroups::detect(),
            groups: Mutex::new(HashMap::new()),
        }
    }
}

impl ProcessRuntime {
    /// The cgroups of instance `pid` (known since its start, or read off
    /// the running process after a restart of edged).
    fn group_of(&self, pid: u32) -> Group {
        let known = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .map(|g| g.dirs().to_vec());
        match known {
            Some(dirs) => Group::from_dirs(dirs),
            None => self.cgroups.groups_of(pid),
        }
    }
}

fn cstr(p: &std::path::Path) -> Result<CString, RuntimeError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Process(format!("{} holds a NUL byte", p.display())))
}

/// Between fork and exec, in the instance's new mount namespace: detaches
/// every volfs mount but the one at `keep`. The namespace began as a copy of
/// edged's, holding every session volume of the host; a copy left there
/// would keep that volume's filesystem alive after its own shim unmounted
/// it. Reads `/proc/self/mountinfo` into `buf`, allocated before the fork
/// (nothing here allocates), and decodes paths in place.
fn detach_other_fuse(buf: &mut [u8], keep: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: open/read/close/umount2 on a buffer and C strings we own.
    let len = unsafe {
        let fd = libc::open(
            c"/proc/self/mountinfo".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        check(fd)?;
        let mut len = 0usize;
        loop {
            let n = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            if n == 0 {
                break;
            }
            len += n as usize;
            if len == buf.len() {
                libc::close(fd);
                return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
            }
        }
        libc::close(fd);
        len
    };
    let keep = keep.to_bytes();
    let mut start = 0;
    while start < len {
        let end = buf[start..len]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(len, |i| start + i);
        let line = &mut buf[start..end];
        start = end + 1;
        let Some((mp_at, w)) = fuse_mount_point(line) else {
            continue;
        };
        if &line[mp_at..w] == keep {
            continue;
        }
        line[w] = 0;
        // SAFETY: a NUL-terminated path inside `buf`; errors are ignored
        // (a mount already gone).
        unsafe { libc::umount2(line[mp_at..].as_ptr().cast(), libc::MNT_DETACH) };
    }
    Ok(())
}

/// For a `/proc/self/mountinfo` line of a volfs mount, decodes its mount
/// point's `\\ooo` escapes in place and returns its byte range; None for
/// other mounts. Allocates nothing.
fn fuse_mount_point(line: &mut [u8]) -> Option<(usize, usize)> {
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
    let (mp_at, mp_end) = field(line, 4)?;
    // "... - FSTYPE SOURCE ...": a fuse mount whose source is a volfs volume.
    let dash = line.windows(3).position(|w| w == b" - ")?;
    let rest = &line[dash + 3..];
    let sp = rest.iter().position(|&b| b == b' ')?;
    let (fstype, source) = (&rest[..sp], &rest[sp + 1..]);
    if !(fstype == b"fuse" || fstype == b"fuse.volfs") || !source.starts_with(b"volfs:") {
        return None;
    }
    let (mut r, mut w) = (mp_at, mp_at);
    while r < mp_end {
        let b = line[r];
        if b == b'\\'
            && r + 3 < mp_end
            && line[r + 1..=r + 3]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            line[w] = (line[r + 1] - b'0') * 64 + (line[r + 2] - b'0') * 8 + (line[r + 3] - b'0');
            r += 4;
        } else {
            line[w] = b;
            r += 1;
        }
        w += 1;
    }
    Some((mp_at, w))
}

/// The byte range of space-separated field `n` of `line`.
fn field(line: &[u8], n: usize) -> Option<(usize, usize)> {
    let mut at = 0;
    for _ in 0..n {
        at += line[at..].iter().position(|&b| b == b' ')? + 1;
    }
    let end = at + line[at..].iter().position(|&b| b == b' ')?;
    Some((at, end))
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether a pid is a live (non-zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Live processes whose environment holds `key=value`: an instance whose
/// start edged did not live to record is found by its socket directory
/// (`EDGE_SOCKET_DIR`), which names this edge's data directory and the
/// session.
pub fn find_by_env(key: &str, value: &str) -> Vec<u32> {
    let want = format!("{key}={value}");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            pid_alive(*pid)
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()))
        })
        .collect()
}

/// `UID:GID`, numeric; an instance never runs as root.
fn parse_user(user: &str) -> Result<(u32, u32), RuntimeError> {
    let ids = user
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    match ids {
        Some((0, _)) | Some((_, 0)) => Err(RuntimeError::Process(format!(
            "user {user:?}: an instance does not run as root"
        ))),
        Some(ids) => Ok(ids),
        None => Err(RuntimeError::Process(format!(
            "user {user:?}: expected numeric UID:GID"
        ))),
    }
}

fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; a negative pid names the group.
    unsafe { libc::kill(-(pid as i32), sig) };
}

impl ProcessRuntime {
    /// Forgets instance `pid`: its child handle (if this edged started it)
    /// and its groups (read while it still runs, for one started before a
    /// restart).
    fn untrack(&self, pid: u32) -> (Option<tokio::process::Child>, Group) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        let known = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        (child, known.unwrap_or_else(|| self.cgroups.groups_of(pid)))
    }
}

/// Whether instance `pid` exited within `limit` (reaped when it is our child).
async fn exited(child: Option<tokio::process::Child>, pid: u32, limit: Duration) -> bool {
    let gone = async {
        match child {
            Some(mut c) => {
                let _ = c.wait().await;
            }
            None => {
                while pid_alive(pid) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    };
    tokio::time::timeout(limit, gone).await.is_ok()
}

impl Runtime for ProcessRuntime {
    fn start<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFut<'a, Result<InstanceId, RuntimeError>> {
        Box::pin(async move {
            let log =
                std::os::unix::fs::OpenOptionsExt::mode(&mut std::fs::OpenOptions::new(), 0o600)
                    .create(true)
                    .append(true)
                    .open(&spec.log_file)
                    .map_err(|e| {
                        RuntimeError::Process(format!("log {}: {e}", spec.log_file.display()))
                    })?;
            let log2 = log
                .try_clone()
                .map_err(|e| RuntimeError::Process(e.to_string()))?;
            let t0 = std::time::Instant::now();
            let (uid, gid) = parse_user(&spec.user)?;
            for d in [INSTANCE_DATA, INSTANCE_RUN] {
                std::fs::create_dir_all(d)
                    .map_err(|e| RuntimeError::Process(format!("{d}: {e}")))?;
            }
            let (vol, run) = (cstr(&spec.volume)?, cstr(&spec.socket_dir)?);
            let hidden = spec.hidden.as_deref().map(cstr).transpose()?;
            let group = match &self.cgroups {
                Cgroups::Unavailable(why) => {
                    tracing::warn!(session = %spec.session_id, "the memory, pids and CPU limits of this instance are NOT applied: {why}");
                    None
                }
                c => Some(
                    c.create(
                        &super::cgroup::instance_name(&spec.edge_id, &spec.session_id),
                        Limits {
                            memory: spec.memory_mib << 20,
                            pids: spec.pids_limit,
                            cpus: spec.cpus,
                        },
                    )
                    .map_err(|e| RuntimeError::Process(format!("cgroup: {e}")))?,
                ),
            };
            let procs = match &group {
                Some(g) => match g.procs() {
                    Ok(p) => p,
                    Err(e) => {
                        g.remove().await;
                        return Err(RuntimeError::Process(format!("cgroup: {e}")));
                    }
                },
                None => Vec::new(),
            };
            let fds = super::cgroup::raw(&procs);
            let t_cgroup = t0.elapsed();
            let (data, sock) = (
                cstr(std::path::Path::new(INSTANCE_DATA))?,
                cstr(std::path::Path::new(INSTANCE_RUN))?,
            );
            let root = c"/";
            // Room for the mount table as it is now, and then some.
            let table = std::fs::read("/proc/self/mountinfo").map_or(0, |t| t.len());
            let mut mountinfo = vec![0u8; table * 2 + (256 << 10)];
            let mut cmd = tokio::process::Command::new(&self.command);
            // SAFETY: between fork and exec the closure makes only
            // async-signal-safe system calls on memory prepared before the
            // fork (C strings, fds); it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    // Its own session (and so its own process group): it
                    // outlives an edged restart, and a handover's freeze
                    // (SIGSTOP) survives edged dying — a stopped process
                    // group that edged's death orphaned would get SIGHUP
                    // from the kernel; one never in edged's session is not.
                    check(libc::setsid())?;
                    super::cgroup::join_self(&fds)?;
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    check(libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ))?;
                    for (src, dst) in [(&vol, &data), (&run, &sock)] {
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ))?;
                    }
                    detach_other_fuse(&mut mountinfo, &data)?;
                    // The standby mount points of other sessions (the
                    // copy of one's own activation would reach it there).
                    // Not one: nothing to detach.
                    if let Some(h) = &hidden {
                        libc::umount2(h.as_ptr(), libc::MNT_DETACH);
                    }
                    check(libc::chdir(data.as_ptr()))?;
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setgid(gid))?;
                    check(libc::setuid(uid))?;
                    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                    Ok(())
                });
            }
            cmd.args(&self.args)
                // Nothing of edged's environment (an operator's secrets, a
                // proxy, systemd's sockets) reaches the app.
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env(ENV_DATA_DIR, INSTANCE_DATA)
                .env(ENV_SOCKET_DIR, INSTANCE_RUN)
                .env(ENV_SESSION_ID, &spec.session_id)
                .env(ENV_INSTANCE, &spec.socket_dir);
            if spec.standby {
                // The volume bound at INSTANCE_DATA is an empty directory
                // until the activation mounts it: the namespace is a slave
                // of edged's, and the volume's mount point a shared mount.
                cmd.env(ENV_ACTIVATION, format!("{INSTANCE_RUN}/{ACTIVATION_NAME}"));
            }
            let spawned = cmd.stdin(Stdio::null()).stdout(log).stderr(log2).spawn();
            drop(procs);
            let child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    if let Some(g) = group {
                        g.remove().await;
                    }
                    return Err(RuntimeError::Process(format!(
                        "{}: {e}",
                        self.command.display()
                    )));
                }
            };
            let Some(pid) = child.id() else {
                if let Some(g) = group {
                    g.remove().await;
                }
                return Err(RuntimeError::Process("child exited at once".into()));
            };
            tracing::debug!(
                session = %spec.session_id,
                cgroup_us = t_cgroup.as_micros() as u64,
                total_us = t0.elapsed().as_micros() as u64,
                "instance started"
            );
            self.children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pid, child);
            if let Some(g) = group {
                self.groups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pid, g);
            }
            Ok(InstanceId::Pid(pid))
        })
    }

    fn stop<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            let (child, group) = self.untrack(pid);
            if !pid_alive(pid) {
                // What the app started may outlive it in its group.
                signal_group(pid, libc::SIGKILL);
                group.remove().await;
                return Ok(());
            }
            // The whole group: the app and whatever it started.
            signal_group(pid, libc::SIGTERM);
            // A paused instance handles SIGTERM once it runs again.
            signal_group(pid, libc::SIGCONT);
            if !exited(child, pid, Duration::from_secs(5)).await {
                tracing::warn!(pid, "instance ignored SIGTERM; killing it");
                signal_group(pid, libc::SIGKILL);
            }
            group.remove().await;
            Ok(())
        })
    }

    fn discard<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            let (child, group) = self.untrack(pid);
            // SIGKILL ends a stopped process without it running again; its
            // group and whatever left the group but not the cgroup, too.
            signal_group(pid, libc::SIGKILL);
            group.signal(libc::SIGKILL);
            if !exited(child, pid, Duration::from_secs(5)).await {
                tracing::warn!(pid, "a discarded instance did not exit within 5 s");
            }
            group.remove().await;
            Ok(())
        })
    }

    fn pause<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            // The whole process group: the app and any children it started,
            // and whatever left the group but not the instance's cgroup.
            signal_group(pid, libc::SIGSTOP);
            self.group_of(pid).signal(libc::SIGSTOP);
            Ok(())
        })
    }

    fn resume<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            signal_group(pid, libc::SIGCONT);
            self.group_of(pid).signal(libc::SIGCONT);
            Ok(())
        })
    }

    fn alive<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, bool> {
        Box::pin(async move {
            match id {
                InstanceId::Pid(pid) => {
                    let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
                    match children.get_mut(pid) {
                        Some(c) => matches!(c.try_wait(), Ok(None)),
                        None => pid_alive(*pid),
                    }
                }
                InstanceId::Container(_) => false,
            }
        })
    }

    fn data_in_instance<'a>(
        &'a self,
        id: &'a InstanceId,
    ) -> BoxFut<'a, Result<Option<std::path::PathBuf>, RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            Ok(Some(format!("/proc/{pid}/root{INSTANCE_DATA}").into()))
        })
    }

    fn logs<'a>(
        &'a self,
        _id: &'a InstanceId,
        spec: &'a InstanceSpec,
        n: usize,
    ) -> BoxFut<'a, Vec<String>> {
        Box::pin(async move { tail(&spec.log_file, n) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_mount_points_are_found_and_decoded_in_place() {
        let mut l =
            b"88 27 0:50 / /var/lib/e\\040s/sessions/ab/mnt rw,nosuid,nodev - fuse volfs:/v/x rw"
                .to_vec();
        let (a, b) = fuse_mount_point(&mut l).unwrap();
        assert_eq!(&l[a..b], b"/var/lib/e s/sessions/ab/mnt");
        let mut l = b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw".to_vec();
        assert_eq!(fuse_mount_point(&mut l), None);
        // Other FUSE filesystems (lxcfs, a FUSE root) stay.
        let mut l = b"5 1 0:9 / /var/lib/lxcfs rw - fuse.lxcfs lxcfs rw".to_vec();
        assert_eq!(fuse_mount_point(&mut l), None);
        let mut l = b"garbage".to_vec();
        assert_eq!(fuse_mount_point(&mut l), None);
        // An escape cut short at the field's end is kept as it is.
        let mut l = b"1 2 0:1 / /a\\04 rw - fuse.volfs volfs:/x rw".to_vec();
        let (a, b) = fuse_mount_point(&mut l).unwrap();
        assert_eq!(&l[a..b], b"/a\\04");
    }

    #[test]
    fn instances_never_run_as_root() {
        assert!(parse_user("0:0").is_err());
        assert!(parse_user("1000:0").is_err());
        assert!(parse_user("nobody").is_err());
        assert_eq!(parse_user("65534:65534").unwrap(), (65534, 65534));
    }
}
