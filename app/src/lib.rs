//! edge-app: the SDK an offloaded server application links to.
//!
//! The app is an ordinary tonic server. On an edge it serves on a Unix
//! socket in the directory edged gives it, and keeps its state under the
//! data directory, which is the session's volfs volume (and moves with the
//! client). Both come from the environment:
//!
//! | variable          | in a container | meaning                        |
//! |-------------------|----------------|--------------------------------|
//! | `EDGE_SOCKET_DIR` | `/run/edge`    | where to create `app.sock`     |
//! | `EDGE_DATA_DIR`   | `/data`        | the session's volume           |
//! | `EDGE_SESSION_ID` |                | the session id (for logs)      |
//!
//! ```ignore
//! let router = tonic::transport::Server::builder().add_service(ListServer::new(MyList::open()?));
//! edge_app::serve(router).await?;
//! ```
//!
//! # Layout
//! Everything is in this file: [`serve`], [`data_dir`], [`socket_path`].

#![warn(missing_docs)]

use std::path::PathBuf;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// Environment variable naming the socket directory.
pub const ENV_SOCKET_DIR: &str = "EDGE_SOCKET_DIR";
/// Environment variable naming the data directory.
pub const ENV_DATA_DIR: &str = "EDGE_DATA_DIR";
/// Environment variable with the session id.
pub const ENV_SESSION_ID: &str = "EDGE_SESSION_ID";
/// File name of the socket edged connects to.
pub const SOCKET_NAME: &str = "app.sock";

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The environment does not say where to serve.
    #[error("{0} is not set: the app must be started by edged (or set it by hand)")]
    NoEnv(&'static str),
    /// The socket cannot be bound.
    #[error("binding {0}: {1}")]
    Bind(String, std::io::Error),
    /// The server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// The session's volume: where the app keeps its state.
pub fn data_dir() -> PathBuf {
    std::env::var_os(ENV_DATA_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the app's socket goes.
pub fn socket_path() -> Result<PathBuf, ServeError> {
    let dir = std::env::var_os(ENV_SOCKET_DIR).ok_or(ServeError::NoEnv(ENV_SOCKET_DIR))?;
    Ok(PathBuf::from(dir).join(SOCKET_NAME))
}

/// The session id edged started this instance for.
pub fn session_id() -> Option<String> {
    std::env::var(ENV_SESSION_ID).ok()
}

/// Serves the app's services (and grpc.health.v1) on the session's socket
/// until SIGTERM or SIGINT, then finishes the calls in flight and returns.
pub async fn serve(router: tonic::transport::server::Router) -> Result<(), ServeError> {
    let path = socket_path()?;
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| ServeError::Bind(path.display().to_string(), e))?;
    tracing::info!(socket = %path.display(), data = %data_dir().display(), "serving");
    // grpc.health.v1 on every app: a standard no-op edged and operators can probe.
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    router
        .add_service(health_svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown())
        .await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
