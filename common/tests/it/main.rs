//! Integration tests of muster-common, one binary with a module per area so
//! the suite links once.

mod bundle;
mod example;
mod plan;
mod workspace;
