//! Several test edges at once, and who among them holds a session.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{App, Bases, Edge, free_addr, neighbour};

/// The edges (by index) that list `session`, with the state they list.
pub async fn holders(edges: &[&Edge], session: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let Ok(mut c) = edged::admin::connect(&e.admin_socket()).await else {
            continue;
        };
        if let Ok(r) = c
            .list_sessions(edge_proto::v1::ListSessionsRequest {})
            .await
        {
            for s in r.into_inner().sessions {
                if s.session_id == session {
                    out.push((i, s.state));
                }
            }
        }
    }
    out
}

/// Waits (up to `limit`) until exactly one of `edges` lists `session`, as
/// serving, and returns its index.
pub async fn sole_owner(edges: &[&Edge], session: &str, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let h = holders(edges, session).await;
        if let [(i, state)] = h.as_slice() {
            if state == "serving" {
                return *i;
            }
        }
        if Instant::now() > deadline {
            for e in edges {
                eprintln!("---- log of {}\n{}", e.addr, e.log());
            }
            panic!("session {session} is not served by exactly one edge: {h:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Edges `a`, `b`, `c`, ... on 127.0.0.1, 127.0.0.2, ..., each a neighbour of
/// every other, serving the same apps.
#[derive(Debug)]
pub struct Cluster {
    /// The edges, in order of their ids.
    pub edges: Vec<Edge>,
}

impl Cluster {
    /// Starts `n` edges; `extra` is laid over each one's configuration.
    pub fn mesh(n: usize, apps: &[App], extra: &str) -> Cluster {
        let ids: Vec<String> = (0..n)
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| free_addr(&format!("127.0.0.{}", i + 1)))
            .collect();
        let edges = (0..n)
            .map(|i| {
                let mut neighbours = String::new();
                for j in (0..n).filter(|j| *j != i) {
                    neighbours += &format!(
                        "[[neighbours]]\nid = {:?}\naddr = \"{}\"\n",
                        ids[j], addrs[j]
                    );
                }
                // `extra` first: its top-level keys must precede any table.
                Edge::start_at(&ids[i], addrs[i], apps, &format!("{extra}\n{neighbours}"))
            })
            .collect();
        Cluster { edges }
    }

    /// A client connection to each edge.
    pub async fn clients(&self) -> Vec<edge_client::EdgeClient> {
        let mut out = Vec::new();
        for e in &self.edges {
            out.push(e.client().await);
        }
        out
    }

    /// The edges, borrowed (for [`sole_owner`] and [`holders`]).
    pub fn refs(&self) -> Vec<&Edge> {
        self.edges.iter().collect()
    }
}

/// Edge `a` on 127.0.0.1 and edge `b` on 127.0.0.2, serving the example
/// apps with the process runtime, and a client of each: the setting of
/// most handover tests. A test takes the parts by reference
/// (`let Pair { a, b, ca, cb, .. } = &mut pair;`); the base volumes live
/// as long as the pair.
#[derive(Debug)]
pub struct Pair {
    /// The edge a session starts on.
    pub a: Edge,
    /// The edge it moves to.
    pub b: Edge,
    /// A client of `a`.
    pub ca: edge_client::EdgeClient,
    /// A client of `b`.
    pub cb: edge_client::EdgeClient,
    /// The apps both serve.
    pub apps: Vec<App>,
    _bases: Bases,
}

impl Pair {
    /// Two edges that do not know each other (no pre-copy, no operator
    /// moves between them); `extra` laid over both configurations.
    pub async fn strangers(extra: &str) -> Pair {
        Pair::start(extra, extra, false).await
    }

    /// Two neighbours: each lists the other, so `a` pre-copies to `b`
    /// (`extra_a` may set `[precopy] interval`). Extras go first: their
    /// top-level keys must precede any table.
    pub async fn neighbours(extra_a: &str, extra_b: &str) -> Pair {
        Pair::start(extra_a, extra_b, true).await
    }

    async fn start(extra_a: &str, extra_b: &str, neighbours: bool) -> Pair {
        let bases = Bases::new();
        let apps = bases.process_apps();
        let (a_addr, b_addr) = (free_addr("127.0.0.1"), free_addr("127.0.0.2"));
        let (mut extra_a, mut extra_b) = (extra_a.to_string(), extra_b.to_string());
        if neighbours {
            extra_a += &format!("\n{}", neighbour("b", b_addr));
            extra_b += &format!("\n{}", neighbour("a", a_addr));
        }
        let b = Edge::start_at("b", b_addr, &apps, &extra_b);
        let a = Edge::start_at("a", a_addr, &apps, &extra_a);
        let (ca, cb) = (a.client().await, b.client().await);
        Pair {
            a,
            b,
            ca,
            cb,
            apps,
            _bases: bases,
        }
    }

    /// A List session of `client` opened on `a`.
    pub async fn open(&self, client: &str) -> edge_client::Session {
        self.ca
            .open_session("list", client)
            .await
            .unwrap_or_else(|e| panic!("open a List session on a: {e}\n{}", self.a.log()))
    }
}
