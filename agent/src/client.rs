//! The agent's side of the three agent routes of the coordinator's HTTP API,
//! with the agent token as bearer: heartbeat, endpoint list, result batches.
//!
//! Answers are sorted by what the agent should do about them
//! ([`ApiError`]): 401/403 mean the token is wrong or revoked, which no
//! retry fixes; an unreachable coordinator, a 5xx, 404 (a coordinator
//! without the agent routes yet), 408 and 429 pass, so the agent keeps its
//! results and tries again; any other 4xx says the request itself is bad.

use std::time::Duration;

use muster_common::monitor::{AgentHealth, EndpointList, ResultBatch};
use muster_common::secret::Secret;
use reqwest::StatusCode;
use serde::Deserialize;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const USER_AGENT: &str = concat!("muster-agent/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error(
        "the coordinator refused the agent token ({status}): the token is wrong or was revoked; \
         create a new agent token (POST /api/v1/agents/) and restart the agent with it"
    )]
    Refused { status: u16 },
    #[error("cannot reach the coordinator: {0}")]
    Unreachable(String),
    #[error("the coordinator answered {status}: {body}")]
    Unavailable { status: u16, body: String },
    #[error("the coordinator rejected the request ({status}): {body}")]
    Rejected { status: u16, body: String },
}

impl ApiError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Unreachable(_) | ApiError::Unavailable { .. }
        )
    }
}

/// What the coordinator says about this agent when it reports its health.
#[derive(Debug, Clone, Deserialize)]
pub struct Registration {
    #[serde(default)]
    pub agent_id: serde_json::Value,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
}

/// The endpoint list, or "unchanged".
#[derive(Debug)]
pub enum Endpoints {
    Changed {
        list: EndpointList,
        /// The `ETag` to send back as `If-None-Match`.
        etag: String,
    },
    Unchanged,
}

pub struct Coordinator {
    http: reqwest::Client,
    base: String,
    token: Secret,
}

impl Coordinator {
    /// `base` is the coordinator's URL without a trailing slash; `tls` the
    /// client configuration for an `https://` one.
    pub fn new(
        base: String,
        token: Secret,
        tls: rustls::ClientConfig,
    ) -> Result<Coordinator, String> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Coordinator { http, base, token })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /api/v1/agent/health/`.
    pub async fn health(&self, health: &AgentHealth) -> Result<Registration, ApiError> {
        let response = self
            .http
            .post(self.url("/api/v1/agent/health/"))
            .bearer_auth(self.token.expose())
            .json(health)
            .send()
            .await
            .map_err(unreachable)?;
        let response = check(response).await?;
        response.json().await.map_err(|e| ApiError::Unavailable {
            status: 200,
            body: format!("the heartbeat answer is not the expected JSON: {e}"),
        })
    }

    /// `GET /api/v1/agent/endpoints/`, with `If-None-Match` when the agent
    /// has a list already.
    pub async fn endpoints(&self, etag: Option<&str>) -> Result<Endpoints, ApiError> {
        let mut request = self
            .http
            .get(self.url("/api/v1/agent/endpoints/"))
            .bearer_auth(self.token.expose());
        if let Some(etag) = etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let response = request.send().await.map_err(unreachable)?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(Endpoints::Unchanged);
        }
        let response = check(response).await?;
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let list: EndpointList = response.json().await.map_err(|e| ApiError::Unavailable {
            status: 200,
            body: format!("the endpoint list is not the expected JSON: {e}"),
        })?;
        let etag = etag.unwrap_or_else(|| list.version.clone());
        Ok(Endpoints::Changed { list, etag })
    }

    /// `POST /api/v1/agent/results/`; the number the coordinator accepted.
    pub async fn results(&self, batch: &ResultBatch) -> Result<u64, ApiError> {
        #[derive(Deserialize)]
        struct Accepted {
            #[serde(default)]
            accepted: u64,
        }
        let response = self
            .http
            .post(self.url("/api/v1/agent/results/"))
            .bearer_auth(self.token.expose())
            .json(batch)
            .send()
            .await
            .map_err(unreachable)?;
        let response = check(response).await?;
        // The batch is taken once the status says so; the count is for logs.
        Ok(response
            .json::<Accepted>()
            .await
            .map_or(batch.results.len() as u64, |a| a.accepted))
    }
}

fn unreachable(error: reqwest::Error) -> ApiError {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    ApiError::Unreachable(text)
}

/// The response when its status is a success; else the error it means.
async fn check(response: reqwest::Response) -> Result<reqwest::Response, ApiError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return Err(ApiError::Refused {
            status: status.as_u16(),
        });
    }
    let mut body = response.text().await.unwrap_or_default();
    if body.len() > 300 {
        let mut cut = 300;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
        body.push('…');
    }
    let status = status.as_u16();
    if status >= 500 || matches!(status, 404 | 408 | 429) {
        Err(ApiError::Unavailable { status, body })
    } else {
        Err(ApiError::Rejected { status, body })
    }
}
