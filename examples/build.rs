//! Compiles the example apps' protos with protox (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/list/v1/list.proto", "proto/search/v1/search.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
