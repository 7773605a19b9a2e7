//! The coordinator's HTTP API as the CLI calls it, and how its failures map
//! to exit codes: unreachable or failing (5xx) is [`exit::UNAVAILABLE`],
//! 401/403 (or no key at all) is [`exit::AUTH`], any other refusal (404,
//! 409, 422, …) is [`exit::REFUSED`].

use std::time::Duration;

use anyhow::anyhow;
use serde_json::Value;

use crate::exit;

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    key: Option<String>,
}

/// Why a call to the API did not give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection, a broken one, an unreadable answer, or a 5xx.
    Unavailable,
    /// 401 or 403, or no key to send.
    Auth,
    /// Any other 4xx: the request names something that does not exist or
    /// is not allowed in its state.
    Refused,
}

/// An error the API answered, or a failure to reach it.
#[derive(Debug)]
pub struct ApiError {
    pub failure: Failure,
    /// The HTTP status, when the API answered.
    pub status: Option<u16>,
    message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for ApiError {}

impl ApiError {
    pub fn unavailable(message: String) -> ApiError {
        ApiError {
            failure: Failure::Unavailable,
            status: None,
            message,
        }
    }

    /// The error for an answer with a non-success `status` and `body`
    /// (the API's `{"detail": …}`, or whatever a proxy said).
    pub fn answered(status: reqwest::StatusCode, body: &str) -> ApiError {
        let detail = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        let failure = match status.as_u16() {
            401 | 403 => Failure::Auth,
            400..=499 => Failure::Refused,
            _ => Failure::Unavailable,
        };
        let hint = if status.as_u16() == 401 {
            " (check MUSTER_API_KEY or --api-key)"
        } else {
            ""
        };
        ApiError {
            failure,
            status: Some(status.as_u16()),
            message: format!("{status}: {detail}{hint}"),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self.failure {
            Failure::Unavailable => exit::UNAVAILABLE,
            Failure::Auth => exit::AUTH,
            Failure::Refused => exit::REFUSED,
        }
    }
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            key: key.filter(|k| !k.is_empty()),
        })
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let key = self.key.as_deref().ok_or_else(|| ApiError {
            failure: Failure::Auth,
            status: None,
            message: "no API key: set MUSTER_API_KEY or pass --api-key".into(),
        })?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(ci) = ci_system() {
            req = req.header("X-Muster-CI", ci);
        }
        Ok(req)
    }

    pub fn unreachable(&self, error: &reqwest::Error) -> ApiError {
        ApiError::unavailable(format!(
            "cannot reach the coordinator at {}: {error}",
            self.base
        ))
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = req.send().await.map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(ApiError::answered(status, &body).into())
    }

    pub async fn json(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = self.send(req).await?;
        response.json().await.map_err(|e| {
            ApiError::unavailable(format!("unreadable answer from the coordinator: {e}")).into()
        })
    }

    /// The run's record; a blip (no connection, a 5xx) is retried for a
    /// while, since the caller waited for this answer and must not lose it.
    pub async fn run_record(&self, id: &str) -> anyhow::Result<Value> {
        let path = format!("/api/v1/action-runs/{id}/");
        let mut tries = 0;
        loop {
            match self.json(self.request(reqwest::Method::GET, &path)?).await {
                Err(error)
                    if tries < 30
                        && error
                            .downcast_ref::<ApiError>()
                            .is_some_and(|e| e.failure == Failure::Unavailable) =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                answer => return answer,
            }
        }
    }
}

/// The CI system this runs in, told to the coordinator for the run's trigger.
fn ci_system() -> Option<&'static str> {
    let set = |name: &str| std::env::var_os(name).is_some();
    if set("GITLAB_CI") {
        Some("gitlab-ci")
    } else if set("GITHUB_ACTIONS") {
        Some("github-actions")
    } else if set("JENKINS_URL") {
        Some("jenkins")
    } else if set("BUILDKITE") {
        Some("buildkite")
    } else {
        None
    }
}

/// A run id as the coordinator answered it.
pub fn run_id_of(answer: &Value) -> anyhow::Result<String> {
    answer["id"].as_str().map(str::to_owned).ok_or_else(|| {
        anyhow!(ApiError::unavailable(
            "the coordinator answered without a run id".into()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_the_documented_exit_codes() {
        let code = |status: u16| {
            ApiError::answered(reqwest::StatusCode::from_u16(status).unwrap(), "").exit_code()
        };
        assert_eq!(code(401), exit::AUTH);
        assert_eq!(code(403), exit::AUTH);
        assert_eq!(code(404), exit::REFUSED);
        assert_eq!(code(409), exit::REFUSED);
        assert_eq!(code(422), exit::REFUSED);
        assert_eq!(code(500), exit::UNAVAILABLE);
        assert_eq!(code(503), exit::UNAVAILABLE);
    }

    #[test]
    fn the_detail_of_an_answer_is_the_message() {
        let error = ApiError::answered(
            reqwest::StatusCode::NOT_FOUND,
            r#"{"detail": "workspace 'x' not found"}"#,
        );
        assert_eq!(error.to_string(), "404 Not Found: workspace 'x' not found");
    }
}
