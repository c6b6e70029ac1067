//! One edge on loopback with the process runtime: sessions end to end,
//! journaled ops, bad input, many clients, restarts and crashes.

use std::time::Duration;

use bytes::Bytes;
use edgeshift_examples::pb::list::list_client::ListClient;
use edgeshift_examples::pb::list::{AddRequest, ItemsRequest};
use edgeshift_examples::pb::search::FindRequest;
use edgeshift_examples::pb::search::search_client::SearchClient;
use edgeshift_tests::{Bases, Edge, instance_pid, noise, pid_alive, sessions};
use tonic::Code;

use edgeshift_tests::list::{ADD, ITEMS, add, items_of, items_req};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apps_end_to_end_and_close_cleans_up() {
    let bases = Bases::new();
    let edge = Edge::start("e2e", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;

    let list = client.open_session("list", "phone-1").await.unwrap();
    assert_eq!(list.edge_id(), "e2e");
    let mut stub = ListClient::new(list.channel());
    for (i, item) in ["milk", "eggs", "bread"].iter().enumerate() {
        let r = stub
            .add(AddRequest {
                item: (*item).into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.count, i as u64 + 1);
    }
    let items = stub
        .items(ItemsRequest {
            delay_ms_per_item: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items, ["milk", "eggs", "bread"]);
    // The state is a SQLite database on the session's volume.
    let dirs = edge.session_dirs();
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0].join("volume/list.db").is_file());
    // An app's own error reaches the client as its status.
    let err = stub
        .add(AddRequest {
            item: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let search = client.open_session("search", "phone-1").await.unwrap();
    let mut s = SearchClient::new(search.channel());
    let r = s
        .find(FindRequest {
            letters: "aeo".into(),
            sleep_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.patterns, 6);
    assert!(!r.words.is_empty());
    assert!(
        r.words
            .iter()
            .all(|w| w.contains('a') && w.contains('e') && w.contains('o'))
    );

    let infos = sessions(&edge).await;
    assert_eq!(infos.len(), 2);
    let li = infos.iter().find(|i| i.session_id == list.id()).unwrap();
    assert_eq!(
        (li.app.as_str(), li.client_id.as_str(), li.state.as_str()),
        ("list", "phone-1", "serving")
    );
    assert!(li.ops >= 5 && li.volume_bytes > 0, "{li:?}");
    let pid = instance_pid(&edge, list.id()).await;
    assert!(pid_alive(pid));

    list.close().await.unwrap();
    search.close().await.unwrap();
    assert!(!pid_alive(pid), "instance stopped");
    assert!(
        edge.session_dirs().is_empty(),
        "session directories removed"
    );
    assert!(
        edge.mounts().is_empty(),
        "volumes unmounted: {:?}",
        edge.mounts()
    );
    assert_eq!(
        list.invoke(ITEMS, items_req(0)).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_run_once_and_results_survive_a_reconnect() {
    let bases = Bases::new();
    let edge = Edge::start("ops", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;
    let s = client.open_session("list", "phone").await.unwrap();

    // A retried call with the same op id is not run twice.
    let op = s.next_op_id();
    let a = s.invoke_op(op, ADD, add("once")).await.unwrap();
    let b = s.invoke_op(op, ADD, add("once")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(
        items_of(s.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["once"]
    );

    // A slow call whose client goes away keeps running; its result is
    // collected through a new connection.
    let slow = s.next_op_id();
    let s2 = s.clone();
    let call = tokio::spawn(async move { s2.invoke_op(slow, ITEMS, items_req(700)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    call.abort();
    let fresh = edge.client().await;
    let again = edge_client::Session::attach(
        &fresh,
        s.id().into(),
        s.token().clone(),
        "ops".into(),
        vec![],
    );
    assert_eq!(items_of(again.result(slow).await.unwrap()), ["once"]);
    assert_eq!(
        again.result(12345).await.unwrap_err().code(),
        Code::NotFound
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_the_edge_keeps_serving() {
    let bases = Bases::new();
    let edge = Edge::start("bad", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;
    let code = |r: Result<edge_client::Session, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(client.open_session("nope", "c").await), Code::NotFound);
    assert_eq!(
        code(client.open_session("../etc", "c").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.open_session("list", "").await),
        Code::InvalidArgument
    );

    let s = client.open_session("list", "c").await.unwrap();
    // Candidates are bounded in number and shape.
    let many: Vec<String> = (0..65).map(|i| format!("e{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let st = s.set_candidates(&many).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    let st = s.set_candidates(&["../x"]).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    let other = client.open_session("list", "d").await.unwrap();
    let wrong_token = edge_client::Session::attach(
        &client,
        s.id().into(),
        other.token().clone(),
        "bad".into(),
        vec![],
    );
    assert_eq!(
        wrong_token
            .invoke(ITEMS, items_req(0))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        wrong_token.close().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let unknown = edge_client::Session::attach(
        &client,
        "0".repeat(32),
        s.token().clone(),
        "bad".into(),
        vec![],
    );
    assert_eq!(
        unknown
            .invoke(ITEMS, items_req(0))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        s.invoke("no-slash", items_req(0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        s.invoke("/list.v1.List/Nope", items_req(0))
            .await
            .unwrap_err()
            .code(),
        Code::Unimplemented
    );
    let big = Bytes::from(vec![b'x'; 1_048_576 + 10]);
    assert_eq!(
        s.invoke(ADD, big).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    // Garbage the app cannot decode is the app's error, not the edge's.
    let garbage = s
        .invoke(ADD, Bytes::from_static(&[0xff, 0xff, 0xff]))
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::Internal, "{garbage:?}");
    // Everything still works.
    s.invoke(ADD, add("fine")).await.unwrap();
    other.invoke(ADD, add("also fine")).await.unwrap();
    assert_eq!(
        items_of(s.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["fine"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_each_with_an_isolated_volume() {
    let bases = Bases::new();
    let edge = Edge::start("many", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let s = client
                .open_session("list", &format!("phone-{i}"))
                .await
                .unwrap();
            let mut stub = ListClient::new(s.channel());
            for j in 0..3 {
                stub.add(AddRequest {
                    item: format!("client {i} item {j}"),
                })
                .await
                .unwrap();
            }
            let items = stub
                .items(ItemsRequest {
                    delay_ms_per_item: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .items;
            assert_eq!(
                items,
                (0..3)
                    .map(|j| format!("client {i} item {j}"))
                    .collect::<Vec<_>>()
            );
            s
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    assert_eq!(sessions(&edge).await.len(), 50);
    assert_eq!(edge.mounts().len(), 50, "one volume per session");
    // One client's token opens nothing of another's.
    let intruder = edge_client::Session::attach(
        &client,
        all[1].id().into(),
        all[0].token().clone(),
        String::new(),
        vec![],
    );
    assert_eq!(
        intruder
            .invoke(ITEMS, items_req(0))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    for s in all {
        s.close().await.unwrap();
    }
    assert!(edge.session_dirs().is_empty());
    assert!(edge.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_edge_recovers_its_sessions() {
    let bases = Bases::new();
    let mut edge = Edge::start("restart", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;
    let a = client.open_session("list", "a").await.unwrap();
    let b = client.open_session("list", "b").await.unwrap();
    a.invoke(ADD, add("a1")).await.unwrap();
    b.invoke(ADD, add("b1")).await.unwrap();
    let pid_a = instance_pid(&edge, a.id()).await;
    let pid_b = instance_pid(&edge, b.id()).await;

    edge.kill();
    // While edged is down, b's instance dies too.
    // SAFETY: kill on a pid we started.
    unsafe { libc::kill(pid_b as i32, libc::SIGKILL) };
    assert!(pid_alive(pid_a), "instances outlive edged");
    edge.restart();

    let client = edge.client().await;
    let a = edge_client::Session::attach(
        &client,
        a.id().into(),
        a.token().clone(),
        String::new(),
        vec![],
    );
    let b = edge_client::Session::attach(
        &client,
        b.id().into(),
        b.token().clone(),
        String::new(),
        vec![],
    );
    a.invoke(ADD, add("a2")).await.unwrap();
    b.invoke(ADD, add("b2")).await.unwrap();
    assert_eq!(
        items_of(a.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["a1", "a2"]
    );
    assert_eq!(
        items_of(b.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["b1", "b2"]
    );
    assert_eq!(
        instance_pid(&edge, a.id()).await,
        pid_a,
        "a live instance is re-attached"
    );
    assert_ne!(
        instance_pid(&edge, b.id()).await,
        pid_b,
        "a dead one is restarted"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
    assert!(edge.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_crash_fails_its_call_clearly_and_the_session_carries_on() {
    let bases = Bases::new();
    let edge = Edge::start("crash", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;
    let s = client.open_session("list", "c").await.unwrap();
    let bystander = client.open_session("list", "d").await.unwrap();
    s.invoke(ADD, add("kept")).await.unwrap();
    let pid = instance_pid(&edge, s.id()).await;

    let s2 = s.clone();
    let call = tokio::spawn(async move { s2.invoke(ITEMS, items_req(5000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill on a pid we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("exited"), "{}", err.message());

    bystander.invoke(ADD, add("unaffected")).await.unwrap();
    // The next call restarts the instance; the volume kept the state.
    assert_eq!(
        items_of(s.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["kept"]
    );
    assert_ne!(instance_pid(&edge, s.id()).await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_reaped() {
    let bases = Bases::new();
    let edge = Edge::start("ttl", "127.0.0.1", &bases.process_apps(), "").with_ttl(2);
    let client = edge.client().await;
    let s = client.open_session("list", "c").await.unwrap();
    s.invoke(ADD, add("x")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !edge.session_dirs().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "idle session was not reaped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.invoke(ITEMS, items_req(0)).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(edge.mounts().is_empty());
}

trait WithTtl {
    fn with_ttl(self, secs: u64) -> Self;
}

impl WithTtl for Edge {
    /// Rewrites the TTL and restarts (the config is read at start).
    fn with_ttl(mut self, secs: u64) -> Self {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            text.replace("session_ttl = 3600", &format!("session_ttl = {secs}")),
        )
        .unwrap();
        self.restart();
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_edges_limits_are_refused_as_resource_exhausted() {
    let bases = Bases::new();
    let edge = Edge::start(
        "a",
        "127.0.0.1",
        &bases.process_apps(),
        "max_sessions = 3\nmax_sessions_per_client = 2\n",
    );
    let c = edge.client().await;
    let s1 = c.open_session("list", "phone-1").await.unwrap();
    c.open_session("list", "phone-1").await.unwrap();
    let err = c.open_session("list", "phone-1").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("phone-1"), "{err:?}");
    c.open_session("list", "phone-2").await.unwrap();
    let err = c.open_session("list", "phone-3").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit of 3"), "{err:?}");
    // A closed session makes room again.
    s1.close().await.unwrap();
    c.open_session("list", "phone-3").await.unwrap();
    assert_eq!(sessions(&edge).await.len(), 3);
    assert_eq!(
        edge.session_dirs().len(),
        3,
        "a refused open leaves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_directory_journal_and_logs_are_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let bases = Bases::new();
    let edge = Edge::start("a", "127.0.0.1", &bases.process_apps(), "");
    let c = edge.client().await;
    let s = c.open_session("list", "phone").await.unwrap();
    s.invoke(ADD, add("x")).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = edge.data_dir.join("sessions").join(s.id());
    assert_eq!(mode(&edge.data_dir.join("sessions")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    for f in ["ops.log", "app.log", "volfs.log", "session.json"] {
        assert_eq!(mode(&dir.join(f)) & 0o077, 0, "{f} is readable by others");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_be_recovered_yet_is_kept_listed_and_recovered_later() {
    let bases = Bases::new();
    let mut edge = Edge::start("a", "127.0.0.1", &bases.process_apps(), "");
    let c = edge.client().await;
    let s = c.open_session("list", "phone").await.unwrap();
    s.invoke(ADD, add("kept")).await.unwrap();
    // edged dies; the operator renames the app in the config meanwhile.
    edge.kill();
    let cfg = std::fs::read_to_string(&edge.config).unwrap();
    let renamed = cfg
        .replace("[apps.list]", "[apps.list2]")
        .replace("[apps.list.", "[apps.list2.");
    assert_ne!(renamed, cfg);
    std::fs::write(&edge.config, renamed).unwrap();
    edge.restart();
    let listed = sessions(&edge).await;
    let info = listed
        .iter()
        .find(|i| i.session_id == s.id())
        .expect("the session is listed");
    assert!(
        info.state.starts_with("failed") && info.state.contains("list"),
        "the operator sees why: {:?}",
        info.state
    );
    assert_eq!(info.client_id, "phone");
    assert!(
        edge.data_dir
            .join("sessions")
            .join(s.id())
            .join("volume/list.db")
            .exists(),
        "the volume is kept"
    );
    // Fixed and restarted: the session is back with its data.
    std::fs::write(&edge.config, cfg).unwrap();
    edge.restart();
    let c = edge.client().await;
    let s = edge_client::Session::attach(&c, s.id().into(), s.token().clone(), "a".into(), vec![]);
    assert_eq!(
        items_of(s.invoke(ITEMS, items_req(0)).await.unwrap()),
        ["kept"]
    );
}

/// A line of /proc/PID/status, e.g. "Uid".
fn status_of(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_instance_runs_unprivileged_in_its_own_namespace_and_cgroups() {
    use edged::runtime::cgroup::Cgroups;
    let bases = Bases::new();
    let edge = Edge::start("jail", "127.0.0.1", &bases.process_apps(), "");
    let client = edge.client().await;
    let s = client.open_session("list", "tenant-1").await.unwrap();
    let other = client.open_session("list", "tenant-2").await.unwrap();
    s.invoke(ADD, add("mine")).await.unwrap();
    let pid = edgeshift_tests::instances_of(s.id())[0];
    // The configured unprivileged user, no groups, no way to regain privileges.
    assert_eq!(status_of(pid, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_of(pid, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_of(pid, "Groups"), "");
    assert_eq!(status_of(pid, "NoNewPrivs"), "1");
    // Its own mount namespace, where the volume and socket directory are at
    // fixed paths and no other session's volume is mounted.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let points: Vec<&str> = info.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert!(
        points.contains(&edged::runtime::process::INSTANCE_DATA),
        "{points:?}"
    );
    assert!(
        !points
            .iter()
            .any(|p| p.contains(other.id()) || p.contains(s.id())),
        "a session volume is mounted at its host path: {points:?}"
    );
    // Its limits, in its own cgroups (the app's memory_mib 256, pids_limit 128).
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let name = format!("/edgeshift/jail-{}", s.id());
    assert!(groups.contains(&name), "{groups}");
    let (mem, pids) = match Cgroups::detect() {
        Cgroups::V2(root) => (
            root.join(&name[1..]).join("memory.max"),
            root.join(&name[1..]).join("pids.max"),
        ),
        Cgroups::V1([m, p, _]) => (
            m.join(&name[1..]).join("memory.limit_in_bytes"),
            p.join(&name[1..]).join("pids.max"),
        ),
        Cgroups::Unavailable(why) => panic!("this test needs cgroups: {why}"),
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    assert_eq!(read(&mem), (256u64 << 20).to_string());
    assert_eq!(read(&pids), "128");
    // Closing removes the groups with the instance.
    s.close().await.unwrap();
    assert!(
        !mem.parent().unwrap().exists(),
        "the cgroup outlived its instance"
    );
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_past_its_quota_refuses_writes_with_enospc() {
    use std::io::Write;
    let bases = Bases::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = edgeshift_tests::config(
        "quota",
        edgeshift_tests::free_addr("127.0.0.1"),
        &dir.path().join("data"),
        &bases.process_apps(),
        "",
    );
    for app in cfg.apps.values_mut() {
        app.volume_mib = 2;
    }
    let edge = Edge::launch(dir, cfg);
    let s = edge
        .client()
        .await
        .open_session("list", "hoarder")
        .await
        .unwrap();
    s.invoke(ADD, add("small")).await.unwrap();
    let mnt = edge.data_dir.join("sessions").join(s.id()).join("mnt");
    // The volume looks as large as its quota.
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs is plain data; all zeroes is a valid value.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed struct to fill.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut vfs) }, 0);
    assert_eq!(vfs.f_blocks * vfs.f_frsize, 2 << 20);
    // Filling it: the write past the quota fails with ENOSPC, what came
    // before stays.
    let big = mnt.join("big");
    let mut f = std::fs::File::create(&big).unwrap();
    let chunk = vec![7u8; 256 << 10];
    let mut written = 0;
    let err = loop {
        match f.write_all(&chunk).and_then(|_| f.sync_all()) {
            Ok(()) => written += chunk.len(),
            Err(e) => break e,
        }
        assert!(written <= 4 << 20, "the quota was not enforced");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= 1 << 20, "only {written} bytes fit");
    drop(f);
    // The app's own writes fail (SQLite: the disk is full); the edge and
    // the session go on, with what was written before.
    let mut added = 0;
    let st = loop {
        match s.invoke(ADD, add(&noise(added, 4000))).await {
            Ok(_) => added += 1,
            Err(st) => break st,
        }
        assert!(added < 1000, "the app never ran out of room");
    };
    assert_ne!(st.code(), Code::InvalidArgument, "{st:?}");
    let items = items_of(s.invoke(ITEMS, items_req(0)).await.unwrap());
    assert_eq!(items.len(), added + 1);
    // Removing the file gives the room back.
    std::fs::remove_file(&big).unwrap();
    s.invoke(ADD, add(&noise(9999, 4000))).await.unwrap();
    s.close().await.unwrap();
}
