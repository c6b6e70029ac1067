//! A warm standby: on the new edge of a handover, the app's instance starts
//! and sets itself up before the owner quiesces the session, so the
//! downtime holds no instance start (process runtime, two edges on
//! loopback). The apps here take 1.5 s to set themselves up (a shell that
//! sleeps, then runs the List app), which is far longer than a handover's
//! downtime on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use edgeshift_tests::list::{ADD, ITEMS, add, items_of, items_req};
use edgeshift_tests::{
    Bases, Edge, bin, free_addr, instance_pid, instances_of, neighbour, pid_alive,
};

/// How long the apps of these tests take to set themselves up.
const SETUP: Duration = Duration::from_millis(1500);

/// `[apps.NAME]`: the List app behind a shell that sleeps for [`SETUP`]
/// first; `prelude` runs before the sleep.
fn slow_app(name: &str, base: &Path, standby: bool, prelude: &str) -> String {
    let script = format!(
        "{prelude}sleep {}; exec {}",
        SETUP.as_secs_f64(),
        bin("list-app").display()
    );
    format!(
        "[apps.{name}]\nbase_volume = {:?}\nstandby = {standby}\nruntime = {{ kind = \"process\", command = \"/bin/sh\", args = [\"-c\", {script:?}] }}\n",
        base.display().to_string()
    )
}

/// Two edges, neighbours of each other, with `apps` laid over the usual ones.
fn two_edges(bases: &Bases, apps: &str) -> (Edge, Edge) {
    let a_addr = free_addr("127.0.0.1");
    let b = Edge::start(
        "b",
        "127.0.0.2",
        &bases.process_apps(),
        &format!("{}{apps}", neighbour("a", a_addr)),
    );
    let a = Edge::start_at(
        "a",
        a_addr,
        &bases.process_apps(),
        &format!("{}{apps}", neighbour("b", b.addr)),
    );
    (a, b)
}

/// Opens a session of `app` on A, adds two items, moves it to B; returns
/// the downtime B reported, the items and instance pid on B, and the session.
async fn move_once(
    a: &Edge,
    b: &Edge,
    app: &str,
) -> (Duration, Vec<String>, u32, edge_client::Session) {
    let (ca, cb) = (a.client().await, b.client().await);
    let s = ca.open_session(app, "walker").await.unwrap();
    s.invoke(ADD, add("one")).await.unwrap();
    s.invoke(ADD, add("two")).await.unwrap();
    let mut down = 0;
    s.handover_to(&cb, |p| down = p.downtime_micros)
        .await
        .unwrap_or_else(|e| panic!("handover: {e}\nA: {}\nB: {}", a.log(), b.log()));
    let items = items_of(s.invoke(ITEMS, items_req(0)).await.unwrap());
    let pid = instance_pid(b, s.id()).await;
    (Duration::from_micros(down), items, pid, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_app_sets_itself_up_before_the_quiesce_and_the_downtime_holds_no_start() {
    let bases = Bases::new();
    let apps =
        slow_app("slow", &bases.list, true, "") + &slow_app("slow-cold", &bases.list, false, "");
    let (a, b) = two_edges(&bases, &apps);

    let (down, items, pid, _s) = move_once(&a, &b, "slow").await;
    eprintln!("downtime with a standby: {down:?}");
    assert_eq!(items, ["one", "two"]);
    assert!(
        down < SETUP,
        "with a standby the downtime ({down:?}) must not hold the app's set-up ({SETUP:?})\nB: {}",
        b.log()
    );
    // The instance serving on B is the standby, activated: the List app the
    // shell became, which the edge started before the volume was there.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, std::fs::canonicalize(bin("list-app")).unwrap());

    // The same app without a standby: its set-up is inside the downtime.
    let (down, items, _, _s) = move_once(&a, &b, "slow-cold").await;
    assert_eq!(items, ["one", "two"]);
    assert!(
        down >= SETUP,
        "without a standby the downtime ({down:?}) holds the set-up ({SETUP:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_does_not_wait_for_its_activation_is_started_after_the_volume_is_there() {
    let bases = Bases::new();
    // Says it waits, but drops the variable: it finds an empty read-only
    // data directory, cannot create its database and exits.
    let apps = slow_app("careless", &bases.list, true, "unset EDGE_ACTIVATION; ");
    let (a, b) = two_edges(&bases, &apps);

    let (down, items, _, _s) = move_once(&a, &b, "careless").await;
    assert_eq!(items, ["one", "two"]);
    // It was given up and the instance started the usual way.
    assert!(down >= SETUP, "downtime {down:?}");
    assert!(
        b.log().contains("the standby instance is given up"),
        "B: {}",
        b.log()
    );
    // Nothing of the standby is left but the live session's.
    let left: Vec<_> = std::fs::read_dir(b.data_dir.join("standby"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "standby directories left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_session_leaves_no_standby_mount_instance_or_directory() {
    let bases = Bases::new();
    let apps = slow_app("slow", &bases.list, true, "");
    let (a, b) = two_edges(&bases, &apps);
    let (_, _, pid, s) = move_once(&a, &b, "slow").await;
    let standby_dirs = || -> Vec<_> {
        std::fs::read_dir(b.data_dir.join("standby"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        standby_dirs().len(),
        1,
        "the serving session keeps its mount point"
    );
    s.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) || !b.mounts().is_empty() || !standby_dirs().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left: pid {pid} alive {}, mounts {:?}, dirs {:?}",
            pid_alive(pid),
            b.mounts(),
            standby_dirs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_left_by_a_killed_edge_is_swept_at_its_restart_and_the_owner_serves_on() {
    let bases = Bases::new();
    let apps = slow_app("slow", &bases.list, true, "");
    let (a, mut b) = two_edges(&bases, &apps);
    let (ca, cb) = (a.client().await, b.client().await);
    let s = ca.open_session("slow", "walker").await.unwrap();
    s.invoke(ADD, add("one")).await.unwrap();
    let on_a = instances_of(s.id());
    assert!(!on_a.is_empty());
    // The handover begins with B's standby setting itself up (1.5 s).
    let s2 = s.clone();
    let moving = tokio::spawn(async move { s2.handover_to(&cb, |_| {}).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    let standby = loop {
        let new: Vec<u32> = instances_of(s.id())
            .into_iter()
            .filter(|p| !on_a.contains(p))
            .collect();
        if !new.is_empty() {
            break new;
        }
        assert!(Instant::now() < deadline, "no standby on B: {}", b.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    b.kill();
    assert!(moving.await.unwrap().is_err(), "the handover went through");
    // The standby runs in its own session: it outlived edged ...
    assert!(standby.iter().any(|p| pid_alive(*p)));
    // ... until the restarted edge sweeps it, with its mount and directory.
    b.restart();
    let left = |b: &Edge| {
        let dirs = std::fs::read_dir(b.data_dir.join("standby"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        (
            standby.iter().filter(|p| pid_alive(**p)).count(),
            b.mounts(),
            dirs,
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while left(&b) != (0, vec![], 0) {
        assert!(
            Instant::now() < deadline,
            "left after the restart: {:?}\n{}",
            left(&b),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The owner was never asked: it serves on, with everything.
    s.invoke(ADD, add("two")).await.unwrap();
    let items = items_of(s.invoke(ITEMS, items_req(0)).await.unwrap());
    assert_eq!(items, ["one", "two"]);
    assert_eq!(s.edge_id(), "a");
}
