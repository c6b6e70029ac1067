//! Who sent a request, as far as the rules for setuid and setgid need it.
//!
//! With `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves dropping setuid/setgid
//! to the filesystem. On write it says whether the caller lacks
//! `CAP_FSETID` (`FUSE_WRITE_KILL_SUIDGID`); on truncate and on open with
//! `O_TRUNC` it says so in bits (`FATTR_KILL_SUIDGID`,
//! `FUSE_OPEN_KILL_SUIDGID`) that fuser does not hand on, and the rule for a
//! setgid file that is not group-executable needs the caller's groups. Both
//! are read from `/proc/<tid>/status` of the calling thread. Whatever cannot
//! be read counts against the caller: no capability, no supplementary group.

use std::os::unix::fs::MetadataExt;

use fuser::Request;

/// `CAP_FSETID`: keep setuid/setgid when writing, truncating or chowning.
const CAP_FSETID: u32 = 4;

/// The credentials of a request's caller that the kernel's
/// `setattr_should_drop_suidgid` looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Caller {
    /// Filesystem group id.
    fsgid: u32,
    /// Supplementary groups.
    groups: Vec<u32>,
    /// Holds `CAP_FSETID` in the initial user namespace.
    fsetid: bool,
}

impl Caller {
    /// The caller of `req`.
    pub(super) fn of(req: &Request) -> Caller {
        let fallback = Caller {
            fsgid: req.gid(),
            groups: Vec::new(),
            fsetid: false,
        };
        let pid = req.pid();
        if pid == 0 {
            return fallback;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return fallback;
        };
        match Caller::parse(&status, req.uid(), req.gid()) {
            // A capability counts only in the daemon's user namespace.
            Some(mut c) => {
                c.fsetid &= same_user_ns(pid);
                c
            }
            None => fallback,
        }
    }

    /// Reads a `/proc/<pid>/status`; `None` unless its filesystem ids are
    /// the request's (the thread is gone and its id reused, or /proc is
    /// another pid namespace's).
    fn parse(status: &str, uid: u32, gid: u32) -> Option<Caller> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let fs_id =
            |name: &str| -> Option<u32> { field(name)?.split_whitespace().nth(3)?.parse().ok() };
        if fs_id("Uid")? != uid || fs_id("Gid")? != gid {
            return None;
        }
        let groups = field("Groups")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()
            .ok()?;
        let caps = u64::from_str_radix(field("CapEff")?, 16).ok()?;
        Some(Caller {
            fsgid: gid,
            groups,
            fsetid: caps & (1 << CAP_FSETID) != 0,
        })
    }

    /// Whether the caller may keep setuid/setgid (`CAP_FSETID`).
    pub(super) fn fsetid(&self) -> bool {
        self.fsetid
    }

    /// Whether the caller is in group `gid` (the kernel's `in_group_p`).
    pub(super) fn in_group(&self, gid: u32) -> bool {
        self.fsgid == gid || self.groups.contains(&gid)
    }
}

/// The setuid/setgid bits of a regular file with `mode` and group `gid` that
/// a write, truncate or chown by a caller without `CAP_FSETID` drops, as the
/// kernel's `setattr_should_drop_suidgid` decides: setuid always, setgid
/// when group-executable or when the caller is not in the file's group
/// (`in_group`, asked only then).
pub(super) fn setid_bits_to_drop(mode: u32, gid: u32, in_group: impl FnOnce(u32) -> bool) -> u32 {
    let mut drop = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !in_group(gid)) {
        drop |= libc::S_ISGID;
    }
    drop
}

/// Whether thread `pid` is in the daemon's user namespace.
fn same_user_ns(pid: u32) -> bool {
    let ns = |p: String| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    match (
        ns(format!("/proc/{pid}/ns/user")),
        ns("/proc/self/ns/user".to_owned()),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
        Groups:\t10 20 \nCapEff:\t0000000000000010\n";

    #[test]
    fn status_gives_groups_and_cap_fsetid() {
        let c = Caller::parse(STATUS, 1000, 100).unwrap();
        assert!(c.fsetid());
        assert!(c.in_group(100) && c.in_group(20) && !c.in_group(30));
    }

    #[test]
    fn status_of_another_user_is_not_taken() {
        assert_eq!(Caller::parse(STATUS, 1001, 100), None);
        assert_eq!(Caller::parse(STATUS, 1000, 101), None);
    }

    #[test]
    fn setgid_without_group_exec_is_dropped_only_for_a_caller_outside_the_group() {
        let c = Caller::parse(STATUS, 1000, 100).unwrap();
        let drop = |mode, gid| setid_bits_to_drop(mode, gid, |g| c.in_group(g));
        assert_eq!(drop(0o6777, 100), 0o6000);
        assert_eq!(drop(0o2767, 100), 0);
        assert_eq!(drop(0o2767, 30), 0o2000);
        assert_eq!(drop(0o4644, 30), 0o4000);
    }
}
