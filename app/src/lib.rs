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
//! | `EDGE_ACTIVATION` | `/run/edge/activate` | set for a warm standby: wait |
//!
//! A warm standby (the app's `standby = true` in edged's config) is started
//! on the new edge of a handover before its volume is there: the app sets
//! itself up, then waits until edged activates it before it touches its
//! data. [`data_dir`] does that wait, so an app that gets its data
//! directory from it needs nothing else. In another language: open the
//! FIFO named by `EDGE_ACTIVATION` without blocking (`O_NONBLOCK`), poll it
//! for input, read one byte: `1` means go on (change to the data directory
//! again: the volume is mounted over it now), nothing (end of file) means
//! exit.
//!
//! ```ignore
//! let router = tonic::transport::Server::builder().add_service(ListServer::new(MyList::open()?));
//! edge_app::serve(router).await?;
//! ```
//!
//! # Layout
//! Everything is in this file: [`serve`], [`data_dir`] (with
//! [`wait_until_active`]), [`socket_path`].

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

/// Environment variable of a warm standby: the FIFO to wait on.
pub const ENV_ACTIVATION: &str = "EDGE_ACTIVATION";

/// The session's volume: where the app keeps its state. The first call of
/// a warm standby blocks until edged activates the instance (see
/// [`wait_until_active`]).
pub fn data_dir() -> PathBuf {
    wait_until_active();
    std::env::var_os(ENV_DATA_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Under a warm standby (`EDGE_ACTIVATION` set): blocks until edged
/// activates this instance, i.e. its volume is mounted at the data
/// directory; exits the process (status 0) when edged gives the standby up
/// instead, and (status 1) when the data directory did not change.
/// Without the variable, or after the first call, returns at once. It
/// blocks its thread: call it (or [`data_dir`]) before the async work
/// starts. A process the app starts inherits the variable: take it out of
/// the child's environment.
pub fn wait_until_active() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(fifo) = std::env::var_os(ENV_ACTIVATION) else {
            return;
        };
        let data = std::env::var_os(ENV_DATA_DIR).map(PathBuf::from);
        let id = |d: &Option<PathBuf>| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(d.as_ref()?).ok()?;
            Some((m.dev(), m.ino()))
        };
        let before = id(&data);
        match read_activation(std::path::Path::new(&fifo)) {
            Ok(true) if before.is_some() && id(&data) == before => {
                eprintln!("edge-app: activated, but the volume is not at {data:?}");
                std::process::exit(1);
            }
            Ok(true) => {
                // The working directory is the directory the volume now
                // covers: enter the volume.
                if let Some(d) = &data {
                    let _ = std::env::set_current_dir(d);
                }
                tracing::info!("activated: the volume is here");
            }
            Ok(false) => {
                tracing::info!("the standby was given up; exiting");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("edge-app: waiting for the activation on {fifo:?}: {e}");
                std::process::exit(1);
            }
        }
    });
}

/// Reads the activation byte: true to go on, false at end of file.
fn read_activation(fifo: &std::path::Path) -> std::io::Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    // Opened without blocking: edged sees the app wait once it is open.
    // Polled, not read: a FIFO no writer opened yet reads as end of file,
    // while poll waits for the byte or for edged's end to close.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)?;
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let mut b = [0u8; 1];
    match f.read(&mut b) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(b[0] == b'1'),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    /// A FIFO in a fresh temporary directory.
    fn fifo(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("edge-app-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        let p = d.join("activate");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    /// Opens the writing end once the reader waits, as edged does.
    fn writer(p: &std::path::Path) -> std::fs::File {
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
            {
                Ok(f) => return f,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        }
    }

    #[test]
    fn the_byte_activates_and_a_closed_writer_gives_up() {
        let p = fifo("go");
        let p2 = p.clone();
        let edged = std::thread::spawn(move || {
            let mut w = writer(&p2);
            // The app must not go on before the byte.
            std::thread::sleep(std::time::Duration::from_millis(50));
            w.write_all(b"1").unwrap();
        });
        let t = std::time::Instant::now();
        assert!(super::read_activation(&p).unwrap());
        assert!(t.elapsed() >= std::time::Duration::from_millis(50));
        edged.join().unwrap();

        let p = fifo("gone");
        let p2 = p.clone();
        let edged = std::thread::spawn(move || drop(writer(&p2)));
        assert!(!super::read_activation(&p).unwrap());
        edged.join().unwrap();
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
