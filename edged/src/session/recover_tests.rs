//! Recovery of what a stop cut short while a session directory was being
//! removed.

use super::Edge;
use super::layout::{Tombstone, Tombstones};
use crate::config::Config;
use crate::migration::Peer;

fn edge_in(d: &std::path::Path) -> std::sync::Arc<Edge> {
    let toml = crate::config::plaintext_default().replace(
        "data_dir = \"/var/lib/edgeshift\"",
        &format!("data_dir = {:?}", d.display().to_string()),
    );
    Edge::new(Config::from_toml(&toml, "test").unwrap()).unwrap()
}

#[tokio::test]
async fn a_removal_cut_short_is_finished_and_never_read_as_a_session() {
    let d = tempfile::tempdir().unwrap();
    let sessions = d.path().join("sessions");
    // Renamed aside, then the stop came: whatever is in it goes.
    let aside = sessions.join(".removing-s1.00000000000000a1");
    std::fs::create_dir_all(aside.join("volume")).unwrap();
    std::fs::write(aside.join("session.json"), b"{}").unwrap();
    // Removed in place by an older edged: the record went first, and the
    // tombstone says the session was released.
    let half = sessions.join("s2");
    std::fs::create_dir_all(half.join("volume")).unwrap();
    Tombstones::open(d.path())
        .unwrap()
        .put(
            "s2",
            &Tombstone {
                to: Peer {
                    edge_id: "b".into(),
                    addr: "b:1".into(),
                },
                attempt: 1,
                epoch: 1,
                at: 0,
            },
        )
        .unwrap();
    // Without a record or a tombstone: nothing says whose it is, so it is
    // kept for the operator.
    let unknown = sessions.join("s3");
    std::fs::create_dir_all(unknown.join("volume")).unwrap();
    let edge = edge_in(d.path());
    let (recovered, removed) = edge.recover().await;
    assert_eq!((recovered, removed), (0, 1));
    assert!(!aside.exists(), "the removal was finished");
    assert!(!half.exists(), "the released leftover was removed");
    assert!(unknown.exists(), "an unknown directory is kept");
    let failed = edge.failed_infos();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].session_id, "s3");
}

#[tokio::test]
async fn a_session_directory_is_removed_whole_or_not_at_all() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("sessions").join("s1");
    std::fs::create_dir_all(dir.join("volume/sub")).unwrap();
    std::fs::write(dir.join("session.json"), b"{}").unwrap();
    super::layout::remove_session_dir(&dir).await;
    assert!(!dir.exists());
    assert_eq!(
        std::fs::read_dir(d.path().join("sessions"))
            .unwrap()
            .count(),
        0,
        "nothing left aside"
    );
}
