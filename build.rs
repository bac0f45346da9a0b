//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so no
//! system `protoc` is needed to build rwgate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/remote.proto", "proto/types.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
