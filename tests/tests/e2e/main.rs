//! End-to-end tests against a real PostgreSQL, the real Docker daemon and
//! real mTLS, one binary for the whole suite.

mod bad_input;
mod core_loop;
mod security;
