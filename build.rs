//! Compiles `proto/tiergate/v1/limiter.proto` with a vendored `protoc`, so a fresh machine needs
//! no protobuf toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tiergate_descriptor.bin"))
        .compile_protos(&["proto/tiergate/v1/limiter.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
