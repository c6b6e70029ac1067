//! The puller's side of a handover: the edge the client moved to, which
//! pulls the session from its owner.
//!
//! What arrives is applied to a *staged* copy (never a session) until the
//! final delta is in and its root hash verified. Then the copy becomes the
//! session directory — persisted as `Starting`, so a restart turns it back
//! into a staged copy — and the instance starts, its calls held. Before it
//! asks the owner to release, the puller persists `AwaitingRelease`: after
//! a crash it asks again, since only the owner's answer says who owns the
//! session. Released: it serves. Refused: the instance stops and the copy is
//! staged again for a later attempt.

use super::{Attempt, Peer};

/// Where the puller is with one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullerState {
    /// No pull under way (a staged copy may exist).
    Idle,
    /// Asked `from` for the session; rounds arrive and are applied to the
    /// staged copy. `attempt` is known once the owner accepted.
    Pulling {
        /// The owner.
        from: Peer,
        /// The owner's attempt id, once it accepted.
        attempt: Option<Attempt>,
    },
    /// Everything arrived; the staged copy is checked against the root hash.
    Verifying {
        /// The owner.
        from: Peer,
        /// The attempt.
        attempt: Attempt,
    },
    /// The copy is the session directory now (persisted); the instance
    /// starts, its calls held.
    Starting {
        /// The owner.
        from: Peer,
        /// The attempt.
        attempt: Attempt,
    },
    /// Persisted; the owner is asked to release (again after a restart).
    AwaitingRelease {
        /// The owner.
        from: Peer,
        /// The attempt.
        attempt: Attempt,
    },
    /// This edge owns and serves the session.
    Serving,
}

/// What happens to the puller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullerEvent {
    /// Pull the session from `from` (a client's or operator's request).
    Begin {
        /// The owner.
        from: Peer,
    },
    /// The owner accepted: its attempt id.
    Accepted {
        /// The attempt.
        attempt: Attempt,
    },
    /// The final delta, the op results and the root hash arrived.
    FinalReceived,
    /// The staged copy hashes to the owner's root.
    Verified,
    /// The instance runs and answers on its socket.
    Started,
    /// `AwaitingRelease` is on disk.
    AwaitingPersisted,
    /// The owner answered the Release.
    ReleaseAnswered {
        /// Released (true) or refused (false: it aborted the attempt).
        released: bool,
    },
    /// The owner did not answer (unreachable, crashed): ask again later.
    ReleaseUnanswered,
    /// What arrived does not hash to what the owner said (damaged in
    /// transit); the shell may try again (a few times at most).
    Damaged,
    /// A step failed before the release was asked.
    Failed {
        /// Why.
        reason: String,
    },
    /// edged restarted and found this state persisted.
    Restarted(PullerState),
}

/// What the shell does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullerAction {
    /// Refuse the request: a pull of this session is under way here, or
    /// this edge serves it already.
    Refuse(&'static str),
    /// Connect to the owner and ask it for the session with the manifest
    /// of the staged copy.
    AskOwner,
    /// Hash the staged copy; report `Verified` or `Failed`.
    Verify,
    /// Make the staged copy the session directory (persisted `Starting`
    /// before it moves), mount it and start the instance with its calls
    /// held; report `Started` or `Failed`.
    Promote,
    /// After a restart: the recovered session's instance runs again (calls
    /// held).
    StartInstance,
    /// Persist `AwaitingRelease`.
    PersistAwaiting,
    /// Ask the owner to release; report its answer.
    AskRelease,
    /// Ask again after a pause.
    AskReleaseLater,
    /// Persist `Serving` and let calls run.
    Serve,
    /// Stop the instance, unmount, and make the session directory a staged
    /// copy again.
    Demote,
    /// Tell the owner this attempt is given up (best effort).
    AskAbort(Attempt),
    /// The pull ended without the session: say why to whoever asked.
    Fail(String),
}

impl PullerState {
    /// Short name, for logs and the operator.
    pub fn name(&self) -> &'static str {
        match self {
            PullerState::Idle => "idle",
            PullerState::Pulling { .. } => "pulling",
            PullerState::Verifying { .. } => "verifying",
            PullerState::Starting { .. } => "starting",
            PullerState::AwaitingRelease { .. } => "awaiting-release",
            PullerState::Serving => "serving",
        }
    }

    /// The one transition function.
    pub fn step(&mut self, ev: PullerEvent) -> Vec<PullerAction> {
        use PullerAction as A;
        use PullerEvent as E;
        use PullerState as S;
        match (&*self, ev) {
            (S::Idle, E::Begin { from }) => {
                *self = S::Pulling {
                    from,
                    attempt: None,
                };
                vec![A::AskOwner]
            }
            (S::Serving, E::Begin { .. }) => vec![A::Refuse("this edge serves the session")],
            (_, E::Begin { .. }) => vec![A::Refuse(
                "a handover of this session to this edge is under way",
            )],
            (S::Pulling { from, .. }, E::Accepted { attempt }) => {
                *self = S::Pulling {
                    from: from.clone(),
                    attempt: Some(attempt),
                };
                vec![]
            }
            (
                S::Pulling {
                    from,
                    attempt: Some(attempt),
                },
                E::FinalReceived,
            ) => {
                *self = S::Verifying {
                    from: from.clone(),
                    attempt: *attempt,
                };
                vec![A::Verify]
            }
            (S::Verifying { from, attempt }, E::Verified) => {
                *self = S::Starting {
                    from: from.clone(),
                    attempt: *attempt,
                };
                vec![A::Promote]
            }
            // Persisted before it takes effect: the release is asked only
            // once a restart would ask it again.
            (S::Starting { .. }, E::Started) => vec![A::PersistAwaiting],
            (S::Starting { from, attempt }, E::AwaitingPersisted) => {
                *self = S::AwaitingRelease {
                    from: from.clone(),
                    attempt: *attempt,
                };
                vec![A::AskRelease]
            }
            (S::AwaitingRelease { .. }, E::ReleaseAnswered { released: true }) => {
                *self = S::Serving;
                vec![A::Serve]
            }
            (S::AwaitingRelease { .. }, E::ReleaseAnswered { released: false }) => {
                *self = S::Idle;
                vec![
                    A::Demote,
                    A::Fail("the old edge gave up the handover; it serves the session".into()),
                ]
            }
            (S::AwaitingRelease { .. }, E::ReleaseUnanswered) => vec![A::AskReleaseLater],
            // Damaged in transit: the owner serves on (its attempt is
            // aborted) and the pull starts again from what is staged, so
            // the damaged blocks are sent again. Never idle in between: no
            // other pull of the session can start meanwhile.
            (S::Pulling { from, attempt }, E::Damaged) => {
                let out = attempt.map(A::AskAbort).into_iter().chain([A::AskOwner]);
                let out = out.collect();
                *self = S::Pulling {
                    from: from.clone(),
                    attempt: None,
                };
                out
            }
            (S::Verifying { from, attempt }, E::Damaged) => {
                let out = vec![A::AskAbort(*attempt), A::AskOwner];
                *self = S::Pulling {
                    from: from.clone(),
                    attempt: None,
                };
                out
            }
            (S::Pulling { attempt, .. }, E::Failed { reason }) => {
                let out = attempt
                    .map(A::AskAbort)
                    .into_iter()
                    .chain([A::Fail(reason)]);
                let out = out.collect();
                *self = S::Idle;
                out
            }
            (S::Verifying { attempt, .. }, E::Failed { reason }) => {
                let out = vec![A::AskAbort(*attempt), A::Fail(reason)];
                *self = S::Idle;
                out
            }
            (S::Starting { attempt, .. }, E::Failed { reason }) => {
                let out = vec![A::Demote, A::AskAbort(*attempt), A::Fail(reason)];
                *self = S::Idle;
                out
            }
            // Restart: a copy that was starting is staged again; one whose
            // release was asked asks again (only the owner knows the answer).
            (_, E::Restarted(S::Starting { attempt, .. })) => {
                *self = S::Idle;
                vec![A::Demote, A::AskAbort(attempt)]
            }
            (_, E::Restarted(S::AwaitingRelease { from, attempt })) => {
                *self = S::AwaitingRelease { from, attempt };
                vec![A::StartInstance, A::AskRelease]
            }
            (_, E::Restarted(S::Serving)) => {
                *self = S::Serving;
                vec![]
            }
            (_, E::Restarted(_)) => {
                *self = S::Idle;
                vec![]
            }
            // Anything else does not belong to this state: ignored.
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PullerAction as A;
    use PullerEvent as E;

    fn owner() -> Peer {
        Peer {
            edge_id: "a".into(),
            addr: "a:1".into(),
        }
    }

    fn to_awaiting(s: &mut PullerState) {
        assert_eq!(s.step(E::Begin { from: owner() }), vec![A::AskOwner]);
        assert!(s.step(E::Accepted { attempt: 5 }).is_empty());
        assert_eq!(s.step(E::FinalReceived), vec![A::Verify]);
        assert_eq!(s.step(E::Verified), vec![A::Promote]);
        assert_eq!(s.step(E::Started), vec![A::PersistAwaiting]);
        assert!(matches!(s, PullerState::Starting { .. }), "not yet on disk");
        assert_eq!(
            s.step(E::AwaitingPersisted),
            vec![A::AskRelease],
            "persisted before asking"
        );
    }

    #[test]
    fn a_pull_serves_only_after_the_release() {
        let mut s = PullerState::Idle;
        to_awaiting(&mut s);
        assert_eq!(s.step(E::ReleaseUnanswered), vec![A::AskReleaseLater]);
        assert!(matches!(s, PullerState::AwaitingRelease { attempt: 5, .. }));
        assert_eq!(
            s.step(E::ReleaseAnswered { released: true }),
            vec![A::Serve]
        );
        assert_eq!(s, PullerState::Serving);
    }

    #[test]
    fn a_refused_release_stages_the_copy_again() {
        let mut s = PullerState::Idle;
        to_awaiting(&mut s);
        let a = s.step(E::ReleaseAnswered { released: false });
        assert_eq!(a[0], A::Demote);
        assert_eq!(s, PullerState::Idle);
    }

    #[test]
    fn a_second_pull_of_the_same_session_is_refused_while_one_runs() {
        let mut s = PullerState::Idle;
        s.step(E::Begin { from: owner() });
        let before = s.clone();
        assert!(matches!(
            s.step(E::Begin { from: owner() })[..],
            [A::Refuse(_)]
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn failures_abort_the_attempt_and_a_started_copy_is_demoted() {
        let mut s = PullerState::Idle;
        s.step(E::Begin { from: owner() });
        // Before the owner accepted there is no attempt to abort.
        assert_eq!(
            s.step(E::Failed {
                reason: "unreachable".into()
            }),
            vec![A::Fail("unreachable".into())]
        );
        let mut s = PullerState::Idle;
        s.step(E::Begin { from: owner() });
        s.step(E::Accepted { attempt: 2 });
        s.step(E::FinalReceived);
        s.step(E::Verified);
        let a = s.step(E::Failed {
            reason: "app did not start".into(),
        });
        assert_eq!(
            a,
            vec![
                A::Demote,
                A::AskAbort(2),
                A::Fail("app did not start".into())
            ]
        );
        assert_eq!(s, PullerState::Idle);
    }

    #[test]
    fn a_copy_whose_waiting_state_cannot_be_persisted_never_asks_for_the_release() {
        let mut s = PullerState::Idle;
        s.step(E::Begin { from: owner() });
        s.step(E::Accepted { attempt: 9 });
        s.step(E::FinalReceived);
        s.step(E::Verified);
        assert_eq!(s.step(E::Started), vec![A::PersistAwaiting]);
        let a = s.step(E::Failed {
            reason: "disk full".into(),
        });
        assert_eq!(
            a,
            vec![A::Demote, A::AskAbort(9), A::Fail("disk full".into())]
        );
        assert!(!a.contains(&A::AskRelease));
    }

    #[test]
    fn a_damaged_round_is_pulled_again_without_leaving_the_pull() {
        let mut s = PullerState::Idle;
        s.step(E::Begin { from: owner() });
        s.step(E::Accepted { attempt: 4 });
        s.step(E::FinalReceived);
        assert_eq!(s.step(E::Damaged), vec![A::AskAbort(4), A::AskOwner]);
        assert!(matches!(s, PullerState::Pulling { attempt: None, .. }));
        // Still pulling: a second pull is refused meanwhile.
        assert!(matches!(
            s.step(E::Begin { from: owner() })[..],
            [A::Refuse(_)]
        ));
        s.step(E::Accepted { attempt: 5 });
        assert_eq!(s.step(E::Damaged), vec![A::AskAbort(5), A::AskOwner]);
    }

    #[test]
    fn a_restart_demotes_a_starting_copy_and_asks_again_for_an_awaited_release() {
        let mut s = PullerState::Idle;
        let a = s.step(E::Restarted(PullerState::Starting {
            from: owner(),
            attempt: 3,
        }));
        assert_eq!(a, vec![A::Demote, A::AskAbort(3)]);
        assert_eq!(s, PullerState::Idle);
        let a = s.step(E::Restarted(PullerState::AwaitingRelease {
            from: owner(),
            attempt: 4,
        }));
        assert_eq!(a, vec![A::StartInstance, A::AskRelease]);
        assert!(matches!(s, PullerState::AwaitingRelease { attempt: 4, .. }));
    }

    #[test]
    fn events_out_of_place_change_nothing() {
        let mut s = PullerState::Idle;
        for e in [
            E::Accepted { attempt: 1 },
            E::FinalReceived,
            E::Verified,
            E::Started,
            E::ReleaseAnswered { released: true },
        ] {
            assert!(s.step(e).is_empty());
            assert_eq!(s, PullerState::Idle);
        }
        // A final delta before the owner accepted is not a final delta.
        s.step(E::Begin { from: owner() });
        assert!(s.step(E::FinalReceived).is_empty());
    }
}
