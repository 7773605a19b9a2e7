//! The gRPC protocol between runners and the coordinator (`muster.runner.v1`).
//!
//! The Rust code is generated from `proto/muster/runner/v1/runner.proto` and
//! checked in (`src/gen/`), so building Muster needs no `protoc`. The test
//! `generated_code_is_current` regenerates it with a pure-Rust protobuf compiler
//! and fails when the checked-in copy is stale; run it with
//! `MUSTER_UPDATE_PROTO=1` to rewrite the file.

/// Version 1 of the runner protocol.
pub mod runner {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        include!("gen/muster.runner.v1.rs");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn generate(out_dir: &Path) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let fds = protox::compile(["muster/runner/v1/runner.proto"], [root.join("proto")])
            .expect("runner.proto compiles");
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .out_dir(out_dir)
            .compile_fds(fds)
            .expect("code generation succeeds");
        std::fs::read_to_string(out_dir.join("muster.runner.v1.rs")).expect("generated file")
    }

    #[test]
    fn generated_code_is_current() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fresh = generate(tmp.path());
        let checked_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen/muster.runner.v1.rs");
        let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
        if fresh != current {
            if std::env::var_os("MUSTER_UPDATE_PROTO").is_some() {
                std::fs::write(&checked_in, fresh).expect("write generated code");
            } else {
                panic!(
                    "proto/src/gen/muster.runner.v1.rs is stale; regenerate with \
                     `MUSTER_UPDATE_PROTO=1 cargo test -p muster-proto`"
                );
            }
        }
    }
}
