//! The two state machines of a handover, as plain code: the owner's side
//! (giving) and the puller's side (taking).
//!
//! Each side is an explicit state enum driven by one function, `step`: an
//! event in (a message from the other edge, a timer carrying its attempt
//! id, the result of a volume or runtime action) → the new state and the
//! actions to perform, in order. The async shells in `session::migrate`
//! perform the actions and feed their results back as events. Every case —
//! two pullers at once, a stale timer, a Release after an abort, a restart
//! in the middle — is a row of a table the unit tests below each machine
//! walk through, without sockets, FUSE or containers.
//!
//! ```text
//! owner:  Serving ─Pull→ Giving{attempt,to} ─LiveSent→ Quiescing ─OpsDrained→ Frozen ─FinalSent→ FinalSent ─Release→ Released{to}
//!                           └──────────────── Abort / Failed / Timer (same attempt) ────────────────┘ → Serving (thawed)
//! puller: Idle ─Begin→ Pulling ─FinalReceived→ Verifying ─Verified→ Starting ─Started, AwaitingPersisted→ AwaitingRelease ─Released→ Serving
//!                        ↑ └──────────── Failed ─────────────┘→ Idle (copy staged)      Refused → Idle (instance stopped, copy staged)
//!                        └── Damaged (from Pulling or Verifying: the attempt aborted, asked again)
//! ```
//!
//! Ownership changes hands at exactly one point: the owner persists
//! `Released` (a tombstone) before it answers the puller's Release. The
//! puller persists `AwaitingRelease` before it asks, serves only after the
//! answer, and after a crash asks again. An owner that restarts while
//! frozen thaws and serves (its state says it never released), so a late
//! Release for that attempt is refused and the puller goes back to staged.
//!
//! # Layout
//! - [`owner`]: [`owner::OwnerState`], its events, actions and `step`.
//! - [`puller`]: [`puller::PullerState`], its events, actions and `step`.
//! - [`pulling`]: the puller's driver, performing those actions through
//!   the `PullEffects` trait (real in `session::take`, a recording fake in
//!   its tests).
//! - [`converge`]: after each live round, another one (throttled or not) or
//!   the quiesce.

pub mod converge;
pub mod owner;
pub mod puller;
pub mod pulling;

use serde::{Deserialize, Serialize};

/// One handover attempt of one session, chosen by the owner when it accepts
/// a pull. Every message and timer of the attempt carries it, so what
/// belongs to an earlier attempt is recognised and ignored.
pub type Attempt = u64;

/// The other edge of a handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its edge id.
    pub edge_id: String,
    /// Where clients reach it (told to late callers).
    pub addr: String,
}

/// A fresh attempt id.
pub fn new_attempt() -> Attempt {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    // Never 0: 0 means "no attempt" on the wire.
    u64::from_le_bytes(b).max(1)
}
