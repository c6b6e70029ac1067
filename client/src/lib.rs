//! edge-client: the mobile side of edgeshift.
//!
//! Connect to an edge, open a session for an app, then call the app either
//! with raw [`Session::invoke`] or, transparently, through the app's own
//! generated tonic client built over [`Session::channel`]: each call becomes
//! an `Invoke` carrying the session, its token and a fresh op id. When the
//! user moves, [`Session::handover_to`] (or a [`Follower`] watching a
//! locator) moves the session to the new nearest edge; the same handle and
//! the same stubs keep working.
//!
//! ```ignore
//! let trust = edge_client::Trust::ca_file("fleet-ca.pem")?;
//! let edge = edge_client::connect_with("edge1.example:50051", &trust).await?;
//! let session = edge.open_session("list", "phone-1").await?;
//! let mut list = ListClient::new(session.channel());
//! list.add(AddRequest { item: "milk".into() }).await?;
//! ```
//!
//! # Layout
//! - this file: [`connect`], [`EdgeClient`], [`Session`];
//! - [`channel`]: [`SessionChannel`], the tower service generated stubs call;
//! - [`locator`]: which edge is nearest ([`FileLocator`] watches a file) and
//!   a [`Follower`] that hands the session over when it changes.

#![warn(missing_docs)]

pub mod channel;
pub mod locator;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use edge_proto::v1 as pb;
use edge_proto::v1::edge_client::EdgeClient as EdgeStub;
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::Channel;

pub use channel::SessionChannel;
/// Progress of a handover, as the new edge reports it.
pub use edge_proto::v1::HandoverProgress;
pub use locator::{FileLocator, Follower};

/// Metadata key on a call refused because its session is moving.
pub const MOVING_KEY: &str = edge_proto::meta::MOVING;
/// Metadata key: the address of the edge a session moved to.
pub const MOVED_TO_ADDR: &str = edge_proto::meta::MOVED_TO_ADDR;
/// Metadata key: the id of the edge a session moved to.
pub const MOVED_TO_ID: &str = edge_proto::meta::MOVED_TO_ID;
/// Where a handover is.
pub use edge_proto::v1::HandoverPhase;

/// How long a call refused as "moving" waits for the session to land.
pub const MOVE_WAIT: Duration = Duration::from_secs(60);

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

/// How a client checks the edges it talks to. The same trust is used for
/// every edge a session is later redirected or handed over to.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// TLS; an edge must present a certificate of this CA (the fleet's,
    /// PEM) naming the host it is dialed at.
    Ca(String),
    /// No TLS: the session token crosses the network in the clear. For
    /// edges on loopback only (`insecure_plaintext`); other addresses are
    /// refused.
    Plaintext,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trust::Ca(_) => "Trust::Ca",
            Trust::Plaintext => "Trust::Plaintext",
        })
    }
}

impl Trust {
    /// Trusts the fleet CA certificate in the PEM file at `path`.
    pub fn ca_file(path: impl AsRef<std::path::Path>) -> std::io::Result<Trust> {
        std::fs::read_to_string(path).map(Trust::Ca)
    }

    fn scheme(&self) -> &'static str {
        match self {
            Trust::Ca(_) => "https",
            Trust::Plaintext => "http",
        }
    }
}

/// `host:port` of an address with or without a scheme.
fn bare(addr: &str) -> &str {
    addr.trim_start_matches("https://")
        .trim_start_matches("http://")
}

/// A connection to one edge.
#[derive(Debug, Clone)]
pub struct EdgeClient {
    stub: EdgeStub<Channel>,
    addr: String,
    trust: Trust,
}

/// Connects to an edge without TLS (`http://host:port` or `host:port`):
/// for edges on loopback. Use [`connect_with`] and a [`Trust`] otherwise.
pub async fn connect(addr: &str) -> Result<EdgeClient, ConnectError> {
    if addr.starts_with("https://") {
        return Err(ConnectError::Address(
            addr.into(),
            "an https edge needs a Trust: use connect_with(addr, Trust::Ca(pem))".into(),
        ));
    }
    connect_with(addr, &Trust::Plaintext).await
}

/// Connects to an edge (`host:port`, or a URL whose scheme matches
/// `trust`), verifying it as `trust` says: its certificate must name the
/// host dialed.
pub async fn connect_with(addr: &str, trust: &Trust) -> Result<EdgeClient, ConnectError> {
    connect_as(addr, trust, None).await
}

/// Whether `host:port` names a loopback address or `localhost`.
fn loopback(addr: &str) -> bool {
    let a = bare(addr);
    let host = match a.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => a.rsplit_once(':').map_or(a, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// [`connect_with`]; with `edge_id`, under TLS the certificate must name
/// that edge (`ID.edge.edgeshift`) instead of the host: how a redirect to
/// an edge known by id is followed.
async fn connect_as(
    addr: &str,
    trust: &Trust,
    edge_id: Option<&str>,
) -> Result<EdgeClient, ConnectError> {
    if *trust == Trust::Plaintext && !loopback(addr) {
        return Err(ConnectError::Address(
            addr.into(),
            "plaintext only to a loopback edge: the token would cross the network in the clear; use Trust::Ca".into(),
        ));
    }
    if addr.contains("://") && !addr.starts_with(&format!("{}://", trust.scheme())) {
        return Err(ConnectError::Address(
            addr.into(),
            format!("expected a {}:// address for {trust:?}", trust.scheme()),
        ));
    }
    let url = format!("{}://{}", trust.scheme(), bare(addr));
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| ConnectError::Address(addr.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Trust::Ca(pem) = trust {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        if let Some(id) = edge_id {
            tls = tls.domain_name(edge_proto::edge_tls_name(id));
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| ConnectError::Address(addr.into(), e.to_string()))?;
    }
    let ch = ep
        .connect()
        .await
        .map_err(|e| ConnectError::Unreachable(url.clone(), e))?;
    Ok(EdgeClient {
        stub: EdgeStub::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        addr: url,
        trust: trust.clone(),
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

pub use edge_proto::phase_name;

/// A handover that broke because the new edge stopped answering, said in
/// plain words (the old edge still serves the session).
fn lost_edge(st: Status, to: &str, from_edge: &str) -> Status {
    if edge_proto::lost_connection(&st) {
        Status::unavailable(format!(
            "the new edge {to} stopped answering during the handover (connection lost); the session stays on edge {from_edge}"
        ))
    } else {
        st
    }
}

/// The edge serving a session now.
#[derive(Clone)]
struct Current {
    stub: EdgeStub<Channel>,
    addr: String,
    edge_id: String,
}

struct Inner {
    /// Swapped by a handover.
    edge: RwLock<Current>,
    id: String,
    token: Bytes,
    next_op: AtomicU64,
    phases: Vec<(String, Duration)>,
    /// Bumped whenever a handover ends (either way): calls refused as
    /// "moving" wait for it, then go again.
    handovers: watch::Sender<u64>,
    /// How edges named by redirects are verified.
    trust: Trust,
}

/// An open session: a handle to the client's own instance of an app.
/// Cheap to clone; clones share the op id sequence and follow handovers.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("edge", &self.current().edge_id)
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
        let current = Current {
            stub: edge.stub.clone(),
            addr: edge.addr.clone(),
            edge_id,
        };
        Session {
            inner: Arc::new(Inner {
                edge: RwLock::new(current),
                id,
                token,
                next_op: AtomicU64::new(start),
                phases,
                handovers: watch::channel(0).0,
                trust: edge.trust.clone(),
            }),
        }
    }

    fn current(&self) -> Current {
        self.inner
            .edge
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stub(&self) -> EdgeStub<Channel> {
        self.current().stub
    }

    /// How the edges of this session are verified.
    pub fn trust(&self) -> &Trust {
        &self.inner.trust
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
    pub fn edge_id(&self) -> String {
        self.current().edge_id
    }

    /// Address of the edge serving the session.
    pub fn edge_addr(&self) -> String {
        self.current().addr
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
    /// A call refused because the session is moving waits for the handover
    /// and goes again, with the same op id, to whichever edge serves then.
    pub async fn invoke_op(
        &self,
        op_id: u64,
        method: &str,
        payload: Bytes,
    ) -> Result<Bytes, Status> {
        let req = pb::InvokeRequest {
            session_id: self.inner.id.clone(),
            token: self.inner.token.to_vec(),
            op_id,
            method: method.into(),
            payload: payload.to_vec(),
        };
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            let mut ended = self.inner.handovers.subscribe();
            match self.stub().invoke(req.clone()).await {
                Ok(r) => return Ok(r.into_inner().payload.into()),
                Err(st)
                    if st.metadata().get(MOVING_KEY).is_some()
                        && tokio::time::Instant::now() < deadline =>
                {
                    // The old edge may say where the session went (a move this
                    // handle did not drive, e.g. by the operator): follow it.
                    let meta = |k: &str| {
                        st.metadata()
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let here = self.edge_addr();
                    let to = meta(MOVED_TO_ADDR).filter(|a| bare(a) != bare(&here));
                    let to_id = meta(MOVED_TO_ID).unwrap_or_default();
                    // Under TLS a redirect is followed only to the edge it
                    // names by id, verified as that edge: a certificate of
                    // the fleet for the address alone is not enough.
                    let verified = match &self.inner.trust {
                        Trust::Ca(_) if to_id.is_empty() => None,
                        Trust::Ca(_) => Some(Some(to_id.as_str())),
                        Trust::Plaintext => Some(None),
                    };
                    if let (Some(addr), Some(id)) = (to, verified) {
                        if let Ok(edge) = connect_as(bare(&addr), &self.inner.trust, id).await {
                            let edge_id = to_id.clone();
                            *self.inner.edge.write().unwrap_or_else(|e| e.into_inner()) = Current {
                                stub: edge.stub,
                                addr: edge.addr,
                                edge_id,
                            };
                            continue;
                        }
                    }
                    // Wait for the handover to end (ours, or one we do not drive).
                    let _ = tokio::time::timeout(Duration::from_millis(200), ended.changed()).await;
                }
                Err(st) => return Err(st),
            }
        }
    }

    /// The result of op `op_id`, waiting while it runs (e.g. after a reconnect
    /// or a handover).
    pub async fn result(&self, op_id: u64) -> Result<Bytes, Status> {
        let r = self
            .stub()
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
        self.stub()
            .close_session(pb::CloseSessionRequest {
                session_id: self.inner.id.clone(),
                token: self.inner.token.to_vec(),
            })
            .await?;
        Ok(())
    }

    /// Names the edges this client may move to next (ids of the serving
    /// edge's neighbours): the session is pre-copied to those only. An empty
    /// list means all neighbours. Returns the candidates in effect.
    pub async fn set_candidates(&self, edge_ids: &[&str]) -> Result<Vec<String>, Status> {
        let r = self
            .stub()
            .set_candidates(pb::CandidatesRequest {
                session_id: self.inner.id.clone(),
                token: self.inner.token.to_vec(),
                edge_ids: edge_ids.iter().map(|s| s.to_string()).collect(),
            })
            .await?;
        Ok(r.into_inner().edge_ids)
    }

    /// A channel for the app's generated tonic client: calls through it are
    /// invokes of this session (and follow it across handovers).
    pub fn channel(&self) -> SessionChannel {
        SessionChannel::new(self.clone())
    }

    /// Moves the session to the edge `to` (the user moved): `to` pulls it
    /// from the edge serving it now. `progress` sees every phase; on success
    /// the session is served by `to`. On failure the old edge still serves it
    /// and the error says why.
    pub async fn handover_to(
        &self,
        to: &EdgeClient,
        mut progress: impl FnMut(&HandoverProgress),
    ) -> Result<(), Status> {
        if to.trust != self.inner.trust {
            // The token goes to `to`: only as the session's own trust says.
            return Err(Status::invalid_argument(format!(
                "the edge client for {} verifies edges as {:?}, this session as {:?}: connect to it with the session's trust",
                to.addr, to.trust, self.inner.trust
            )));
        }
        let from = self.current();
        let result = async {
            let lost = |st: Status| lost_edge(st, &to.addr, &from.edge_id);
            let mut stream = to
                .stub
                .clone()
                .handover(pb::HandoverRequest {
                    session_id: self.inner.id.clone(),
                    token: self.inner.token.to_vec(),
                    from_addr: bare(&from.addr).to_string(),
                    from_edge: from.edge_id.clone(),
                })
                .await
                .map_err(lost)?
                .into_inner();
            while let Some(p) = stream.message().await.map_err(lost)? {
                progress(&p);
                if p.phase() == HandoverPhase::Ready {
                    *self.inner.edge.write().unwrap_or_else(|e| e.into_inner()) = Current {
                        stub: to.stub.clone(),
                        addr: to.addr.clone(),
                        edge_id: p.edge_id.clone(),
                    };
                    return Ok(());
                }
            }
            Err(Status::unavailable(
                "the new edge ended the handover without being ready",
            ))
        }
        .await;
        self.inner.handovers.send_modify(|g| *g += 1);
        result
    }
}
