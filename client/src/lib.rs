//! edge-client: the mobile side of edgeshift.
//!
//! Connect to an edge, open a session for an app, then call the app either
//! with raw [`Session::invoke`] or, transparently, through the app's own
//! generated tonic client built over [`Session::channel`]: each call becomes
//! an `Invoke` carrying the session, its token and a fresh op id.
//!
//! ```ignore
//! let edge = edge_client::connect("http://127.0.0.1:50051").await?;
//! let session = edge.open_session("list", "phone-1").await?;
//! let mut list = ListClient::new(session.channel());
//! list.add(AddRequest { item: "milk".into() }).await?;
//! ```
//!
//! # Layout
//! - this file: [`connect`], [`EdgeClient`], [`Session`];
//! - [`channel`]: [`SessionChannel`], the tower service generated stubs call.

#![warn(missing_docs)]

pub mod channel;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use edge_proto::v1 as pb;
use edge_proto::v1::edge_client::EdgeClient as EdgeStub;
use tonic::Status;
use tonic::transport::Channel;

pub use channel::SessionChannel;

/// Errors of connecting.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address does not parse.
    #[error("bad edge address {0:?}: {1}")]
    Address(String, String),
    /// The edge does not answer.
    #[error("edge {0} unreachable: {1}")]
    Unreachable(String, tonic::transport::Error),
}

/// A connection to one edge.
#[derive(Debug, Clone)]
pub struct EdgeClient {
    stub: EdgeStub<Channel>,
    addr: String,
}

/// Connects to an edge (`http://host:port`, or `host:port`).
pub async fn connect(addr: &str) -> Result<EdgeClient, ConnectError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| ConnectError::Address(addr.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let ch = ep
        .connect()
        .await
        .map_err(|e| ConnectError::Unreachable(url.clone(), e))?;
    Ok(EdgeClient {
        stub: EdgeStub::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        addr: url,
    })
}

impl EdgeClient {
    /// The edge's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Opens a session for `app` on this edge.
    pub async fn open_session(&self, app: &str, client_id: &str) -> Result<Session, Status> {
        let r = self
            .stub
            .clone()
            .open_session(pb::OpenSessionRequest {
                app: app.into(),
                client_id: client_id.into(),
            })
            .await?
            .into_inner();
        let phases = r
            .phases
            .iter()
            .map(|p| (p.name.clone(), Duration::from_micros(p.micros)))
            .collect();
        Ok(Session::attach(
            self,
            r.session_id,
            r.token.into(),
            r.edge_id,
            phases,
        ))
    }
}

struct Inner {
    stub: EdgeStub<Channel>,
    id: String,
    token: Bytes,
    edge_id: String,
    next_op: AtomicU64,
    phases: Vec<(String, Duration)>,
}

/// An open session: a handle to the client's own instance of an app.
/// Cheap to clone; clones share the op id sequence.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("edge", &self.inner.edge_id)
            .finish()
    }
}

impl Session {
    /// A handle to an existing session (e.g. after a reconnect), given its id and token.
    pub fn attach(
        edge: &EdgeClient,
        id: String,
        token: Bytes,
        edge_id: String,
        phases: Vec<(String, Duration)>,
    ) -> Session {
        // Op ids start at a random point so two handles of one session do not collide.
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("the OS random source works");
        let start = u64::from_le_bytes(seed) >> 16;
        Session {
            inner: Arc::new(Inner {
                stub: edge.stub.clone(),
                id,
                token,
                edge_id,
                next_op: AtomicU64::new(start),
                phases,
            }),
        }
    }

    /// Session id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The session token (keep it secret).
    pub fn token(&self) -> &Bytes {
        &self.inner.token
    }

    /// Id of the edge serving the session.
    pub fn edge_id(&self) -> &str {
        &self.inner.edge_id
    }

    /// How long each phase of the open took on the edge.
    pub fn open_phases(&self) -> &[(String, Duration)] {
        &self.inner.phases
    }

    /// A fresh op id.
    pub fn next_op_id(&self) -> u64 {
        self.inner.next_op.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls `method` (e.g. `/list.v1.List/Add`) with an encoded request; a fresh op id.
    pub async fn invoke(&self, method: &str, payload: Bytes) -> Result<Bytes, Status> {
        self.invoke_op(self.next_op_id(), method, payload).await
    }

    /// Calls with a given op id: a retry with the same id is not run twice.
    pub async fn invoke_op(
        &self,
        op_id: u64,
        method: &str,
        payload: Bytes,
    ) -> Result<Bytes, Status> {
        let r = self
            .inner
            .stub
            .clone()
            .invoke(pb::InvokeRequest {
                session_id: self.inner.id.clone(),
                token: self.inner.token.to_vec(),
                op_id,
                method: method.into(),
                payload: payload.to_vec(),
            })
            .await?;
        Ok(r.into_inner().payload.into())
    }

    /// The result of op `op_id`, waiting while it runs (e.g. after a reconnect).
    pub async fn result(&self, op_id: u64) -> Result<Bytes, Status> {
        let r = self
            .inner
            .stub
            .clone()
            .result(pb::ResultRequest {
                session_id: self.inner.id.clone(),
                token: self.inner.token.to_vec(),
                op_id,
            })
            .await?;
        Ok(r.into_inner().payload.into())
    }

    /// Closes the session: the edge stops the instance and removes its volume.
    pub async fn close(&self) -> Result<(), Status> {
        self.inner
            .stub
            .clone()
            .close_session(pb::CloseSessionRequest {
                session_id: self.inner.id.clone(),
                token: self.inner.token.to_vec(),
            })
            .await?;
        Ok(())
    }

    /// A channel for the app's generated tonic client: calls through it are
    /// invokes of this session.
    pub fn channel(&self) -> SessionChannel {
        SessionChannel::new(self.clone())
    }
}
