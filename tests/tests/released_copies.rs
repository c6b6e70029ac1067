//! What an edge keeps of a session it released: its volume, as a staged
//! copy as of the final delta. The new owner knows that state, so its
//! pre-copy rounds back are deltas from it, and a move back sends only what
//! changed since (process runtime, two edges on loopback).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use edgeshift_tests::list::{ADD, add, count_of};
use edgeshift_tests::{Bases, Edge, free_addr, neighbour};

/// The identity of a file: a copy or a re-creation has another.
fn identity(p: &Path) -> (u64, std::time::SystemTime) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.ino(), m.created().expect("birth time (statx)"))
}

async fn wait_for(what: &str, edge: &Edge, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: {}", edge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_volume_stays_staged_and_rounds_and_moves_back_send_only_the_changes() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a_addr = free_addr("127.0.0.1");
    let precopy = "[precopy]\ninterval = 0.3\n";
    let b = Edge::start(
        "b",
        "127.0.0.2",
        &apps,
        &format!("{}{precopy}", neighbour("a", a_addr)),
    );
    let a = Edge::start_at(
        "a",
        a_addr,
        &apps,
        &format!("{}{precopy}", neighbour("b", b.addr)),
    );
    let (ca, cb) = (a.client().await, b.client().await);
    let s = ca.open_session("list", "walker").await.unwrap();
    s.invoke(ADD, add("at a")).await.unwrap();
    // A file the app never touches again, written through the mount.
    let id = s.id().to_string();
    let on_a = a.data_dir.join("sessions").join(&id);
    std::fs::write(on_a.join("mnt/big"), vec![7u8; 2 << 20]).unwrap();
    let before = identity(&on_a.join("volume/big"));

    s.handover_to(&cb, |_| {}).await.unwrap();
    // A kept its volume (moved, not copied) as a staged copy.
    let staged = a.data_dir.join("staging").join(&id).join("volume");
    wait_for("A kept the released volume", &a, || {
        staged.join("big").exists() && !on_a.exists()
    })
    .await;
    assert_eq!(identity(&staged.join("big")), before);

    // B's rounds back are deltas from the final state: a change made on B
    // arrives, and the unchanged file is the one A kept (a full round
    // starts the staged copy afresh).
    let on_b = b.data_dir.join("sessions").join(&id);
    std::fs::write(on_b.join("mnt/marker"), b"written on b").unwrap();
    wait_for("B's round reached A's staged copy", &b, || {
        std::fs::read(staged.join("marker")).is_ok_and(|m| m == b"written on b")
    })
    .await;
    assert_eq!(
        identity(&staged.join("big")),
        before,
        "B sent the whole volume again: {}",
        b.log()
    );

    // The move back sends what changed since the last round, not the volume.
    s.invoke(ADD, add("at b")).await.unwrap();
    let mut received = 0;
    s.handover_to(&ca, |p| received = p.bytes_received)
        .await
        .unwrap();
    assert!(
        received < 512 << 10,
        "the move back sent {received} bytes of a volume over 2 MB"
    );
    assert_eq!(count_of(s.invoke(ADD, add("back at a")).await.unwrap()), 3);
    assert_eq!(
        std::fs::read(on_a.join("mnt/marker")).unwrap(),
        b"written on b"
    );
    s.close().await.unwrap();
}
