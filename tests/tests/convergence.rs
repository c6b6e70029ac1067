//! Live rounds of a handover (process runtime, A on 127.0.0.1, B on
//! 127.0.0.2, the link between them slowed by a relay): rounds repeat while
//! what is left shrinks; an app that dirties its volume faster than the link
//! drains is slowed (auto-converge) until the final round fits the downtime
//! budget; nothing the client was told is lost.

use std::time::Duration;

use edgeshift_tests::list::{ADD, ITEMS, add, items_of, items_req};
use edgeshift_tests::{Bases, Edge, Faults, Pair, Relay, noise};

async fn items(s: &edge_client::Session) -> Vec<String> {
    items_of(s.invoke(ITEMS, items_req(0)).await.unwrap())
}

/// A List of thousands of 4 KB items comes back in one reply.
const BIG_LISTS: &str = "max_payload = 67108864\n";

/// Moves `s` from `from` to `to` over a relay that slows the link (`throttle`
/// after every 16 KiB), and returns the progress events.
async fn move_slowly(
    s: &edge_client::Session,
    (from, from_id): (&Edge, &str),
    to: &Edge,
    throttle: Duration,
) -> Vec<edge_client::HandoverProgress> {
    let relay = Relay::start(
        from.addr,
        Faults {
            throttle: Some(throttle),
            ..Faults::default()
        },
    )
    .await;
    let via = edgeshift_tests::connect(&relay.addr.to_string())
        .await
        .unwrap();
    let moving = edge_client::Session::attach(
        &via,
        s.id().into(),
        s.token().clone(),
        from_id.into(),
        vec![],
    );
    let cb = to.client().await;
    let mut events = Vec::new();
    moving
        .handover_to(&cb, |p| events.push(p.clone()))
        .await
        .unwrap_or_else(|e| panic!("move: {e}\n{}", from.log()));
    events
}

/// Bytes of the final round: received between the quiesce and the end.
fn final_round(events: &[edge_client::HandoverProgress]) -> u64 {
    use edge_client::HandoverPhase as P;
    let at = |ph: P| {
        events
            .iter()
            .find(|p| p.phase() == ph)
            .unwrap_or_else(|| panic!("no {ph:?} in {events:?}"))
            .bytes_received
    };
    at(P::Final) - at(P::Quiesced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_rounds_repeat_while_the_app_writes_until_the_last_one_fits_the_downtime_budget() {
    // A budget no first round can meet while the app writes, on both.
    let t = Pair::strangers("[handover]\nmax_downtime = 0.002\nauto_converge = false\n").await;
    let Pair { a, b, .. } = &t;
    let s = t.open("walker").await;
    for i in 0..200 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    // A writer that keeps dirtying the volume during the moves, over a link
    // of about 8 MB/s: fast enough that what the writer dirties during a
    // round is usually less than the round sent. On a busy machine the
    // writer can out-dirty a first round, and then one live round is right
    // (the owner quiesces: not converging); so the session moves back and
    // forth, three times at most, until a move shows rounds repeating.
    let writer = edgeshift_tests::Writer::start(s.clone(), "w");
    // Writing before the move starts (a busy machine may run the writer
    // late): the first live round leaves something behind.
    writer.wait_acked(3).await;
    let mut seen = Vec::new();
    let (mut from, mut to) = ((a, "a"), (b, "b"));
    for _ in 0..3 {
        let events = move_slowly(&s, from, to.0, Duration::from_millis(2)).await;
        let quiesce = events
            .iter()
            .position(|p| p.phase() == edge_client::HandoverPhase::Quiesced)
            .expect("a quiesce");
        // Each live round is reported as it is applied, and again when
        // the owner says another follows: counted by number.
        let live: std::collections::BTreeSet<u32> = events[..quiesce]
            .iter()
            .filter(|p| p.phase() == edge_client::HandoverPhase::Pull)
            .map(|p| p.round)
            .collect();
        assert!(
            !live.is_empty() && live.len() <= 8,
            "at least one live round, at most max_live_rounds: {live:?} in {events:?}"
        );
        seen.push(live.len());
        if live.len() >= 2 {
            break;
        }
        std::mem::swap(&mut from, &mut to);
    }
    assert!(
        seen.iter().any(|n| *n >= 2),
        "more than one live round while the app wrote, in one move of three: {seen:?}\n{}\n{}",
        a.log(),
        b.log()
    );
    let (acked, unsure) = writer.finish().await;
    let got = items(&s).await;
    edgeshift_tests::check_items(&got[200..], &acked, &unsure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_that_out_writes_the_link_is_slowed_until_the_final_round_fits() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    // The same budget on both; A does not throttle (the control case).
    let a = Edge::start(
        "a",
        "127.0.0.1",
        &apps,
        &format!("{BIG_LISTS}[handover]\nmax_downtime = 0.2\nauto_converge = false\n"),
    );
    let b = Edge::start(
        "b",
        "127.0.0.2",
        &apps,
        &format!("{BIG_LISTS}[handover]\nmax_downtime = 0.2\n"),
    );
    let ca = a.client().await;
    let s = ca.open_session("list", "writer").await.unwrap();
    for i in 0..100 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    // 4 KB items as fast as the app takes them, over a link of about
    // 1.6 MB/s (16 KiB every 10 ms).
    let writer = edgeshift_tests::Writer::start_sized(s.clone(), "w", 4000);
    let link = Duration::from_millis(10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let plain = move_slowly(&s, (&a, "a"), &b, link).await;
    assert!(
        plain.iter().all(|p| p.throttle_bytes_per_sec == 0),
        "no throttle without auto-converge: {plain:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let converged = move_slowly(&s, (&b, "b"), &a, link).await;
    let throttled: Vec<u64> = converged
        .iter()
        .map(|p| p.throttle_bytes_per_sec)
        .filter(|t| *t > 0)
        .collect();
    assert!(
        !throttled.is_empty(),
        "the rounds did not converge by themselves, so the app was slowed: {converged:?}\n{}",
        b.log()
    );
    let (f_plain, f_converged) = (final_round(&plain), final_round(&converged));
    eprintln!(
        "final round: {f_plain} B without auto-converge, {f_converged} B with (throttles {throttled:?})"
    );
    assert!(
        f_converged * 2 < f_plain,
        "the final round shrank: {f_converged} B with auto-converge, {f_plain} B without"
    );
    // The throttle ended with the live rounds: the app on A writes on.
    let (acked, unsure) = writer.finish().await;
    let got = items(&s).await;
    edgeshift_tests::check_items(&got[100..], &acked, &unsure);
    assert_eq!(s.edge_id(), "a");
}
