//! The operator's door: the Admin service on a Unix socket in the data
//! directory (mode 0600, so only root — or the user edged runs as — may
//! list, close or move sessions). It is not served on the Edge port, where
//! clients and other edges come in.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_proto::v1::admin_client::AdminClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;

/// File name of the Admin socket in the data directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// Where the Admin socket of an edge with configuration `cfg` is.
pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.admin_socket
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join(SOCKET_NAME))
}

/// Binds the Admin socket at `path` (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created with no permission for anyone else from the start.
    // SAFETY: umask has no memory-safety preconditions; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let l = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// A client of the Admin service at `path`.
pub async fn connect(path: &Path) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    let p = path.to_path_buf();
    let ch =
        Endpoint::from_static("http://admin.invalid")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await?;
    Ok(AdminClient::new(ch))
}

/// A client of the Admin service on an edge's `admin_listen` port
/// (`host:port`), as the operator whose certificate and key are given;
/// the edge is verified against the fleet CA by the host it is dialed at.
pub async fn connect_remote(
    addr: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let ch = Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .identity(Identity::from_pem(cert_pem, key_pem)),
        )?
        .connect()
        .await?;
    Ok(AdminClient::new(ch))
}
