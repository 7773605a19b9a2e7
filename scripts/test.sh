#!/usr/bin/env bash
# The project's one test command: prepares the test environment
# (scripts/test-env.sh: PostgreSQL, Redis, container images) and runs the
# whole workspace's tests. Extra arguments go to `cargo test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: error: cargo not found (install the Rust toolchain)" >&2
    exit 1
}

env_lines=$(scripts/test-env.sh --print-env)
eval "$env_lines"

if [ "${CI:-}" = true ]; then
    export CARGO_TERM_COLOR=never
fi

# The end-to-end tests run the built binaries (the muster CLI among them).
cargo build --workspace --bins --locked
exec cargo test --workspace --locked "$@"
