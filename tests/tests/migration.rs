//! Handover between edges on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (process
//! runtime): state follows the client, a running call's result arrives
//! through the new edge, calls made during the move are served once, a
//! failed move leaves the session whole on the old edge.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use edge_client::{FileLocator, Follower, locator::FollowEvent};
use edgeshift_tests::{
    App, Bases, Cluster, Edge, Faults, Pair, Relay, Runtime, bin, free_addr, neighbour, noise,
};
use tonic::Code;

use edgeshift_tests::list::{ADD, ITEMS, add, items_of, items_req};

async fn items(s: &edge_client::Session) -> Vec<String> {
    items_of(s.invoke(ITEMS, items_req(0)).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_follows_the_client_a_b_c_and_back_to_a() {
    let bases = Bases::new();
    let cluster = Cluster::mesh(3, &bases.process_apps(), "");
    let (edges, clients) = (&cluster.edges, cluster.clients().await);
    let s = clients[0].open_session("list", "walker").await.unwrap();
    s.invoke(ADD, add("at a")).await.unwrap();
    let mut expect = vec!["at a".to_string()];
    for (i, to) in [1usize, 2, 0].into_iter().enumerate() {
        let mut phases = Vec::new();
        s.handover_to(&clients[to], |p| {
            phases.push(edge_client::phase_name(p.phase()).to_string())
        })
        .await
        .unwrap();
        assert_eq!(s.edge_id(), ["a", "b", "c"][to]);
        assert!(
            phases.contains(&"quiesced".to_string()) && phases.last().unwrap() == "ready",
            "{phases:?}"
        );
        assert_eq!(items(&s).await, expect, "state intact after move {i}");
        let item = format!("at {}", ["a", "b", "c"][to]);
        s.invoke(ADD, add(&item)).await.unwrap();
        expect.push(item);
        // The old edge kept nothing.
        let from = [0usize, 1, 2][i];
        edges[from].wait_empty().await;
        assert_eq!(edges[to].session_dirs().len(), 1);
    }
    // The volume on the final edge hashes like a fresh scan of it.
    let backing = edges[0].session_dirs()[0].join("volume");
    s.close().await.unwrap();
    assert!(!backing.exists());
}

async fn futures_join(edges: &[Edge]) -> Vec<edge_client::EdgeClient> {
    let mut v = Vec::new();
    for e in edges {
        v.push(e.client().await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_call_finishes_and_its_result_is_had_through_the_new_edge() {
    let t = Pair::strangers("").await;
    let Pair { a, cb, .. } = &t;
    let s = t.open("walker").await;
    for i in 0..5 {
        s.invoke(ADD, add(&format!("item {i}"))).await.unwrap();
    }
    // A slow call (5 items × 200 ms) whose client loses its link to A.
    let op = s.next_op_id();
    let s2 = s.clone();
    let lost = tokio::spawn(async move { s2.invoke_op(op, ITEMS, items_req(200)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    lost.abort();
    let mut downtime = 0;
    s.handover_to(cb, |p| downtime = p.downtime_micros)
        .await
        .unwrap();
    assert_eq!(s.edge_id(), "b");
    let r = items_of(s.result(op).await.unwrap());
    assert_eq!(
        r.len(),
        5,
        "the call ran to its end on A and its result moved to B"
    );
    assert!(downtime > 0);
    assert_eq!(items(&s).await.len(), 5, "and it was not run again");
    a.wait_empty().await;
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_made_during_the_move_are_served_once() {
    let t = Pair::strangers("").await;
    let Pair { cb, .. } = &t;
    let s = t.open("walker").await;
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (s, done) = (s.clone(), done.clone());
        tokio::spawn(async move {
            for i in 0..60 {
                s.invoke(ADD, add(&format!("w{i}"))).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(60)).await;
    s.handover_to(cb, |_| {}).await.unwrap();
    writer.await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 60);
    let got = items(&s).await;
    assert_eq!(
        got,
        (0..60).map(|i| format!("w{i}")).collect::<Vec<_>>(),
        "every call exactly once, in order"
    );
    s.close().await.unwrap();
}

/// The most memory process `pid` ever held (VmHWM), bytes.
fn peak_rss(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_round_streams_through_both_edges_and_moves_whole() {
    let t = Pair::strangers("").await;
    let Pair { a, b, .. } = &t;
    let s = t.open("big").await;
    s.invoke(ADD, add("kept")).await.unwrap();
    // 48 MiB no pre-copy sent: the first round carries all of it, from
    // volfs on A to the staged copy on B.
    const SIZE: usize = 48 << 20;
    let blob = a.data_dir.join("sessions").join(s.id()).join("mnt/blob");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&blob, &data).unwrap();
    let (pa, pb) = (a.pid().unwrap(), b.pid().unwrap());
    let before = (peak_rss(pa), peak_rss(pb));
    s.handover_to(&b.client().await, |_| {}).await.unwrap();
    // Frame by frame: neither edge held the round whole (a delta file read
    // into memory, or a round buffered before its apply, would).
    let grew = (peak_rss(pa) - before.0, peak_rss(pb) - before.1);
    assert!(
        grew.0 < SIZE as u64 / 3 && grew.1 < SIZE as u64 / 3,
        "peak memory grew by {} MiB on A and {} MiB on B for a {} MiB round",
        grew.0 >> 20,
        grew.1 >> 20,
        SIZE >> 20
    );
    let moved = b.data_dir.join("sessions").join(s.id());
    assert_eq!(std::fs::read(moved.join("mnt/blob")).unwrap(), data);
    // Nothing spooled or left behind on either side.
    let stray = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".delta") || n == "handover")
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(stray(&moved), Vec::<String>::new());
    assert!(!b.data_dir.join("staging").join(s.id()).exists());
    assert_eq!(
        items_of(s.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["kept"]
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_move_leaves_the_session_whole_on_the_old_edge() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    // B cannot run the app: its start fails after the volume arrived.
    let broken = [App {
        name: "list".into(),
        base: bases.list.clone(),
        runtime: Runtime::Process("/nonexistent/list-app".into()),
    }];
    let b = Edge::start("b", "127.0.0.2", &broken, "");
    let (ca, cb) = (a.client().await, b.client().await);
    let s = ca.open_session("list", "walker").await.unwrap();
    s.invoke(ADD, add("before")).await.unwrap();
    let err = s.handover_to(&cb, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(s.edge_id(), "a");
    // A serves again (its instance restarts), nothing lost, and B owns nothing.
    s.invoke(ADD, add("after")).await.unwrap();
    assert_eq!(items(&s).await, ["before", "after"]);
    assert!(b.session_dirs().is_empty());
    assert!(b.mounts().is_empty());

    // A move to an edge whose source is gone fails clearly, too.
    let c = Edge::start("c", "127.0.0.3", &bases.process_apps(), "");
    let cc = c.client().await;
    drop(a);
    let err = s.handover_to(&cc, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(c.session_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_moves_the_session_when_the_location_file_changes() {
    let t = Pair::strangers("").await;
    let Pair { a, b, .. } = &t;
    let s = t.open("walker").await;
    s.invoke(ADD, add("x")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nearest");
    std::fs::write(&file, a.addr.to_string()).unwrap();
    let mut follower = Follower::start(s.clone(), FileLocator::new(&file)).unwrap();
    // The user moves: the shared file names B (written atomically).
    let tmp = dir.path().join("nearest.tmp");
    std::fs::write(&tmp, format!("{}\n", b.addr)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let moved = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match follower.next_event().await {
                Some(FollowEvent::Moved(to)) => return to,
                Some(FollowEvent::Failed(to, e)) => panic!("move to {to} failed: {e}"),
                Some(FollowEvent::Progress(_)) => {}
                None => panic!("follower stopped"),
            }
        }
    })
    .await
    .expect("the follower moved the session");
    assert_eq!(moved, b.addr.to_string());
    assert_eq!(s.edge_id(), "b");
    assert_eq!(items(&s).await, ["x"]);
    let _ = bin("edged");
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_copy_leaves_only_the_last_changes_for_the_handover() {
    let t = Pair::neighbours("[precopy]\ninterval = 0.3\n", "").await;
    let Pair { a, b, cb, .. } = &t;
    let s = t.open("walker").await;
    let big = "x".repeat(4000);
    for i in 0..300 {
        s.invoke(ADD, add(&format!("{i} {big}"))).await.unwrap();
    }
    // B stages the volume in the background.
    let staged = b.data_dir.join("staging").join(s.id()).join("volume");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dir_bytes(&staged) < 1_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was pre-copied to B: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.invoke(ADD, add("the last change")).await.unwrap();
    let mut received = 0;
    s.handover_to(cb, |p| received = p.bytes_received)
        .await
        .unwrap();
    let total = dir_bytes(&b.session_dirs()[0].join("volume"));
    assert!(total > 1_000_000, "volume is {total} bytes");
    assert!(
        received < 300_000,
        "handover sent {received} bytes of a {total}-byte volume"
    );
    // The list moved whole: one more item makes 302 (Items would exceed the payload limit).
    let r = s.invoke(ADD, add("after the move")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 302);
    assert!(
        !b.data_dir.join("staging").join(s.id()).exists(),
        "the staged copy became the session"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_tampered_link_leaves_one_owner() {
    let t = Pair::strangers("").await;
    let Pair { a, b, cb, .. } = &t;
    let s = t.open("walker").await;
    for i in 0..200 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    let count = |r: Bytes| edgeshift_tests::list::count_of(r);
    // A link cut mid-transfer (every connection), then a link that flips a
    // byte (TLS refuses the record): each move fails, A owns it whole.
    for faults in [
        Faults {
            cut_after: Some(200_000),
            ..Faults::default()
        },
        Faults {
            corrupt_at: Some(300_000),
            ..Faults::default()
        },
    ] {
        let relay = Relay::start(a.addr, faults).await;
        let via = edgeshift_tests::connect(&relay.addr.to_string())
            .await
            .unwrap();
        let moving = edge_client::Session::attach(
            &via,
            s.id().into(),
            s.token().clone(),
            "a".into(),
            vec![],
        );
        let err = moving.handover_to(cb, |_| {}).await.unwrap_err();
        assert!(
            matches!(
                err.code(),
                Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss
            ),
            "{faults:?}: {err:?}"
        );
        b.wait_empty().await;
        assert!(b.session_dirs().is_empty(), "B took a session");
        assert!(b.mounts().is_empty());
    }
    let n = count(s.invoke(ADD, add("still on a")).await.unwrap());
    assert_eq!(s.edge_id(), "a");
    assert_eq!(n, 201);
    // The link heals: the move succeeds.
    s.handover_to(cb, |_| {}).await.unwrap();
    assert_eq!(count(s.invoke(ADD, add("on b")).await.unwrap()), n + 1);
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_a_damaged_block_is_refused_and_sent_again() {
    // In plaintext nothing but the block hashes catches a flipped byte: B
    // refuses the block, pulls again, and the block is sent again.
    let t = Pair::strangers("insecure_plaintext = true").await;
    let Pair { a, b, cb, .. } = &t;
    assert!(a.url().starts_with("http://"));
    let s = t.ca.open_session("list", "walker").await.unwrap();
    for i in 0..200 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    let relay = Relay::start(
        a.addr,
        Faults {
            corrupt_at: Some(300_000),
            ..Faults::default()
        },
    )
    .await;
    let via = edge_client::connect(&relay.addr.to_string()).await.unwrap();
    let moving =
        edge_client::Session::attach(&via, s.id().into(), s.token().clone(), "a".into(), vec![]);
    moving.handover_to(cb, |_| {}).await.unwrap();
    assert!(
        b.log().contains("damaged in transit"),
        "B saw the damage: {}",
        b.log()
    );
    let n = edgeshift_tests::list::count_of(moving.invoke(ADD, add("on b")).await.unwrap());
    assert_eq!(n, 201);
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_failed_start_and_a_restart_of_the_new_edge_resumes_from_what_it_holds() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    let broken = [App {
        name: "list".into(),
        base: bases.list.clone(),
        runtime: Runtime::Process("/nonexistent/list-app".into()),
    }];
    let mut b = Edge::start("b", "127.0.0.2", &broken, "");
    let ca = a.client().await;
    let s = ca.open_session("list", "walker").await.unwrap();
    for i in 0..200 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    let cb = b.client().await;
    let mut first = 0;
    assert!(
        s.handover_to(&cb, |p| first = first.max(p.bytes_received))
            .await
            .is_err()
    );
    assert!(
        first > 500_000,
        "the first attempt sent the volume ({first} bytes)"
    );
    // The operator fixes B and restarts it; the staged volume survived.
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(
        &b.config,
        cfg.replace("/nonexistent/list-app", bin("list-app").to_str().unwrap()),
    )
    .unwrap();
    b.restart();
    s.invoke(ADD, add("one more")).await.unwrap();
    let cb = b.client().await;
    let mut second = 0;
    s.handover_to(&cb, |p| second = p.bytes_received)
        .await
        .unwrap();
    assert!(
        second < first / 4,
        "the retry resumed: {second} bytes after {first}"
    );
    assert_eq!(s.edge_id(), "b");
    let r = s.invoke(ADD, add("on b")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_clients_moving_among_three_edges_lose_no_call_and_run_none_twice() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let edges = [
        Edge::start("a", "127.0.0.1", &apps, ""),
        Edge::start("b", "127.0.0.2", &apps, ""),
        Edge::start("c", "127.0.0.3", &apps, ""),
    ];
    let clients = Arc::new(futures_join(&edges).await);
    let mut tasks = Vec::new();
    for i in 0..20usize {
        let clients = clients.clone();
        tasks.push(tokio::spawn(async move {
            let s = clients[i % 3]
                .open_session("list", &format!("walker-{i}"))
                .await
                .unwrap();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let (s, stop) = (s.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    let mut k = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let item = format!("{i}-{k}");
                        s.invoke(ADD, add(&item)).await.unwrap();
                        acked.push(item);
                        k += 1;
                    }
                    acked
                })
            };
            for m in 1..=3usize {
                tokio::time::sleep(Duration::from_millis(50 + (i as u64 * 7) % 40)).await;
                let to = (i + m) % 3;
                s.handover_to(&clients[to], |_| {}).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            stop.store(true, Ordering::SeqCst);
            let acked = writer.await.unwrap();
            assert_eq!(
                items(&s).await,
                acked,
                "client {i}: every acknowledged call once, in order"
            );
            s.close().await.unwrap();
            acked.len()
        }));
    }
    let mut calls = 0;
    for t in tasks {
        match t.await {
            Ok(n) => calls += n,
            Err(e) => {
                for e in &edges {
                    eprintln!("---- log of an edge\n{}", e.log());
                }
                panic!("a client failed: {e}");
            }
        }
    }
    assert!(calls > 100, "only {calls} calls were made");
    for e in &edges {
        e.wait_empty().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_moves_a_session_and_the_client_follows() {
    let t = Pair::neighbours("", "").await;
    let Pair { a, .. } = &t;
    let s = t.open("walker").await;
    s.invoke(ADD, add("before")).await.unwrap();
    // The operator's door is a Unix socket; the Edge port does not serve Admin.
    let mut public = edge_proto::v1::admin_client::AdminClient::new(
        edgeshift_tests::channel(&a.url(), None).await.unwrap(),
    );
    let refused = public
        .list_sessions(edge_proto::v1::ListSessionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(a.admin_socket()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only root talks to the Admin socket");
    let mut admin = a.admin().await;
    let bad = admin
        .migrate(edge_proto::v1::MigrateRequest {
            session_id: s.id().into(),
            to_edge: "nowhere".into(),
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
    let mut progress = admin
        .migrate(edge_proto::v1::MigrateRequest {
            session_id: s.id().into(),
            to_edge: "b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The operator sees the move phase by phase, live.
    let mut seen = Vec::new();
    while let Some(p) = progress.message().await.unwrap() {
        seen.push(p);
    }
    let phases: Vec<&str> = seen
        .iter()
        .map(|p| edge_client::phase_name(p.phase()))
        .collect();
    assert!(phases.contains(&"quiesced"), "{phases:?}");
    assert_eq!(phases.last(), Some(&"ready"), "{phases:?}");
    let last = seen.last().unwrap();
    assert!(
        last.bytes_received > 0 && last.downtime_micros > 0,
        "{last:?}"
    );
    // The client learns of the move on its next call and follows.
    s.invoke(ADD, add("after")).await.unwrap();
    assert_eq!(s.edge_id(), "b");
    assert_eq!(items(&s).await, ["before", "after"]);
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_copy_goes_to_the_candidates_the_client_names() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a_addr = free_addr("127.0.0.1");
    let b = Edge::start("b", "127.0.0.2", &apps, &neighbour("a", a_addr));
    let c = Edge::start("c", "127.0.0.3", &apps, &neighbour("a", a_addr));
    let extra = format!(
        "[[neighbours]]\nid = \"b\"\naddr = \"{}\"\n[[neighbours]]\nid = \"c\"\naddr = \"{}\"\n[precopy]\ninterval = 0.3\n",
        b.addr, c.addr
    );
    let a = Edge::start_at("a", a_addr, &apps, &extra);
    let ca = a.client().await;
    let s = ca.open_session("list", "walker").await.unwrap();
    assert_eq!(s.set_candidates(&["c", "nowhere"]).await.unwrap(), ["c"]);
    for i in 0..50 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    let staged = |e: &Edge| e.data_dir.join("staging").join(s.id()).join("volume");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dir_bytes(&staged(&c)) < 100_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was pre-copied to c"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!staged(&b).exists(), "b is not a candidate and got nothing");
    // All neighbours again: b gets its copy too.
    assert_eq!(s.set_candidates(&[]).await.unwrap(), ["b", "c"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dir_bytes(&staged(&b)) < 100_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was pre-copied to b"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_the_old_edge_during_pre_copy_loses_nothing() {
    let mut t = Pair::neighbours("[precopy]\ninterval = 0.3\n", "").await;
    let s = t.open("walker").await;
    let Pair { a, b, .. } = &mut t;
    for i in 0..50 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    let staged = b.data_dir.join("staging").join(s.id()).join("volume");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dir_bytes(&staged) < 100_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was pre-copied to b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A dies mid pre-copy and comes back: it recovers the session and
    // pre-copies again from scratch (it no longer knows what B holds).
    a.restart();
    let ca = a.client().await;
    let s = edge_client::Session::attach(&ca, s.id().into(), s.token().clone(), "a".into(), vec![]);
    let r = s.invoke(ADD, add("after the restart")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 51);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let cb = b.client().await;
    s.handover_to(&cb, |_| {}).await.unwrap();
    let r = s.invoke(ADD, add("on b")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 52);
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_new_edge_mid_handover_leaves_the_session_on_the_old_one() {
    let mut t = Pair::strangers("").await;
    let s = t.open("walker").await;
    let Pair { a, b, .. } = &mut t;
    for i in 0..200 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    // A slow link from A to B: the handover takes seconds.
    let relay = Relay::start(
        a.addr,
        Faults {
            throttle: Some(Duration::from_millis(40)),
            ..Faults::default()
        },
    )
    .await;
    let via = edgeshift_tests::connect(&relay.addr.to_string())
        .await
        .unwrap();
    let moving =
        edge_client::Session::attach(&via, s.id().into(), s.token().clone(), "a".into(), vec![]);
    let cb = b.client().await;
    let mv = tokio::spawn(async move { moving.handover_to(&cb, |_| {}).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    b.kill();
    assert!(
        mv.await.unwrap().is_err(),
        "the move cannot succeed without B"
    );
    // A noticed the broken stream and serves on; nothing was lost.
    let r = s.invoke(ADD, add("still on a")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 201);
    assert_eq!(s.edge_id(), "a");
    // B comes back; the move goes through.
    b.restart();
    let cb = b.client().await;
    s.handover_to(&cb, |_| {}).await.unwrap();
    let r = s.invoke(ADD, add("on b")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 202);
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_candidate_during_pre_copy_loses_nothing() {
    let mut t = Pair::neighbours("[precopy]\ninterval = 0.2\n", "").await;
    let s = t.open("walker").await;
    let Pair { a, b, .. } = &mut t;
    for i in 0..30 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    // B dies while rounds are coming in, more writes land on A meanwhile.
    b.kill();
    for i in 30..60 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.restart();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cb = b.client().await;
    s.handover_to(&cb, |_| {}).await.unwrap();
    assert_eq!(
        edgeshift_tests::list::count_of(s.invoke(ADD, add("on b")).await.unwrap()),
        61
    );
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_past_its_staging_budget_refuses_pre_copy_but_still_takes_a_handover() {
    let t = Pair::neighbours(
        "[precopy]\ninterval = 0.2\n",
        "[precopy]\nstaging_budget = 100000\n",
    )
    .await;
    let Pair { b, .. } = &t;
    let s = t.open("walker").await;
    for i in 0..100 {
        s.invoke(ADD, add(&noise(i, 3000))).await.unwrap();
    }
    // Rounds come and are refused: nothing past the budget is kept.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let staged = b.data_dir.join("staging").join(s.id());
    assert!(
        dir_bytes(&staged.join("volume")) + dir_bytes(&staged) < 100_000,
        "B kept {} bytes",
        dir_bytes(&staged.join("volume"))
    );
    // A client that moves is not held to the pre-copy budget.
    let cb = b.client().await;
    s.handover_to(&cb, |_| {}).await.unwrap();
    let r = s.invoke(ADD, add("on b")).await.unwrap();
    assert_eq!(edgeshift_tests::list::count_of(r), 101);
}

/// Inodes of the established TCP sockets process `pid` holds toward `to`.
fn sockets_to(pid: u32, to: std::net::SocketAddr) -> Vec<u64> {
    let std::net::SocketAddr::V4(to) = to else {
        panic!("an IPv4 edge address")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(to.ip().octets()),
        to.port()
    );
    let mine: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st ... inode (the 10th field)
            (f.get(2) == Some(&want.as_str()) && f.get(3) == Some(&"01"))
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .filter(|i| mine.contains(i))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handovers_between_two_edges_reuse_one_pooled_connection() {
    let t = Pair::strangers("").await;
    let Pair { a, b, ca, cb, .. } = &t;
    let s = t.open("pooled").await;
    s.invoke(ADD, add("one")).await.unwrap();
    let pid_b = b.pid().unwrap();
    assert!(sockets_to(pid_b, a.addr).is_empty());
    // B pulls from A: it dials A, and keeps the connection.
    s.handover_to(cb, |_| {}).await.unwrap();
    let first = sockets_to(pid_b, a.addr);
    assert_eq!(first.len(), 1, "B holds one connection to A");
    // Back to A, and to B again: the second pull from A goes over the same
    // connection (no new handshake).
    s.handover_to(ca, |_| {}).await.unwrap();
    s.handover_to(cb, |_| {}).await.unwrap();
    assert_eq!(
        sockets_to(pid_b, a.addr),
        first,
        "the pull reused B's connection"
    );
    assert_eq!(sockets_to(a.pid().unwrap(), b.addr).len(), 1);
    assert_eq!(items(&s).await, ["one"]);
    s.close().await.unwrap();
}
