//! End-to-end tests against a real PostgreSQL, the real Docker daemon and
//! real mTLS, one binary for the whole suite.

mod agent;
mod artifacts;
mod bad_input;
mod cancel;
mod chaos;
mod cluster;
mod core_loop;
mod dev;
mod faults;
mod live;
mod metrics;
mod monitoring;
mod openapi;
mod pipeline;
mod revocation;
mod security;
