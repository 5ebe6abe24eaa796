//! Generates the server side of `streams.Streams` from the client crate's
//! protos, with the `protoc` that `protoc-bin-vendored` ships, so that no
//! system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos_with_config(
            config,
            &["protos/streams.proto"],
            &[std::path::Path::new("protos"), well_known.as_path()],
        )?;
    println!("cargo:rerun-if-changed=protos");
    Ok(())
}
