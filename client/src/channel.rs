//! [`SessionChannel`]: a tower service that looks like a tonic `Channel` to
//! the app's generated client. It takes the gRPC request the stub built,
//! unwraps the message, sends it as an `Invoke` of the session, and wraps the
//! answer back into a gRPC response (message and `grpc-status` trailers), so
//! the app's own proxy object works unchanged — distribution transparency.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tonic::Status;
use tonic::body::Body;

use crate::Session;

/// See the module docs.
#[derive(Clone, Debug)]
pub struct SessionChannel {
    session: Session,
}

impl SessionChannel {
    pub(crate) fn new(session: Session) -> Self {
        SessionChannel { session }
    }
}

/// Unframes a unary gRPC message: 1 byte compression flag, 4 bytes length.
fn unframe(mut b: Bytes) -> Result<Bytes, Status> {
    if b.len() < 5 {
        return Err(Status::internal("request body is not a gRPC message"));
    }
    if b[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not forwarded",
        ));
    }
    b.advance(1);
    let len = b.get_u32() as usize;
    if b.len() != len {
        return Err(Status::internal(
            "only unary calls travel through a session",
        ));
    }
    Ok(b)
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 5);
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

fn ok_response(msg: Bytes) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([
        Ok::<_, Status>(Frame::data(frame(&msg))),
        Ok(Frame::trailers(trailers)),
    ]);
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(StreamBody::new(frames)))
        .expect("static response parts")
}

impl tower::Service<http::Request<Body>> for SessionChannel {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let session = self.session.clone();
        Box::pin(async move {
            let method = req.uri().path().to_string();
            let result = async {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Status::internal(format!("reading the request: {e}")))?
                    .to_bytes();
                session.invoke(&method, unframe(body)?).await
            }
            .await;
            Ok(match result {
                Ok(msg) => ok_response(msg),
                Err(status) => status.into_http(),
            })
        })
    }
}
