//! ICMP echo to 127.0.0.1, through whichever socket this host allows.

use muster_agent::check::{self, icmp, IcmpSockets};
use muster_common::monitor::Verdict;
use serde_json::json;

use crate::support::{checker, endpoint};

/// Whether the ping_group_range sysctl lets this process's group open
/// unprivileged ICMP sockets.
fn ping_sockets_allowed() -> bool {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap();
    let bounds: Vec<u32> = range
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let gid: u32 = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Gid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    bounds[0] <= gid && gid <= bounds[1]
}

#[tokio::test]
async fn loopback_answers_every_echo() {
    let e = endpoint(
        "icmp",
        "127.0.0.1",
        json!({
            "icmp": {"count": 5},
            "conditions": [
                {"condition": "[PACKET_LOSS] == 0"},
                {"condition": "[RESPONSE_TIME] < 100"},
                {"condition": "[CONNECTED] == true"},
            ],
        }),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert_eq!(r.measured.packet_loss_percent, Some(0.0));
    assert_eq!(r.measured.ip.as_deref(), Some("127.0.0.1"));
    let t = &r.timings;
    let (min, avg, max) = (
        t.rtt_min_ms.unwrap(),
        t.rtt_avg_ms.unwrap(),
        t.rtt_max_ms.unwrap(),
    );
    assert!(
        0.0 < min && min <= avg && avg <= max && max < 100.0,
        "{t:?}"
    );
    assert_eq!(r.measured.response_time_ms, Some(avg));
}

#[tokio::test]
async fn ipv6_loopback_answers_too() {
    let e = endpoint("icmp", "::1", json!({"icmp": {"count": 2}}));
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert_eq!(r.measured.packet_loss_percent, Some(0.0));
    assert_eq!(r.measured.ip.as_deref(), Some("::1"));
}

#[tokio::test]
async fn a_host_name_is_resolved_first() {
    let e = endpoint("icmp", "localhost", json!({"icmp": {"count": 1}}));
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert!(r.timings.dns_ms.is_some());
}

#[tokio::test]
async fn without_ping_sockets_the_error_names_the_sysctl() {
    let ip = "127.0.0.1".parse().unwrap();
    match icmp::open(ip, IcmpSockets::UnprivilegedOnly) {
        Ok((_, kind)) => {
            assert!(ping_sockets_allowed());
            assert_eq!(kind, icmp::SocketKind::Ping);
        }
        Err(error) => {
            assert!(!ping_sockets_allowed());
            assert!(
                error.contains("sysctl net.ipv4.ping_group_range is"),
                "{error}"
            );
            // The agent's way falls back to a raw socket (this test runs as root).
            let (_, kind) = icmp::open(ip, IcmpSockets::UnprivilegedThenRaw).unwrap();
            assert_eq!(kind, icmp::SocketKind::Raw);
        }
    }
}

#[tokio::test]
async fn an_unanswered_host_is_down_with_full_loss() {
    // TEST-NET-2 (RFC 5737) is never assigned; the echo goes unanswered or
    // cannot even be sent. Either way: down, and nothing measured as up.
    let e = endpoint(
        "icmp",
        "198.51.100.1",
        json!({"timeout": 1, "icmp": {"count": 2}}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert!(!r.measured.connected);
    let error = r.error.unwrap();
    assert!(
        error.starts_with("no echo reply from 198.51.100.1 to 2 requests")
            || error.starts_with("cannot send an echo request"),
        "{error}"
    );
}
