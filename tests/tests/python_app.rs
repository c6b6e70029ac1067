//! An app in another language: the List app's server half in Python
//! (grpcio), run by the process runtime as it runs the Rust one, called
//! through the same generated Rust stub, and moved between edges with its
//! SQLite state. The contract between edged and an app is gRPC on a Unix
//! socket and two environment variables.

use std::path::PathBuf;
use std::process::Command;

use edgeshift_examples::pb::list::list_client::ListClient;
use edgeshift_examples::pb::list::{AddRequest, ItemsRequest};
use edgeshift_tests::{App, Bases, Edge, Runtime};
use tonic::Code;

/// The Python app, failing (never skipping) without Debian's python3-grpcio.
fn python_list_app() -> PathBuf {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import grpc, sqlite3"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Python app test needs /usr/bin/python3 with grpcio: apt-get install python3-grpcio (scripts/setup.sh does)"
    );
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/list_app.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_app_serves_and_moves_with_its_state() {
    let bases = Bases::new();
    let apps = [App {
        name: "list-py".into(),
        base: bases.list.clone(),
        runtime: Runtime::Process(python_list_app()),
    }];
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    let b = Edge::start("b", "127.0.0.2", &apps, "");
    let s = a
        .client()
        .await
        .open_session("list-py", "phone")
        .await
        .unwrap();
    let mut list = ListClient::new(s.channel());
    for (i, item) in ["one", "two"].iter().enumerate() {
        let r = list
            .add(AddRequest {
                item: (*item).into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.count, i as u64 + 1);
    }
    // The app's own error reaches the client as its status.
    let err = list
        .add(AddRequest {
            item: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Its state is SQLite on the session's volume, written as the app's user.
    let vol = a.data_dir.join("sessions").join(s.id()).join("volume");
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(vol.join("list.db")).unwrap());
    assert_eq!(owner, 65534);
    // The session moves; the same stub goes on against the new edge.
    s.handover_to(&b.client().await, |_| {}).await.unwrap();
    assert_eq!(s.edge_id(), "b");
    let r = list
        .add(AddRequest {
            item: "three".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 3);
    let items = list
        .items(ItemsRequest {
            delay_ms_per_item: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items, ["one", "two", "three"]);
    s.close().await.unwrap();
}
