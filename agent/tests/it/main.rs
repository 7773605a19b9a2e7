//! The agent's integration tests: each check against a real server the test
//! starts on loopback (HTTP, TLS, TCP, ICMP to 127.0.0.1, a DNS server
//! answering with the agent's own encoder), the disk buffer with real
//! files, and the binary started as a process.

mod binary;
mod dns;
mod http;
mod icmp;
mod spool;
mod support;
mod tcp;
mod tls;
