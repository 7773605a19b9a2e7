//! DNS checks against a small DNS server the test runs on loopback, which
//! answers with the agent's own encoder.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use muster_agent::check;
use muster_agent::dns::{flags, Message, RData, Record, CLASS_IN};
use muster_common::monitor::Verdict;
use serde_json::json;
use tokio::net::UdpSocket;

use crate::support::{checker, endpoint};

/// Answers `ok.test` A (192.0.2.7, 192.0.2.8), `mail.test` MX
/// (10 mx.mail.test), `silent.test` never, `garbage.test` with a broken
/// message, anything else NXDOMAIN. Counts the queries it receives.
async fn dns_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let counted = queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            let Ok(query) = Message::decode(&buf[..n]) else {
                continue;
            };
            let name = query.questions[0].name.clone();
            let mut answer = query.clone();
            answer.flags |= flags::QR | flags::RA | flags::AA;
            let record = |data: RData, rtype| Record {
                name: name.clone(),
                rtype,
                class: CLASS_IN,
                ttl: 60,
                data,
            };
            match name.as_str() {
                "ok.test" => {
                    answer.answers = vec![
                        record(RData::A(Ipv4Addr::new(192, 0, 2, 7)), 1),
                        record(RData::A(Ipv4Addr::new(192, 0, 2, 8)), 1),
                    ]
                }
                "mail.test" => {
                    answer.answers = vec![record(
                        RData::Mx {
                            preference: 10,
                            exchange: "mx.mail.test".into(),
                        },
                        15,
                    )]
                }
                "silent.test" => continue,
                "garbage.test" => {
                    let mut bytes = answer.encode().unwrap();
                    bytes.truncate(14);
                    bytes[5] = 9;
                    let _ = socket.send_to(&bytes, from).await;
                    continue;
                }
                _ => answer.flags |= 3,
            }
            let _ = socket.send_to(&answer.encode().unwrap(), from).await;
        }
    });
    (addr, queries)
}

#[tokio::test]
async fn an_answer_with_the_expected_address_is_up() {
    let (addr, _) = dns_server().await;
    let e = endpoint(
        "dns",
        &addr.to_string(),
        json!({
            "dns": {"name": "ok.test", "query_type": "A", "expected": "192.0.2.8"},
            "conditions": [
                {"condition": "[DNS_RCODE] == NOERROR"},
                {"condition": "[RESPONSE_TIME] < 500"},
            ],
        }),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert_eq!(r.measured.dns_rcode.as_deref(), Some("NOERROR"));
    assert_eq!(r.measured.ip.as_deref(), Some("127.0.0.1"));
    assert!(r.measured.connected);
    assert!(r.measured.response_time_ms.unwrap() < r.timings.total_ms + 0.001);
}

#[tokio::test]
async fn rcode_and_expected_answers_decide() {
    let (addr, _) = dns_server().await;
    let target = addr.to_string();
    // NXDOMAIN: measured, and the condition fails.
    let e = endpoint(
        "dns",
        &target,
        json!({"dns": {"name": "nope.test"}, "conditions": [{"condition": "[DNS_RCODE] == NOERROR"}]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert_eq!(r.error, None);
    assert_eq!(r.measured.dns_rcode.as_deref(), Some("NXDOMAIN"));
    assert_eq!(
        r.conditions[0].message.as_deref(),
        Some("[DNS_RCODE] is \"NXDOMAIN\", not == \"NOERROR\"")
    );

    // An answer that is not the expected one.
    let e = endpoint(
        "dns",
        &target,
        json!({"dns": {"name": "ok.test", "expected": "192.0.2.99"}}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert_eq!(
        r.error.as_deref(),
        Some("the A answers for ok.test (192.0.2.7, 192.0.2.8) do not include \"192.0.2.99\"")
    );

    // MX, matched by its exchange.
    let e = endpoint(
        "dns",
        &target,
        json!({"dns": {"name": "mail.test", "query_type": "mx", "expected": "mx.mail.test."}}),
    );
    assert_eq!(check::run(&checker(), &e).await.verdict, Verdict::Up);
}

#[tokio::test]
async fn a_silent_server_gets_the_query_twice_then_the_check_times_out() {
    let (addr, queries) = dns_server().await;
    let e = endpoint(
        "dns",
        &addr.to_string(),
        json!({"timeout": 1, "dns": {"name": "silent.test"}}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert_eq!(
        r.error.as_deref(),
        Some("timed out after 1s while waiting for the DNS answer")
    );
    assert_eq!(queries.load(Ordering::SeqCst), 2);
    assert!(!r.measured.connected);
}

#[tokio::test]
async fn broken_answers_and_missing_servers_are_errors() {
    let (addr, _) = dns_server().await;
    let e = endpoint(
        "dns",
        &addr.to_string(),
        json!({"dns": {"name": "garbage.test"}}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    let error = r.error.unwrap();
    assert!(
        error.starts_with(&format!("the answer from {addr} is malformed")),
        "{error}"
    );

    // Nobody on the port: the kernel's port-unreachable ends it early.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let closed = socket.local_addr().unwrap();
    drop(socket);
    let e = endpoint(
        "dns",
        &closed.to_string(),
        json!({"dns": {"name": "ok.test"}}),
    );
    let r = check::run(&checker(), &e).await;
    let error = r.error.unwrap();
    assert!(
        error.starts_with(&format!("no answer from {closed}")),
        "{error}"
    );

    for (dns, words) in [
        (json!({"name": ""}), "dns.name is empty"),
        (
            json!({"name": "ok.test", "query_type": "SRV"}),
            "is not one of A, NS",
        ),
        (json!({"name": "a..b"}), "empty label"),
    ] {
        let r = check::run(
            &checker(),
            &endpoint("dns", &addr.to_string(), json!({"dns": dns})),
        )
        .await;
        let error = r.error.unwrap();
        assert!(error.contains(words), "{error}");
    }
}
