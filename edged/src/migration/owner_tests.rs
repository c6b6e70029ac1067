//! The owner's machine, row by row: every case a table of events and
//! the actions they give.

use super::*;
use OwnerAction as A;
use OwnerEvent as E;

fn peer(id: &str) -> Peer {
    Peer {
        edge_id: id.into(),
        addr: format!("{id}:1"),
    }
}

/// Drives an owner through a handover to `b` up to FinalSent.
fn to_final_sent(s: &mut OwnerState, attempt: Attempt) {
    assert_eq!(
        s.step(E::Pull {
            attempt,
            to: peer("b")
        }),
        vec![
            A::Arm {
                attempt,
                timer: OwnerTimer::Live,
                after: LIVE_WAIT
            },
            A::SendLive
        ]
    );
    let a = s.step(E::LiveSent { attempt });
    assert_eq!(a[0], A::HoldCalls);
    assert_eq!(a.last(), Some(&A::WaitOps));
    let a = s.step(E::OpsDrained { attempt });
    assert_eq!(
        a,
        vec![
            A::Persist(Persist::Frozen {
                attempt,
                to: peer("b")
            }),
            A::Freeze,
            A::Arm {
                attempt,
                timer: OwnerTimer::Final,
                after: FINAL_WAIT
            },
            A::SendFinal
        ],
        "persisted before the freeze"
    );
    let a = s.step(E::FinalSent { attempt });
    assert!(matches!(
        a[..],
        [A::Arm {
            timer: OwnerTimer::Release,
            ..
        }]
    ));
    assert!(matches!(s, OwnerState::FinalSent { .. }));
}

#[test]
fn a_handover_ends_released_with_the_tombstone_persisted_before_the_answer() {
    let mut s = OwnerState::Serving;
    to_final_sent(&mut s, 7);
    let a = s.step(E::Release {
        attempt: 7,
        from: "b".into(),
    });
    assert_eq!(
        a,
        vec![
            A::Persist(Persist::Released {
                attempt: 7,
                to: peer("b")
            }),
            A::Reply(Ok(())),
            A::RedirectCalls(peer("b")),
            A::Teardown
        ]
    );
    // The answer was lost and the puller asks again: same answer, nothing else.
    assert_eq!(
        s.step(E::Release {
            attempt: 7,
            from: "b".into()
        }),
        vec![A::Reply(Ok(()))]
    );
    // A released session is never given again.
    assert_eq!(
        s.step(E::Pull {
            attempt: 8,
            to: peer("c")
        }),
        vec![A::RefusePull(Refusal::Moved(peer("b")))]
    );
}

#[test]
fn a_second_puller_is_refused_and_the_first_handover_goes_on() {
    for stop_at in 0..4 {
        let mut s = OwnerState::Serving;
        s.step(E::Pull {
            attempt: 1,
            to: peer("b"),
        });
        let events = [
            E::LiveSent { attempt: 1 },
            E::OpsDrained { attempt: 1 },
            E::FinalSent { attempt: 1 },
        ];
        for e in events.into_iter().take(stop_at) {
            s.step(e);
        }
        let before = s.clone();
        let a = s.step(E::Pull {
            attempt: 2,
            to: peer("c"),
        });
        assert_eq!(a, vec![A::RefusePull(Refusal::Moving(peer("b")))]);
        assert_eq!(s, before, "the refusal changes nothing (no thaw)");
    }
    let mut s = OwnerState::Serving;
    to_final_sent(&mut s, 1);
    s.step(E::Pull {
        attempt: 2,
        to: peer("c"),
    });
    assert_eq!(
        s.step(E::Release {
            attempt: 1,
            from: "b".into()
        })[0],
        A::Persist(Persist::Released {
            attempt: 1,
            to: peer("b")
        })
    );
}

#[test]
fn only_the_puller_of_the_current_attempt_may_release() {
    let mut s = OwnerState::Serving;
    to_final_sent(&mut s, 3);
    for (attempt, from) in [(2, "b"), (3, "c")] {
        assert_eq!(
            s.step(E::Release {
                attempt,
                from: from.into()
            }),
            vec![A::Reply(Err(Refusal::NotGiving))]
        );
    }
    assert!(matches!(s, OwnerState::FinalSent { attempt: 3, .. }));
}

#[test]
fn an_abort_thaws_a_frozen_instance_and_a_late_release_is_refused() {
    let mut s = OwnerState::Serving;
    to_final_sent(&mut s, 4);
    let a = s.step(E::Abort {
        attempt: 4,
        from: "b".into(),
    });
    assert_eq!(
        a,
        vec![
            A::Thaw,
            A::Persist(Persist::Serving),
            A::ResumeCalls,
            A::Reply(Ok(()))
        ]
    );
    assert_eq!(s, OwnerState::Serving);
    assert_eq!(
        s.step(E::Release {
            attempt: 4,
            from: "b".into()
        }),
        vec![A::Reply(Err(Refusal::NotGiving))]
    );
}

#[test]
fn a_failure_before_the_freeze_resumes_calls_without_a_thaw() {
    let mut s = OwnerState::Serving;
    s.step(E::Pull {
        attempt: 5,
        to: peer("b"),
    });
    s.step(E::LiveSent { attempt: 5 });
    let a = s.step(E::Failed {
        attempt: 5,
        reason: "stream broke".into(),
    });
    assert_eq!(a, vec![A::ResumeCalls]);
    assert_eq!(s, OwnerState::Serving);
}

#[test]
fn a_stale_timer_of_an_earlier_attempt_changes_nothing() {
    let mut s = OwnerState::Serving;
    to_final_sent(&mut s, 1);
    s.step(E::Abort {
        attempt: 1,
        from: "b".into(),
    });
    to_final_sent(&mut s, 2);
    let before = s.clone();
    for timer in [OwnerTimer::Ops, OwnerTimer::Release] {
        assert!(s.step(E::Timer { attempt: 1, timer }).is_empty());
    }
    assert!(
        s.step(E::Failed {
            attempt: 1,
            reason: "old".into()
        })
        .is_empty()
    );
    assert_eq!(s, before);
    // The current attempt's own timer aborts it.
    let a = s.step(E::Timer {
        attempt: 2,
        timer: OwnerTimer::Release,
    });
    assert_eq!(a[0], A::Thaw);
    assert_eq!(s, OwnerState::Serving);
}

#[test]
fn the_ops_timer_gives_up_a_quiesce_that_does_not_drain() {
    let mut s = OwnerState::Serving;
    s.step(E::Pull {
        attempt: 9,
        to: peer("b"),
    });
    s.step(E::LiveSent { attempt: 9 });
    assert_eq!(
        s.step(E::Timer {
            attempt: 9,
            timer: OwnerTimer::Ops
        }),
        vec![A::ResumeCalls]
    );
    // A drain reported after the give-up is stale.
    assert!(s.step(E::OpsDrained { attempt: 9 }).is_empty());
    assert_eq!(s, OwnerState::Serving);
}

#[test]
fn the_same_puller_retrying_after_losing_track_starts_a_new_attempt() {
    let mut s = OwnerState::Serving;
    to_final_sent(&mut s, 1);
    let a = s.step(E::Pull {
        attempt: 2,
        to: peer("b"),
    });
    assert_eq!(
        a,
        vec![
            A::Thaw,
            A::Persist(Persist::Serving),
            A::ResumeCalls,
            A::Arm {
                attempt: 2,
                timer: OwnerTimer::Live,
                after: LIVE_WAIT
            },
            A::SendLive
        ]
    );
    assert!(matches!(s, OwnerState::Giving { attempt: 2, .. }));
    assert_eq!(
        s.step(E::Release {
            attempt: 1,
            from: "b".into()
        }),
        vec![A::Reply(Err(Refusal::NotGiving))],
        "the old attempt cannot release any more"
    );
}

#[test]
fn a_live_round_or_a_final_delta_that_never_goes_out_is_given_up() {
    let mut s = OwnerState::Serving;
    s.step(E::Pull {
        attempt: 1,
        to: peer("b"),
    });
    assert_eq!(
        s.step(E::Timer {
            attempt: 1,
            timer: OwnerTimer::Live
        }),
        vec![A::ResumeCalls]
    );
    s.step(E::Pull {
        attempt: 2,
        to: peer("b"),
    });
    s.step(E::LiveSent { attempt: 2 });
    s.step(E::OpsDrained { attempt: 2 });
    let a = s.step(E::Timer {
        attempt: 2,
        timer: OwnerTimer::Final,
    });
    assert_eq!(a[0], A::Thaw, "a frozen instance does not stay frozen");
    assert_eq!(s, OwnerState::Serving);
}
