//! Wire types of edgeshift, package `edge.v1`.
//!
//! # Layout
//! - `edge/v1/edge.proto`: the `Edge` service clients call and the `Admin`
//!   service of the operator.
//! - `edge/v1/volume.proto`: the manifest of a volume and the frames a delta
//!   travels in (header, manifest entries, block chunks, trailer with the root hash).
//!
//! Every message change is commented in the `.proto` file; peers exchange
//! [`PROTOCOL_VERSION`] on first contact and refuse a version they do not know.

/// Version of the edge.v1 wire protocol carried in delta headers and peer hellos.
pub const PROTOCOL_VERSION: u32 = 1;

/// Package `edge.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::doc_markdown)]
    tonic::include_proto!("edge.v1");
}
