//! TCP checks against a real listener on loopback.

use std::net::SocketAddr;

use muster_agent::check;
use muster_common::monitor::Verdict;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::support::{checker, closed_port, endpoint};

/// Greets with "220 ready", then answers each line with "pong <line>".
async fn line_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let _ = write.write_all(b"220 ready\n").await;
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("pong {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_open_port_is_up() {
    let addr = line_server().await;
    let e = endpoint(
        "tcp",
        &addr.to_string(),
        json!({"conditions": [{"condition": "[CONNECTED] == true"}, {"condition": "[RESPONSE_TIME] < 1000"}]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert!(r.measured.connected);
    assert_eq!(r.measured.ip.as_deref(), Some("127.0.0.1"));
    let connect = r.timings.connect_ms.unwrap();
    assert!(connect >= 0.0 && connect <= r.timings.total_ms);
    assert_eq!(r.timings.tls_ms, None);
}

#[tokio::test]
async fn send_and_expect() {
    let addr = line_server().await;
    let ok = endpoint(
        "tcp",
        &format!("localhost:{}", addr.port()),
        json!({"tcp": {"send": "ping", "expect": "pong ping"}}),
    );
    let r = check::run(&checker(), &ok).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert!(r.timings.dns_ms.is_some() && r.timings.first_byte_ms.is_some());

    // A banner, with nothing sent.
    let banner = endpoint("tcp", &addr.to_string(), json!({"tcp": {"expect": "220"}}));
    assert_eq!(check::run(&checker(), &banner).await.verdict, Verdict::Up);

    // A reply that never comes.
    let wrong = endpoint(
        "tcp",
        &addr.to_string(),
        json!({"timeout": 1, "tcp": {"send": "ping", "expect": "PONG"}}),
    );
    let r = check::run(&checker(), &wrong).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert_eq!(
        r.error.as_deref(),
        Some("timed out after 1s while waiting for the reply")
    );
    assert!(r.measured.connected);
}

#[tokio::test]
async fn a_closed_port_is_down() {
    let port = closed_port().await;
    let e = endpoint(
        "tcp",
        &format!("127.0.0.1:{port}"),
        json!({"conditions": [{"condition": "[CONNECTED] == true"}]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert!(!r.measured.connected);
    assert!(r.error.unwrap().contains("Connection refused"));
    assert!(!r.conditions[0].ok);
}

#[tokio::test]
async fn a_target_without_a_port_is_refused_clearly() {
    let r = check::run(&checker(), &endpoint("tcp", "127.0.0.1", json!({}))).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert!(r.error.unwrap().contains("expected host:port"));
}
