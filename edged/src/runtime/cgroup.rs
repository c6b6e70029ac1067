//! Memory, pids and CPU limits of process-runtime instances, through
//! cgroups: v2 where the unified hierarchy has the controllers, else the v1
//! hierarchies of `memory`, `pids` and `cpu`. Each instance gets a group
//! `edgeshift/EDGE-SESSION` in each hierarchy, joined by the child before
//! it runs the app (a fork bomb is bounded from its first instruction).
//!
//! Where neither is available the limits cannot be applied; [`Cgroups::detect`]
//! says why, `edged config check` prints it, and edged logs it at every
//! instance start: never silently ignored.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const GROUP: &str = "edgeshift";
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// What this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy at this path, with the three controllers.
    V2(PathBuf),
    /// The v1 hierarchies of memory, pids and cpu, in that order.
    V1([PathBuf; 3]),
    /// No way to apply the limits, and why.
    Unavailable(String),
}

/// An instance's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory, bytes (no swap beyond it where the kernel accounts swap).
    pub memory: u64,
    /// Processes and threads.
    pub pids: i64,
    /// CPUs (a share of one period).
    pub cpus: f64,
}

/// The groups of one instance.
#[derive(Debug)]
pub struct Group {
    dirs: Vec<PathBuf>,
}

fn v2_controllers(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
}

impl Cgroups {
    /// Looks at `/sys/fs/cgroup`, and makes (and removes) a group to be
    /// sure: a read-only hierarchy, or one whose controllers cannot be
    /// given to children, is unavailable.
    pub fn detect() -> Cgroups {
        let found = Cgroups::look();
        if matches!(found, Cgroups::Unavailable(_)) {
            return found;
        }
        let probe = format!("probe-{}", std::process::id());
        let limits = Limits {
            memory: 64 << 20,
            pids: 16,
            cpus: 1.0,
        };
        match found.create(&probe, limits) {
            Ok(g) => {
                for d in &g.dirs {
                    let _ = std::fs::remove_dir(d);
                }
                found
            }
            Err(e) => Cgroups::Unavailable(format!("{found:?} cannot be used: {e}")),
        }
    }

    fn look() -> Cgroups {
        let root = Path::new(ROOT);
        for dir in [root.to_path_buf(), root.join("unified")] {
            if let Some(c) = v2_controllers(&dir) {
                let have: Vec<&str> = c.split_whitespace().collect();
                if CONTROLLERS.iter().all(|w| have.contains(w)) {
                    return Cgroups::V2(dir);
                }
            }
        }
        let v1 = CONTROLLERS.map(|c| root.join(c));
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .zip(&v1)
            .filter(|(_, d)| !d.join("cgroup.procs").exists())
            .map(|(c, _)| *c)
            .collect();
        if missing.is_empty() {
            return Cgroups::V1(v1);
        }
        Cgroups::Unavailable(format!(
            "no cgroup v2 hierarchy with the memory, pids and cpu controllers, and no v1 hierarchy of {} under {ROOT}",
            missing.join(", ")
        ))
    }

    /// Creates the groups of instance `name` with `limits`; nothing is left
    /// behind when that fails part way.
    pub fn create(&self, name: &str, limits: Limits) -> std::io::Result<Group> {
        let mut made = Group { dirs: Vec::new() };
        match self.create_in(name, limits, &mut made) {
            Ok(()) => Ok(made),
            Err(e) => {
                for d in &made.dirs {
                    let _ = std::fs::remove_dir(d);
                }
                Err(e)
            }
        }
    }

    fn create_in(&self, name: &str, limits: Limits, made: &mut Group) -> std::io::Result<()> {
        let quota = (limits.cpus * 100_000.0).round().max(1000.0) as u64;
        match self {
            Cgroups::Unavailable(why) => Err(std::io::Error::other(why.clone())),
            Cgroups::V2(root) => {
                let parent = root.join(GROUP);
                std::fs::create_dir_all(&parent)?;
                let enable = "+memory +pids +cpu";
                // The root's and the parent's children may use the controllers.
                write(&root.join("cgroup.subtree_control"), enable)?;
                write(&parent.join("cgroup.subtree_control"), enable)?;
                let dir = parent.join(name);
                make(&dir)?;
                made.dirs.push(dir.clone());
                write(&dir.join("memory.max"), &limits.memory.to_string())?;
                // Absent where swap is not accounted.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                if limits.cpus > 0.0 {
                    write(&dir.join("cpu.max"), &format!("{quota} 100000"))?;
                }
                Ok(())
            }
            Cgroups::V1([mem, pids, cpu]) => {
                let dirs: Vec<PathBuf> = [mem, pids, cpu]
                    .iter()
                    .map(|h| h.join(GROUP).join(name))
                    .collect();
                for d in &dirs {
                    make(d)?;
                    made.dirs.push(d.clone());
                }
                write(
                    &dirs[0].join("memory.limit_in_bytes"),
                    &limits.memory.to_string(),
                )?;
                let memsw = dirs[0].join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory.to_string())?;
                }
                write(&dirs[1].join("pids.max"), &limits.pids.to_string())?;
                if limits.cpus > 0.0 {
                    write(&dirs[2].join("cpu.cfs_period_us"), "100000")?;
                    write(&dirs[2].join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Ok(())
            }
        }
    }

    /// The groups a running process is in, under `edgeshift/` (to remove
    /// them once it is gone, e.g. after an edged restart).
    pub fn groups_of(&self, pid: u32) -> Group {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return Group { dirs: Vec::new() };
        };
        let prefix = format!("/{GROUP}/");
        let mut dirs = Vec::new();
        for line in text.lines() {
            // hierarchy-id:controllers:path
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
            let (Some(ctrls), Some(path)) = (ctrls, path) else {
                continue;
            };
            if !path.starts_with(&prefix) || path.contains("..") {
                continue;
            }
            let rel = path.trim_start_matches('/');
            match self {
                Cgroups::V2(root) if ctrls.is_empty() => dirs.push(root.join(rel)),
                Cgroups::V1(h) => {
                    for (c, hier) in CONTROLLERS.iter().zip(h) {
                        if ctrls.split(',').any(|x| x == *c) {
                            dirs.push(hier.join(rel));
                        }
                    }
                }
                _ => {}
            }
        }
        Group { dirs }
    }
}

fn make(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn write(p: &Path, v: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| f.write_all(v.as_bytes()))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

impl Group {
    /// The `cgroup.procs` files, opened for the child to join by writing
    /// "0" between fork and exec (see [`join_self`]).
    pub fn procs(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// The processes in the groups (whatever process group or session they
    /// moved to).
    pub fn pids(&self) -> Vec<u32> {
        let Some(d) = self.dirs.first() else {
            return Vec::new();
        };
        std::fs::read_to_string(d.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Sends `sig` to every process in the groups.
    pub fn signal(&self, sig: i32) {
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// Kills what is left in the groups, then removes them; retried a
    /// little while the kernel finishes reaping. A group that will not go
    /// is reported.
    pub async fn remove(&self) {
        for _ in 0..50 {
            if self.pids().is_empty() {
                break;
            }
            self.signal(libc::SIGKILL);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        for d in &self.dirs {
            let mut gone = false;
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    gone = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if !gone {
                tracing::warn!(group = %d.display(), "an instance's cgroup could not be removed (processes left in it?)");
            }
        }
    }

    /// A group of these directories.
    pub fn from_dirs(dirs: Vec<PathBuf>) -> Group {
        Group { dirs }
    }

    /// The group directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// The name of the groups of session `session` on edge `edge`.
pub fn instance_name(edge: &str, session: &str) -> String {
    format!("{edge}-{session}")
}

/// Removes the groups of session `session` on edge `edge`, if any are left
/// (an instance that died while edged was not there to remove them).
pub async fn remove_instance(edge: &str, session: &str) {
    let name = instance_name(edge, session);
    let dirs: Vec<PathBuf> = match Cgroups::look() {
        Cgroups::V2(root) => vec![root.join(GROUP).join(&name)],
        Cgroups::V1(h) => h.iter().map(|d| d.join(GROUP).join(&name)).collect(),
        Cgroups::Unavailable(_) => Vec::new(),
    };
    let dirs: Vec<PathBuf> = dirs.into_iter().filter(|d| d.exists()).collect();
    if !dirs.is_empty() {
        Group::from_dirs(dirs).remove().await;
    }
}

/// Between fork and exec: moves the calling process into the groups whose
/// `cgroup.procs` files `fds` are. Async-signal-safe (write(2) only).
pub fn join_self(fds: &[i32]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: writes two bytes from a static buffer to an open fd.
        let n = unsafe { libc::write(*fd, b"0\n".as_ptr().cast(), 2) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw fds of `procs`, for [`join_self`].
pub fn raw(procs: &[OwnedFd]) -> Vec<i32> {
    procs.iter().map(|f| f.as_raw_fd()).collect()
}
