//! Generates the gRPC messages and services from `proto/samtrain.proto`
//! (needs `protoc`: Debian's protobuf-compiler, or set `PROTOC`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/samtrain.proto");
    tonic_prost_build::configure().compile_protos(&["proto/samtrain.proto"], &["proto"])?;
    Ok(())
}
