//! The process runtime: each instance is a child process of edged, in its
//! own session (so it outlives an edged restart and is re-attached),
//! with the volume and socket directory in its environment.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use super::{
    BoxFut, ENV_DATA_DIR, ENV_SESSION_ID, ENV_SOCKET_DIR, InstanceId, InstanceSpec, Runtime,
    RuntimeError, tail,
};

/// Runs instances as child processes.
#[derive(Debug)]
pub struct ProcessRuntime {
    command: std::path::PathBuf,
    args: Vec<String>,
    children: Mutex<HashMap<u32, tokio::process::Child>>,
}

impl ProcessRuntime {
    /// A runtime that starts `command args...`.
    pub fn new(command: std::path::PathBuf, args: Vec<String>) -> Self {
        ProcessRuntime {
            command,
            args,
            children: Mutex::new(HashMap::new()),
        }
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

fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; a negative pid names the group.
    unsafe { libc::kill(-(pid as i32), sig) };
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
            let mut cmd = tokio::process::Command::new(&self.command);
            // Its own session (and so its own process group): it outlives an
            // edged restart, and a handover's freeze (SIGSTOP) survives edged
            // dying — a stopped process group that edged's death orphaned
            // would get SIGHUP from the kernel; one that was never in
            // edged's session is not orphaned by it.
            // SAFETY: setsid is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd
                .args(&self.args)
                .env(ENV_DATA_DIR, &spec.volume)
                .env(ENV_SOCKET_DIR, &spec.socket_dir)
                .env(ENV_SESSION_ID, &spec.session_id)
                .current_dir(&spec.volume)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .map_err(|e| RuntimeError::Process(format!("{}: {e}", self.command.display())))?;
            let pid = child
                .id()
                .ok_or_else(|| RuntimeError::Process("child exited at once".into()))?;
            self.children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pid, child);
            Ok(InstanceId::Pid(pid))
        })
    }

    fn stop<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            let child = self
                .children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid);
            if !pid_alive(pid) {
                // What the app started may outlive it in its group.
                signal_group(pid, libc::SIGKILL);
                return Ok(());
            }
            // The whole group: the app and whatever it started.
            signal_group(pid, libc::SIGTERM);
            // A paused instance handles SIGTERM once it runs again.
            signal_group(pid, libc::SIGCONT);
            let graceful = async {
                match child {
                    Some(mut c) => {
                        let _ = c.wait().await;
                    }
                    None => {
                        while pid_alive(pid) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), graceful)
                .await
                .is_err()
            {
                tracing::warn!(pid, "instance ignored SIGTERM; killing it");
                signal_group(pid, libc::SIGKILL);
            }
            Ok(())
        })
    }

    fn pause<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            // The whole process group: the app and any children it started.
            signal_group(pid, libc::SIGSTOP);
            Ok(())
        })
    }

    fn resume<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Pid(pid) = *id else {
                return Err(RuntimeError::Process(format!("{id} is not a process")));
            };
            signal_group(pid, libc::SIGCONT);
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

    fn logs<'a>(
        &'a self,
        _id: &'a InstanceId,
        spec: &'a InstanceSpec,
        n: usize,
    ) -> BoxFut<'a, Vec<String>> {
        Box::pin(async move { tail(&spec.log_file, n) })
    }
}
