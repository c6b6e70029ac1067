//! The gRPC boundary: the `Edge`, `Admin` and `Peer` services and grpc.health.v1,
//! where session errors become statuses.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::v1 as pb;
use edge_proto::v1::admin_server::{Admin, AdminServer};
use edge_proto::v1::edge_server::{Edge as EdgeSvc, EdgeServer};
use edge_proto::v1::peer_server::{Peer, PeerServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::pki::Identity;
use crate::session::Edge;

/// Implements `edge.v1.Edge` over an [`Edge`].
#[derive(Debug, Clone)]
pub struct EdgeService(pub Arc<Edge>);

#[tonic::async_trait]
impl EdgeSvc for EdgeService {
    async fn open_session(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let r = req.into_inner();
        let (s, token, phases) = self
            .0
            .open(&r.app, &r.client_id)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: s.id.clone(),
            token: token.to_vec(),
            edge_id: self.0.cfg.edge_id.clone(),
            phases: phases
                .into_iter()
                .map(|(name, d)| pb::Phase {
                    name: name.into(),
                    micros: d.as_micros() as u64,
                })
                .collect(),
        }))
    }

    async fn invoke(
        &self,
        req: Request<pb::InvokeRequest>,
    ) -> Result<Response<pb::InvokeResponse>, Status> {
        let r = req.into_inner();
        let payload = self
            .0
            .invoke(
                &r.session_id,
                &r.token,
                r.op_id,
                &r.method,
                r.payload.into(),
            )
            .await?;
        Ok(Response::new(pb::InvokeResponse {
            payload: payload.to_vec(),
        }))
    }

    async fn result(
        &self,
        req: Request<pb::ResultRequest>,
    ) -> Result<Response<pb::InvokeResponse>, Status> {
        let r = req.into_inner();
        let payload = self.0.result(&r.session_id, &r.token, r.op_id).await?;
        Ok(Response::new(pb::InvokeResponse {
            payload: payload.to_vec(),
        }))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let r = req.into_inner();
        self.0
            .close(&r.session_id, Some(&r.token))
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::CloseSessionResponse {}))
    }

    async fn set_candidates(
        &self,
        req: Request<pb::CandidatesRequest>,
    ) -> Result<Response<pb::CandidatesResponse>, Status> {
        let r = req.into_inner();
        let ids = self
            .0
            .set_candidates(&r.session_id, &r.token, r.edge_ids)
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::CandidatesResponse { edge_ids: ids }))
    }

    type HandoverStream = ReceiverStream<Result<pb::HandoverProgress, Status>>;

    async fn handover(
        &self,
        req: Request<pb::HandoverRequest>,
    ) -> Result<Response<Self::HandoverStream>, Status> {
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let edge = self.0.clone();
        tokio::spawn(async move {
            if let Err(st) = edge
                .take(&r.session_id, &r.token, &r.from_edge, &r.from_addr, &tx)
                .await
            {
                tracing::warn!(session = %r.session_id, error = %st.message(), "handover failed");
                let _ = tx.send(Err(st)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Implements `edge.v1.Admin` over an [`Edge`].
#[derive(Debug, Clone)]
pub struct AdminService(pub Arc<Edge>);

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_sessions(
        &self,
        _req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Ok(Response::new(pb::ListSessionsResponse {
            edge_id: self.0.cfg.edge_id.clone(),
            sessions: self.0.list().await,
        }))
    }

    async fn close_session(
        &self,
        req: Request<pb::AdminCloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        self.0
            .close(&req.into_inner().session_id, None)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::CloseSessionResponse {}))
    }

    type MigrateStream = ReceiverStream<Result<pb::HandoverProgress, Status>>;

    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        self.0.migrate(&r.session_id, &r.to_edge, tx)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Implements `edge.v1.Peer` over an [`Edge`].
#[derive(Debug, Clone)]
pub struct PeerService(pub Arc<Edge>);

impl PeerService {
    /// The calling edge: under TLS the id its certificate names (a request
    /// field never counts); in plaintext, `claimed`.
    fn caller<T>(&self, req: &Request<T>, claimed: &str) -> Result<String, Status> {
        if !self.0.peers.authenticated() {
            // A name from a request field: bounded like any id before it is
            // kept or echoed in an answer.
            if !claimed.is_empty() && !crate::config::valid_name(claimed) {
                return Err(Status::invalid_argument("bad edge id"));
            }
            return Ok(claimed.to_string());
        }
        match crate::tls::caller(req) {
            Some(Identity::Edge(id)) => Ok(id),
            Some(Identity::Operator(name)) => Err(Status::permission_denied(format!(
                "operator {name}: the Peer service serves fleet edges only"
            ))),
            None => Err(Status::unauthenticated(
                "the Peer service needs the certificate of a fleet edge (mutual TLS)",
            )),
        }
    }

    /// The calling edge, which must be a configured neighbour of this one
    /// (pre-copy, drop and operator moves happen between neighbours only).
    fn neighbour<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let id = self.caller(req, "")?;
        if self.0.peers.authenticated() && !self.0.cfg.neighbours.iter().any(|n| n.id == id) {
            return Err(Status::permission_denied(format!(
                "edge {id} is not a neighbour of edge {}",
                self.0.cfg.edge_id
            )));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        self.caller(&req, "")?;
        let r = req.into_inner();
        if r.version != edge_proto::PEER_VERSION {
            return Err(Status::failed_precondition(format!(
                "this edge speaks peer protocol v{}, the peer v{}",
                edge_proto::PEER_VERSION,
                r.version
            )));
        }
        // The app of a session this edge owns, for a puller that holds its
        // token (it starts the app's standby instance).
        let app = (!r.session_id.is_empty())
            .then(|| self.0.app_for_peer(&r.session_id, &r.token))
            .flatten()
            .unwrap_or_default();
        Ok(Response::new(pb::HelloResponse {
            version: edge_proto::PEER_VERSION,
            edge_id: self.0.cfg.edge_id.clone(),
            app,
        }))
    }

    type HandoverStream = ReceiverStream<Result<pb::HandoverChunk, Status>>;

    async fn handover(
        &self,
        req: Request<pb::PeerHandoverRequest>,
    ) -> Result<Response<Self::HandoverStream>, Status> {
        // Few frames in flight: the give task's pace is the link's, so the
        // rate a live round measures is the link's too.
        let to = self.caller(&req, &req.get_ref().to_edge)?;
        let mut r = req.into_inner();
        r.to_edge = to;
        let (tx, rx) = mpsc::channel(4);
        let edge = self.0.clone();
        tokio::spawn(async move { edge.give(r, tx).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type AdoptStream = ReceiverStream<Result<pb::HandoverProgress, Status>>;

    async fn adopt(
        &self,
        req: Request<pb::AdoptRequest>,
    ) -> Result<Response<Self::AdoptStream>, Status> {
        // Under TLS the edge asking is the owner it will be dialed as.
        let from = self.neighbour(&req)?;
        let (tx, rx) = mpsc::channel(16);
        self.0.adopt(from, req.into_inner(), tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn precopy(
        &self,
        req: Request<tonic::Streaming<pb::PrecopyChunk>>,
    ) -> Result<Response<pb::PrecopyAck>, Status> {
        self.neighbour(&req)?;
        Ok(Response::new(self.0.stage(req.into_inner()).await?))
    }

    async fn drop(
        &self,
        req: Request<pb::DropRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.neighbour(&req)?;
        self.0.drop_staged(&req.into_inner().session_id).await;
        Ok(Response::new(pb::ReleaseResponse::default()))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let from = self.caller(&req, &req.get_ref().from_edge)?;
        let r = req.into_inner();
        session_named(&r.session_id)?;
        let held = self
            .0
            .release(&r.session_id, r.attempt, &from)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::ReleaseResponse {
            held_micros: held.map_or(0, |d| d.as_micros() as u64),
        }))
    }

    async fn round_applied(
        &self,
        req: Request<pb::RoundAppliedRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let from = self.caller(&req, &req.get_ref().from_edge)?;
        let r = req.into_inner();
        session_named(&r.session_id)?;
        self.0
            .round_applied(
                &r.session_id,
                r.attempt,
                r.round,
                std::time::Duration::from_micros(r.finish_micros),
                &from,
            )
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::ReleaseResponse::default()))
    }

    async fn abort(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let from = self.caller(&req, &req.get_ref().from_edge)?;
        let r = req.into_inner();
        session_named(&r.session_id)?;
        self.0
            .abort_handover(&r.session_id, r.attempt, &from)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::ReleaseResponse::default()))
    }
}

/// Serves `edge` until `shutdown` resolves: the Edge and Peer services (and
/// health) on `listener`, the Admin service on `admin` (a Unix socket, see
/// [`crate::admin`]) and on `admin_tcp` (`admin_listen`, operators' TLS); reaps idle sessions meanwhile. Sessions stay up
/// after shutdown (a restarted edged recovers them) unless the caller
/// closes them.
pub async fn run(
    edge: Arc<Edge>,
    listener: TcpListener,
    admin: tokio::net::UnixListener,
    admin_tcp: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(AdminService(edge.clone())))
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin), stopped(stop_rx.clone())),
    );
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<EdgeServer<EdgeService>>().await;
    let reaper = {
        let edge = edge.clone();
        let every =
            (edge.cfg.session_ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                edge.reap_idle().await;
                edge.prune_staged().await;
                edge.prune();
                edge.retry_failed().await;
            }
        })
    };
    let precopy = tokio::spawn(edge.clone().precopy_loop());
    let limit = edge.cfg.max_payload + 4096;
    // Small unary calls must not wait for Nagle's algorithm (a 40 ms stall
    // against delayed ACKs); tonic sets no option on a caller's listener.
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    // One connection carries a peer's pre-copy rounds, pulls and releases
    // (edged pools them): a stalled bulk stream must not take the whole
    // connection's flow-control window from a release.
    let mut builder = tonic::transport::Server::builder()
        .initial_connection_window_size(crate::peers::CONNECTION_WINDOW);
    if let Some(tls) = edge.peers.material() {
        builder = builder.tls_config(tls.edge_port())?;
    }
    let admin_tcp = match (admin_tcp, edge.peers.material()) {
        (Some(listener), Some(tls)) => Some(tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tls.admin_port())?
                .add_service(AdminServer::with_interceptor(
                    AdminService(edge.clone()),
                    operators_only,
                ))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stopped(stop_rx.clone()),
                ),
        )),
        _ => None,
    };
    let result = builder
        .add_service(health_svc)
        .add_service(
            EdgeServer::new(EdgeService(edge.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            PeerServer::new(PeerService(edge.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    reaper.abort();
    precopy.abort();
    if let Ok(Err(e)) = admin_server.await {
        tracing::error!(error = %e, "the Admin service failed");
    }
    if let Some(t) = admin_tcp {
        if let Ok(Err(e)) = t.await {
            tracing::error!(error = %e, "the Admin TCP service failed");
        }
    }
    result
}

/// The Admin TCP port serves operator certificates only (an edge's
/// certificate is the fleet's too, but an edge is no operator).
/// A session id from another edge, checked before it is looked up or
/// echoed in an answer.
fn session_named(id: &str) -> Result<(), Status> {
    if crate::config::valid_name(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument("bad session id"))
    }
}

fn operators_only(req: Request<()>) -> Result<Request<()>, Status> {
    match crate::tls::caller(&req) {
        Some(Identity::Operator(_)) => Ok(req),
        _ => Err(Status::permission_denied(
            "the Admin service needs an operator certificate of the fleet CA",
        )),
    }
}
