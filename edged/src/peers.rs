//! Dialing other edges of the fleet: the one place a `PeerClient` is made.
//!
//! With TLS, a peer is dialed by id and address: the handshake verifies the
//! certificate names `ID.edge.edgeshift` (see [`crate::pki`]), so a forged
//! "old edge" at an address a client named cannot answer; and this edge
//! presents its own certificate, which the peer reads its id from. Without
//! TLS (`insecure_plaintext`, loopback only) the id is not checked.
//!
//! Connections are pooled: one per (id, address), made on first use and
//! kept (a tonic channel reconnects by itself, with the same identity
//! check), so pre-copy rounds, handovers and releases to a neighbour share
//! one HTTP/2 connection rather than a TLS handshake each. Every connect,
//! the first and each reconnect, ends within [`DIAL_TIMEOUT`], TLS
//! handshake included. An entry is
//! forgotten when a call on it finds the peer unreachable, and the pool
//! holds at most [`MAX_POOLED`] entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_proto::v1::peer_client::PeerClient;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::tls::Material;

/// Largest message of the peer protocol (a delta frame).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Flow-control window of a whole connection between edges, several times
/// a stream's, so one stalled stream leaves room for the others.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// Longest a new connection to a peer may take, handshake included.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest the TCP connect alone may take (split among the addresses a
/// name resolves to).
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the pool keeps at most (neighbours and the edges sessions
/// came from); past it, the pool starts over.
pub const MAX_POOLED: usize = 256;

/// Pooled connections by (edge id, address).
type Pool = HashMap<(String, String), PeerClient<Channel>>;

/// Dials peers (see the module docs).
#[derive(Debug, Clone)]
pub struct Peers {
    tls: Option<Material>,
    pool: Arc<Mutex<Pool>>,
}

impl Peers {
    /// Dials with `tls`, or in plaintext when None.
    pub fn new(tls: Option<Material>) -> Peers {
        Peers {
            tls,
            pool: Arc::default(),
        }
    }

    fn key(id: &str, addr: &str) -> (String, String) {
        let bare = addr
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        (id.to_string(), bare.to_string())
    }

    /// A client of the edge `id` at `addr`: the pooled connection, or a new
    /// one ([`Peers::connect`]) kept for the next call.
    pub async fn dial(&self, id: &str, addr: &str) -> Result<PeerClient<Channel>, Status> {
        let key = Self::key(id, addr);
        if let Some(c) = self.lock().get(&key) {
            return Ok(c.clone());
        }
        let c = self.connect(id, addr).await?;
        let mut pool = self.lock();
        if pool.len() >= MAX_POOLED {
            pool.clear();
        }
        Ok(pool.entry(key).or_insert(c).clone())
    }

    /// Drops the pooled connection to `id` at `addr` (the peer did not
    /// answer): the next dial connects afresh.
    pub fn forget(&self, id: &str, addr: &str) {
        self.lock().remove(&Self::key(id, addr));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The certificates this edge serves with, under TLS.
    pub fn material(&self) -> Option<&Material> {
        self.tls.as_ref()
    }

    /// Whether peers are authenticated by certificate.
    pub fn authenticated(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection to the edge `id` at `addr` (`host:port`), with the
    /// limits of a delta stream. `id` may be empty only without TLS.
    pub async fn connect(&self, id: &str, addr: &str) -> Result<PeerClient<Channel>, Status> {
        let bare = addr
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{bare}"))
            .map_err(|e| Status::invalid_argument(format!("bad edge address {addr:?}: {e}")))?
            // With a connector of our own, tonic bounds the whole connect by
            // this, TLS handshake included, for the first connection and for
            // every reconnect of the pooled channel alike (with its built-in
            // connector it bounds TCP only: a peer that accepts and then
            // stalls the handshake would hold a dialer, and the pre-copy loop
            // serves every session).
            .connect_timeout(DIAL_TIMEOUT)
            // A peer that stops answering (stopped, partitioned) is noticed
            // even while a stream waits on it.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            // Shared by bulk rounds and small calls (see server::run).
            .initial_connection_window_size(CONNECTION_WINDOW);
        if self.tls.is_none() && !crate::config::loopback(bare) {
            return Err(Status::permission_denied(format!(
                "this edge runs in insecure_plaintext and dials loopback addresses only, not {bare}"
            )));
        }
        if let Some(tls) = &self.tls {
            if !crate::pki::valid_label(id) {
                return Err(Status::invalid_argument(format!(
                    "the edge at {bare} is named by no valid edge id ({id:?}); with TLS a peer is dialed by its id"
                )));
            }
            ep = ep
                .tls_config(tls.dial_peer(id))
                .map_err(|e| Status::internal(format!("TLS setup: {e}")))?;
        }
        // hyper's connector as tonic would build it (every address a name
        // resolves to, happy eyeballs, TCP_NODELAY), passed in so that the
        // timeout above covers TLS too.
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(TCP_CONNECT_TIMEOUT));
        let ch = ep.connect_with_connector(tcp).await.map_err(|e| {
            let detail = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            let who = if id.is_empty() {
                format!("the edge at {bare}")
            } else {
                format!("edge {id} at {bare}")
            };
            if detail.contains("certificate") || detail.contains("Certificate") {
                Status::permission_denied(format!(
                    "{who} did not prove it is edge {id:?} of this fleet: {detail}"
                ))
            } else if timed_out(&e) {
                Status::unavailable(format!(
                    "{who} did not finish connecting in time (TCP within {} s, TLS handshake included within {} s)",
                    TCP_CONNECT_TIMEOUT.as_secs(),
                    DIAL_TIMEOUT.as_secs()
                ))
            } else {
                Status::unavailable(format!(
                    "{who} does not answer ({e}: {detail}); is it running?"
                ))
            }
        })?;
        Ok(PeerClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }
}

/// Whether an io::Error of kind TimedOut is somewhere in `e`'s chain (the
/// connect timeout).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = x.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_stalls_its_handshake_is_given_up_and_not_pooled() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::Ca::generate().unwrap();
        ca.save(dir.path()).unwrap();
        let (cert, key) = ca
            .issue_edge("a", &["127.0.0.1".into()], 1)
            .unwrap()
            .save(dir.path(), "a")
            .unwrap();
        let tls = Material::load(&crate::config::TlsConfig {
            ca: dir.path().join(crate::pki::CA_CERT),
            cert,
            key,
        })
        .unwrap();
        // Accepts TCP, never answers the TLS hello.
        let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = stall.local_addr().unwrap().to_string();
        let held = std::thread::spawn(move || stall.accept());
        let peers = Peers::new(Some(tls));
        let t = std::time::Instant::now();
        let st = peers.dial("b", &addr).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
        assert!(st.message().contains("handshake"), "{st:?}");
        assert!(t.elapsed() < DIAL_TIMEOUT + Duration::from_secs(5));
        assert!(peers.lock().is_empty(), "a failed dial was pooled");
        drop(held);
    }
}
