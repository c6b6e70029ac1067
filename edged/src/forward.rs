//! Forwarding a call to the app: a unary gRPC call over the app's Unix
//! socket whose request and response are opaque bytes (a raw codec), so
//! edged needs none of the app's types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::TokioIo;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// File name of the app's socket in its socket directory.
pub const SOCKET_NAME: &str = "app.sock";

/// A codec that passes message bytes through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// Encoder/decoder of [`RawCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Connects to the app's socket without following a symlink the app may
/// have planted in its socket directory: the name is opened `O_PATH |
/// O_NOFOLLOW` in the directory, must be a socket, and is connected to
/// through that very inode (`/proc/self/fd/N`). An app that replaces its
/// socket with a link to another session's socket is refused, not forwarded.
pub async fn connect_unix_nofollow(socket: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let dir = socket.parent().unwrap_or(Path::new("."));
    let name = socket.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path has no name")
    })?;
    let c = |p: &[u8]| {
        std::ffi::CString::new(p).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in socket path")
        })
    };
    let (cdir, cname) = (c(dir.as_os_str().as_bytes())?, c(name.as_bytes())?);
    // SAFETY: valid C strings; the returned fds are owned below.
    let dfd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dfd` is a fresh fd we own.
    let dfd = unsafe { OwnedFd::from_raw_fd(dfd) };
    // SAFETY: as above.
    let fd = unsafe {
        libc::openat(
            dfd.as_raw_fd(),
            cname.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero stat is a valid out buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is valid, `st` a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a socket (a symlink or another file planted by the app); refused",
                socket.display()
            ),
        ));
    }
    let s = tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await?;
    drop(fd);
    Ok(s)
}

/// A connection to one instance's socket.
#[derive(Debug, Clone)]
pub struct AppClient {
    channel: Channel,
    max_message: usize,
}

/// Checks a gRPC method path: `/package.Service/Method`.
pub fn valid_method(m: &str) -> bool {
    let Some(rest) = m.strip_prefix('/') else {
        return false;
    };
    let Some((svc, method)) = rest.split_once('/') else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._".contains(&b))
    };
    ok(svc) && ok(method) && m.len() <= 256
}

impl AppClient {
    /// A client that connects on first use (unit tests that never call).
    #[cfg(test)]
    pub fn lazy(socket: &Path, max_message: usize) -> AppClient {
        let path: PathBuf = socket.to_path_buf();
        let channel = Endpoint::from_static("http://app.invalid").connect_with_connector_lazy(
            tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }),
        );
        AppClient {
            channel,
            max_message,
        }
    }

    /// Connects to the socket (HTTP/2 handshake included).
    pub async fn connect(
        socket: &Path,
        max_message: usize,
    ) -> Result<AppClient, tonic::transport::Error> {
        let path: PathBuf = socket.to_path_buf();
        let channel =
            Endpoint::from_static("http://app.invalid")
                .connect_timeout(Duration::from_secs(2))
                .connect_with_connector(tower::service_fn(move |_| {
                    let p = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(connect_unix_nofollow(&p).await?))
                    }
                }))
                .await?;
        Ok(AppClient {
            channel,
            max_message,
        })
    }

    /// Calls `method` with an encoded request message.
    pub async fn call(&self, method: &str, payload: Bytes) -> Result<Bytes, Status> {
        let path = http::uri::PathAndQuery::try_from(method)
            .map_err(|_| Status::invalid_argument(format!("bad method path {method:?}")))?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("app instance not reachable: {e}")))?;
        grpc.unary(Request::new(payload), path, RawCodec)
            .await
            .map(|r| r.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve_health(path: &Path) {
        let (_, health) = tonic_health::server::health_reporter();
        let l = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
        );
    }

    #[tokio::test]
    async fn a_socket_the_app_replaced_with_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let other = d.path().join("other-session.sock");
        serve_health(&other).await;
        assert!(AppClient::connect(&other, 1024).await.is_ok());
        let run = d.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let planted = run.join(SOCKET_NAME);
        std::os::unix::fs::symlink(&other, &planted).unwrap();
        let err = connect_unix_nofollow(&planted).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert!(AppClient::connect(&planted, 1024).await.is_err());
        // A regular file is no socket either.
        std::fs::remove_file(&planted).unwrap();
        std::fs::write(&planted, b"x").unwrap();
        assert!(connect_unix_nofollow(&planted).await.is_err());
    }
}
