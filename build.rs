//! Compiles `proto/registry/v1/registry.proto` with protox, a pure-Rust
//! protobuf compiler, so that building needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/registry/v1/registry.proto";
    println!("cargo:rerun-if-changed={proto}");

    // protox ships the google.protobuf well-known types, so the imports of
    // Duration, Struct and Timestamp resolve without any include path.
    let file_descriptors = protox::compile([proto], ["proto"])?;

    // The encoded descriptor set feeds server reflection at run time.
    // compile_fds does not write it, so it is written here.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("registry_descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;

    // ListResponse is written by hand in src/list_response.rs, so that the
    // server can send workers it encoded ahead of time. The codec in
    // src/codec.rs starts each call with small buffers.
    tonic_prost_build::configure()
        .extern_path(".registry.v1.ListResponse", "crate::list_response::ListResponse")
        .codec_path("crate::codec::RegistryCodec")
        .compile_fds(file_descriptors)?;

    Ok(())
}
