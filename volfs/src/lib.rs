//! volfs: a FUSE volume that knows its dirty blocks.
//!
//! A volume is a plain *backing directory* holding the files exactly as the
//! application sees them. volfs serves it through FUSE as a passthrough
//! filesystem and observes every change: writes mark fixed-size blocks dirty
//! (default 64 KiB), so a manifest of per-block blake3 hashes and a root hash
//! stays current by rehashing only what changed. A *delta* from any manifest
//! a receiver holds carries only the changed entries and the blocks the
//! receiver lacks; applying it recomputes the root hash and fails loudly if
//! it differs from the sender's.
//!
//! # Layout
//! - [`dirty`]: per-file block bitmaps with the clear-before-read protocol.
//! - [`manifest`]: entries, block hashes, the root hash, persistence.
//! - [`scan`]: refreshing a manifest from the tree, rehashing only what it must.
//! - [`delta`]: writing and reading delta streams.
//! - [`blockstore`]: the content-addressed store a receiver stages blocks in.
//! - [`apply`]: applying a delta to a backing directory, all or nothing.
//! - [`beneath`]: opening paths beneath a volume's root, never through a symlink.
//! - [`backing`]: a backing directory and its hidden `.volfs/` metadata.
//! - [`fs`]: the FUSE passthrough filesystem (`fs/ops.rs`: one method per
//!   kernel request).
//! - [`mount`]: a live mount and its operations; [`service`]: the `Volume`
//!   service it answers on its socket, and the client of it.
//! - [`throttle`]: holding write replies while a handover catches up.
//! - [`offline`]: the same operations on an unmounted volume.
//! - [`wire`]: what a manifest from another edge would cost, counted before decoding.
//! - [`fuzz`]: the delta reader and apply as one fuzz target.
//! - `sys`: thin wrappers over the `*at` system calls.

#![warn(missing_docs)]

pub mod apply;
pub mod backing;
pub mod beneath;
pub mod blockstore;
pub mod delta;
pub mod dirty;
pub mod fs;
pub mod fuzz;
pub mod manifest;
pub mod mount;
pub mod offline;
pub mod scan;
pub mod service;
mod sys;
pub mod throttle;
pub mod wire;

pub use manifest::{DEFAULT_BLOCK_SIZE, Hash, Manifest, hex};
pub use mount::{LiveVolume, MountHandle, MountOptions, mount};
