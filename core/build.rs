//! Compiles the wire protocol. `protoc` comes from the `protoc-bin-vendored` crate so a
//! fresh machine needs no system package to build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; set_var is fine here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .codec_path("crate::codec::LdcCodec")
        .file_descriptor_set_path(out.join("ldc_descriptor.bin"))
        .compile_protos(&["proto/ldc/v1/payments.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
