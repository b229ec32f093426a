//! Compiles `proto/meridian/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates the prost types into OUT_DIR.
fn main() {
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["events.proto", "live.proto"].map(|f| proto_root.join("meridian/v1").join(f));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&proto_root]).expect("proto/meridian/v1/*.proto compile");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("prost generates the event types");
}
