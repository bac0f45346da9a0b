//! Compiles the vendored `third_party/prometheus/*.proto` with protox (a
//! pure-Rust protobuf compiler), so no system `protoc` is needed to build
//! rwgate: the Remote-Write 1.0 messages
//! (`prometheus.*`) and the 2.0 ones (`io.prometheus.write.v2.*`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "third_party/prometheus/remote.proto",
        "third_party/prometheus/types.proto",
        "third_party/prometheus/io/prometheus/write/v2/types.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["third_party/prometheus"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
