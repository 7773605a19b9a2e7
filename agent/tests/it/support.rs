//! What the tests share: endpoints built from JSON as the coordinator sends
//! them, a checker, and the HTTP server most checks point at.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{any, get};
use muster_agent::check::{Checker, Prepared, TlsConfigs};
use muster_agent::config::SYSTEM_CA_BUNDLE;
use muster_common::monitor::EndpointSpec;
use serde_json::{json, Value};

/// An endpoint of `kind` at `target`; `extra` sets or overrides fields.
pub fn endpoint(kind: &str, target: &str, extra: Value) -> Prepared {
    Prepared::new(spec(kind, target, extra))
}

pub fn spec(kind: &str, target: &str, extra: Value) -> EndpointSpec {
    let mut value = json!({
        "id": uuid::Uuid::now_v7(), "name": "test", "kind": kind, "target": target,
        "interval": 5, "timeout": 2,
    });
    if let (Value::Object(base), Value::Object(extra)) = (&mut value, extra) {
        base.extend(extra);
    }
    serde_json::from_value(value).expect("a valid endpoint spec")
}

pub fn checker() -> Checker {
    checker_trusting(Path::new(SYSTEM_CA_BUNDLE))
}

pub fn checker_trusting(ca_file: &Path) -> Checker {
    Checker::new(TlsConfigs::new(ca_file).expect("the CA bundle loads"))
}

/// An HTTP server on 127.0.0.1 with a few routes:
/// `/` (JSON `{"status": "UP"}`), `/slow/{ms}`, `/status/{code}`,
/// `/redirect` (302 to `/`), `/echo` (method, body and `x-test` back),
/// `/big` (2 MiB).
pub async fn http_server() -> SocketAddr {
    let app = axum::Router::new()
        .route(
            "/",
            get(|| async { axum::Json(json!({"status": "UP", "items": [1, 2]})) }),
        )
        .route(
            "/slow/{ms}",
            get(|UrlPath(ms): UrlPath<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                "late"
            }),
        )
        .route(
            "/status/{code}",
            get(|UrlPath(code): UrlPath<u16>| async move {
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
            }),
        )
        .route("/redirect", get(|| async { Redirect::to("/") }))
        .route(
            "/echo",
            any(
                |method: Method, headers: HeaderMap, body: String| async move {
                    let test = headers
                        .get("x-test")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    format!("{method} {body} x-test={test}").into_response()
                },
            ),
        )
        .route("/big", get(|| async { "x".repeat(2 << 20) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// A port on 127.0.0.1 that nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}
