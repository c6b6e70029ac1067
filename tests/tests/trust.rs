//! Who may talk to an edge, and how it knows: TLS from the fleet CA, peers
//! identified by their certificates, forged handovers refused, the `pki`
//! and `config check` commands, operators on the Admin TCP port.

use std::process::Command;

use edge_proto::v1 as pb;
use edge_proto::v1::admin_client::AdminClient;
use edge_proto::v1::edge_client::EdgeClient as EdgeStub;
use edge_proto::v1::peer_client::PeerClient;
use edgeshift_tests::{Bases, Edge, bin, channel, config, fleet_ca, free_addr};
use tonic::Code;

fn hello() -> pb::HelloRequest {
    pb::HelloRequest {
        version: edge_proto::PEER_VERSION,
        edge_id: "b".into(),
        ..Default::default()
    }
}

/// An edge of another fleet (its own CA) called `id`.
fn impostor(id: &str, apps: &[edgeshift_tests::App]) -> (Edge, edged::pki::Ca) {
    let other = edged::pki::Ca::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr("127.0.0.4");
    let mut cfg = config(id, addr, &dir.path().join("data"), apps, "");
    let pki = dir.path().join("other-pki");
    other.save(&pki).unwrap();
    let (cert, key) = other
        .issue_edge(id, &[addr.ip().to_string()], 1)
        .unwrap()
        .save(&pki, id)
        .unwrap();
    cfg.tls = Some(edged::config::TlsConfig {
        ca: pki.join(edged::pki::CA_CERT),
        cert,
        key,
    });
    (Edge::launch(dir, cfg), other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_service_serves_fleet_edges_only_and_clients_verify_the_edge() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    let peer = |id: Option<edged::pki::Issued>| {
        let url = a.url();
        async move { PeerClient::new(channel(&url, id.as_ref()).await.unwrap()) }
    };
    // No certificate: not an edge.
    let st = peer(None).await.hello(hello()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    // An operator's certificate is the fleet's, but no edge's.
    let op = fleet_ca().issue_operator("alice", 1).unwrap();
    let st = peer(Some(op)).await.hello(hello()).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    // A fleet edge that is no neighbour of A: it may say hello (and pull a
    // session whose token it holds), not pre-copy, drop or hand over to A.
    let mallory = fleet_ca().issue_edge("mallory", &[], 1).unwrap();
    let mut m = peer(Some(mallory)).await;
    let h = m.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.edge_id, "a");
    let st = m
        .drop(pb::DropRequest {
            session_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("mallory"), "{st:?}");
    let st = m
        .precopy(tokio_stream::iter(Vec::<pb::PrecopyChunk>::new()))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let st = m
        .adopt(pb::AdoptRequest {
            session_id: "x".into(),
            ticket: vec![],
            from_addr: "127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    // A certificate of another CA is refused at the handshake.
    let (_, other) = impostor("b", &apps);
    let forged = other.issue_edge("b", &[], 1).unwrap();
    let refused = match channel(&a.url(), Some(&forged)).await {
        Err(_) => true,
        Ok(ch) => PeerClient::new(ch).hello(hello()).await.is_err(),
    };
    assert!(refused, "a certificate of another CA was accepted");
    // Clients verify the edge: a client trusting another CA, or none, gets
    // no session.
    let wrong = edge_client::Trust::Ca(other.cert_pem.clone());
    let r = edge_client::connect_with(&a.url(), &wrong).await;
    assert!(r.is_err(), "a client trusted an edge of another CA");
    let plain = edge_client::connect(&format!("http://{}", a.addr)).await;
    if let Ok(c) = plain {
        assert!(c.open_session("list", "p").await.is_err());
    }
    // A trust of several CAs (a CA rotation under way) accepts the edge.
    let both = edge_client::Trust::Ca(format!("{}{}", other.cert_pem, fleet_ca().cert_pem));
    edge_client::connect_with(&a.url(), &both)
        .await
        .unwrap()
        .open_session("list", "rotating")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    // A session keeps its trust: its token is not handed to an edge client
    // that verifies edges otherwise.
    let mine = a
        .client()
        .await
        .open_session("list", "keeps")
        .await
        .unwrap();
    let other_trust = edge_client::connect_with(&a.url(), &both).await.unwrap();
    let st = mine.handover_to(&other_trust, |_| {}).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    mine.close().await.unwrap();
    // Plaintext goes to loopback edges only (refused before any traffic).
    let far = edge_client::connect("http://203.0.113.5:50051").await;
    assert!(
        far.as_ref()
            .is_err_and(|e| e.to_string().contains("loopback")),
        "{far:?}"
    );
    // The fleet's client works, and A still serves.
    let s = a.client().await.open_session("list", "ok").await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_from_a_forged_old_edge_is_refused_before_anything_is_sent() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a = Edge::start("a", "127.0.0.1", &apps, "");
    let b = Edge::start("b", "127.0.0.2", &apps, "");
    let c = Edge::start("c", "127.0.0.3", &apps, "");
    let (fake_a, _) = impostor("a", &apps);
    let s = a
        .client()
        .await
        .open_session("list", "victim")
        .await
        .unwrap();
    s.invoke(
        edgeshift_tests::list::ADD,
        edgeshift_tests::list::add("mine"),
    )
    .await
    .unwrap();
    let mut to_b = EdgeStub::new(channel(&b.url(), None).await.unwrap());
    let pull = |from_addr: String, from_edge: &str| pb::HandoverRequest {
        session_id: s.id().into(),
        token: s.token().to_vec(),
        from_addr,
        from_edge: from_edge.into(),
    };
    async fn outcome(
        stub: &mut EdgeStub<tonic::transport::Channel>,
        req: pb::HandoverRequest,
    ) -> tonic::Status {
        let mut stream = match stub.handover(req).await {
            Ok(r) => r.into_inner(),
            Err(st) => return st,
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the handover succeeded"),
                Err(st) => return st,
            }
        }
    }
    // An edge of another fleet claiming to be A, and a real fleet edge (C)
    // at the address the client names: neither proves it is A.
    for (addr, what) in [(fake_a.addr, "impostor"), (c.addr, "edge c")] {
        let st = outcome(&mut to_b, pull(addr.to_string(), "a")).await;
        assert_eq!(st.code(), Code::PermissionDenied, "{what}: {st:?}");
        assert!(st.message().contains("did not prove"), "{what}: {st:?}");
    }
    // No old edge named at all.
    let st = outcome(&mut to_b, pull(a.addr.to_string(), "")).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(b.session_dirs().is_empty(), "B installed a session");
    // A session B holds already is refused before any network call: the
    // named "old edge" sees no connection.
    let mine = b
        .client()
        .await
        .open_session("list", "b-own")
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let req = pb::HandoverRequest {
        session_id: mine.id().into(),
        token: b"forged".to_vec(),
        from_addr: listener.local_addr().unwrap().to_string(),
        from_edge: "a".into(),
    };
    let st = outcome(&mut to_b, req).await;
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
    assert!(listener.accept().is_err(), "B dialed the named edge");
    // B's own session is intact, and the victim's is still A's, whole.
    mine.invoke(edgeshift_tests::list::ADD, edgeshift_tests::list::add("x"))
        .await
        .unwrap();
    let items = edgeshift_tests::list::items_of(
        s.invoke(
            edgeshift_tests::list::ITEMS,
            edgeshift_tests::list::items_req(0),
        )
        .await
        .unwrap(),
    );
    assert_eq!(items, vec!["mine".to_string()]);
    assert_eq!(s.edge_id(), "a");
}

fn edged(args: &[&str]) -> std::process::Output {
    Command::new(bin("edged")).args(args).output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_commands_make_certificates_that_config_check_and_a_client_accept() {
    use std::os::unix::fs::PermissionsExt;
    let bases = Bases::new();
    let apps = bases.process_apps();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    let o = edged(&["pki", "init", ca_s]);
    assert!(o.status.success(), "{}", text(&o));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let o = edged(&["pki", "init", ca_s]);
    assert!(!o.status.success(), "a CA was overwritten");
    let o = edged(&[
        "pki",
        "issue",
        "--ca",
        ca_s,
        "--edge",
        "solo",
        "--addr",
        "127.0.0.1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("[tls]"), "{}", text(&o));
    assert_eq!(mode(&ca.join("solo.key")), 0o600);
    let o = edged(&["pki", "issue", "--ca", ca_s, "--edge", "other"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = edged(&["pki", "issue", "--ca", ca_s, "--edge", "Bad_Name"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("DNS label"), "{}", text(&o));

    let addr = free_addr("127.0.0.1");
    let mut cfg = config("solo", addr, &dir.path().join("data"), &apps, "");
    let files = |name: &str| edged::config::TlsConfig {
        ca: ca.join("ca.pem"),
        cert: ca.join(format!("{name}.pem")),
        key: ca.join(format!("{name}.key")),
    };
    let check = |cfg: &edged::config::Config| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
        edged(&["config", "check", path.to_str().unwrap()])
    };
    cfg.tls = Some(files("solo"));
    let o = check(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("certified"), "{}", text(&o));
    // Another edge's certificate.
    cfg.tls = Some(files("other"));
    let o = check(&cfg);
    assert!(!o.status.success());
    assert!(text(&o).contains("is issued for"), "{}", text(&o));
    // A CA file holding an old and a new CA (a rotation) is accepted.
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        fleet_ca().cert_pem.clone() + &std::fs::read_to_string(ca.join("ca.pem")).unwrap(),
    )
    .unwrap();
    cfg.tls = Some(files("solo"));
    cfg.tls.as_mut().unwrap().ca = bundle;
    let o = check(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    // A certificate of another CA.
    cfg.tls = Some(edgeshift_tests::edge_certs(
        &dir.path().join("harness"),
        "solo",
        addr.ip(),
    ));
    cfg.tls.as_mut().unwrap().ca = ca.join("ca.pem");
    let o = check(&cfg);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a valid edge certificate"),
        "{}",
        text(&o)
    );
    // A key others may read.
    cfg.tls = Some(files("solo"));
    std::fs::set_permissions(ca.join("solo.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = check(&cfg);
    assert!(!o.status.success());
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
    std::fs::set_permissions(ca.join("solo.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // Plaintext on a non-loopback address.
    let path = dir.path().join("plain.toml");
    let mut t: toml::Table = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    t.remove("tls");
    t.insert("insecure_plaintext".into(), toml::Value::Boolean(true));
    t.insert("listen".into(), toml::Value::String("0.0.0.0:7000".into()));
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let o = edged(&["config", "check", path.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("non-loopback"), "{}", text(&o));

    // edged does not serve under another edge's name.
    let other_cfg = {
        let mut c = cfg.clone();
        c.tls = Some(files("other"));
        let path = dir.path().join("other.toml");
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        path
    };
    let o = edged(&["serve", "--config", other_cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is issued for"), "{}", text(&o));
    // The edge serves with the certificates the commands made; a client
    // trusting the CA file reaches it.
    let e = Edge::launch_in(dir.path(), cfg);
    let trust = edge_client::Trust::ca_file(ca.join("ca.pem")).unwrap();
    let client = edge_client::connect_with(&e.addr.to_string(), &trust)
        .await
        .unwrap();
    let s = client.open_session("list", "solo").await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reach_the_admin_port_with_their_certificate_only() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let admin_addr = free_addr("127.0.0.1");
    let a = Edge::start(
        "a",
        "127.0.0.1",
        &apps,
        &format!("admin_listen = \"{admin_addr}\""),
    );
    let s = a.client().await.open_session("list", "seen").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &fleet_ca().cert_pem).unwrap();
    fleet_ca()
        .issue_operator("alice", 1)
        .unwrap()
        .save(dir.path(), "alice")
        .unwrap();
    fleet_ca()
        .issue_edge("b", &[], 1)
        .unwrap()
        .save(dir.path(), "b")
        .unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    let remote = admin_addr.to_string();
    let as_who = |who: &str| {
        edged(&[
            "sessions",
            "--remote",
            &remote,
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p(&format!("{who}.pem")),
            "--key",
            &p(&format!("{who}.key")),
        ])
    };
    let o = as_who("alice");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(s.id()), "{}", text(&o));
    // An edge's certificate is the fleet's, but no operator's.
    let o = as_who("b");
    assert!(!o.status.success());
    assert!(text(&o).contains("operator certificate"), "{}", text(&o));
    // No certificate: the handshake fails, nothing is listed.
    let listed = match channel(&format!("https://{admin_addr}"), None).await {
        Err(_) => false,
        Ok(ch) => AdminClient::new(ch)
            .list_sessions(pb::ListSessionsRequest {})
            .await
            .is_ok(),
    };
    assert!(
        !listed,
        "the Admin port served a caller without a certificate"
    );
    // An Admin port that cannot be bound (taken by A) stops a start loudly.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "a2",
        free_addr("127.0.0.1"),
        &dir.path().join("data"),
        &apps,
        &format!("admin_listen = \"{admin_addr}\""),
    );
    let path = dir.path().join("a2.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let o = edged(&["serve", "--config", path.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("admin_listen"), "{}", text(&o));
}
