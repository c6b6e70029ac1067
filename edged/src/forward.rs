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
        let channel = Endpoint::from_static("http://app.invalid")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
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
