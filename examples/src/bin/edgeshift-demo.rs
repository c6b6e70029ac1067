//! The edgeshift demo on the embedded defaults: one edge on loopback with
//! the process runtime, the List and Search apps opened as sessions and
//! called through their own generated stubs, the operator's view, and close.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use edged::config::{AppConfig, Config, RuntimeConfig};
use edgeshift_examples::pb::list::list_client::ListClient;
use edgeshift_examples::pb::list::{AddRequest, ItemsRequest};
use edgeshift_examples::pb::search::FindRequest;
use edgeshift_examples::pb::search::search_client::SearchClient;

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
        },
    );
    cfg.apps.insert(
        "search".into(),
        AppConfig {
            base_volume: base_search,
            runtime: process("search-app")?,
            memory_mib: 256,
            pids_limit: 128,
        },
    );

    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let edge = edged::session::Edge::new(cfg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(edged::server::run(edge.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    println!(
        "edge {} serving on {addr} (process runtime, volumes on volfs)",
        edge.cfg.edge_id
    );

    // Sessions are closed even when a step fails.
    let result = calls(&addr.to_string()).await;
    edge.close_all().await;
    let _ = stop_tx.send(());
    server.await??;
    result
}

async fn calls(addr: &str) -> anyhow::Result<()> {
    let client = edge_client::connect(addr).await?;

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
    let mut admin =
        edge_proto::v1::admin_client::AdminClient::connect(format!("http://{addr}")).await?;
    for s in admin
        .list_sessions(edge_proto::v1::ListSessionsRequest {})
        .await?
        .into_inner()
        .sessions
    {
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
