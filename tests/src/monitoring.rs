//! Harness for the monitoring tests: an agent speaking the real agent
//! protocol over HTTP (its token, `muster_common::monitor`'s types), and a
//! webhook receiver on loopback that records what it is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use muster_common::condition::Measured;
use muster_common::monitor::{
    AgentHealth, CheckResult, ConditionResult, EndpointList, ResultBatch, Timings, TlsInfo, Verdict,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::TestCoordinator;

/// A monitoring agent as the coordinator sees one: its token, sending what
/// `muster-agent` sends.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub id: String,
    pub name: String,
    pub location: String,
    pub token: String,
    /// The coordinator's HTTP address.
    pub base: String,
    http: reqwest::Client,
    /// The time of the last result made up, so each is later than the one
    /// before, as an agent's checks of one endpoint are.
    clock: Arc<Mutex<DateTime<Utc>>>,
}

impl AgentClient {
    /// A time after every one handed out before, near now.
    pub fn next_time(&self) -> DateTime<Utc> {
        let mut last = self.clock.lock().unwrap_or_else(PoisonError::into_inner);
        *last = Utc::now().max(*last + chrono::Duration::milliseconds(1));
        *last
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The same agent talking to another coordinator (on the same database).
    pub fn via(&self, c: &TestCoordinator) -> AgentClient {
        AgentClient {
            base: format!("http://{}", c.coordinator.http_addr),
            ..self.clone()
        }
    }

    async fn answer(response: reqwest::Response) -> anyhow::Result<(u16, Value)> {
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// `POST /api/v1/agent/health/`.
    pub async fn heartbeat(&self) -> anyhow::Result<(u16, Value)> {
        let health = AgentHealth {
            version: "test-agent/1".into(),
            endpoints_version: None,
            buffered_results: 0,
            checks_per_minute: 6.0,
        };
        let response = self
            .http
            .post(self.url("/api/v1/agent/health/"))
            .bearer_auth(&self.token)
            .json(&health)
            .send()
            .await?;
        Self::answer(response).await
    }

    /// `GET /api/v1/agent/endpoints/`, with `If-None-Match` when given:
    /// the status, the `ETag`, and the list unless 304.
    pub async fn endpoints(
        &self,
        etag: Option<&str>,
    ) -> anyhow::Result<(u16, Option<String>, Option<EndpointList>)> {
        let mut request = self
            .http
            .get(self.url("/api/v1/agent/endpoints/"))
            .bearer_auth(&self.token);
        if let Some(etag) = etag {
            request = request.header("If-None-Match", etag);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let list = if status == 200 {
            Some(response.json::<EndpointList>().await?)
        } else {
            None
        };
        Ok((status, etag, list))
    }

    /// `POST /api/v1/agent/results/`.
    pub async fn report(&self, results: Vec<CheckResult>) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(self.url("/api/v1/agent/results/"))
            .bearer_auth(&self.token)
            .json(&ResultBatch { results })
            .send()
            .await?;
        Self::answer(response).await
    }

    /// Reports `verdicts` for `endpoint`, in this order, failing unless
    /// every one is accepted.
    pub async fn report_all(&self, endpoint: &str, verdicts: &[Verdict]) -> anyhow::Result<()> {
        let endpoint = Uuid::parse_str(endpoint)?;
        let results = verdicts
            .iter()
            .map(|v| check_result(endpoint, self.next_time(), *v))
            .collect();
        let (status, body) = self.report(results).await?;
        if status != 202 || body["accepted"] != json!(verdicts.len()) {
            bail!("results not accepted: {status} {body}");
        }
        Ok(())
    }
}

/// A check result as an HTTP check reports it: `[STATUS] == 200` held or
/// not, with phase timings and a certificate expiry.
pub fn check_result(endpoint: Uuid, at: DateTime<Utc>, verdict: Verdict) -> CheckResult {
    let up = verdict != Verdict::Down;
    CheckResult {
        id: Uuid::now_v7(),
        endpoint_id: endpoint,
        checked_at: at,
        verdict,
        error: None,
        measured: Measured {
            status: Some(if up { 200 } else { 503 }),
            response_time_ms: Some(12.0),
            connected: true,
            ..Measured::default()
        },
        timings: Timings {
            dns_ms: Some(0.4),
            connect_ms: Some(0.9),
            tls_ms: Some(3.2),
            first_byte_ms: Some(8.1),
            total_ms: 12.0,
            ..Timings::default()
        },
        tls: TlsInfo {
            version: Some("TLSv1.3".into()),
            certificate_expires_at: Some(at + chrono::Duration::days(2)),
        },
        conditions: vec![ConditionResult {
            condition: "[STATUS] == 200".into(),
            ok: up,
            message: (!up).then(|| "[STATUS] is 503, not == 200".to_owned()),
        }],
    }
}

impl TestCoordinator {
    /// Creates an agent at `location` with the admin key.
    pub async fn create_agent(&self, name: &str, location: &str) -> anyhow::Result<AgentClient> {
        self.create_agent_with(&self.admin_key, name, location)
            .await
    }

    /// Creates an agent at `location` with `key`.
    pub async fn create_agent_with(
        &self,
        key: &str,
        name: &str,
        location: &str,
    ) -> anyhow::Result<AgentClient> {
        let (status, agent) = self
            .call(
                key,
                reqwest::Method::POST,
                "/api/v1/agents/",
                Some(json!({ "name": name, "location": location })),
            )
            .await?;
        if status != 201 {
            bail!("creating agent {name}: {status} {agent}");
        }
        Ok(AgentClient {
            id: agent["id"].as_str().context("agent id")?.to_owned(),
            name: name.to_owned(),
            location: location.to_owned(),
            token: agent["token"].as_str().context("agent token")?.to_owned(),
            base: format!("http://{}", self.coordinator.http_addr),
            http: reqwest::Client::new(),
            clock: Arc::new(Mutex::new(Utc::now() - chrono::Duration::seconds(1))),
        })
    }

    /// Creates an endpoint with the admin key; returns its id.
    pub async fn create_endpoint(&self, body: Value) -> anyhow::Result<String> {
        let endpoint = self
            .admin(reqwest::Method::POST, "/api/v1/endpoints/", Some(body))
            .await?;
        Ok(endpoint["id"].as_str().context("endpoint id")?.to_owned())
    }

    /// `GET /api/v1/endpoints/{id}/` with the admin key.
    pub async fn endpoint(&self, id: &str) -> anyhow::Result<Value> {
        self.admin(
            reqwest::Method::GET,
            &format!("/api/v1/endpoints/{id}/"),
            None,
        )
        .await
    }

    /// Waits until endpoint `id` has `status`; returns the endpoint then.
    pub async fn wait_status(&self, id: &str, status: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let endpoint = self.endpoint(id).await?;
            if endpoint["status"] == status {
                return Ok(endpoint);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out waiting for endpoint {id} to be {status}: {endpoint}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An HTTP server on loopback that takes webhook posts and records their
/// JSON. The first `fail_first` posts are answered 500 (and not recorded),
/// to show that the coordinator retries.
pub struct WebhookReceiver {
    pub url: String,
    received: Arc<Mutex<Vec<Value>>>,
    posts: Arc<Mutex<usize>>,
    shutdown: CancellationToken,
}

impl WebhookReceiver {
    pub async fn start(fail_first: usize) -> anyhow::Result<WebhookReceiver> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), fail_first).await
    }

    /// Like `start`, on another loopback address (127.0.0.2, say).
    pub async fn start_on(
        ip: std::net::IpAddr,
        fail_first: usize,
    ) -> anyhow::Result<WebhookReceiver> {
        let received = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(0usize));
        let (r, p) = (received.clone(), posts.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let (received, posts) = (r.clone(), p.clone());
                async move {
                    let n = {
                        let mut posts = posts.lock().unwrap_or_else(PoisonError::into_inner);
                        *posts += 1;
                        *posts
                    };
                    if n <= fail_first {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    received
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(body);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr: SocketAddr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(WebhookReceiver {
            url: format!("http://{addr}/hook"),
            received,
            posts,
            shutdown,
        })
    }

    /// The messages accepted, in order.
    pub fn received(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many accepted messages had `event`.
    pub fn count(&self, event: &str) -> usize {
        self.received()
            .iter()
            .filter(|m| m["event"] == event)
            .count()
    }

    /// Posts received, refused ones included.
    pub fn posts(&self) -> usize {
        *self.posts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `n` messages with `event` were accepted.
    pub async fn wait_for(&self, event: &str, n: usize) -> anyhow::Result<()> {
        crate::wait_until(
            Duration::from_secs(20),
            &format!("{n} {event} message(s)"),
            || async { Ok(self.count(event) >= n) },
        )
        .await
        .with_context(|| format!("received: {:?}", self.received()))
    }

    /// Registers this receiver as a webhook notifier of `key`'s organization.
    pub async fn register(&self, c: &TestCoordinator, key: &str) -> anyhow::Result<()> {
        let (status, body) = c
            .call(
                key,
                reqwest::Method::POST,
                "/api/v1/notifiers/",
                Some(json!({ "kind": "webhook", "url": self.url })),
            )
            .await?;
        if status != 201 {
            bail!("registering the webhook: {status} {body}");
        }
        Ok(())
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
