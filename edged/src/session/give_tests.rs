//! The owner's shell with a recording runtime: what the machine says
//! is done, in order, and persisted before it takes effect.

use std::sync::Arc;

use std::sync::atomic::Ordering;

use edge_proto::v1 as pb;
use tokio::sync::mpsc;

use super::{Edge, EdgeError, Gate, Role, Session};
use crate::config::Config;
use crate::migration::owner::{OwnerAction, OwnerEvent, OwnerState, OwnerTimer, Refusal};
use crate::migration::{Attempt, Peer};
use crate::runtime::fake::{Call, FakeRuntime};
use crate::runtime::{InstanceId, Runtime};
use crate::session::SessionRecord;

async fn edge_with_session() -> (Arc<Edge>, Arc<Session>, Arc<FakeRuntime>, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let toml = crate::config::plaintext_default().replace(
        "data_dir = \"/var/lib/edgeshift\"",
        &format!("data_dir = {:?}", d.path().display().to_string()),
    );
    let edge = Edge::new(Config::from_toml(&toml, "test").unwrap()).unwrap();
    let fake = Arc::new(FakeRuntime::default());
    let rec = SessionRecord {
        id: "s1".into(),
        app: "list".into(),
        client_id: "c".into(),
        token_hash: blake3::hash(b"t").to_hex().to_string(),
        created: 0,
        instance: None,
        volfs_pid: None,
        epoch: 1,
        role: Role::Serving,
    };
    std::fs::create_dir_all(edge.sessions_dir().join("s1")).unwrap();
    let s = Arc::new(
        edge.build_session(&rec, blake3::hash(b"t"), fake.clone() as Arc<dyn Runtime>)
            .unwrap(),
    );
    // An instance "runs" without starting anything.
    let client = crate::forward::AppClient::lazy(&std::path::PathBuf::from("/nonexistent"), 1024);
    *s.instance.lock().await = Some((InstanceId::Pid(7), client));
    edge.sessions
        .write()
        .unwrap()
        .insert("s1".into(), s.clone());
    (edge, s, fake, d)
}

fn peer(id: &str) -> Peer {
    Peer {
        edge_id: id.into(),
        addr: format!("{id}:1"),
    }
}

fn persisted(s: &Session) -> Role {
    let rec: SessionRecord =
        serde_json::from_slice(&std::fs::read(s.layout().record()).unwrap()).unwrap();
    rec.role
}

async fn to_final_sent(edge: &Arc<Edge>, s: &Arc<Session>, attempt: Attempt) {
    edge.owner_event(
        s,
        OwnerEvent::Pull {
            attempt,
            to: peer("b"),
        },
    )
    .await;
    edge.owner_event(s, OwnerEvent::LiveSent { attempt }).await;
    assert_eq!(
        *s.gate.borrow(),
        Gate::Held,
        "calls are held from the quiesce"
    );
    edge.owner_event(s, OwnerEvent::OpsDrained { attempt })
        .await;
    edge.owner_event(s, OwnerEvent::FinalSent { attempt }).await;
}

#[tokio::test]
async fn the_freeze_is_persisted_first_and_an_abort_thaws_and_reopens_calls() {
    let (edge, s, fake, _d) = edge_with_session().await;
    to_final_sent(&edge, &s, 3).await;
    assert_eq!(fake.calls(), vec![Call::Pause(InstanceId::Pid(7))]);
    assert!(matches!(persisted(&s), Role::Frozen { attempt: 3, .. }));
    let acts = edge
        .owner_event(
            &s,
            OwnerEvent::Abort {
                attempt: 3,
                from: "b".into(),
            },
        )
        .await;
    assert_eq!(acts, vec![OwnerAction::Reply(Ok(()))]);
    assert_eq!(
        fake.calls(),
        vec![
            Call::Pause(InstanceId::Pid(7)),
            Call::Resume(InstanceId::Pid(7))
        ]
    );
    assert_eq!(persisted(&s), Role::Serving);
    assert_eq!(*s.gate.borrow(), Gate::Open);
    assert_eq!(
        *s.held_since.lock().unwrap(),
        None,
        "calls are no longer held"
    );
}

#[tokio::test]
async fn a_release_persists_the_tombstone_redirects_calls_and_frees_the_session() {
    let (edge, s, fake, _d) = edge_with_session().await;
    to_final_sent(&edge, &s, 5).await;
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    // The answer says how long calls have been held: the downtime began
    // at the hold, not when the new edge heard of the quiesce.
    let held = edge.release("s1", 5, "b").await.unwrap();
    assert!(
        held.is_some_and(|d| d >= std::time::Duration::from_millis(30)),
        "{held:?}"
    );
    assert_eq!(*s.gate.borrow(), Gate::Moved(peer("b")));
    let t = edge.tombstones.load();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].1.attempt, t[0].1.to.edge_id.as_str()), (5, "b"));
    assert_eq!(edge.session_count(), 0);
    // The old instance is discarded frozen, never thawed to stop it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !fake.calls().contains(&Call::Discard(InstanceId::Pid(7))) {
        assert!(std::time::Instant::now() < deadline, "{:?}", fake.calls());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Resume(_) | Call::Stop(_))),
        "{:?}",
        fake.calls()
    );
    // Asked again (the answer was lost): answered from the tombstone,
    // without a hold it no longer knows.
    assert_eq!(edge.release("s1", 5, "b").await.unwrap(), None);
    assert!(edge.release("s1", 4, "b").await.is_err());
    assert!(matches!(
        edge.session("s1", b"t"),
        Err(EdgeError::Moved(..))
    ));
}

#[tokio::test]
async fn a_second_pull_is_refused_without_touching_the_first() {
    let (edge, s, fake, _d) = edge_with_session().await;
    edge.owner_event(
        &s,
        OwnerEvent::Pull {
            attempt: 1,
            to: peer("b"),
        },
    )
    .await;
    edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
        .await;
    edge.owner_event(&s, OwnerEvent::OpsDrained { attempt: 1 })
        .await;
    let acts = edge
        .owner_event(
            &s,
            OwnerEvent::Pull {
                attempt: 2,
                to: peer("c"),
            },
        )
        .await;
    assert_eq!(
        acts,
        vec![OwnerAction::RefusePull(Refusal::Moving(peer("b")))]
    );
    assert_eq!(
        fake.calls(),
        vec![Call::Pause(InstanceId::Pid(7))],
        "no thaw"
    );
    assert_eq!(*s.gate.borrow(), Gate::Held);
}

#[tokio::test]
async fn a_stale_timer_changes_nothing_and_a_retry_starts_clean() {
    let (edge, s, fake, _d) = edge_with_session().await;
    to_final_sent(&edge, &s, 1).await;
    edge.owner_event(
        &s,
        OwnerEvent::Abort {
            attempt: 1,
            from: "b".into(),
        },
    )
    .await;
    to_final_sent(&edge, &s, 2).await;
    let before = fake.calls().len();
    edge.owner_event(
        &s,
        OwnerEvent::Timer {
            attempt: 1,
            timer: OwnerTimer::Release,
        },
    )
    .await;
    assert_eq!(
        fake.calls().len(),
        before,
        "the old attempt's timer did nothing"
    );
    assert!(matches!(
        *s.owner.lock().await,
        OwnerState::FinalSent { attempt: 2, .. }
    ));
}

#[tokio::test]
async fn a_failed_freeze_gives_the_attempt_up_and_calls_run_again() {
    let (edge, s, fake, _d) = edge_with_session().await;
    fake.fail_pause.store(true, Ordering::SeqCst);
    edge.owner_event(
        &s,
        OwnerEvent::Pull {
            attempt: 1,
            to: peer("b"),
        },
    )
    .await;
    edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
        .await;
    let acts = edge
        .owner_event(&s, OwnerEvent::OpsDrained { attempt: 1 })
        .await;
    assert!(
        !acts.contains(&OwnerAction::SendFinal),
        "nothing more is sent"
    );
    assert_eq!(*s.owner.lock().await, OwnerState::Serving);
    assert_eq!(*s.gate.borrow(), Gate::Open);
}

#[tokio::test]
async fn a_thaw_never_overtakes_a_freeze() {
    let (edge, s, fake, _d) = edge_with_session().await;
    edge.owner_event(
        &s,
        OwnerEvent::Pull {
            attempt: 1,
            to: peer("b"),
        },
    )
    .await;
    edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
        .await;
    // The freeze (slow) and an abort race.
    let (e2, s2) = (edge.clone(), s.clone());
    let freeze = tokio::spawn(async move {
        e2.owner_event(&s2, OwnerEvent::OpsDrained { attempt: 1 })
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    edge.owner_event(
        &s,
        OwnerEvent::Abort {
            attempt: 1,
            from: "b".into(),
        },
    )
    .await;
    freeze.await.unwrap();
    let calls = fake.calls();
    if let Some(p) = calls.iter().position(|c| matches!(c, Call::Pause(_))) {
        assert!(
            calls[p..].iter().any(|c| matches!(c, Call::Resume(_))),
            "a freeze is always followed by its thaw: {calls:?}"
        );
    }
    assert_eq!(*s.owner.lock().await, OwnerState::Serving);
}

#[tokio::test]
async fn a_session_still_waiting_for_its_release_is_not_given_away_or_closed() {
    let (edge, s, fake, _d) = edge_with_session().await;
    *s.role.lock().unwrap() = Role::AwaitingRelease {
        attempt: 1,
        from: peer("a"),
    };
    let (tx, mut rx) = mpsc::channel(4);
    edge.give(
        pb::PeerHandoverRequest {
            session_id: "s1".into(),
            token: b"t".to_vec(),
            held_manifest: Vec::new(),
            to_edge: "c".into(),
            to_addr: "c:1".into(),
            acks_rounds: true,
        },
        tx,
    )
    .await;
    let err = rx.recv().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(*s.owner.lock().await, OwnerState::Serving);
    assert!(fake.calls().is_empty(), "nothing frozen");
    assert!(matches!(
        edge.close("s1", Some(b"t")).await,
        Err(EdgeError::Moving(_))
    ));
}

#[tokio::test]
async fn a_session_being_handed_over_is_not_closed_from_under_the_handover() {
    let (edge, s, _fake, _d) = edge_with_session().await;
    to_final_sent(&edge, &s, 4).await;
    assert!(matches!(
        edge.close("s1", None).await,
        Err(EdgeError::Moving(_))
    ));
    assert_eq!(edge.session_count(), 1);
    edge.release("s1", 4, "b").await.unwrap();
    assert_eq!(edge.session_count(), 0);
}

#[tokio::test]
async fn only_the_puller_of_the_live_rounds_acknowledges_them() {
    let (edge, s, _fake, _d) = edge_with_session().await;
    let refused = |r: Result<(), EdgeError>| matches!(r, Err(EdgeError::Refused(..)));
    let ms = std::time::Duration::from_millis;
    assert!(
        refused(edge.round_applied("s1", 1, 1, ms(30), "b").await),
        "no handover under way"
    );
    edge.owner_event(
        &s,
        OwnerEvent::Pull {
            attempt: 1,
            to: peer("b"),
        },
    )
    .await;
    assert!(
        refused(edge.round_applied("s1", 2, 1, ms(30), "b").await),
        "another attempt"
    );
    assert!(
        refused(edge.round_applied("s1", 1, 1, ms(30), "c").await),
        "another edge"
    );
    assert_eq!(*s.applied.borrow(), (0, 0, ms(0)));
    edge.round_applied("s1", 1, 1, ms(30), "b").await.unwrap();
    assert_eq!(*s.applied.borrow(), (1, 1, ms(30)));
    // Once the quiesce began, live rounds are over.
    edge.owner_event(&s, OwnerEvent::LiveSent { attempt: 1 })
        .await;
    assert!(refused(edge.round_applied("s1", 1, 2, ms(30), "b").await));
    assert_eq!(*s.applied.borrow(), (1, 1, ms(30)));
}
