//! The example apps of edgeshift, after the original thesis: the List app (a
//! to-do list) and the Search app (a dictionary search), each with its server
//! half (served with edge-app inside the session's instance) and its client
//! half (the app's generated stub over an edge-client session).
//!
//! # Layout
//! - [`pb`]: generated code of `proto/list/v1` and `proto/search/v1`.
//! - [`list`]: the List server; [`search`]: the Search server and the
//!   dictionary builder.
//! - `src/bin/`: `list-app`, `search-app` (server binaries) and
//!   `edgeshift-demo` (one edge on loopback, both apps called through it).

#![warn(missing_docs)]

pub mod list;
pub mod search;

/// Generated protobuf code.
pub mod pb {
    /// `list.v1`.
    pub mod list {
        #![allow(missing_docs)]
        tonic::include_proto!("list.v1");
    }
    /// `search.v1`.
    pub mod search {
        #![allow(missing_docs)]
        tonic::include_proto!("search.v1");
    }
}
