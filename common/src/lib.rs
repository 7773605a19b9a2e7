//! Code shared by Muster's binaries: the Polycrate workspace model and its
//! bundles, the plan a runner executes, token formats, PKI helpers, and the
//! telemetry set-up every binary uses.
//!
//! Nothing here knows about HTTP, gRPC or SQL: those live at the edges, in the
//! coordinator and runner crates.

pub mod bundle;
pub mod condition;
pub mod monitor;
pub mod pki;
pub mod plan;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod token;
pub mod workspace;
