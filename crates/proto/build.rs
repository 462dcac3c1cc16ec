//! Generates the gRPC code from `proto/cloudless/v1` at build time.
//! Generated code is not checked in: `protoc` is a hard build dependency anyway
//! (containerd-client's build script needs it too), so checking in would only add drift.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "common", "cluster", "raft", "workload", "node", "agent", "secret",
    ]
    .map(|f| root.join(format!("cloudless/v1/{f}.proto")));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &[root])?;
    Ok(())
}
