//! The Search app's server binary; `search-app build-dictionary OUT` builds
//! the dictionary a base volume holds.

use edgeshift_examples::pb::search::search_server::SearchServer;
use edgeshift_examples::search::{SearchService, build_dictionary, word_list};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, out] = args.as_slice() {
        if cmd == "build-dictionary" {
            let n = build_dictionary(std::path::Path::new(out), &word_list())?;
            println!("{out}: {n} words");
            return Ok(());
        }
    }
    let svc = SearchService::open(&edge_app::data_dir())?;
    let router = tonic::transport::Server::builder().add_service(SearchServer::new(svc));
    edge_app::serve(router).await?;
    Ok(())
}
