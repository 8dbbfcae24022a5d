//! Compiles the .proto files with protox (pure Rust), so that no system `protoc` is
//! needed, and generates the tonic services and prost messages from the descriptors.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/hub.proto", "proto/twinfleet/device/v1/device.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
