//! The List app's server binary: run by edged inside a session's instance.

use edgeshift_examples::list::ListService;
use edgeshift_examples::pb::list::list_server::ListServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let svc = ListService::open(&edge_app::data_dir())?;
    let router = tonic::transport::Server::builder().add_service(ListServer::new(svc));
    edge_app::serve(router).await?;
    Ok(())
}
