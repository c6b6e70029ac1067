//! The owner's side of a handover: the edge that serves a session and gives
//! it to the edge that pulls it.
//!
//! Calls keep being served during the live round; from the quiesce on, new
//! calls are held (not refused) and running ones finish; then the instance
//! is frozen — persisted first, so a restart knows to thaw it — and the
//! final delta and the op results go out. The owner stays the owner until
//! the puller's Release of the same attempt; it persists `Released` before
//! it answers, and held calls are then told where the session went. An
//! abort, a failure or the release timer of the same attempt thaws the
//! instance and lets the held calls run here.

use std::time::Duration;

use super::{Attempt, Peer};

/// How long the owner waits for the puller's Release (or Abort) once
/// everything was sent, before it serves again.
pub const RELEASE_WAIT: Duration = Duration::from_secs(60);

/// How long the quiesce waits for running ops before it gives up.
pub const OPS_WAIT: Duration = Duration::from_secs(120);

/// How long the live round may take before the attempt is given up (a
/// puller that stopped reading must not hold the session's handovers).
pub const LIVE_WAIT: Duration = Duration::from_secs(30 * 60);

/// How long the instance may stay frozen while the final delta goes out.
pub const FINAL_WAIT: Duration = Duration::from_secs(120);

/// Where the owner is in a handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerState {
    /// Serving calls; no handover under way.
    Serving,
    /// The live round streams to `to`; calls are still served.
    Giving {
        /// The attempt.
        attempt: Attempt,
        /// The puller.
        to: Peer,
    },
    /// New calls are held; running ones finish.
    Quiescing {
        /// The attempt.
        attempt: Attempt,
        /// The puller.
        to: Peer,
    },
    /// The instance is frozen (persisted before the freeze); the final
    /// delta and the op results stream.
    Frozen {
        /// The attempt.
        attempt: Attempt,
        /// The puller.
        to: Peer,
    },
    /// Everything went out; waiting for the puller's Release or Abort.
    FinalSent {
        /// The attempt.
        attempt: Attempt,
        /// The puller.
        to: Peer,
    },
    /// Released to `to` (persisted as a tombstone before the answer).
    /// Terminal: the session is torn down here and never served again.
    Released {
        /// The attempt that took it.
        attempt: Attempt,
        /// The new owner.
        to: Peer,
    },
}

/// What happens to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerEvent {
    /// An edge asks to pull the session (its token or ticket already checked).
    Pull {
        /// The attempt the shell assigned to this pull.
        attempt: Attempt,
        /// The edge asking.
        to: Peer,
    },
    /// The live round went out.
    LiveSent {
        /// Its attempt.
        attempt: Attempt,
    },
    /// No op runs any more (and no new one may begin).
    OpsDrained {
        /// Its attempt.
        attempt: Attempt,
    },
    /// The final delta and the op results went out.
    FinalSent {
        /// Its attempt.
        attempt: Attempt,
    },
    /// The puller serves the session and asks to be the owner.
    Release {
        /// The attempt it pulled in.
        attempt: Attempt,
        /// The edge asking.
        from: String,
    },
    /// The puller gives up.
    Abort {
        /// The attempt it pulled in.
        attempt: Attempt,
        /// The edge asking.
        from: String,
    },
    /// A step of the attempt failed (the stream broke, the freeze failed).
    Failed {
        /// Its attempt.
        attempt: Attempt,
        /// Why.
        reason: String,
    },
    /// A timer of the attempt fired.
    Timer {
        /// Its attempt.
        attempt: Attempt,
        /// Which.
        timer: OwnerTimer,
    },
}

/// The owner's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerTimer {
    /// The live round did not go out in time.
    Live,
    /// Running ops did not finish in time.
    Ops,
    /// The final delta did not go out in time (the instance is frozen).
    Final,
    /// No Release or Abort came in time.
    Release,
}

/// What the owner persists, before it takes effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// The instance will be frozen for this attempt (a restart thaws it).
    Frozen {
        /// The attempt.
        attempt: Attempt,
        /// The puller.
        to: Peer,
    },
    /// No handover: the instance runs (clears `Frozen`).
    Serving,
    /// The session belongs to `to` now (the tombstone).
    Released {
        /// The attempt.
        attempt: Attempt,
        /// The new owner.
        to: Peer,
    },
}

/// Why a pull or a release is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another handover of the session is under way (to this edge).
    Moving(Peer),
    /// The session was released to this edge already.
    Moved(Peer),
    /// Release or Abort of an attempt that is not the current one (it was
    /// aborted, or never was).
    NotGiving,
}

/// What the shell does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerAction {
    /// Refuse the pull that came in.
    RefusePull(Refusal),
    /// Stream the live round.
    SendLive,
    /// Hold new calls (the journal admits no new op).
    HoldCalls,
    /// Wait until running ops finish, then report `OpsDrained`.
    WaitOps,
    /// Persist, durably, before going on.
    Persist(Persist),
    /// Freeze the instance.
    Freeze,
    /// Stream the final delta and the op results, then report `FinalSent`
    /// (and only then send the closing frame).
    SendFinal,
    /// Start a timer of the attempt.
    Arm {
        /// The attempt.
        attempt: Attempt,
        /// Which.
        timer: OwnerTimer,
        /// When.
        after: Duration,
    },
    /// Thaw the instance.
    Thaw,
    /// Let held calls (and new ones) run here again.
    ResumeCalls,
    /// Tell held calls (and late ones) where the session went.
    RedirectCalls(Peer),
    /// Answer the Release or Abort that came in.
    Reply(Result<(), Refusal>),
    /// Stop the instance, unmount, remove the session here; tell the other
    /// candidates to drop what they staged.
    Teardown,
}

impl OwnerState {
    /// The attempt under way, if any.
    pub fn attempt(&self) -> Option<Attempt> {
        match self {
            OwnerState::Giving { attempt, .. }
            | OwnerState::Quiescing { attempt, .. }
            | OwnerState::Frozen { attempt, .. }
            | OwnerState::FinalSent { attempt, .. } => Some(*attempt),
            OwnerState::Serving | OwnerState::Released { .. } => None,
        }
    }

    /// The puller of the attempt under way (or the new owner).
    pub fn peer(&self) -> Option<&Peer> {
        match self {
            OwnerState::Giving { to, .. }
            | OwnerState::Quiescing { to, .. }
            | OwnerState::Frozen { to, .. }
            | OwnerState::FinalSent { to, .. }
            | OwnerState::Released { to, .. } => Some(to),
            OwnerState::Serving => None,
        }
    }

    /// Whether the instance is (or is about to be) frozen.
    pub fn frozen(&self) -> bool {
        matches!(
            self,
            OwnerState::Frozen { .. } | OwnerState::FinalSent { .. }
        )
    }

    /// Short name, for logs and the operator.
    pub fn name(&self) -> &'static str {
        match self {
            OwnerState::Serving => "serving",
            OwnerState::Giving { .. } => "giving",
            OwnerState::Quiescing { .. } => "quiescing",
            OwnerState::Frozen { .. } => "frozen",
            OwnerState::FinalSent { .. } => "final-sent",
            OwnerState::Released { .. } => "released",
        }
    }

    /// Abandons the attempt under way: back to serving, thawed.
    fn abort(&mut self) -> Vec<OwnerAction> {
        let was_frozen = self.frozen();
        *self = OwnerState::Serving;
        let mut out = Vec::new();
        if was_frozen {
            out.push(OwnerAction::Thaw);
            out.push(OwnerAction::Persist(Persist::Serving));
        }
        out.push(OwnerAction::ResumeCalls);
        out
    }

    /// The one transition function.
    pub fn step(&mut self, ev: OwnerEvent) -> Vec<OwnerAction> {
        use OwnerAction as A;
        use OwnerEvent as E;
        use OwnerState as S;
        let current = self.attempt();
        let is_current = |a: Attempt| current == Some(a);
        match ev {
            E::Pull { attempt, to } => match self {
                S::Serving => {
                    *self = S::Giving { attempt, to };
                    vec![
                        A::Arm {
                            attempt,
                            timer: OwnerTimer::Live,
                            after: LIVE_WAIT,
                        },
                        A::SendLive,
                    ]
                }
                // The same puller lost track of an attempt that is only
                // waiting for its Release (it restarted): start over.
                S::FinalSent { to: cur, .. } if cur.edge_id == to.edge_id => {
                    let mut out = self.abort();
                    *self = S::Giving { attempt, to };
                    out.push(A::Arm {
                        attempt,
                        timer: OwnerTimer::Live,
                        after: LIVE_WAIT,
                    });
                    out.push(A::SendLive);
                    out
                }
                S::Released { to: cur, .. } => vec![A::RefusePull(Refusal::Moved(cur.clone()))],
                S::Giving { to: cur, .. }
                | S::Quiescing { to: cur, .. }
                | S::Frozen { to: cur, .. }
                | S::FinalSent { to: cur, .. } => {
                    vec![A::RefusePull(Refusal::Moving(cur.clone()))]
                }
            },
            E::LiveSent { attempt } if is_current(attempt) => match self {
                S::Giving { attempt, to } => {
                    let (attempt, to) = (*attempt, to.clone());
                    *self = S::Quiescing { attempt, to };
                    vec![
                        A::HoldCalls,
                        A::Arm {
                            attempt,
                            timer: OwnerTimer::Ops,
                            after: OPS_WAIT,
                        },
                        A::WaitOps,
                    ]
                }
                _ => vec![],
            },
            E::OpsDrained { attempt } if is_current(attempt) => match self {
                S::Quiescing { attempt, to } => {
                    let (attempt, to) = (*attempt, to.clone());
                    *self = S::Frozen {
                        attempt,
                        to: to.clone(),
                    };
                    vec![
                        A::Persist(Persist::Frozen { attempt, to }),
                        A::Freeze,
                        A::Arm {
                            attempt,
                            timer: OwnerTimer::Final,
                            after: FINAL_WAIT,
                        },
                        A::SendFinal,
                    ]
                }
                _ => vec![],
            },
            E::FinalSent { attempt } if is_current(attempt) => match self {
                S::Frozen { attempt, to } => {
                    let attempt = *attempt;
                    *self = S::FinalSent {
                        attempt,
                        to: to.clone(),
                    };
                    vec![A::Arm {
                        attempt,
                        timer: OwnerTimer::Release,
                        after: RELEASE_WAIT,
                    }]
                }
                _ => vec![],
            },
            E::Release { attempt, from } => match self {
                S::FinalSent { attempt: a, to } if *a == attempt && to.edge_id == from => {
                    let to = to.clone();
                    *self = S::Released {
                        attempt,
                        to: to.clone(),
                    };
                    vec![
                        A::Persist(Persist::Released {
                            attempt,
                            to: to.clone(),
                        }),
                        A::Reply(Ok(())),
                        A::RedirectCalls(to),
                        A::Teardown,
                    ]
                }
                // A repeated Release (the answer was lost) is answered again.
                S::Released { attempt: a, to } if *a == attempt && to.edge_id == from => {
                    vec![A::Reply(Ok(()))]
                }
                _ => vec![A::Reply(Err(Refusal::NotGiving))],
            },
            E::Abort { attempt, from } => {
                if is_current(attempt) && self.peer().is_some_and(|p| p.edge_id == from) {
                    let mut out = self.abort();
                    out.push(A::Reply(Ok(())));
                    out
                } else {
                    vec![A::Reply(Err(Refusal::NotGiving))]
                }
            }
            E::Failed { attempt, .. } if is_current(attempt) => self.abort(),
            E::Timer { attempt, timer } if is_current(attempt) => match (&*self, timer) {
                (S::Giving { .. }, OwnerTimer::Live)
                | (S::Quiescing { .. }, OwnerTimer::Ops)
                | (S::Frozen { .. }, OwnerTimer::Final)
                | (S::FinalSent { .. }, OwnerTimer::Release) => self.abort(),
                _ => vec![],
            },
            // Anything of another attempt: stale, ignored.
            E::LiveSent { .. }
            | E::OpsDrained { .. }
            | E::FinalSent { .. }
            | E::Failed { .. }
            | E::Timer { .. } => vec![],
        }
    }
}

#[cfg(test)]
#[path = "owner_tests.rs"]
mod tests;
