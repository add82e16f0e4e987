//! Generates the gRPC messages and services from `proto/samtrain.proto`
//! (needs `protoc`: Debian's protobuf-compiler, or set `PROTOC`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/samtrain.proto");
    tonic_prost_build::configure()
        // The one shape of a committed checkpoint: the workers' events, the
        // coordinator's job records in the store and the API all use it.
        .type_attribute(
            "samtrain.v1.Checkpoint",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        // Likewise the scores of a job's evaluation, and its examples.
        .type_attribute(
            "samtrain.v1.Scores",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        .type_attribute(
            "samtrain.v1.EvalExample",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        .compile_protos(&["proto/samtrain.proto"], &["proto"])?;
    Ok(())
}
