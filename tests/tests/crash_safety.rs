//! Handovers through crashes and races (process runtime, edges on
//! 127.0.0.x): an edge killed with SIGKILL at a chosen or random moment of a
//! handover and started again, two edges pulling one session at once, and
//! hundreds of moves — with a client writing all the while. After each:
//! exactly one edge serves the session, every acknowledged write is there
//! exactly once, and nothing outlives the session.

use std::time::{Duration, Instant};

use edgeshift_tests::list::{ITEMS, add, items_of, items_req};
use edgeshift_tests::{
    Bases, Edge, Faults, Pair, Relay, Writer, check_items, instance_pid, instances_of, noise,
    pid_alive, proc_state, sole_owner,
};

async fn items(s: &edge_client::Session) -> Vec<String> {
    items_of(s.invoke(ITEMS, items_req(0)).await.unwrap())
}

async fn client(e: &Edge) -> edge_client::EdgeClient {
    e.client().await
}

/// A handle of `s` that reaches its edge through `via` (a relay).
async fn through(s: &edge_client::Session, via: &Relay, edge_id: &str) -> edge_client::Session {
    let c = edgeshift_tests::connect(&via.addr.to_string())
        .await
        .unwrap();
    edge_client::Session::attach(&c, s.id().into(), s.token().clone(), edge_id.into(), vec![])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_old_edge_killed_while_frozen_thaws_its_instance_and_serves_on() {
    let mut t = Pair::strangers("").await;
    let s = t.open("walker").await;
    let Pair { a, b, .. } = &mut t;
    for i in 0..60 {
        s.invoke(edgeshift_tests::list::ADD, add(&noise(i, 3000)))
            .await
            .unwrap();
    }
    let pid = instance_pid(a, s.id()).await;
    let writer = Writer::start(s.clone(), "w");
    // B pulls over a slow link, so A stays frozen for a while.
    let relay = Relay::start(
        a.addr,
        Faults {
            throttle: Some(Duration::from_millis(30)),
            ..Faults::default()
        },
    )
    .await;
    let moving = through(&s, &relay, "a").await;
    let cb = client(b).await;
    let mv = tokio::spawn(async move { moving.handover_to(&cb, |_| {}).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while proc_state(pid) != Some('T') {
        assert!(
            Instant::now() < deadline,
            "A never froze its instance: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    a.kill();
    let err = mv.await.unwrap().unwrap_err();
    assert!(
        !err.message().contains("h2 protocol"),
        "the client is told in plain words: {err:?}"
    );
    a.restart();
    // The same instance, thawed, with its state; B kept nothing.
    let now = instance_pid(a, s.id()).await;
    assert_eq!(
        now,
        pid,
        "{}\n{}",
        a.log(),
        String::from_utf8_lossy(
            &std::process::Command::new("ps")
                .args([
                    "-o",
                    "pid,ppid,pgid,stat,args",
                    "-p",
                    &format!("{pid},{now}")
                ])
                .output()
                .unwrap()
                .stdout
        )
    );
    assert_ne!(proc_state(pid), Some('T'), "the instance was thawed");
    assert_eq!(
        sole_owner(&[a, b], s.id(), Duration::from_secs(20)).await,
        0
    );
    let (acked, unsure) = writer.finish().await;
    assert!(acked.len() > 5, "the writer wrote ({} acked)", acked.len());
    let got = items(&s).await;
    check_items(&got[60..], &acked, &unsure);
    assert!(b.session_dirs().is_empty(), "B holds no session");
    // And the session still moves.
    s.handover_to(&client(b).await, |_| {}).await.unwrap();
    assert_eq!(
        sole_owner(&[a, b], s.id(), Duration::from_secs(10)).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_old_edge_killed_just_after_releasing_never_serves_the_session_again() {
    let mut t = Pair::strangers("").await;
    let s = t.open("walker").await;
    let Pair { a, b, .. } = &mut t;
    let pid = instance_pid(a, s.id()).await;
    let writer = Writer::start(s.clone(), "w");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s2, cb) = (s.clone(), client(b).await);
    let mv = tokio::spawn(async move { s2.handover_to(&cb, |_| {}).await });
    let stone = a.tombstone(s.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stone.exists() {
        assert!(Instant::now() < deadline, "A never released: {}", a.log());
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    a.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.restart();
    mv.await
        .unwrap()
        .expect("B owns the session: the release was persisted before A died");
    assert_eq!(
        sole_owner(&[a, b], s.id(), Duration::from_secs(20)).await,
        1
    );
    a.wait_empty().await;
    assert!(!pid_alive(pid), "A's instance is gone");
    // A handle still pointing at A is sent to B, after A's restart too.
    let stale = edge_client::Session::attach(
        &client(a).await,
        s.id().into(),
        s.token().clone(),
        "a".into(),
        vec![],
    );
    stale
        .invoke(edgeshift_tests::list::ADD, add("late"))
        .await
        .unwrap();
    assert_eq!(stale.edge_id(), "b");
    let (acked, unsure) = writer.finish().await;
    let got = items(&s).await;
    let (late, rest): (Vec<String>, Vec<String>) = got.into_iter().partition(|i| i == "late");
    assert_eq!(late.len(), 1);
    check_items(&rest, &acked, &unsure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_edges_pulling_one_session_at_once_exactly_one_wins() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    let b = Edge::start("b", "127.0.0.2", &apps, "");
    let c = Edge::start("c", "127.0.0.3", &apps, "");
    let ca = client(&a).await;
    let s = ca.open_session("list", "walker").await.unwrap();
    for i in 0..40 {
        s.invoke(edgeshift_tests::list::ADD, add(&noise(i, 3000)))
            .await
            .unwrap();
    }
    let writer = Writer::start(s.clone(), "w");
    let handle =
        || edge_client::Session::attach(&ca, s.id().into(), s.token().clone(), "a".into(), vec![]);
    let (sb, sc) = (handle(), handle());
    let (cb, cc) = (client(&b).await, client(&c).await);
    let (rb, rc) = tokio::join!(sb.handover_to(&cb, |_| {}), sc.handover_to(&cc, |_| {}));
    let winner = match (&rb, &rc) {
        (Ok(()), Err(e)) => {
            assert!(
                e.message().contains("edge b") || e.message().contains("moving"),
                "the loser is told who won: {e:?}"
            );
            1
        }
        (Err(e), Ok(())) => {
            assert!(
                e.message().contains("edge c") || e.message().contains("moving"),
                "the loser is told who won: {e:?}"
            );
            2
        }
        other => panic!("exactly one pull wins: {other:?}"),
    };
    assert_eq!(
        sole_owner(&[&a, &b, &c], s.id(), Duration::from_secs(20)).await,
        winner
    );
    let (acked, unsure) = writer.finish().await;
    let got = items(&s).await;
    check_items(&got[40..], &acked, &unsure);
    a.wait_empty().await;
}

/// A small seeded generator (xorshift), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_run_of_handovers_with_an_edge_killed_at_random_keeps_one_owner_and_every_write() {
    let seed: u64 = std::env::var("EDGESHIFT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261129);
    let rounds: usize = std::env::var("EDGESHIFT_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("chaos seed {seed}, {rounds} rounds (EDGESHIFT_CHAOS_SEED / _ROUNDS to replay)");
    let mut rng = Rng(seed | 1);
    let bases = Bases::new();
    let apps = bases.process_apps();
    let mut edges = [
        Edge::start("a", "127.0.0.1", &apps, ""),
        Edge::start("b", "127.0.0.2", &apps, ""),
    ];
    let clients = [client(&edges[0]).await, client(&edges[1]).await];
    let s = clients[0].open_session("list", "walker").await.unwrap();
    for i in 0..20 {
        s.invoke(edgeshift_tests::list::ADD, add(&noise(i, 3000)))
            .await
            .unwrap();
    }
    let writer = Writer::start(s.clone(), "w");
    let mut owner = 0usize;
    for round in 0..rounds {
        let to = 1 - owner;
        let (s2, c2) = (s.clone(), clients[to].clone());
        let t0 = Instant::now();
        let mv = tokio::spawn(async move {
            let r = s2.handover_to(&c2, |_| {}).await;
            (r, t0.elapsed())
        });
        let at = rng.below(300);
        tokio::time::sleep(Duration::from_millis(at)).await;
        let victim = rng.below(2) as usize;
        edges[victim].kill();
        tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        edges[victim].restart();
        let (r, took) = tokio::time::timeout(Duration::from_secs(90), mv)
            .await
            .expect("the handover ends")
            .unwrap();
        let refs = [&edges[0], &edges[1]];
        owner = sole_owner(&refs, s.id(), Duration::from_secs(40)).await;
        eprintln!(
            "round {round}: killed {} at {at} ms, handover ({} ms) {:?}, owner {}",
            ["a", "b"][victim],
            took.as_millis(),
            r.as_ref().map_err(|e| e.message().to_string()),
            ["a", "b"][owner]
        );
    }
    let (acked, unsure) = writer.finish().await;
    let got = items(&s).await;
    check_items(&got[20..], &acked, &unsure);
    assert!(acked.len() > 20, "the writer wrote ({} acked)", acked.len());
    // Both edges retire, closing their sessions: no instance of the session
    // is left anywhere.
    for e in &mut edges {
        e.stop_closing_sessions();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !instances_of(s.id()).is_empty() {
        let left = instances_of(s.id());
        assert!(
            Instant::now() < deadline,
            "instances outlived the session: {left:?}: {}\n{}\n{}",
            left.iter()
                .map(|p| format!(
                    "{p}: cwd {:?}",
                    std::fs::read_link(format!("/proc/{p}/cwd")).ok()
                ))
                .collect::<Vec<_>>()
                .join(", "),
            edges[0].log(),
            edges[1].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_moves_leave_fds_and_memory_flat() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let edges = [
        Edge::start("a", "127.0.0.1", &apps, ""),
        Edge::start("b", "127.0.0.2", &apps, ""),
    ];
    let clients = [client(&edges[0]).await, client(&edges[1]).await];
    let mut sessions = Vec::new();
    for i in 0..2 {
        let s = clients[0]
            .open_session("list", &format!("walker-{i}"))
            .await
            .unwrap();
        s.invoke(edgeshift_tests::list::ADD, add(&noise(i, 2000)))
            .await
            .unwrap();
        sessions.push(s);
    }
    let moves = 200;
    let mut warm = (0, 0);
    for m in 0..moves / 2 {
        for s in &sessions {
            let to = if s.edge_id() == "a" { 1 } else { 0 };
            s.handover_to(&clients[to], |_| {}).await.unwrap();
        }
        // Both sessions are on A after every second round: compare like with like.
        if m == 11 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            warm = (edges[0].fds(), edges[0].rss());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = (edges[0].fds(), edges[0].rss());
    eprintln!("edge a after 24 moves: {warm:?} (fds, rss); after {moves}: {end:?}");
    assert!(
        end.0 <= warm.0 + 3,
        "fds grew from {} to {} over {moves} moves",
        warm.0,
        end.0
    );
    assert!(
        end.1 <= warm.1 + 24 * 1024 * 1024,
        "memory grew from {} to {} bytes over {moves} moves",
        warm.1,
        end.1
    );
    for s in &sessions {
        assert_eq!(items(s).await.len(), 1);
    }
}
