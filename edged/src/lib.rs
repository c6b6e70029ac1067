//! edged: the daemon of an edge host.
//!
//! A client opens a *session* for an app; edged gives it its own instance of
//! the app (a child process or a Docker container) over its own volfs
//! volume, and forwards the client's calls to the instance's Unix socket.
//!
//! # Layout
//! - [`config`]: `edged.toml`, with a commented default.
//! - [`admin`]: the operator's Admin service on a Unix socket (0600).
//! - [`session`]: sessions and the [`session::Edge`] that owns them: open,
//!   invoke, result, close, idle reaping, recovery after a restart (by the
//!   handover role each session persisted); [`session::migrate`]: handover
//!   between edges (the new edge pulls; the async shells of the two state
//!   machines are `session/give.rs` and `session/take.rs`); [`session::precopy`]:
//!   pre-copy rounds to the neighbour edges.
//! - [`migration`]: the two handover state machines as plain code — the
//!   owner's ([`migration::owner`]) and the puller's ([`migration::puller`]),
//!   each an enum with one `step` function, unit-tested case by case.
//! - [`journal`]: each session's op journal (run once by op id, results kept).
//! - [`forward`]: calls to the app over its socket with a raw-bytes codec.
//! - [`volume`]: seeding a volume, its volfs shim process and the client of
//!   the shim's `Volume` service (status, deltas as frames, throttle);
//!   [`incoming`]: a delta applied to a staged volume as it arrives.
//! - [`runtime`]: the [`runtime::Runtime`] trait, the process and Docker
//!   runtimes, and `FROM scratch` image builds.
//! - [`pki`]: the fleet CA and the certificates it issues (`edged pki`);
//!   [`tls`]: TLS of the ports and who a caller is; [`peers`]: dialing
//!   another edge, verified by its id.
//! - [`server`]: the gRPC services (`Edge`, `Admin`, health) and `run`.
//!
//! Why a volfs *process* per volume: an edged restart, crash or upgrade must
//! not pull a volume out from under a running instance (containerd keeps a
//! shim per container for the same reason). edged talks to each shim's
//! `Volume` service (gRPC on the volume's Unix socket); a restarted edged
//! re-attaches them.

#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod forward;
pub mod incoming;
pub mod journal;
pub mod migration;
pub mod peers;
pub mod pki;
pub mod runtime;
pub mod server;
pub mod session;
pub mod tls;
pub mod volume;
