//! The puller's driver: performs what [`PullerState::step`] says, through
//! [`PullEffects`], and feeds each outcome back as the next event.
//!
//! The decisions of a pull that are not the machine's own live here, next
//! to it and testable the same way (with a recording fake instead of
//! sockets, FUSE and an app): a damaged round is pulled again a few times,
//! then given up; a failure keeps its status code for whoever asked; a pull
//! succeeds only once the owner released and this edge serves. The real
//! effects are `session::take`'s.

use std::collections::VecDeque;
use std::time::Duration;

use tonic::Status;

use super::Attempt;
use super::puller::{PullerAction, PullerEvent};

/// The side effects of a pull, one method per action of the machine.
pub(crate) trait PullEffects {
    /// Asks the owner for the session and applies every round to the
    /// staged copy; Ok once the final round is in. A failure says which
    /// attempt the owner had accepted, if it had.
    async fn ask_owner(&mut self) -> Result<(), (Status, Option<Attempt>)>;
    /// Checks the staged copy against the owner's root hash.
    async fn verify(&mut self) -> Result<(), Status>;
    /// Makes the staged copy the session (persisted `Starting`) and starts
    /// its instance, calls held.
    async fn promote(&mut self) -> Result<(), Status>;
    /// Persists `AwaitingRelease`.
    async fn persist_awaiting(&mut self) -> Result<(), Status>;
    /// Asks the owner to release until it answers (within a bound); Ok once
    /// it released and this edge serves, with the downtime it reported.
    async fn ask_release(&mut self) -> Result<Option<Duration>, Status>;
    /// Stops the instance and stages the copy again.
    async fn demote(&mut self);
    /// Tells the owner `attempt` is given up (best effort).
    async fn ask_abort(&mut self, attempt: Attempt);
    /// The owner did not answer: its pooled connection is dropped.
    fn forget_owner(&mut self);
}

/// How often a pull is asked when what arrives is damaged.
pub const PULL_ATTEMPTS: u32 = 3;

/// Runs a pull from `plan` (what the machine answered to `Begin`) to its
/// end. `step` feeds an event to this session's machine. Ok: this edge
/// serves the session, with the downtime the owner reported.
pub(crate) async fn drive(
    fx: &mut impl PullEffects,
    mut step: impl FnMut(PullerEvent) -> Vec<PullerAction>,
    plan: Vec<PullerAction>,
) -> Result<Option<Duration>, Status> {
    use PullerAction as A;
    use PullerEvent as E;
    let mut tries = 0u32;
    // Why the last step failed, with its code (`Fail` carries words only).
    let mut failure: Option<Status> = None;
    let mut served = None;
    // A failed step: what arrived, damaged in transit, is pulled again (a
    // few times; only the pull and its check can find damage), else the
    // pull's failure.
    let mut failed = |st: Status, tries: Option<u32>| {
        if st.code() == tonic::Code::DataLoss && tries.is_some_and(|t| t < PULL_ATTEMPTS) {
            tracing::warn!(error = %st.message(), tries, "damaged in transit; pulling again");
            return E::Damaged;
        }
        let reason = st.message().to_string();
        failure = Some(st);
        E::Failed { reason }
    };
    let mut todo = VecDeque::from(plan);
    while let Some(a) = todo.pop_front() {
        let events = match a {
            A::AskOwner => {
                tries += 1;
                match fx.ask_owner().await {
                    Ok(()) => vec![E::FinalReceived],
                    Err((st, attempt)) => {
                        if st.code() == tonic::Code::Unavailable {
                            fx.forget_owner();
                        }
                        // An attempt the owner accepted is aborted, known
                        // to the machine yet or not (a malformed identity).
                        let mut evs: Vec<_> = attempt
                            .map(|a| E::Accepted { attempt: a })
                            .into_iter()
                            .collect();
                        evs.push(failed(st, Some(tries)));
                        evs
                    }
                }
            }
            A::Verify => match fx.verify().await {
                Ok(()) => vec![E::Verified],
                Err(st) => vec![failed(st, Some(tries))],
            },
            A::Promote => match fx.promote().await {
                Ok(()) => vec![E::Started],
                Err(st) => vec![failed(st, None)],
            },
            // Not persisted, so never asked: the owner serves on.
            A::PersistAwaiting => match fx.persist_awaiting().await {
                Ok(()) => vec![E::AwaitingPersisted],
                Err(st) => vec![failed(st, None)],
            },
            // Released, it serves; refused, the copy is staged again:
            // both done as the machine says by the effect itself, which
            // steps the machine with the answer.
            A::AskRelease => {
                served = Some(fx.ask_release().await?);
                vec![]
            }
            A::Demote => {
                fx.demote().await;
                vec![]
            }
            A::AskAbort(attempt) => {
                fx.ask_abort(attempt).await;
                vec![]
            }
            A::Fail(reason) => {
                return Err(failure.take().unwrap_or_else(|| Status::aborted(reason)));
            }
            A::Refuse(m) => return Err(Status::aborted(m)),
            // After a restart only (`session::recover`), which starts the
            // instance and asks for the release itself.
            A::StartInstance | A::AskReleaseLater | A::Serve => vec![],
        };
        if !events.is_empty() {
            // The machine's answer to the outcome replaces what was left
            // of its last plan: a failed step ends that plan.
            todo.clear();
        }
        for ev in events {
            todo.extend(step(ev));
        }
    }
    served.ok_or_else(|| {
        Status::internal(
            "the pull ended without serving the session (another pull of it raced this one)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::Peer;
    use crate::migration::puller::PullerState;

    /// What the fake was asked, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Did {
        AskOwner,
        Verify,
        Promote,
        Persist,
        AskRelease,
        Demote,
        Abort(Attempt),
        Forget,
    }

    /// Answers each effect from a script (Ok when the script runs out),
    /// and records what was asked.
    #[derive(Default)]
    struct Fake {
        did: Vec<Did>,
        owner: VecDeque<Result<(), (Status, Option<Attempt>)>>,
        verify: VecDeque<Result<(), Status>>,
        promote: Option<Status>,
        persist: Option<Status>,
        release: Option<Status>,
        /// The attempt the owner names as it accepts (the machine hears it
        /// as `pull` does, while the rounds come).
        accepted: Attempt,
        machine: Option<std::rc::Rc<std::cell::RefCell<PullerState>>>,
    }

    impl PullEffects for Fake {
        async fn ask_owner(&mut self) -> Result<(), (Status, Option<Attempt>)> {
            self.did.push(Did::AskOwner);
            let r = self.owner.pop_front().unwrap_or(Ok(()));
            // An owner that does not answer accepts nothing.
            if r.as_ref()
                .is_err_and(|(st, _)| st.code() == tonic::Code::Unavailable)
            {
                return r;
            }
            self.accepted += 1;
            if let Some(m) = &self.machine {
                m.borrow_mut().step(PullerEvent::Accepted {
                    attempt: self.accepted,
                });
            }
            r
        }
        async fn verify(&mut self) -> Result<(), Status> {
            self.did.push(Did::Verify);
            self.verify.pop_front().unwrap_or(Ok(()))
        }
        async fn promote(&mut self) -> Result<(), Status> {
            self.did.push(Did::Promote);
            self.promote.take().map_or(Ok(()), Err)
        }
        async fn persist_awaiting(&mut self) -> Result<(), Status> {
            self.did.push(Did::Persist);
            self.persist.take().map_or(Ok(()), Err)
        }
        async fn ask_release(&mut self) -> Result<Option<Duration>, Status> {
            self.did.push(Did::AskRelease);
            if let Some(st) = self.release.take() {
                return Err(st);
            }
            if let Some(m) = &self.machine {
                m.borrow_mut()
                    .step(PullerEvent::ReleaseAnswered { released: true });
            }
            Ok(Some(Duration::from_millis(40)))
        }
        async fn demote(&mut self) {
            self.did.push(Did::Demote);
        }
        async fn ask_abort(&mut self, attempt: Attempt) {
            self.did.push(Did::Abort(attempt));
        }
        fn forget_owner(&mut self) {
            self.did.push(Did::Forget);
        }
    }

    /// Runs a pull of a fresh machine against `fx`; returns the result
    /// and the machine's state after.
    fn run(mut fx: Fake) -> (Result<Option<Duration>, Status>, Vec<Did>, PullerState) {
        let m = std::rc::Rc::new(std::cell::RefCell::new(PullerState::Idle));
        fx.machine = Some(m.clone());
        let plan = m.borrow_mut().step(PullerEvent::Begin {
            from: Peer {
                edge_id: "a".into(),
                addr: "a:1".into(),
            },
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(drive(&mut fx, |ev| m.borrow_mut().step(ev), plan));
        let end = m.borrow().clone();
        (r, fx.did, end)
    }

    #[test]
    fn a_pull_asks_verifies_promotes_persists_then_asks_for_the_release() {
        let (r, did, end) = run(Fake::default());
        assert_eq!(r.unwrap(), Some(Duration::from_millis(40)));
        use Did::*;
        assert_eq!(did, [AskOwner, Verify, Promote, Persist, AskRelease]);
        assert_eq!(end, PullerState::Serving);
    }

    #[test]
    fn a_damaged_round_is_pulled_again_then_given_up() {
        use Did::*;
        let damaged = || Err((Status::data_loss("block 7 damaged"), None));
        // Damaged once (in transit), then whole.
        let (r, did, _) = run(Fake {
            owner: [damaged()].into(),
            ..Fake::default()
        });
        r.unwrap();
        assert_eq!(
            did[..4],
            [AskOwner, Abort(1), AskOwner, Verify],
            "the first attempt aborted, asked again"
        );
        // Damaged every time: three pulls, each attempt aborted, and the
        // data-loss status for whoever asked.
        let (r, did, end) = run(Fake {
            owner: [damaged(), damaged(), damaged()].into(),
            ..Fake::default()
        });
        assert_eq!(r.unwrap_err().code(), tonic::Code::DataLoss);
        assert_eq!(
            did,
            [AskOwner, Abort(1), AskOwner, Abort(2), AskOwner, Abort(3)]
        );
        assert_eq!(end, PullerState::Idle);
        // A copy that does not hash to the owner's root counts the same.
        let (r, did, _) = run(Fake {
            verify: [Err(Status::data_loss("root differs"))].into(),
            ..Fake::default()
        });
        r.unwrap();
        assert_eq!(did[..4], [AskOwner, Verify, Abort(1), AskOwner]);
    }

    #[test]
    fn an_owner_that_does_not_answer_is_forgotten_and_its_status_kept() {
        let (r, did, end) = run(Fake {
            owner: [Err((Status::unavailable("edge a does not answer"), None))].into(),
            ..Fake::default()
        });
        let st = r.unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert_eq!(st.message(), "edge a does not answer");
        assert_eq!(did, [Did::AskOwner, Did::Forget], "no attempt to abort");
        assert_eq!(end, PullerState::Idle);
    }

    #[test]
    fn a_start_that_fails_stages_the_copy_again_and_aborts() {
        use Did::*;
        let (r, did, end) = run(Fake {
            promote: Some(Status::unavailable("the app did not start")),
            ..Fake::default()
        });
        assert_eq!(r.unwrap_err().message(), "the app did not start");
        assert_eq!(did, [AskOwner, Verify, Promote, Demote, Abort(1)]);
        assert_eq!(end, PullerState::Idle);
    }

    #[test]
    fn only_the_pull_and_its_check_count_as_damage() {
        use Did::*;
        // A promotion failing with a data-loss code is a failure of the
        // start, not a round to pull again.
        let (r, did, end) = run(Fake {
            promote: Some(Status::data_loss("the app's volume is damaged")),
            ..Fake::default()
        });
        assert_eq!(r.unwrap_err().code(), tonic::Code::DataLoss);
        assert_eq!(did, [AskOwner, Verify, Promote, Demote, Abort(1)]);
        assert_eq!(end, PullerState::Idle);
    }

    #[test]
    fn a_waiting_state_that_cannot_be_persisted_never_asks_for_the_release() {
        use Did::*;
        let (r, did, _) = run(Fake {
            persist: Some(Status::internal("disk full")),
            ..Fake::default()
        });
        assert_eq!(r.unwrap_err().message(), "disk full");
        assert_eq!(did, [AskOwner, Verify, Promote, Persist, Demote, Abort(1)]);
        assert!(!did.contains(&AskRelease));
    }

    #[test]
    fn a_refused_release_is_the_pulls_error() {
        let (r, did, _) = run(Fake {
            release: Some(Status::aborted("the old edge gave up the handover")),
            ..Fake::default()
        });
        assert_eq!(r.unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(did.last(), Some(&Did::AskRelease));
    }

    #[test]
    fn a_second_pull_is_refused_before_any_effect() {
        let mut m = PullerState::Idle;
        m.step(PullerEvent::Begin {
            from: Peer {
                edge_id: "a".into(),
                addr: "a:1".into(),
            },
        });
        let plan = m.step(PullerEvent::Begin {
            from: Peer {
                edge_id: "c".into(),
                addr: "c:1".into(),
            },
        });
        let mut fx = Fake::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(drive(&mut fx, |ev| m.step(ev), plan));
        assert_eq!(r.unwrap_err().code(), tonic::Code::Aborted);
        assert!(fx.did.is_empty());
    }

    #[test]
    fn a_pull_whose_machine_ignores_it_never_reports_success() {
        // The machine of the session was taken over (say, by a restart's
        // recovery): nothing it answers leads to a release.
        let mut fx = Fake::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(drive(&mut fx, |_| vec![], vec![PullerAction::AskOwner]));
        assert_eq!(r.unwrap_err().code(), tonic::Code::Internal);
        assert_eq!(fx.did, [Did::AskOwner]);
    }
}
