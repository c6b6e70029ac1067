//! The Docker runtime through bollard: an image built FROM scratch from the
//! List app's binary, one hardened container per session, cleaned up on close.

use std::process::Command;

use edgeshift_examples::pb::list::list_client::ListClient;
use edgeshift_examples::pb::list::{AddRequest, ItemsRequest};
use edgeshift_tests::list::{ITEMS, items_of, items_req};
use edgeshift_tests::{App, Bases, Edge, Runtime, bin, require_docker, sessions};

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the List app's image as `tag`; the bases and the app list that run it.
fn list_app_image(tag: &str) -> (Bases, [App; 1]) {
    let out = Command::new(bin("edged"))
        .args(["image", "build", "--binary"])
        .arg(bin("list-app"))
        .args(["--tag", tag])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "image build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bases = Bases::new();
    let apps = [App {
        name: "list".into(),
        base: bases.list.clone(),
        runtime: Runtime::Docker(tag.into()),
    }];
    (bases, apps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_runtime_end_to_end() {
    require_docker();
    let tag = format!("edgeshift-test/list-app:{}", std::process::id());
    let (_bases, apps) = list_app_image(&tag);
    let edge = Edge::start("docker", "127.0.0.1", &apps, "");
    let client = edge.client().await;
    let s = client.open_session("list", "phone").await.unwrap();
    let mut stub = ListClient::new(s.channel());
    stub.add(AddRequest {
        item: "in a container".into(),
    })
    .await
    .unwrap();
    stub.add(AddRequest {
        item: "on volfs".into(),
    })
    .await
    .unwrap();
    let items = stub
        .items(ItemsRequest {
            delay_ms_per_item: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items, ["in a container", "on volfs"]);
    assert!(
        edge.session_dirs()[0].join("volume/list.db").is_file(),
        "state is on the session's volume"
    );

    let info = sessions(&edge).await;
    let cid = &info[0].container_id;
    assert!(!cid.is_empty() && !cid.starts_with("pid:"), "{cid}");
    let label = format!("label=edgeshift.session={}", s.id());
    let full = docker(&["ps", "-q", "--no-trunc", "--filter", &label]);
    assert!(
        full.starts_with(cid.as_str()),
        "container {cid} runs ({full})"
    );
    let hc = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.NetworkMode}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}} {{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}} {{.Config.User}}",
        &full,
    ]);
    assert_eq!(
        hc, "none true [ALL] [no-new-privileges] 268435456 268435456 1000000000 128 65534:65534",
        "network none, read-only, no capabilities, no swap beyond memory, one CPU, not root"
    );
    // The app really runs as that user, and its files on the volume are its own.
    let db = edge.session_dirs()[0].join("volume/list.db");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&db).unwrap()),
        65534
    );

    s.close().await.unwrap();
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &label]),
        "",
        "container removed"
    );
    assert!(edge.session_dirs().is_empty());
    assert!(edge.mounts().is_empty());
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_session_moves_between_edges() {
    require_docker();
    let tag = format!("edgeshift-test/list-app-move:{}", std::process::id());
    let (_bases, apps) = list_app_image(&tag);
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    let b = Edge::start("b", "127.0.0.2", &apps, "");
    let ca = a.client().await;
    let cb = b.client().await;
    let s = ca.open_session("list", "phone").await.unwrap();
    let mut stub = ListClient::new(s.channel());
    stub.add(AddRequest {
        item: "packed on a".into(),
    })
    .await
    .unwrap();
    let label = format!("label=edgeshift.session={}", s.id());
    let on_a = docker(&["ps", "-q", "--no-trunc", "--filter", &label]);
    let mut downtime = 0;
    // What runs on B for the session when A has quiesced it.
    let mut standby = None;
    s.handover_to(&cb, |p| {
        downtime = p.downtime_micros;
        if p.phase() == edge_proto::v1::HandoverPhase::Quiesced && standby.is_none() {
            standby = Some(docker(&[
                "ps",
                "-q",
                "--no-trunc",
                "--filter",
                &label,
                "--filter",
                "label=edgeshift.edge=b",
            ]));
        }
    })
    .await
    .unwrap_or_else(|e| panic!("handover: {e}\nB: {}", b.log()));
    assert_eq!(s.edge_id(), "b");
    // A warm standby: B's container was running before the quiesce, so
    // its start was not part of the downtime.
    let standby = standby.expect("a quiesced phase was reported");
    assert!(
        !standby.is_empty(),
        "no container of the session ran on B when A quiesced: {}",
        b.log()
    );
    stub.add(AddRequest {
        item: "unpacked on b".into(),
    })
    .await
    .unwrap();
    let items = stub
        .items(ItemsRequest {
            delay_ms_per_item: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items, ["packed on a", "unpacked on b"]);
    let on_b = docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &label,
        "--filter",
        "label=edgeshift.edge=b",
    ]);
    assert!(
        !on_b.is_empty() && on_b != on_a,
        "one new container on b ({on_a} -> {on_b})"
    );
    assert_eq!(
        on_b,
        standby,
        "the standby became the session's instance: {}",
        b.log()
    );
    a.wait_empty().await;
    assert_eq!(
        docker(&["ps", "-aq", "--no-trunc", "--filter", &format!("id={on_a}")]),
        "",
        "a's container removed"
    );
    eprintln!("docker handover downtime: {:.1} ms", downtime as f64 / 1e3);

    // Back to A with a call running (3 items × 300 ms) whose client lost B:
    // it finishes on B, is not run again, and its result comes through A.
    stub.add(AddRequest {
        item: "third".into(),
    })
    .await
    .unwrap();
    let op = s.next_op_id();
    let s2 = s.clone();
    let lost = tokio::spawn(async move { s2.invoke_op(op, ITEMS, items_req(300)).await });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    lost.abort();
    s.handover_to(&ca, |_| {}).await.unwrap();
    assert_eq!(s.edge_id(), "a");
    assert_eq!(items_of(s.result(op).await.unwrap()).len(), 3);
    let items = stub
        .items(ItemsRequest {
            delay_ms_per_item: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items, ["packed on a", "unpacked on b", "third"]);
    b.wait_empty().await;
    s.close().await.unwrap();
    assert_eq!(docker(&["ps", "-aq", "--filter", &label]), "");
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
}
