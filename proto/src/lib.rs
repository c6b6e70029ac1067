//! Wire types of edgeshift, package `edge.v1`.
//!
//! # Layout
//! - `edge/v1/edge.proto`: the `Edge` service clients call and the `Admin`
//!   service of the operator.
//! - `edge/v1/peer.proto`: the `Peer` service between edges (pre-copy,
//!   handover, release).
//! - `edge/v1/volume.proto`: the manifest of a volume and the frames a delta
//!   travels in (header, block chunks, manifest entries, trailer with the
//!   root hash).
//! - `edge/v1/shim.proto`: the `Volume` service a volume's shim (`volfs
//!   mount`) answers on its Unix socket: dirty state (asked or watched),
//!   deltas as streams of frames, the write throttle, unmount.
//! - [`meta`]: the gRPC metadata keys edges and clients share.
//!
//! Every message change is commented in the `.proto` file. Four versions
//! move independently: edges exchange [`PEER_VERSION`] in `Peer.Hello` and
//! refuse one they do not know; a delta's header carries
//! [`DELTA_VERSION`]; a persisted manifest [`MANIFEST_VERSION`]; a shim
//! says its [`VOLUME_API_VERSION`] in every `VolumeStatus`.

/// Version of the `Peer` protocol between edges, said in `Peer.Hello`.
pub const PEER_VERSION: u32 = 2;

/// Version of the delta format, in every delta's header.
pub const DELTA_VERSION: u32 = 1;

/// Version of the persisted manifest (`.volfs/manifest.pb`, `volfs manifest`).
pub const MANIFEST_VERSION: u32 = 1;

/// Version of the `Volume` service of a volume's shim.
pub const VOLUME_API_VERSION: u32 = 1;

/// The DNS name a fleet certificate gives edge `id` (its identity under
/// TLS): edges dial each other, and clients follow redirects, with it as
/// the server name to verify.
pub fn edge_tls_name(id: &str) -> String {
    format!("{id}{EDGE_TLS_SUFFIX}")
}

/// The suffix of [`edge_tls_name`].
pub const EDGE_TLS_SUFFIX: &str = ".edge.edgeshift";

/// gRPC metadata keys of edgeshift, defined once for edges and clients.
pub mod meta {
    /// On a call refused or held because its session is moving: "1".
    pub const MOVING: &str = "edgeshift-moving";
    /// The address of the edge a session moved to.
    pub const MOVED_TO_ADDR: &str = "edgeshift-moved-to";
    /// The id of the edge a session moved to.
    pub const MOVED_TO_ID: &str = "edgeshift-moved-to-id";
}

/// Whether a status is a connection that broke or never opened (as tonic
/// and hyper word it), not an answer of the other side: callers say so in
/// plain words ("edge X stopped answering") instead of "h2 protocol error".
pub fn lost_connection(st: &tonic::Status) -> bool {
    const WORDING: [&str; 7] = [
        "operation was canceled",
        "h2 protocol error",
        "transport error",
        "tcp connect error",
        "error reading a body",
        "connection reset",
        "broken pipe",
    ];
    matches!(
        st.code(),
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
    ) && {
        let m = st.message().to_ascii_lowercase();
        WORDING.iter().any(|k| m.contains(k))
    }
}

/// Short name of a handover phase: "pull", "quiesced", "final", "apply",
/// "start", "ready".
pub fn phase_name(p: v1::HandoverPhase) -> &'static str {
    match p {
        v1::HandoverPhase::Unspecified => "?",
        v1::HandoverPhase::Pull => "pull",
        v1::HandoverPhase::Quiesced => "quiesced",
        v1::HandoverPhase::Final => "final",
        v1::HandoverPhase::Apply => "apply",
        v1::HandoverPhase::Start => "start",
        v1::HandoverPhase::Ready => "ready",
    }
}

/// Package `edge.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::doc_markdown)]
    tonic::include_proto!("edge.v1");
}
