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

/// Runs `check` on a thread of its own in a fresh network namespace whose
/// loopback is up but ignores echo requests: a host that never answers,
/// made by the test (no address outside it is ever a target).
fn in_a_silent_namespace<T: Send + 'static>(
    check: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of our own (the test runs as root)");
        // A child inherits this thread's namespace.
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip (iproute2, installed by scripts/test-env.sh)");
        assert!(up.success(), "ip link set lo up: {up}");
        // Opened from this thread, /proc/sys/net is this namespace's.
        std::fs::write("/proc/sys/net/ipv4/icmp_echo_ignore_all", "1").unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check)
    })
    .join()
    .expect("the check's thread")
}

#[test]
fn an_unanswered_host_is_down_with_full_loss() {
    let e = endpoint(
        "icmp",
        "127.0.0.1",
        json!({"timeout": 1, "icmp": {"count": 2}}),
    );
    let r = in_a_silent_namespace(async move { check::run(&checker(), &e).await });
    assert_eq!(r.verdict, Verdict::Down);
    assert!(!r.measured.connected);
    assert_eq!(r.measured.packet_loss_percent, Some(100.0));
    let error = r.error.unwrap();
    assert!(
        error.starts_with("no echo reply from 127.0.0.1 to 2 requests"),
        "{error}"
    );
}
