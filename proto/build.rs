//! Generates the gRPC code from proto/vsha.proto with a protoc that ships
//! inside a crates.io package, so a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/vsha.proto");
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/vsha.proto"], &["proto"])?;
    Ok(())
}
