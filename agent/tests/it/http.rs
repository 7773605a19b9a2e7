//! HTTP checks against a real axum server on loopback.

use muster_agent::check;
use muster_common::monitor::Verdict;
use serde_json::json;

use crate::support::{checker, closed_port, endpoint, http_server};

#[tokio::test]
async fn a_healthy_server_is_up_with_every_phase_timed() {
    let addr = http_server().await;
    // By name, so the DNS phase happens too.
    let target = format!("http://localhost:{}/", addr.port());
    let e = endpoint(
        "http",
        &target,
        json!({"conditions": [
            {"condition": "[STATUS] == 200"},
            {"condition": "[BODY].status == UP"},
            {"condition": "[BODY].items[1] == 2"},
            {"condition": "[RESPONSE_TIME] < 2000"},
            {"condition": "[CONNECTED] == true"},
        ]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert_eq!(r.error, None);
    assert!(r.conditions.iter().all(|c| c.ok));
    assert_eq!(r.measured.status, Some(200));
    assert_eq!(r.measured.ip.as_deref(), Some("127.0.0.1"));
    assert!(r.measured.body.is_none(), "the body is not reported");
    let t = &r.timings;
    let dns = t.dns_ms.expect("a DNS phase");
    let connect = t.connect_ms.expect("a connect phase");
    let first_byte = t.first_byte_ms.expect("a first-byte phase");
    assert_eq!(t.tls_ms, None, "no TLS on http://");
    for phase in [dns, connect, first_byte] {
        assert!(phase >= 0.0 && phase < t.total_ms, "{t:?}");
    }
    assert!(dns + connect + first_byte <= t.total_ms + 0.001, "{t:?}");
    assert!(t.total_ms < 2000.0, "{t:?}");
    let response_time = r.measured.response_time_ms.unwrap();
    assert!(response_time <= t.total_ms, "{t:?} {response_time}");
}

#[tokio::test]
async fn first_byte_waits_for_a_slow_server() {
    let addr = http_server().await;
    let e = endpoint("http", &format!("http://{addr}/slow/200"), json!({}));
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    let t = &r.timings;
    assert_eq!(t.dns_ms, None, "an address needs no lookup");
    let first_byte = t.first_byte_ms.unwrap();
    assert!(first_byte >= 200.0, "{t:?}");
    assert!(t.connect_ms.unwrap() < 200.0, "{t:?}");
    assert!(t.total_ms >= first_byte, "{t:?}");
}

#[tokio::test]
async fn a_check_that_times_out_is_down_and_says_where() {
    let addr = http_server().await;
    let e = endpoint(
        "http",
        &format!("http://{addr}/slow/5000"),
        json!({"timeout": 1, "conditions": [{"condition": "[STATUS] == 200"}]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    let error = r.error.unwrap();
    assert_eq!(error, "timed out after 1s while waiting for the response");
    assert!(r.timings.connect_ms.is_some());
    assert!(r.timings.first_byte_ms.is_none());
    assert!(r.timings.total_ms >= 1000.0 && r.timings.total_ms < 1500.0);
    assert!(r.measured.connected);
    assert!(!r.conditions[0].ok, "[STATUS] was never measured");
}

#[tokio::test]
async fn a_refused_connection_is_down() {
    let port = closed_port().await;
    let e = endpoint("http", &format!("http://127.0.0.1:{port}/"), json!({}));
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert!(!r.measured.connected);
    let error = r.error.unwrap();
    assert!(
        error.starts_with(&format!("cannot connect to 127.0.0.1:{port}")),
        "{error}"
    );
}

#[tokio::test]
async fn status_conditions_fail_or_degrade() {
    let addr = http_server().await;
    let e = endpoint(
        "http",
        &format!("http://{addr}/status/503"),
        json!({"conditions": [{"condition": "[STATUS] == 200"}]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert_eq!(r.error, None, "the check was made; a condition failed");
    assert_eq!(
        r.conditions[0].message.as_deref(),
        Some("[STATUS] is 503, not == 200")
    );
    let e = endpoint(
        "http",
        &format!("http://{addr}/slow/100"),
        json!({"conditions": [
            {"condition": "[STATUS] == 200"},
            {"condition": "[RESPONSE_TIME] < 50", "degrades": true},
        ]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Degraded, "{r:#?}");
}

#[tokio::test]
async fn redirects_are_followed_only_when_asked() {
    let addr = http_server().await;
    let target = format!("http://{addr}/redirect");
    let r = check::run(&checker(), &endpoint("http", &target, json!({}))).await;
    assert_eq!(r.measured.status, Some(303));
    let followed = endpoint(
        "http",
        &target,
        json!({"http": {"follow_redirects": true}, "conditions": [{"condition": "[BODY].status == UP"}]}),
    );
    let r = check::run(&checker(), &followed).await;
    assert_eq!(r.measured.status, Some(200));
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
}

#[tokio::test]
async fn method_headers_and_body_are_sent() {
    let addr = http_server().await;
    let e = endpoint(
        "http",
        &format!("http://{addr}/echo"),
        json!({
            "http": {"method": "post", "headers": [["X-Test", "1"]], "body": "hello"},
            "conditions": [{"condition": "[BODY] == \"POST hello x-test=1\""}],
        }),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
}

#[tokio::test]
async fn a_large_body_is_read_up_to_a_mebibyte() {
    let addr = http_server().await;
    let e = endpoint(
        "http",
        &format!("http://{addr}/big"),
        json!({"conditions": [{"condition": "[BODY] != \"\""}]}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
}

#[tokio::test]
async fn bad_specs_are_errors_not_panics() {
    for (target, http, words) in [
        ("not a url", json!({}), "is not a URL"),
        ("ftp://127.0.0.1/", json!({}), "only http:// and https://"),
        (
            "http://127.0.0.1:1/",
            json!({"method": "GE T"}),
            "not an HTTP method",
        ),
        (
            "http://127.0.0.1:1/",
            json!({"headers": [["bad header", "x"]]}),
            "not a valid header name",
        ),
    ] {
        let r = check::run(&checker(), &endpoint("http", target, json!({"http": http}))).await;
        assert_eq!(r.verdict, Verdict::Down);
        let error = r.error.unwrap();
        assert!(error.contains(words), "{target}: {error}");
    }
}
