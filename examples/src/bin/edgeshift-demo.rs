//! The edgeshift demo on the embedded defaults: two edges on loopback with
//! the process runtime and TLS from a throwaway fleet CA; the List and Search apps opened as sessions and
//! called through their own generated stubs; the user moves and the List
//! session follows to the second edge with a call running; the operator's
//! view; close.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use edged::config::{AppConfig, Config, RuntimeConfig};
use edgeshift_examples::pb::list::list_client::ListClient;
use edgeshift_examples::pb::list::{AddRequest, ItemsRequest};
use edgeshift_examples::pb::search::FindRequest;
use edgeshift_examples::pb::search::search_client::SearchClient;
use prost::Message;

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let p = dir.join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} not built (cargo build -p edgeshift-examples -p volfs)",
        p.display()
    );
    Ok(p)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let work = tempfile::Builder::new()
        .prefix("edgeshift-demo")
        .tempdir()?;
    let base_list = work.path().join("base/list");
    let base_search = work.path().join("base/search");
    std::fs::create_dir_all(&base_list)?;
    std::fs::create_dir_all(&base_search)?;
    let t = Instant::now();
    let n = edgeshift_examples::search::build_dictionary(
        &base_search.join("dictionary.db"),
        &edgeshift_examples::search::word_list(),
    )?;
    println!(
        "base volume of search: dictionary.db with {n} words ({:?})",
        t.elapsed()
    );

    let mut cfg = Config::from_toml(edged::config::DEFAULT_TOML, "default")?;
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.data_dir = work.path().join("edge");
    cfg.volfs_binary = Some(sibling("volfs")?);
    cfg.apps.clear();
    let process = |bin: &str| -> anyhow::Result<RuntimeConfig> {
        Ok(RuntimeConfig::Process {
            command: sibling(bin)?,
            args: vec![],
        })
    };
    cfg.apps.insert(
        "list".into(),
        AppConfig {
            base_volume: base_list,
            runtime: process("list-app")?,
            memory_mib: 256,
            pids_limit: 128,
            cpus: 1.0,
            user: "65534:65534".into(),
            volume_mib: 1024,
            standby: true,
        },
    );
    cfg.apps.insert(
        "search".into(),
        AppConfig {
            base_volume: base_search,
            runtime: process("search-app")?,
            memory_mib: 256,
            pids_limit: 128,
            cpus: 1.0,
            user: "65534:65534".into(),
            volume_mib: 1024,
            standby: true,
        },
    );

    // Two edges on loopback; A pre-copies its sessions to B, its neighbour.
    let b_listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
    let b_addr = b_listener.local_addr()?;
    let mut cfg_b = cfg.clone();
    cfg_b.edge_id = "edge-b".into();
    cfg_b.data_dir = work.path().join("edge-b");
    let mut cfg_a = cfg;
    cfg_a.edge_id = "edge-a".into();
    cfg_a.data_dir = work.path().join("edge-a");
    cfg_a.neighbours = vec![edged::config::Neighbour {
        id: "edge-b".into(),
        addr: b_addr.to_string(),
    }];
    cfg_a.precopy.interval = std::time::Duration::from_millis(500);
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a_addr = a_listener.local_addr()?;
    // Neighbours are mutual: B takes A's pre-copies because it lists A.
    cfg_b.neighbours = vec![edged::config::Neighbour {
        id: "edge-a".into(),
        addr: a_addr.to_string(),
    }];
    // A throwaway fleet CA in the work dir, and a certificate for each edge:
    // clients verify the edges, the edges verify each other (mutual TLS).
    let pki = work.path().join("pki");
    let ca = edged::pki::Ca::generate()?;
    ca.save(&pki)?;
    for (c, addr) in [(&mut cfg_a, a_addr), (&mut cfg_b, b_addr)] {
        let (cert, key) = ca
            .issue_edge(&c.edge_id, &[addr.ip().to_string()], 1)?
            .save(&pki, &c.edge_id)?;
        c.tls = Some(edged::config::TlsConfig {
            ca: pki.join(edged::pki::CA_CERT),
            cert,
            key,
        });
    }
    println!("fleet CA and edge certificates in {}", pki.display());
    let trust = edge_client::Trust::Ca(ca.cert_pem.clone());
    let admin_a = edged::admin::socket_path(&cfg_a);
    let admin_b = edged::admin::socket_path(&cfg_b);
    let (a_admin, b_admin) = (edged::admin::bind(&admin_a)?, edged::admin::bind(&admin_b)?);
    let edge_a = edged::session::Edge::new(cfg_a)?;
    let edge_b = edged::session::Edge::new(cfg_b)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server_a = tokio::spawn(edged::server::run(
        edge_a.clone(),
        a_listener,
        a_admin,
        None,
        stopped(stop_rx.clone()),
    ));
    let server_b = tokio::spawn(edged::server::run(
        edge_b.clone(),
        b_listener,
        b_admin,
        None,
        stopped(stop_rx),
    ));
    println!("edge-a serving on {a_addr}, edge-b on {b_addr} (process runtime, volumes on volfs)");

    // Sessions are closed even when a step fails.
    let result = calls(
        &trust,
        &a_addr.to_string(),
        &b_addr.to_string(),
        [&admin_a, &admin_b],
    )
    .await;
    edge_a.close_all().await;
    edge_b.close_all().await;
    let _ = stop_tx.send(true);
    server_a.await??;
    server_b.await??;
    result
}

async fn calls(
    trust: &edge_client::Trust,
    addr: &str,
    b_addr: &str,
    admin_sockets: [&std::path::PathBuf; 2],
) -> anyhow::Result<()> {
    let client = edge_client::connect_with(addr, trust).await?;

    println!("\n== List app");
    let list = client.open_session("list", "demo-phone").await?;
    println!(
        "session {} opened: {}",
        list.id(),
        phases(list.open_phases())
    );
    let mut stub = ListClient::new(list.channel());
    for item in ["buy milk", "write thesis", "move to the next edge"] {
        let r = stub
            .add(AddRequest { item: item.into() })
            .await?
            .into_inner();
        println!("add {item:?} -> {} items", r.count);
    }
    let t = Instant::now();
    let items = stub
        .items(ItemsRequest {
            delay_ms_per_item: 100,
        })
        .await?
        .into_inner()
        .items;
    println!(
        "items (100 ms of work per item, {:?}): {items:?}",
        t.elapsed()
    );

    println!("\n== The user moves: edge-a -> edge-b, with a call running");
    let edge_b = edge_client::connect_with(b_addr, trust).await?;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await; // a pre-copy round to edge-b
    let op = list.next_op_id();
    let running = {
        let l = list.clone();
        let req = prost::Message::encode_to_vec(&ItemsRequest {
            delay_ms_per_item: 200,
        });
        tokio::spawn(async move { l.invoke_op(op, "/list.v1.List/Items", req.into()).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    list.handover_to(&edge_b, |p| {
        println!(
            "  {:<9} round {} {:>7} bytes received, downtime so far {:.1} ms",
            edge_client::phase_name(p.phase()),
            p.round,
            p.bytes_received,
            p.downtime_micros as f64 / 1e3
        )
    })
    .await?;
    println!(
        "  (downtime counts from when edge-a began holding new calls: it includes the wait for\n   the running call to finish on edge-a, whose result travels with the session)"
    );
    let done = edgeshift_examples::pb::list::ItemsReply::decode(running.await??)?;
    println!(
        "the call that was running returned {} items; the session is on {} now",
        done.items.len(),
        list.edge_id()
    );
    let r = stub
        .add(AddRequest {
            item: "arrived at edge-b".into(),
        })
        .await?
        .into_inner();
    println!(
        "the same stub, now served by edge-b: add -> {} items",
        r.count
    );

    println!("\n== Search app");
    let search = client.open_session("search", "demo-phone").await?;
    println!(
        "session {} opened: {}",
        search.id(),
        phases(search.open_phases())
    );
    let mut stub = SearchClient::new(search.channel());
    let t = Instant::now();
    let r = stub
        .find(FindRequest {
            letters: "rstl".into(),
            sleep_ms: 500,
        })
        .await?
        .into_inner();
    println!(
        "find 'rstl': {} words over {} patterns in {:?}; first: {:?}",
        r.words.len(),
        r.patterns,
        t.elapsed(),
        &r.words[..r.words.len().min(8)]
    );

    println!("\n== Operator's view");
    let mut all = Vec::new();
    for a in admin_sockets {
        let mut admin = edged::admin::connect(a).await?;
        let r = admin
            .list_sessions(edge_proto::v1::ListSessionsRequest {})
            .await?
            .into_inner();
        all.extend(r.sessions.into_iter().map(|s| (r.edge_id.clone(), s)));
    }
    for (edge, s) in all {
        print!("{edge}: ");
        println!(
            "{} app={} client={} state={} volume={}B dirty={}B ops={} instance={}",
            s.session_id,
            s.app,
            s.client_id,
            s.state,
            s.volume_bytes,
            s.dirty_bytes,
            s.ops,
            s.container_id
        );
    }

    list.close().await?;
    search.close().await?;
    println!("\nsessions closed: instances stopped, volumes unmounted and removed");
    Ok(())
}

fn phases(p: &[(String, std::time::Duration)]) -> String {
    p.iter()
        .map(|(n, d)| format!("{n} {:.1} ms", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}
