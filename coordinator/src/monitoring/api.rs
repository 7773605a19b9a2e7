//! The monitoring routes, merged into the HTTP API by [`routes`]. JSON
//! shapes of monitoring live here (the agents' wire types are
//! `muster_common::monitor`). They read bodies with `crate::api`'s helpers
//! and answer 422 for a bad field, JSON of the wrong shape included.
//!
//! People, with API keys (viewers read; workspace admins and above write
//! endpoints, notifiers and maintenance windows; org admins and above
//! create and revoke agents):
//! - `/api/v1/agents/` (POST, GET), `/api/v1/agents/{id}/` (DELETE revokes)
//! - `/api/v1/endpoints/` (POST, GET), `/api/v1/endpoints/{id}/` (GET, PUT,
//!   DELETE), `/api/v1/endpoints/{id}/results/` (GET, the history)
//! - `/api/v1/notifiers/` (POST, GET), `/api/v1/notifiers/{id}/` (DELETE)
//! - `/api/v1/maintenance-windows/` (POST, GET),
//!   `/api/v1/maintenance-windows/{id}/` (DELETE)
//!
//! Agents, with their agent token only (an API key gets 403 here, and an
//! agent token gets 403 everywhere else):
//! - `POST /api/v1/agent/health/`: `AgentHealth` → `{agent_id, name, location}`
//! - `GET /api/v1/agent/endpoints/`: `EndpointList`, with an `ETag` (its
//!   version); `If-None-Match` with it → 304
//! - `POST /api/v1/agent/results/`: `ResultBatch` (at most 1000) → 202
//!   `{accepted, stored, duplicates, refused: [{id, endpoint_id, reason}]}`;
//!   `accepted` counts what the coordinator holds (stored now or before), so
//!   an agent can drop those from its buffer; refused ones will never be
//!   taken and should be dropped too.
//!
//! OpenAPI: each handler carries its `#[utoipa::path]`; [`routes`] is
//! merged into `crate::api::endpoints`, so the router and the document
//! come from one list. The schemas of the JSON built here are in
//! `openapi` (this module's).

use std::collections::BTreeSet;

use axum::extract::{DefaultBodyLimit, OriginalUri, Path, Query};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Datelike, Utc};
use muster_common::condition::Condition;
use muster_common::monitor::{
    AgentHealth, CheckKind, CheckResult, ConditionSpec, DnsOptions, EndpointList, HttpOptions,
    IcmpOptions, ResultBatch, TcpOptions,
};
use muster_common::token::{self, TokenKind};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{
    parse_kind, Agent, CheckOptions, Endpoint, EndpointConfig, EndpointDetail, LocationState,
    MaintenanceWindow, Monitoring, NewAgent, NewMaintenanceWindow, Notifier, Refused, ResultFilter,
    StoredResult, MAX_BATCH,
};
use crate::api::{
    conflict, json_body_as, listing, no_nul_in_json, opt_time, page_of, paginated, parse_id,
    parse_json_body, time, ApiResult, AppState, JsonBody, PageQuery,
};
use crate::auth::{AgentCaller, Caller};
use crate::error::{Code, ServiceError};
use crate::store::Role;

mod openapi;

type State = axum::extract::State<AppState>;

/// A full batch with bodies kept is larger than the API's usual 1 MiB.
const RESULTS_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// How far in the future a result's time may be (clock skew).
const FUTURE_SKEW: chrono::Duration = chrono::Duration::minutes(5);
const MAX_LOCATIONS: usize = 32;
const MAX_CONDITIONS: usize = 32;
const MAX_WINDOW_ENDPOINTS: usize = 100;

/// The monitoring routes with their OpenAPI descriptions, for
/// `crate::api::endpoints` to merge. They need the [`Monitoring`] context
/// as a request extension (set in `crate::start`).
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    let (schemas, paths, results) = routes!(agent_results);
    let results = results.layer(DefaultBodyLimit::max(RESULTS_BODY_LIMIT));
    OpenApiRouter::new()
        .routes(routes!(list_agents, create_agent))
        .routes(routes!(revoke_agent))
        .routes(routes!(agent_health))
        .routes(routes!(agent_endpoints))
        .routes((schemas, paths, results))
        .routes(routes!(list_endpoints, create_endpoint))
        .routes(routes!(get_endpoint, update_endpoint, delete_endpoint))
        .routes(routes!(list_results))
        .routes(routes!(list_notifiers, create_notifier))
        .routes(routes!(delete_notifier))
        .routes(routes!(list_windows, create_window))
        .routes(routes!(delete_window))
}

/// A JSON body of a monitoring route: JSON of the wrong shape is a 422, as
/// every bad field of theirs is.
fn json_body<T: DeserializeOwned + Serialize>(body: JsonBody) -> ApiResult<T> {
    json_body_as(body, Code::Unprocessable)
}

/// A name people give (agents, endpoints): 1 to 128 characters, no control
/// characters.
fn check_name(field: &str, name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ServiceError::unprocessable(format!(
            "{field}: expected 1 to 128 characters without control characters, found {name:?}"
        )));
    }
    Ok(())
}

/// A location: a letter or digit, then up to 62 letters, digits, '.', '_'
/// or '-' (`site-a`, `fra1`, `office.berlin`).
pub fn is_valid_location(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_location(field: &str, location: &str) -> ApiResult<()> {
    if is_valid_location(location) {
        Ok(())
    } else {
        Err(ServiceError::unprocessable(format!(
            "{field}: {location:?} is not a valid location (a letter or digit, then up to 62 letters, digits, '.', '_' or '-')"
        )))
    }
}

// ---- agents -------------------------------------------------------------

fn agent_json(a: &Agent, m: &Monitoring, now: DateTime<Utc>) -> Value {
    let silence =
        chrono::Duration::from_std(m.settings.agent_silence).unwrap_or(chrono::Duration::MAX);
    let online =
        a.silent_since.is_none() && a.last_heartbeat_at.is_some_and(|t| now - t <= silence);
    json!({
        "id": a.id,
        "name": a.name,
        "location": a.location,
        "prefix": a.prefix,
        "status": if a.revoked_at.is_some() { "revoked" } else if online { "online" } else { "offline" },
        "version": a.version,
        "last_heartbeat_at": opt_time(a.last_heartbeat_at),
        "last_report_at": opt_time(a.last_report_at),
        "silent_since": opt_time(a.silent_since),
        "endpoint_count": a.endpoint_count,
        "checks_per_minute": a.checks_per_minute,
        "buffered_results": a.buffered_results,
        "endpoints_version": a.endpoints_version,
        "created_at": time(a.created_at),
        "revoked_at": opt_time(a.revoked_at),
    })
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgentBody {
    /// 1 to 128 characters, no control characters; unique in the organization.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// Where the agent runs: it checks the endpoints assigned to this location.
    #[schema(schema_with = openapi::location_schema)]
    location: String,
}

/// Create a monitoring agent (org admins)
///
/// The answer holds the agent's token, this once.
#[utoipa::path(
    post,
    path = "/api/v1/agents/",
    tag = "monitoring",
    request_body = NewAgentBody,
    responses(
        (status = 201, description = "created", body = openapi::CreatedAgent),
        (status = 400, description = "the body is not JSON, or holds a NUL character", body = openapi::Problem),
        (status = 403, description = "only org admins create agents", body = openapi::Problem),
        (status = 409, description = "an agent of that name exists in the organization", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "a field is missing or not valid; the answer names it", body = openapi::Problem),
    ),
)]
async fn create_agent(
    axum::extract::State(state): State,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::OrgAdmin, "create monitoring agents")?;
    let body: NewAgentBody = json_body(body)?;
    check_name("name", &body.name)?;
    check_location("location", &body.location)?;
    let secret = token::generate(TokenKind::AgentToken);
    let agent = state
        .store
        .create_agent(NewAgent {
            org_id: caller.identity.org_id,
            name: body.name.clone(),
            location: body.location.clone(),
            prefix: token::display_prefix(&secret),
            token_hash: token::hash(&secret),
            created_by: caller.identity.id,
        })
        .await
        .map_err(|e| {
            conflict(
                e,
                format!("agent '{}' already exists in this organization", body.name),
            )
        })?;
    tracing::info!(agent_id = %agent.id, agent = %agent.name, location = %agent.location, by = %caller.identity.name, "monitoring agent created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": agent.id,
            "name": agent.name,
            "location": agent.location,
            "token": secret,
            "prefix": agent.prefix,
            "created_at": time(agent.created_at),
        })),
    ))
}

#[utoipa::path(
    get,
    path = "/api/v1/agents/",
    tag = "monitoring",
    summary = "The monitoring agents of the caller's organization (all for super admins)",
    params(PageQuery),
    responses(
        (status = 200, description = "one page of agents", body = openapi::Paginated<openapi::Agent>),
        (status = 400, description = "page or page_size is not valid", body = openapi::Problem),
    ),
)]
async fn list_agents(
    axum::extract::State(state): State,
    Extension(m): Extension<Monitoring>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let page = page_of(&q)?;
    let (count, agents) = state.store.list_agents(caller.scope(), page).await?;
    let now = Utc::now();
    Ok(Json(paginated(
        &uri,
        &headers,
        page,
        count,
        agents.iter().map(|a| agent_json(a, &m, now)).collect(),
    )))
}

/// Revokes an agent (204): its token is refused from now on, and its
/// location turns `unknown` where no other agent checks. Revoking again
/// changes nothing (204).
#[utoipa::path(
    delete,
    path = "/api/v1/agents/{id}/",
    tag = "monitoring",
    params(("id" = Uuid, Path, description = "the agent's id")),
    responses(
        (status = 204, description = "revoked (or it was already)"),
        (status = 403, description = "only org admins revoke agents", body = openapi::Problem),
        (status = 404, description = "no such agent the caller may see", body = openapi::Problem),
    ),
)]
async fn revoke_agent(
    axum::extract::State(state): State,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::OrgAdmin, "revoke monitoring agents")?;
    let id = parse_id(&id, "agent")?;
    match state
        .store
        .revoke_agent(caller.scope(), id, Utc::now())
        .await?
    {
        Some(agent) => {
            tracing::warn!(agent_id = %id, agent = %agent.name, by = %caller.identity.name, "monitoring agent revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ServiceError::not_found(format!("agent '{id}' not found"))),
    }
}

// ---- the agent routes ---------------------------------------------------

/// An agent's heartbeat (agents only)
///
/// What it runs and how it fares; an agent that was silent is reporting
/// again from here on.
#[utoipa::path(
    post,
    path = "/api/v1/agent/health/",
    tag = "agents",
    security(("agent_token" = [])),
    request_body = AgentHealth,
    responses(
        (status = 200, description = "the agent, as the coordinator knows it", body = openapi::AgentSeen),
        (status = 400, description = "the body is not JSON, or holds a NUL character", body = openapi::Problem),
        (status = 403, description = "an API key: this route takes an agent token", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "a field is missing or not valid; the answer names it", body = openapi::Problem),
    ),
)]
async fn agent_health(
    axum::extract::State(state): State,
    Extension(m): Extension<Monitoring>,
    AgentCaller(agent): AgentCaller,
    body: JsonBody,
) -> ApiResult<Json<Value>> {
    let health: AgentHealth = json_body(body)?;
    if health.version.chars().count() > 64 || health.version.chars().any(char::is_control) {
        return Err(ServiceError::unprocessable(
            "version: expected at most 64 characters without control characters",
        ));
    }
    if health
        .endpoints_version
        .as_ref()
        .is_some_and(|v| v.len() > 128)
    {
        return Err(ServiceError::unprocessable(
            "endpoints_version: expected at most 128 characters",
        ));
    }
    if !(health.checks_per_minute.is_finite() && health.checks_per_minute >= 0.0) {
        return Err(ServiceError::unprocessable(format!(
            "checks_per_minute: expected a number of at least 0, found {}",
            health.checks_per_minute
        )));
    }
    let seen = state
        .store
        .agent_heartbeat(agent.id, &health, Utc::now())
        .await?
        .ok_or_else(|| ServiceError::unauthenticated("agent token is unknown or revoked"))?;
    if agent.silent_since.is_some() {
        tracing::info!(agent_id = %agent.id, agent = %agent.name, "monitoring agent reporting again");
        // Its resolve message was queued.
        m.outbox.notify_one();
    }
    Ok(Json(json!({
        "agent_id": seen.id,
        "name": seen.name,
        "location": seen.location,
    })))
}

/// The version of an endpoint list: a digest of what the agent receives.
fn list_version(list: &[muster_common::monitor::EndpointSpec]) -> String {
    let bytes = serde_json::to_vec(list).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

/// The endpoints the agent checks (agents only)
///
/// Its organization's endpoints at its location. The `ETag` is the list's
/// version: sent back in `If-None-Match`, it is answered 304 while the list
/// is unchanged.
#[utoipa::path(
    get,
    path = "/api/v1/agent/endpoints/",
    tag = "agents",
    security(("agent_token" = [])),
    params(
        ("If-None-Match" = Option<String>, Header, nullable = false, description = "the `ETag` of the list the agent has"),
    ),
    responses(
        (status = 200, description = "the agent's endpoints", body = EndpointList,
            headers(("ETag" = String, description = "the list's version, quoted"))),
        (status = 304, description = "the list is the one If-None-Match names",
            headers(("ETag" = String, description = "the list's version, quoted"))),
        (status = 403, description = "an API key: this route takes an agent token", body = openapi::Problem),
    ),
)]
async fn agent_endpoints(
    axum::extract::State(state): State,
    AgentCaller(agent): AgentCaller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let endpoints = state.store.endpoints_for_agent(&agent).await?;
    let specs: Vec<_> = endpoints.iter().map(Endpoint::spec).collect();
    let version = list_version(&specs);
    let etag = format!("\"{version}\"");
    let etag_value = HeaderValue::from_str(&etag)
        .map_err(|_| ServiceError::new(Code::Internal, "endpoint list version is not a header"))?;
    if none_match(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let list = EndpointList {
        version,
        endpoints: specs,
    };
    Ok(([(header::ETAG, etag_value)], Json(list)).into_response())
}

/// Report check results (agents only)
///
/// At most 1000 a batch. Each result is taken once (by its id): a batch
/// sent again is answered as the first time. Results the coordinator will
/// never take (another location's endpoint, a time in the future or beyond
/// the retention, text with a NUL) are refused one by one, with the reason.
#[utoipa::path(
    post,
    path = "/api/v1/agent/results/",
    tag = "agents",
    security(("agent_token" = [])),
    request_body = ResultBatch,
    responses(
        (status = 202, description = "taken: what was stored, and what was refused", body = openapi::ResultsAccepted),
        (status = 400, description = "the body is not JSON", body = openapi::Problem),
        (status = 403, description = "an API key: this route takes an agent token", body = openapi::Problem),
        (status = 413, description = "more than 1000 results, or a body larger than 16 MiB", body = openapi::Problem),
        (status = 422, description = "the body is not a batch of results; the answer names the field", body = openapi::Problem),
    ),
)]
async fn agent_results(
    axum::extract::State(state): State,
    Extension(m): Extension<Monitoring>,
    AgentCaller(agent): AgentCaller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    // Each result is checked for NUL characters below, on its own.
    let (batch, _): (ResultBatch, _) = parse_json_body(body, Code::Unprocessable)?;
    if batch.results.len() > MAX_BATCH {
        return Err(ServiceError::new(
            Code::TooLarge,
            format!(
                "results: at most {MAX_BATCH} per batch, found {}",
                batch.results.len()
            ),
        ));
    }
    let now = Utc::now();
    let retention =
        chrono::Duration::from_std(m.settings.retention).unwrap_or(chrono::Duration::MAX);
    let mut refused: Vec<Refused> = Vec::new();
    let mut fit = Vec::with_capacity(batch.results.len());
    for r in batch.results {
        match unfit(&r, now, retention) {
            Some(reason) => refused.push(Refused {
                result_id: r.id,
                endpoint_id: r.endpoint_id,
                reason,
            }),
            None => fit.push(r),
        }
    }
    let outcome = state.store.record_results(&agent, &fit, now).await?;
    if outcome.notifications > 0 {
        m.outbox.notify_one();
    }
    refused.extend(outcome.refused);
    state
        .metrics
        .check_results(outcome.stored, outcome.duplicates, refused.len());
    if !refused.is_empty() {
        tracing::warn!(agent_id = %agent.id, refused = refused.len(), "results refused");
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "accepted": outcome.stored + outcome.duplicates,
            "stored": outcome.stored,
            "duplicates": outcome.duplicates,
            "refused": refused.iter().map(|r| json!({
                "id": r.result_id,
                "endpoint_id": r.endpoint_id,
                "reason": r.reason,
            })).collect::<Vec<_>>(),
        })),
    ))
}

/// Why a result will never be stored, if it will not: a time too far
/// ahead or beyond the retention, or text with a NUL character (which
/// PostgreSQL cannot store). Refusing it alone keeps the rest of its batch.
fn unfit(r: &CheckResult, now: DateTime<Utc>, retention: chrono::Duration) -> Option<String> {
    if r.checked_at > now + FUTURE_SKEW {
        return Some(format!(
            "checked_at {} is in the future (this coordinator's clock says {})",
            time(r.checked_at),
            time(now)
        ));
    }
    if now.signed_duration_since(r.checked_at) >= retention {
        return Some(format!(
            "checked_at {} is older than the result retention ({} days)",
            time(r.checked_at),
            retention.num_days()
        ));
    }
    let value = serde_json::to_value(r).unwrap_or_default();
    no_nul_in_json("", &value).err().map(|e| e.message)
}

// ---- endpoints ----------------------------------------------------------

/// Reads the fields of a JSON object one by one, each with an error that
/// names it; the ones left over at the end are unknown.
struct Fields {
    prefix: &'static str,
    map: Map<String, Value>,
}

impl Fields {
    fn new(prefix: &'static str, value: Value) -> ApiResult<Fields> {
        match value {
            Value::Object(map) => Ok(Fields { prefix, map }),
            other => Err(ServiceError::unprocessable(format!(
                "{}expected a JSON object, found {}",
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", prefix.trim_end_matches('.'))
                },
                kind_of(&other)
            ))),
        }
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn take(&mut self, field: &str) -> Option<Value> {
        self.map.remove(field).filter(|v| !v.is_null())
    }

    fn string(&mut self, field: &str) -> ApiResult<Option<String>> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ServiceError::unprocessable(format!(
                "{}: expected a string, found {}",
                self.name(field),
                kind_of(&other)
            ))),
        }
    }

    fn required_string(&mut self, field: &str) -> ApiResult<String> {
        self.string(field)?
            .ok_or_else(|| ServiceError::unprocessable(format!("{}: required", self.name(field))))
    }

    fn bool(&mut self, field: &str) -> ApiResult<Option<bool>> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(ServiceError::unprocessable(format!(
                "{}: expected true or false, found {}",
                self.name(field),
                kind_of(&other)
            ))),
        }
    }

    /// A whole number in `range`, `default` when absent.
    fn number(
        &mut self,
        field: &str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
        unit: &str,
    ) -> ApiResult<u32> {
        let Some(value) = self.take(field) else {
            return Ok(default);
        };
        match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if range.contains(&n) => Ok(n),
            _ => Err(ServiceError::unprocessable(format!(
                "{}: expected a whole number{unit} from {} to {}, found {value}",
                self.name(field),
                range.start(),
                range.end()
            ))),
        }
    }

    fn finish(self) -> ApiResult<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(ServiceError::unprocessable(format!(
                "{}: unknown field",
                self.name(key)
            ))),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A host name or an IP address.
fn is_valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// `host:port` (`[v6]:port` for IPv6 addresses); the port is `default`
/// when absent and `default` is given.
fn check_host_port(target: &str, default: Option<u16>) -> bool {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, "")) => (v6, None),
            Some((v6, port)) => match port.strip_prefix(':') {
                Some(port) => (v6, Some(port)),
                None => return false,
            },
            None => return false,
        }
    } else {
        match target.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            Some(_) => return false,
            None => (target, None),
        }
    };
    let port_ok = match port {
        Some(p) => p.parse::<u16>().is_ok_and(|p| p > 0),
        None => default.is_some(),
    };
    port_ok && is_valid_host(host)
}

fn check_target(kind: CheckKind, target: &str) -> ApiResult<()> {
    let bad = |expected: &str| {
        Err(ServiceError::unprocessable(format!(
            "target: expected {expected} for a {} check, found {target:?}",
            kind.as_str()
        )))
    };
    if target.len() > 2048 || target.chars().any(char::is_whitespace) {
        return bad("at most 2048 characters without spaces");
    }
    match kind {
        CheckKind::Http => {
            let ok = target.parse::<axum::http::Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty())
            });
            if ok {
                Ok(())
            } else {
                bad("an http:// or https:// URL")
            }
        }
        CheckKind::Tcp => {
            if check_host_port(target, None) {
                Ok(())
            } else {
                bad("host:port")
            }
        }
        CheckKind::Dns => {
            if check_host_port(target, Some(53)) {
                Ok(())
            } else {
                bad("the DNS server as host or host:port")
            }
        }
        CheckKind::Icmp => {
            if is_valid_host(target) {
                Ok(())
            } else {
                bad("a host name or IP address")
            }
        }
    }
}

fn parse_conditions(kind: CheckKind, value: Option<Value>) -> ApiResult<Vec<ConditionSpec>> {
    let items = match value {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ServiceError::unprocessable(format!(
                "conditions: expected an array, found {}",
                kind_of(&other)
            )))
        }
    };
    if items.len() > MAX_CONDITIONS {
        return Err(ServiceError::unprocessable(format!(
            "conditions: at most {MAX_CONDITIONS}, found {}",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("conditions[{i}]");
            let spec = match item {
                Value::String(condition) => ConditionSpec {
                    condition,
                    degrades: false,
                },
                Value::Object(map) => {
                    let mut f = Fields {
                        prefix: "",
                        map,
                    };
                    let condition = f.string("condition")?.ok_or_else(|| {
                        ServiceError::unprocessable(format!("{field}.condition: required"))
                    })?;
                    let degrades = f.bool("degrades")?.unwrap_or(false);
                    if let Some(key) = f.map.keys().next() {
                        return Err(ServiceError::unprocessable(format!(
                            "{field}.{key}: unknown field (a condition has 'condition' and 'degrades')"
                        )));
                    }
                    ConditionSpec {
                        condition,
                        degrades,
                    }
                }
                other => {
                    return Err(ServiceError::unprocessable(format!(
                        "{field}: expected a string or {{\"condition\": ..., \"degrades\": ...}}, found {}",
                        kind_of(&other)
                    )))
                }
            };
            let parsed = Condition::parse(&spec.condition).map_err(|e| {
                ServiceError::unprocessable(format!(
                    "{field}: column {}: {} (in {:?})",
                    e.column, e.message, spec.condition
                ))
            })?;
            if !parsed.placeholder.applies_to(kind.as_str()) {
                let kinds: Vec<&str> = ["http", "tcp", "icmp", "dns"]
                    .into_iter()
                    .filter(|k| parsed.placeholder.applies_to(k))
                    .collect();
                return Err(ServiceError::unprocessable(format!(
                    "{field}: [{}] is not measured by {} checks (only by {})",
                    parsed.placeholder.name(),
                    kind.as_str(),
                    kinds.join(", ")
                )));
            }
            Ok(spec)
        })
        .collect()
}

fn parse_locations(value: Option<Value>) -> ApiResult<Vec<String>> {
    let items = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) | None => {
            return Err(ServiceError::unprocessable(
                "locations: required, a non-empty array of the locations whose agents check this endpoint",
            ))
        }
        Some(other) => {
            return Err(ServiceError::unprocessable(format!(
                "locations: expected an array of strings, found {}",
                kind_of(&other)
            )))
        }
    };
    if items.len() > MAX_LOCATIONS {
        return Err(ServiceError::unprocessable(format!(
            "locations: at most {MAX_LOCATIONS}, found {}",
            items.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let field = format!("locations[{i}]");
        let Value::String(location) = item else {
            return Err(ServiceError::unprocessable(format!(
                "{field}: expected a string, found {}",
                kind_of(&item)
            )));
        };
        check_location(&field, &location)?;
        if !seen.insert(location.clone()) {
            return Err(ServiceError::unprocessable(format!(
                "{field}: {location:?} is listed twice"
            )));
        }
    }
    Ok(seen.into_iter().collect())
}

fn http_options(value: Value) -> ApiResult<HttpOptions> {
    let mut f = Fields::new("http.", value)?;
    let method = f.string("method")?.unwrap_or_default().to_ascii_uppercase();
    if !(method.is_empty()
        || (method.len() <= 16 && method.chars().all(|c| c.is_ascii_uppercase())))
    {
        return Err(ServiceError::unprocessable(format!(
            "http.method: expected a method such as GET or POST, found {method:?}"
        )));
    }
    let headers = match f.take("headers") {
        None => Vec::new(),
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(name, value)| match value {
                Value::String(v) => Ok((name, v)),
                other => Err(ServiceError::unprocessable(format!(
                    "http.headers.{name}: expected a string, found {}",
                    kind_of(&other)
                ))),
            })
            .collect::<ApiResult<Vec<_>>>()?,
        Some(Value::Array(pairs)) => pairs
            .into_iter()
            .enumerate()
            .map(|(i, pair)| {
                serde_json::from_value::<(String, String)>(pair).map_err(|_| {
                    ServiceError::unprocessable(format!(
                        "http.headers[{i}]: expected [\"Name\", \"value\"]"
                    ))
                })
            })
            .collect::<ApiResult<Vec<_>>>()?,
        Some(other) => {
            return Err(ServiceError::unprocessable(format!(
                "http.headers: expected an object of names and values, found {}",
                kind_of(&other)
            )))
        }
    };
    if headers.len() > 50 {
        return Err(ServiceError::unprocessable("http.headers: at most 50"));
    }
    for (name, value) in &headers {
        let name_ok = !name.is_empty()
            && name.len() <= 256
            && axum::http::HeaderName::from_bytes(name.as_bytes()).is_ok();
        if !name_ok {
            return Err(ServiceError::unprocessable(format!(
                "http.headers: {name:?} is not a valid header name"
            )));
        }
        if value.len() > 8192 || HeaderValue::from_str(value).is_err() {
            return Err(ServiceError::unprocessable(format!(
                "http.headers.{name}: not a valid header value (at most 8192 visible characters)"
            )));
        }
    }
    let body = f.string("body")?;
    if body.as_ref().is_some_and(|b| b.len() > 64 * 1024) {
        return Err(ServiceError::unprocessable("http.body: at most 64 KiB"));
    }
    let options = HttpOptions {
        method,
        headers,
        body,
        follow_redirects: f.bool("follow_redirects")?.unwrap_or(false),
        insecure_tls: f.bool("insecure_tls")?.unwrap_or(false),
    };
    f.finish()?;
    Ok(options)
}

fn tcp_options(value: Value) -> ApiResult<TcpOptions> {
    let mut f = Fields::new("tcp.", value)?;
    let send = f.string("send")?;
    let expect = f.string("expect")?;
    for (field, text) in [("tcp.send", &send), ("tcp.expect", &expect)] {
        if text.as_ref().is_some_and(|t| t.len() > 4096) {
            return Err(ServiceError::unprocessable(format!(
                "{field}: at most 4096 bytes"
            )));
        }
    }
    let options = TcpOptions {
        send,
        expect,
        tls: f.bool("tls")?.unwrap_or(false),
    };
    f.finish()?;
    Ok(options)
}

fn icmp_options(value: Value) -> ApiResult<IcmpOptions> {
    let mut f = Fields::new("icmp.", value)?;
    let options = IcmpOptions {
        count: f.number("count", IcmpOptions::default().count, 1..=20, "")?,
    };
    f.finish()?;
    Ok(options)
}

fn dns_options(value: Option<Value>) -> ApiResult<DnsOptions> {
    const TYPES: [&str; 6] = ["A", "AAAA", "CNAME", "MX", "TXT", "NS"];
    let Some(value) = value else {
        return Err(ServiceError::unprocessable(
            "dns: required for a dns check: {\"name\": \"example.org\", \"query_type\": \"A\"}",
        ));
    };
    let mut f = Fields::new("dns.", value)?;
    let name = f.required_string("name")?;
    if !is_valid_host(name.trim_end_matches('.')) {
        return Err(ServiceError::unprocessable(format!(
            "dns.name: {name:?} is not a valid domain name"
        )));
    }
    let query_type = f
        .string("query_type")?
        .unwrap_or_else(|| "A".to_owned())
        .to_ascii_uppercase();
    if !TYPES.contains(&query_type.as_str()) {
        return Err(ServiceError::unprocessable(format!(
            "dns.query_type: expected one of {}, found {query_type:?}",
            TYPES.join(", ")
        )));
    }
    let expected = f.string("expected")?;
    if expected.as_ref().is_some_and(|e| e.len() > 1024) {
        return Err(ServiceError::unprocessable(
            "dns.expected: at most 1024 characters",
        ));
    }
    f.finish()?;
    Ok(DnsOptions {
        name,
        query_type,
        expected,
    })
}

/// An endpoint's configuration from its JSON, every field checked.
pub fn parse_endpoint(body: Value) -> ApiResult<EndpointConfig> {
    let mut f = Fields::new("", body)?;
    let name = f.required_string("name")?;
    check_name("name", &name)?;
    let kind_text = f.required_string("kind")?;
    let kind = parse_kind(&kind_text).ok_or_else(|| {
        ServiceError::unprocessable(format!(
            "kind: expected one of http, tcp, icmp, dns; found {kind_text:?}"
        ))
    })?;
    let target = f.required_string("target")?;
    check_target(kind, &target)?;
    let interval = f.number("interval", 60, 1..=86_400, " of seconds")?;
    let timeout = f.number("timeout", interval.min(10), 1..=300, " of seconds")?;
    if timeout > interval {
        return Err(ServiceError::unprocessable(format!(
            "timeout: {timeout} s is longer than the interval ({interval} s); a check must end before the next begins"
        )));
    }
    let locations = parse_locations(f.take("locations"))?;
    let most = locations.len() as u32;
    let min_failing_locations = f.number("min_failing_locations", 1, 1..=most, "")?;
    let failure_threshold = f.number("failure_threshold", 3, 1..=100, "")?;
    let success_threshold = f.number("success_threshold", 2, 1..=100, "")?;
    let conditions = parse_conditions(kind, f.take("conditions"))?;
    let mut options = CheckOptions::default();
    for (field, own) in [
        ("http", CheckKind::Http),
        ("tcp", CheckKind::Tcp),
        ("icmp", CheckKind::Icmp),
        ("dns", CheckKind::Dns),
    ] {
        let value = f.take(field);
        if own != kind {
            if value.is_some() {
                return Err(ServiceError::unprocessable(format!(
                    "{field}: options of {field} checks, but this is a {} check",
                    kind.as_str()
                )));
            }
            continue;
        }
        match kind {
            CheckKind::Http => {
                options.http = value.map(http_options).transpose()?.unwrap_or_default()
            }
            CheckKind::Tcp => options.tcp = value.map(tcp_options).transpose()?.unwrap_or_default(),
            CheckKind::Icmp => {
                options.icmp = value.map(icmp_options).transpose()?.unwrap_or_default()
            }
            CheckKind::Dns => options.dns = dns_options(value)?,
        }
    }
    f.finish()?;
    Ok(EndpointConfig {
        name,
        kind,
        target,
        interval,
        timeout,
        locations,
        min_failing_locations,
        failure_threshold,
        success_threshold,
        conditions,
        options,
    })
}

fn endpoint_json(e: &Endpoint) -> Value {
    let c = &e.config;
    let mut out = json!({
        "id": e.id,
        "name": c.name,
        "kind": c.kind.as_str(),
        "target": c.target,
        "interval": c.interval,
        "timeout": c.timeout,
        "locations": c.locations,
        "min_failing_locations": c.min_failing_locations,
        "failure_threshold": c.failure_threshold,
        "success_threshold": c.success_threshold,
        "conditions": c.conditions,
        "status": e.status.as_str(),
        "status_changed_at": time(e.status_changed_at),
        "incident": e.incident.as_ref().map(|i| json!({
            "id": i.id,
            "started_at": time(i.started_at),
            "muted": i.muted,
        })),
        "created_at": time(e.created_at),
        "updated_at": time(e.updated_at),
    });
    let options = match c.kind {
        CheckKind::Http => serde_json::to_value(&c.options.http),
        CheckKind::Tcp => serde_json::to_value(&c.options.tcp),
        CheckKind::Icmp => serde_json::to_value(&c.options.icmp),
        CheckKind::Dns => serde_json::to_value(&c.options.dns),
    };
    out[c.kind.as_str()] = options.unwrap_or_default();
    out
}

fn state_json(s: &LocationState) -> Value {
    json!({
        "location": s.location,
        "state": s.state.as_str(),
        "consecutive_failures": s.failures,
        "consecutive_successes": s.successes,
        "last_checked_at": opt_time(s.last_checked_at),
        "agent_id": s.agent_id,
        "certificate_expires_at": opt_time(s.last_result.as_ref().and_then(|r| r.tls.certificate_expires_at)),
        "last_result": s.last_result.as_ref().map(|r| serde_json::to_value(r).unwrap_or_default()),
    })
}

fn detail_json(d: &EndpointDetail) -> Value {
    let mut out = endpoint_json(&d.endpoint);
    out["location_states"] = d.locations.iter().map(state_json).collect();
    out["uptime"] = json!({
        "24h": d.uptime.day,
        "7d": d.uptime.week,
        "30d": d.uptime.month,
    });
    out
}

/// The error of a store refusing an endpoint: a conflict is its name.
fn name_taken(e: crate::store::StoreError, config: &EndpointConfig) -> ServiceError {
    conflict(
        e,
        format!(
            "endpoint '{}' already exists in this organization",
            config.name
        ),
    )
}

/// Create an endpoint to monitor (workspace admins)
#[utoipa::path(
    post,
    path = "/api/v1/endpoints/",
    tag = "monitoring",
    request_body = openapi::EndpointBody,
    responses(
        (status = 201, description = "created", body = openapi::Endpoint),
        (status = 400, description = "the body is not JSON, or holds a NUL character", body = openapi::Problem),
        (status = 403, description = "only workspace admins change endpoints", body = openapi::Problem),
        (status = 409, description = "an endpoint of that name exists in the organization", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "a field is missing or not valid; the answer names it (a condition, its index and column)", body = openapi::Problem),
    ),
)]
async fn create_endpoint(
    axum::extract::State(state): State,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::WorkspaceAdmin, "create endpoints")?;
    let config = parse_endpoint(json_body(body)?)?;
    let now = Utc::now();
    let endpoint = state
        .store
        .create_endpoint(caller.identity.org_id, &config, now)
        .await
        .map_err(|e| name_taken(e, &config))?;
    tracing::info!(endpoint_id = %endpoint.id, endpoint = %config.name, by = %caller.identity.name, "endpoint created");
    Ok((StatusCode::CREATED, Json(endpoint_json(&endpoint))))
}

/// Replace an endpoint's configuration (workspace admins)
///
/// Its state is kept where its locations are.
#[utoipa::path(
    put,
    path = "/api/v1/endpoints/{id}/",
    tag = "monitoring",
    params(("id" = Uuid, Path, description = "the endpoint's id")),
    request_body = openapi::EndpointBody,
    responses(
        (status = 200, description = "changed", body = openapi::Endpoint),
        (status = 400, description = "the body is not JSON, or holds a NUL character", body = openapi::Problem),
        (status = 403, description = "only workspace admins change endpoints", body = openapi::Problem),
        (status = 404, description = "no such endpoint the caller may see", body = openapi::Problem),
        (status = 409, description = "another endpoint of that name exists in the organization", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "a field is missing or not valid; the answer names it (a condition, its index and column)", body = openapi::Problem),
    ),
)]
async fn update_endpoint(
    axum::extract::State(state): State,
    Extension(m): Extension<Monitoring>,
    caller: Caller,
    Path(id): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Value>> {
    caller.require(Role::WorkspaceAdmin, "change endpoints")?;
    let id = parse_id(&id, "endpoint")?;
    let config = parse_endpoint(json_body(body)?)?;
    let now = Utc::now();
    let endpoint = state
        .store
        .update_endpoint(caller.scope(), id, &config, now)
        .await
        .map_err(|e| name_taken(e, &config))?
        .ok_or_else(|| ServiceError::not_found(format!("endpoint '{id}' not found")))?;
    // A change of locations may end an incident: its resolve goes out now.
    m.outbox.notify_one();
    tracing::info!(endpoint_id = %id, by = %caller.identity.name, "endpoint changed");
    Ok(Json(endpoint_json(&endpoint)))
}

/// Delete an endpoint, with its results (workspace admins)
#[utoipa::path(
    delete,
    path = "/api/v1/endpoints/{id}/",
    tag = "monitoring",
    params(("id" = Uuid, Path, description = "the endpoint's id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 403, description = "only workspace admins delete endpoints", body = openapi::Problem),
        (status = 404, description = "no such endpoint the caller may see", body = openapi::Problem),
    ),
)]
async fn delete_endpoint(
    axum::extract::State(state): State,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::WorkspaceAdmin, "delete endpoints")?;
    let id = parse_id(&id, "endpoint")?;
    if state.store.delete_endpoint(caller.scope(), id).await? {
        tracing::info!(endpoint_id = %id, by = %caller.identity.name, "endpoint deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ServiceError::not_found(format!(
            "endpoint '{id}' not found"
        )))
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/endpoints/",
    tag = "monitoring",
    summary = "The monitored endpoints the caller sees, with their status",
    params(PageQuery),
    responses(
        (status = 200, description = "one page of endpoints", body = openapi::Paginated<openapi::Endpoint>),
        (status = 400, description = "page or page_size is not valid", body = openapi::Problem),
    ),
)]
async fn list_endpoints(
    axum::extract::State(state): State,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let page = page_of(&q)?;
    let (count, endpoints) = state.store.list_endpoints(caller.scope(), page).await?;
    Ok(Json(paginated(
        &uri,
        &headers,
        page,
        count,
        endpoints.iter().map(endpoint_json).collect(),
    )))
}

#[utoipa::path(
    get,
    path = "/api/v1/endpoints/{id}/",
    tag = "monitoring",
    summary = "An endpoint with its state at each location and its uptime",
    params(("id" = Uuid, Path, description = "the endpoint's id")),
    responses(
        (status = 200, description = "the endpoint", body = openapi::EndpointDetail),
        (status = 404, description = "no such endpoint the caller may see", body = openapi::Problem),
    ),
)]
async fn get_endpoint(
    axum::extract::State(state): State,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "endpoint")?;
    let detail = state
        .store
        .endpoint_detail(caller.scope(), id, Utc::now())
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("endpoint '{id}' not found")))?;
    Ok(Json(detail_json(&detail)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// Only the results from this location.
    location: Option<String>,
    /// Only results checked at or after this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    since: Option<String>,
    /// Only results checked before this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    until: Option<String>,
    #[serde(flatten)]
    #[param(ignore)]
    page: PageQuery,
}

fn query_time(field: &str, value: &Option<String>) -> ApiResult<Option<DateTime<Utc>>> {
    value
        .as_deref()
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ServiceError::bad_request(format!(
                        "{field}: expected an RFC 3339 time such as 2025-01-31T12:00:00Z, found {v:?}"
                    ))
                })
        })
        .transpose()
}

fn stored_result_json(r: &StoredResult) -> Value {
    let mut out = serde_json::to_value(&r.result).unwrap_or_default();
    out["location"] = Value::String(r.location.clone());
    out["agent_id"] = json!(r.agent_id);
    out["received_at"] = Value::String(time(r.received_at));
    out
}

/// The endpoint's results, newest first (`location`, `since`, `until`
/// filter them).
#[utoipa::path(
    get,
    path = "/api/v1/endpoints/{id}/results/",
    tag = "monitoring",
    params(("id" = Uuid, Path, description = "the endpoint's id"), ResultsQuery, PageQuery),
    responses(
        (status = 200, description = "one page of results", body = openapi::Paginated<openapi::StoredResult>),
        (status = 400, description = "page, page_size, since or until is not valid", body = openapi::Problem),
        (status = 404, description = "no such endpoint the caller may see", body = openapi::Problem),
    ),
)]
async fn list_results(
    axum::extract::State(state): State,
    caller: Caller,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "endpoint")?;
    let page = page_of(&q.page)?;
    let filter = ResultFilter {
        location: q.location.clone(),
        since: query_time("since", &q.since)?,
        until: query_time("until", &q.until)?,
    };
    let (count, results) = state
        .store
        .list_results(caller.scope(), id, &filter, page)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("endpoint '{id}' not found")))?;
    Ok(Json(paginated(
        &uri,
        &headers,
        page,
        count,
        results.iter().map(stored_result_json).collect(),
    )))
}

// ---- notifiers ----------------------------------------------------------

fn notifier_json(n: &Notifier) -> Value {
    json!({ "id": n.id, "kind": n.kind, "url": n.url, "created_at": time(n.created_at) })
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNotifierBody {
    #[schema(value_type = openapi::NotifierKind)]
    kind: String,
    /// An `http://` or `https://` URL: alerts and resolves are posted to it
    /// as JSON.
    #[schema(max_length = 2048)]
    url: String,
}

/// Create a notifier, a webhook for alerts (workspace admins)
#[utoipa::path(
    post,
    path = "/api/v1/notifiers/",
    tag = "monitoring",
    request_body = NewNotifierBody,
    responses(
        (status = 201, description = "created", body = openapi::Notifier),
        (status = 400, description = "the body is not JSON, or holds a NUL character", body = openapi::Problem),
        (status = 403, description = "only workspace admins create notifiers", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "a field is missing or not valid; the answer names it", body = openapi::Problem),
    ),
)]
async fn create_notifier(
    axum::extract::State(state): State,
    Extension(m): Extension<Monitoring>,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::WorkspaceAdmin, "create notifiers")?;
    let body: NewNotifierBody = json_body(body)?;
    if body.kind != "webhook" {
        return Err(ServiceError::unprocessable(format!(
            "kind: expected \"webhook\" (the only kind so far), found {:?}",
            body.kind
        )));
    }
    let url_ok = body.url.len() <= 2048
        && body.url.parse::<axum::http::Uri>().is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty())
        });
    if !url_ok {
        return Err(ServiceError::unprocessable(format!(
            "url: expected an http:// or https:// URL of at most 2048 characters, found {:?}",
            body.url
        )));
    }
    if let Err(why) = m.settings.webhooks.check_url(&body.url) {
        return Err(ServiceError::unprocessable(format!("url: {why}")));
    }
    let notifier = state
        .store
        .create_notifier(caller.identity.org_id, &body.kind, &body.url)
        .await?;
    tracing::info!(notifier_id = %notifier.id, by = %caller.identity.name, "notifier created");
    Ok((StatusCode::CREATED, Json(notifier_json(&notifier))))
}

#[utoipa::path(
    get,
    path = "/api/v1/notifiers/",
    tag = "monitoring",
    summary = "The notifiers of the caller's organization (workspace admins: their URLs may hold secrets)",
    responses(
        (status = 200, description = "the notifiers, on one page", body = openapi::Paginated<openapi::Notifier>),
        (status = 403, description = "only workspace admins see notifiers", body = openapi::Problem),
    ),
)]
async fn list_notifiers(
    axum::extract::State(state): State,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    // Webhook URLs often carry a secret: only those who may change them see them.
    caller.require(Role::WorkspaceAdmin, "list notifiers")?;
    let notifiers = state.store.list_notifiers(caller.scope()).await?;
    Ok(Json(listing(notifiers.iter().map(notifier_json).collect())))
}

#[utoipa::path(
    delete,
    path = "/api/v1/notifiers/{id}/",
    tag = "monitoring",
    summary = "Delete a notifier (workspace admins)",
    params(("id" = Uuid, Path, description = "the notifier's id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 403, description = "only workspace admins delete notifiers", body = openapi::Problem),
        (status = 404, description = "no such notifier the caller may see", body = openapi::Problem),
    ),
)]
async fn delete_notifier(
    axum::extract::State(state): State,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::WorkspaceAdmin, "delete notifiers")?;
    let id = parse_id(&id, "notifier")?;
    if state.store.delete_notifier(caller.scope(), id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ServiceError::not_found(format!(
            "notifier '{id}' not found"
        )))
    }
}

// ---- maintenance windows ------------------------------------------------

fn window_json(w: &MaintenanceWindow) -> Value {
    json!({
        "id": w.id,
        "start": time(w.starts_at),
        "end": time(w.ends_at),
        "endpoint_ids": w.endpoint_ids,
        "reason": w.reason,
        "created_at": time(w.created_at),
    })
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWindowBody {
    start: DateTime<Utc>,
    /// After the start, and not past.
    end: DateTime<Utc>,
    /// Absent or empty: every endpoint of the organization, and its agents.
    #[serde(default)]
    #[schema(max_items = 100)]
    endpoint_ids: Vec<Uuid>,
    /// At most 1024 bytes.
    #[schema(max_length = 1024)]
    reason: Option<String>,
}

/// Refuses a time RFC 3339 cannot write (a year before 0 or after 9999),
/// which serde reads nonetheless: PostgreSQL cannot store the earliest of
/// them, and no window needs one.
fn within_rfc3339(field: &str, t: DateTime<Utc>) -> ApiResult<()> {
    if (0..=9999).contains(&t.year()) {
        Ok(())
    } else {
        Err(ServiceError::unprocessable(format!(
            "{field}: expected a time from year 0 to 9999, found {}",
            time(t)
        )))
    }
}

/// Create a maintenance window (workspace admins)
///
/// Incidents that open during it are muted: no alert, no resolve.
#[utoipa::path(
    post,
    path = "/api/v1/maintenance-windows/",
    tag = "monitoring",
    request_body = NewWindowBody,
    responses(
        (status = 201, description = "created", body = openapi::MaintenanceWindow),
        (status = 400, description = "the body is not JSON, or holds a NUL character", body = openapi::Problem),
        (status = 403, description = "only workspace admins create maintenance windows", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "a field is missing or not valid (an end before the start or past, an endpoint not in the organization); the answer names it", body = openapi::Problem),
    ),
)]
async fn create_window(
    axum::extract::State(state): State,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::WorkspaceAdmin, "create maintenance windows")?;
    let body: NewWindowBody = json_body(body)?;
    let now = Utc::now();
    within_rfc3339("start", body.start)?;
    within_rfc3339("end", body.end)?;
    if body.end <= body.start {
        return Err(ServiceError::unprocessable(format!(
            "end: {} is not after start ({})",
            time(body.end),
            time(body.start)
        )));
    }
    if body.end <= now {
        return Err(ServiceError::unprocessable(format!(
            "end: {} has passed already",
            time(body.end)
        )));
    }
    if body.reason.as_ref().is_some_and(|r| r.len() > 1024) {
        return Err(ServiceError::unprocessable(
            "reason: at most 1024 characters",
        ));
    }
    if body.endpoint_ids.len() > MAX_WINDOW_ENDPOINTS {
        return Err(ServiceError::unprocessable(format!(
            "endpoint_ids: at most {MAX_WINDOW_ENDPOINTS} (leave it out to cover every endpoint)"
        )));
    }
    let mut ids = BTreeSet::new();
    for (i, id) in body.endpoint_ids.iter().enumerate() {
        let known = state
            .store
            .endpoint_detail(caller.scope(), *id, now)
            .await?
            .is_some_and(|d| d.endpoint.org_id == caller.identity.org_id);
        if !known {
            return Err(ServiceError::unprocessable(format!(
                "endpoint_ids[{i}]: no endpoint '{id}' in this organization"
            )));
        }
        ids.insert(*id);
    }
    let window = state
        .store
        .create_maintenance_window(NewMaintenanceWindow {
            org_id: caller.identity.org_id,
            starts_at: body.start,
            ends_at: body.end,
            endpoint_ids: ids.into_iter().collect(),
            reason: body.reason,
            created_by: caller.identity.id,
        })
        .await?;
    tracing::info!(window_id = %window.id, by = %caller.identity.name, "maintenance window created");
    Ok((StatusCode::CREATED, Json(window_json(&window))))
}

#[utoipa::path(
    get,
    path = "/api/v1/maintenance-windows/",
    tag = "monitoring",
    summary = "The maintenance windows of the caller's organization",
    responses(
        (status = 200, description = "the maintenance windows, on one page", body = openapi::Paginated<openapi::MaintenanceWindow>),
    ),
)]
async fn list_windows(
    axum::extract::State(state): State,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    let windows = state.store.list_maintenance_windows(caller.scope()).await?;
    Ok(Json(listing(windows.iter().map(window_json).collect())))
}

#[utoipa::path(
    delete,
    path = "/api/v1/maintenance-windows/{id}/",
    tag = "monitoring",
    summary = "Delete a maintenance window (workspace admins)",
    params(("id" = Uuid, Path, description = "the maintenance window's id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 403, description = "only workspace admins delete maintenance windows", body = openapi::Problem),
        (status = 404, description = "no such maintenance window the caller may see", body = openapi::Problem),
    ),
)]
async fn delete_window(
    axum::extract::State(state): State,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::WorkspaceAdmin, "delete maintenance windows")?;
    let id = parse_id(&id, "maintenance window")?;
    if state
        .store
        .delete_maintenance_window(caller.scope(), id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ServiceError::not_found(format!(
            "maintenance window '{id}' not found"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Value {
        json!({
            "name": "web", "kind": "http", "target": "http://127.0.0.1:8000/",
            "interval": 5, "timeout": 2, "locations": ["site-a"],
            "min_failing_locations": 1, "failure_threshold": 3, "success_threshold": 2,
            "conditions": ["[STATUS] == 200", {"condition": "[RESPONSE_TIME] < 300", "degrades": true}]
        })
    }

    fn refused(change: impl FnOnce(&mut Value)) -> String {
        let mut body = valid();
        change(&mut body);
        let error = parse_endpoint(body).expect_err("refused");
        assert_eq!(error.code, Code::Unprocessable, "{}", error.message);
        error.message
    }

    #[test]
    fn the_issue_example_parses() {
        let config = parse_endpoint(valid()).unwrap();
        assert_eq!(config.kind, CheckKind::Http);
        assert_eq!(config.conditions.len(), 2);
        assert!(config.conditions[1].degrades);
        assert_eq!(config.locations, ["site-a"]);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = parse_endpoint(json!({
            "name": "dns", "kind": "dns", "target": "127.0.0.1:5353",
            "locations": ["b", "a"], "dns": {"name": "example.org"}
        }))
        .unwrap();
        assert_eq!((config.interval, config.timeout), (60, 10));
        assert_eq!((config.failure_threshold, config.success_threshold), (3, 2));
        assert_eq!(config.locations, ["a", "b"]);
        assert_eq!(config.options.dns.query_type, "A");
    }

    #[test]
    fn errors_name_the_field() {
        for (change, words) in [
            (
                Box::new(|b: &mut Value| b["kind"] = json!("smtp")) as Box<dyn FnOnce(&mut Value)>,
                "kind: expected one of",
            ),
            (
                Box::new(|b| b["interval"] = json!("5")),
                "interval: expected a whole number",
            ),
            (
                Box::new(|b| b["timeout"] = json!(10)),
                "timeout: 10 s is longer",
            ),
            (
                Box::new(|b| b["locations"] = json!([])),
                "locations: required",
            ),
            (
                Box::new(|b| b["locations"] = json!(["a", "a"])),
                "locations[1]",
            ),
            (
                Box::new(|b| b["locations"] = json!(["bad location"])),
                "locations[0]",
            ),
            (
                Box::new(|b| b["min_failing_locations"] = json!(2)),
                "min_failing_locations",
            ),
            (
                Box::new(|b| b["target"] = json!("ftp://x/")),
                "target: expected an http",
            ),
            (
                Box::new(|b| b["intervall"] = json!(5)),
                "intervall: unknown field",
            ),
            (
                Box::new(|b| b["tcp"] = json!({})),
                "tcp: options of tcp checks",
            ),
            (
                Box::new(|b| b["http"] = json!({"method": "G T"})),
                "http.method",
            ),
            (
                Box::new(|b| b["http"] = json!({"follow": true})),
                "http.follow: unknown field",
            ),
            (
                Box::new(|b| {
                    b.as_object_mut().unwrap().remove("name");
                }),
                "name: required",
            ),
        ] {
            let message = refused(change);
            assert!(message.contains(words), "{message} (expected {words:?})");
        }
    }

    #[test]
    fn invalid_conditions_name_their_index_and_column() {
        let message = refused(|b| b["conditions"] = json!(["[STATUS] == 200", "[STATUS] = 200"]));
        assert!(
            message.starts_with("conditions[1]: column 10:"),
            "{message}"
        );
        let message = refused(|b| {
            b["kind"] = json!("tcp");
            b["target"] = json!("127.0.0.1:80");
            b["conditions"] = json!(["[CONNECTED] == true", "[STATUS] == 200"]);
        });
        assert!(
            message.contains("conditions[1]: [STATUS] is not measured by tcp checks"),
            "{message}"
        );
        let message = refused(|b| {
            b["conditions"] = json!([{"condition": "[STATUS] == 200", "degrade": true}])
        });
        assert!(
            message.contains("conditions[0].degrade: unknown field"),
            "{message}"
        );
    }

    #[test]
    fn targets_are_checked_per_kind() {
        assert!(check_target(CheckKind::Tcp, "db.internal:5432").is_ok());
        assert!(check_target(CheckKind::Tcp, "[::1]:22").is_ok());
        assert!(check_target(CheckKind::Tcp, "db.internal").is_err());
        assert!(check_target(CheckKind::Tcp, "db:0").is_err());
        assert!(check_target(CheckKind::Dns, "10.0.0.53").is_ok());
        assert!(check_target(CheckKind::Dns, "10.0.0.53:5353").is_ok());
        assert!(check_target(CheckKind::Icmp, "127.0.0.1").is_ok());
        assert!(check_target(CheckKind::Icmp, "::1").is_ok());
        assert!(check_target(CheckKind::Icmp, "host:1").is_err());
        assert!(check_target(CheckKind::Http, "https://example.org/health").is_ok());
        assert!(check_target(CheckKind::Http, "example.org").is_err());
    }

    #[test]
    fn etags_match_with_quotes_lists_and_weak_tags() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("W/\"abc\", \"def\""),
        );
        assert!(none_match(&headers, "\"abc\""));
        assert!(none_match(&headers, "\"def\""));
        assert!(!none_match(&headers, "\"xyz\""));
        assert!(!none_match(&HeaderMap::new(), "\"abc\""));
    }

    #[test]
    fn locations_look_like_names() {
        assert!(is_valid_location("site-a"));
        assert!(is_valid_location("fra1.dc_2"));
        assert!(!is_valid_location("-a"));
        assert!(!is_valid_location("a b"));
        assert!(!is_valid_location(""));
        assert!(!is_valid_location(&"a".repeat(64)));
    }
}
