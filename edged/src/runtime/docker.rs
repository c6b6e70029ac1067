//! The Docker runtime, through bollard: one container per session with
//! network `none`, a read-only root, every capability dropped,
//! no-new-privileges, memory and pids limits, the volume at `/data` and the
//! socket directory at `/run/edge`.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;

use super::{
    ACTIVATION_NAME, BoxFut, ENV_ACTIVATION, ENV_DATA_DIR, ENV_SESSION_ID, ENV_SOCKET_DIR,
    InstanceId, InstanceSpec, Runtime, RuntimeError,
};

/// Path of the volume inside a container.
pub const DATA_IN_CONTAINER: &str = "/data";
/// Path of the socket directory inside a container.
pub const SOCKET_IN_CONTAINER: &str = "/run/edge";

/// Runs instances as Docker containers of one image.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    image: String,
}

fn derr(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Docker(e.to_string())
}

/// Connects to the local engine (`/var/run/docker.sock`), checking it answers.
pub async fn connect() -> Result<Docker, RuntimeError> {
    let d = Docker::connect_with_local_defaults().map_err(derr)?;
    d.ping()
        .await
        .map_err(|e| RuntimeError::Docker(format!("engine does not answer: {e}")))?;
    d.negotiate_version().await.map_err(derr)
}

/// The container of a session on an edge (edges on one host share an engine).
pub fn container_name(edge_id: &str, session_id: &str) -> String {
    format!("edgeshift-{edge_id}-{session_id}")
}

impl DockerRuntime {
    /// A runtime for `image` on the engine `docker`.
    pub fn new(docker: Docker, image: String) -> Self {
        DockerRuntime { docker, image }
    }
}

impl DockerRuntime {
    /// Removes container `c` by force (the engine kills it with SIGKILL,
    /// paused or not); one already gone is removed.
    async fn force_remove(&self, c: &str) -> Result<(), bollard::errors::Error> {
        let rm = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(c, Some(rm)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Runtime for DockerRuntime {
    fn start<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFut<'a, Result<InstanceId, RuntimeError>> {
        Box::pin(async move {
            let name = container_name(&spec.edge_id, &spec.session_id);
            // A standby's volume mount point is a shared mount: its
            // activation (the volume mounted there) reaches the container.
            let propagation = if spec.standby { ":rslave" } else { "" };
            let mut env = vec![
                format!("{ENV_DATA_DIR}={DATA_IN_CONTAINER}"),
                format!("{ENV_SOCKET_DIR}={SOCKET_IN_CONTAINER}"),
                format!("{ENV_SESSION_ID}={}", spec.session_id),
            ];
            if spec.standby {
                env.push(format!(
                    "{ENV_ACTIVATION}={SOCKET_IN_CONTAINER}/{ACTIVATION_NAME}"
                ));
            }
            let host = HostConfig {
                binds: Some(vec![
                    format!("{}:{DATA_IN_CONTAINER}{propagation}", spec.volume.display()),
                    format!("{}:{SOCKET_IN_CONTAINER}", spec.socket_dir.display()),
                ]),
                network_mode: Some("none".into()),
                readonly_rootfs: Some(true),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                memory: Some((spec.memory_mib as i64) << 20),
                // No swap beyond the memory limit.
                memory_swap: Some((spec.memory_mib as i64) << 20),
                nano_cpus: Some((spec.cpus * 1e9) as i64),
                pids_limit: Some(spec.pids_limit),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_string(),
                    "rw,size=16m".to_string(),
                )])),
                ..Default::default()
            };
            let body = ContainerCreateBody {
                image: Some(self.image.clone()),
                env: Some(env),
                working_dir: Some(DATA_IN_CONTAINER.into()),
                user: (!spec.user.is_empty()).then(|| spec.user.clone()),
                labels: Some(HashMap::from([
                    ("edgeshift.session".to_string(), spec.session_id.clone()),
                    ("edgeshift.app".to_string(), spec.app.clone()),
                    ("edgeshift.edge".to_string(), spec.edge_id.clone()),
                ])),
                host_config: Some(host),
                ..Default::default()
            };
            let opts = CreateContainerOptionsBuilder::default().name(&name).build();
            let created = match self
                .docker
                .create_container(Some(opts.clone()), body.clone())
                .await
            {
                // A container of this session that edged did not live to
                // record (it died between create and record): replace it.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) => {
                    tracing::warn!(container = %name, "replacing an unrecorded container of this session");
                    self.stop(&InstanceId::Container(name.clone())).await?;
                    self.docker
                        .create_container(Some(opts), body)
                        .await
                        .map_err(derr)?
                }
                r => r.map_err(derr)?,
            };
            if let Err(e) = self.docker.start_container(&created.id, None).await {
                let _ = self.stop(&InstanceId::Container(created.id.clone())).await;
                return Err(derr(e));
            }
            Ok(InstanceId::Container(created.id))
        })
    }

    fn stop<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return Err(RuntimeError::Docker(format!("{id} is not a container")));
            };
            // A container paused by a handover must run to stop.
            let _ = self.docker.unpause_container(c).await;
            let stop = StopContainerOptionsBuilder::default().t(5).build();
            match self.docker.stop_container(c, Some(stop)).await {
                Ok(()) => {}
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    return Ok(());
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 304, ..
                }) => {}
                Err(e) => {
                    tracing::warn!(container = %c, error = %e, "stop failed; removing by force")
                }
            }
            self.force_remove(c).await.map_err(derr)
        })
    }

    fn discard<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return Err(RuntimeError::Docker(format!("{id} is not a container")));
            };
            // Removed by force while paused: the engine kills it (SIGKILL)
            // without a stop signal the app could act on. Never unpaused:
            // a failure is an error (the record stays, and a restart
            // discards it again).
            let mut last = None;
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                }
                match self.force_remove(c).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            Err(RuntimeError::Docker(format!(
                "discarding {c}: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            )))
        })
    }

    fn pause<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return Err(RuntimeError::Docker(format!("{id} is not a container")));
            };
            self.docker.pause_container(c).await.map_err(derr)
        })
    }

    fn resume<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return Err(RuntimeError::Docker(format!("{id} is not a container")));
            };
            self.docker.unpause_container(c).await.map_err(derr)
        })
    }

    fn alive<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return false;
            };
            match self.docker.inspect_container(c, None).await {
                Ok(i) => i.state.and_then(|s| s.running).unwrap_or(false),
                Err(_) => false,
            }
        })
    }

    fn data_in_instance<'a>(
        &'a self,
        id: &'a InstanceId,
    ) -> BoxFut<'a, Result<Option<std::path::PathBuf>, RuntimeError>> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return Err(RuntimeError::Docker(format!("{id} is not a container")));
            };
            let pid = self
                .docker
                .inspect_container(c, None)
                .await
                .map_err(derr)?
                .state
                .and_then(|s| s.pid)
                .filter(|p| *p > 0)
                .ok_or_else(|| RuntimeError::Docker(format!("{c} does not run")))?;
            Ok(Some(format!("/proc/{pid}/root{DATA_IN_CONTAINER}").into()))
        })
    }

    fn logs<'a>(
        &'a self,
        id: &'a InstanceId,
        _spec: &'a InstanceSpec,
        n: usize,
    ) -> BoxFut<'a, Vec<String>> {
        Box::pin(async move {
            let InstanceId::Container(c) = id else {
                return Vec::new();
            };
            let opts = LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .tail(&n.to_string())
                .build();
            let mut s = self.docker.logs(c, Some(opts));
            let mut out = Vec::new();
            while let Some(Ok(l)) = s.next().await {
                out.extend(l.to_string().lines().map(str::to_string));
            }
            out
        })
    }
}
