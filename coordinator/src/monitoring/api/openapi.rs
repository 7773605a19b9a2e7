//! The schemas of the monitoring routes' JSON, for the OpenAPI document
//! (`crate::api::openapi` completes it). The answers are built with
//! `json!`; these types describe them and are never built, and
//! `response_schema_conformance` in the schemathesis test holds the two
//! together. The agents' wire types (`muster_common::monitor`) describe
//! themselves.
//!
//! A request schema here may be looser than the route, never stricter: the
//! schemathesis test sends what a schema forbids and expects a refusal. So
//! every optional field of an endpoint is nullable (the route reads `null`
//! as absent), and what a schema cannot say (a quorum no larger than the
//! list of locations, options only of the endpoint's kind) the route checks.

#![allow(dead_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use muster_common::monitor::{
    CheckKind, CheckResult, ConditionSpec, DnsOptions, HttpOptions, IcmpOptions, TcpOptions,
};
use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, Type};
use utoipa::ToSchema;
use uuid::Uuid;

pub(super) use crate::api::openapi::{Paginated, Problem};

/// The pattern of a location (`is_valid_location`).
const LOCATION_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$";

/// A location: a letter or digit, then up to 62 letters, digits, '.', '_'
/// or '-'.
pub(super) fn location_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(LOCATION_PATTERN))
        .build()
}

/// An endpoint's locations: at least one, each once.
fn locations_schema() -> utoipa::openapi::schema::Array {
    ArrayBuilder::new()
        .items(location_schema())
        .min_items(Some(1))
        .max_items(Some(super::MAX_LOCATIONS))
        .unique_items(true)
        .build()
}

// ---- requests ----

/// An endpoint as it is created or replaced. Fields left out (or `null`)
/// take their defaults; unknown fields are refused.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointBody {
    /// 1 to 128 characters, no control characters; unique in the organization.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    kind: CheckKind,
    /// An `http://` or `https://` URL (http), `host:port` (tcp), the DNS
    /// server as `host` or `host:port` (dns), a host or address (icmp).
    #[schema(max_length = 2048)]
    target: String,
    /// Seconds between checks; 60 unless given.
    #[schema(minimum = 1, maximum = 86400)]
    interval: Option<u32>,
    /// Seconds a check may take, at most the interval; 10 (or the interval)
    /// unless given.
    #[schema(minimum = 1, maximum = 300)]
    timeout: Option<u32>,
    /// The locations whose agents check it.
    #[schema(schema_with = locations_schema)]
    locations: Vec<String>,
    /// How many locations must be down for the endpoint to be; 1 unless
    /// given, at most the number of locations.
    #[schema(minimum = 1, maximum = 32)]
    min_failing_locations: Option<u32>,
    /// Consecutive failures before a location is down; 3 unless given.
    #[schema(minimum = 1, maximum = 100)]
    failure_threshold: Option<u32>,
    /// Consecutive successes before a down location is up again; 2 unless given.
    #[schema(minimum = 1, maximum = 100)]
    success_threshold: Option<u32>,
    /// Conditions every check is held to (`[STATUS] == 200`); each measured
    /// by the endpoint's kind of check.
    #[schema(max_items = 32)]
    conditions: Option<Vec<ConditionItem>>,
    /// Options of an http check.
    http: Option<HttpCheckOptions>,
    /// Options of a tcp check.
    tcp: Option<TcpCheckOptions>,
    /// Options of an icmp check.
    icmp: Option<IcmpCheckOptions>,
    /// Options of a dns check: required for one.
    dns: Option<DnsCheckOptions>,
}

/// A condition: its text, or the text and whether failing it only degrades
/// the endpoint.
#[derive(ToSchema)]
#[serde(untagged)]
pub(super) enum ConditionItem {
    Text(String),
    Object(ConditionBody),
}

#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ConditionBody {
    condition: String,
    /// Failing it makes the endpoint `degraded`, not `down`; false unless given.
    degrades: Option<bool>,
}

#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpCheckOptions {
    /// `GET` unless given.
    #[schema(pattern = "^[A-Za-z]{0,16}$")]
    method: Option<String>,
    /// Request headers, as an object of names and values or as
    /// `[name, value]` pairs; at most 50.
    headers: Option<HttpHeaders>,
    /// At most 64 KiB.
    #[schema(max_length = 65536)]
    body: Option<String>,
    follow_redirects: Option<bool>,
    /// Accept certificates that do not verify; the expiry is still measured.
    insecure_tls: Option<bool>,
}

#[derive(ToSchema)]
#[serde(untagged)]
pub(super) enum HttpHeaders {
    Object(BTreeMap<String, String>),
    Pairs(Vec<(String, String)>),
}

#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TcpCheckOptions {
    /// Sent after connecting; at most 4096 bytes.
    #[schema(max_length = 4096)]
    send: Option<String>,
    /// A text the reply must contain; at most 4096 bytes.
    #[schema(max_length = 4096)]
    expect: Option<String>,
    /// A TLS handshake after connecting.
    tls: Option<bool>,
}

#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct IcmpCheckOptions {
    /// Echo requests per check; 3 unless given.
    #[schema(minimum = 1, maximum = 20)]
    count: Option<u32>,
}

#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DnsCheckOptions {
    /// The domain name to query.
    name: String,
    /// `A` unless given: `A`, `AAAA`, `CNAME`, `MX`, `TXT` or `NS`, in any case.
    #[schema(pattern = "^([Aa]|[Aa]{4}|[Cc][Nn][Aa][Mm][Ee]|[Mm][Xx]|[Tt][Xx][Tt]|[Nn][Ss])$")]
    query_type: Option<String>,
    /// An answer that must be among those returned.
    #[schema(max_length = 1024)]
    expected: Option<String>,
}

// ---- answers ----

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub(super) enum AgentStatus {
    Online,
    Offline,
    Revoked,
}

#[derive(ToSchema)]
pub(super) struct Agent {
    id: Uuid,
    name: String,
    location: String,
    /// The token's first characters, to recognise it.
    prefix: String,
    /// Online while its heartbeats arrive.
    status: AgentStatus,
    /// From its last heartbeat, as are the fields below up to `endpoints_version`.
    version: Option<String>,
    last_heartbeat_at: Option<DateTime<Utc>>,
    /// When it last delivered results.
    last_report_at: Option<DateTime<Utc>>,
    /// Since when it is known silent.
    silent_since: Option<DateTime<Utc>>,
    /// The endpoints assigned to its location.
    endpoint_count: i64,
    checks_per_minute: f64,
    buffered_results: i64,
    endpoints_version: Option<String>,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

/// A new agent: the only answer that holds its token.
#[derive(ToSchema)]
pub(super) struct CreatedAgent {
    id: Uuid,
    name: String,
    location: String,
    /// The agent's token, `agt_…`: shown this once, stored only as a hash.
    token: String,
    prefix: String,
    created_at: DateTime<Utc>,
}

/// The agent a heartbeat came from, as the coordinator knows it.
#[derive(ToSchema)]
pub(super) struct AgentSeen {
    agent_id: Uuid,
    name: String,
    location: String,
}

/// What became of a batch of results.
#[derive(ToSchema)]
pub(super) struct ResultsAccepted {
    /// Results the coordinator holds, stored now or before: the agent may
    /// drop them.
    accepted: u64,
    stored: u64,
    /// Stored before (a batch sent again).
    duplicates: u64,
    /// Results that will never be taken, and why: the agent should drop
    /// them too.
    refused: Vec<RefusedResult>,
}

#[derive(ToSchema)]
pub(super) struct RefusedResult {
    /// The result's id.
    id: Uuid,
    endpoint_id: Uuid,
    reason: String,
}

/// An endpoint's status, and its state at one location.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub(super) enum EndpointStatus {
    Up,
    Degraded,
    Down,
    Unknown,
}

#[derive(ToSchema)]
pub(super) struct Endpoint {
    id: Uuid,
    name: String,
    kind: CheckKind,
    target: String,
    interval: u32,
    timeout: u32,
    locations: Vec<String>,
    min_failing_locations: u32,
    failure_threshold: u32,
    success_threshold: u32,
    conditions: Vec<ConditionSpec>,
    status: EndpointStatus,
    status_changed_at: DateTime<Utc>,
    /// The incident while it is down.
    incident: Option<Incident>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The options of an http check (present on those only).
    http: Option<HttpOptions>,
    /// The options of a tcp check (present on those only).
    tcp: Option<TcpOptions>,
    /// The options of an icmp check (present on those only).
    icmp: Option<IcmpOptions>,
    /// The options of a dns check (present on those only).
    dns: Option<DnsOptions>,
}

#[derive(ToSchema)]
pub(super) struct Incident {
    id: Uuid,
    started_at: DateTime<Utc>,
    /// It opened during a maintenance window: no alert, no resolve.
    muted: bool,
}

/// An endpoint with its state at each location and its uptime.
#[derive(ToSchema)]
pub(super) struct EndpointDetail {
    #[serde(flatten)]
    endpoint: Endpoint,
    location_states: Vec<LocationState>,
    uptime: Uptime,
}

#[derive(ToSchema)]
pub(super) struct LocationState {
    location: String,
    state: EndpointStatus,
    consecutive_failures: u32,
    consecutive_successes: u32,
    last_checked_at: Option<DateTime<Utc>>,
    /// The agent that reported the last result.
    agent_id: Option<Uuid>,
    /// From the last result's TLS handshake.
    certificate_expires_at: Option<DateTime<Utc>>,
    last_result: Option<CheckResult>,
}

/// Percent of checks, over all locations, that were not down; null without
/// checks in that time.
#[derive(ToSchema)]
pub(super) struct Uptime {
    #[serde(rename = "24h")]
    day: Option<f64>,
    #[serde(rename = "7d")]
    week: Option<f64>,
    #[serde(rename = "30d")]
    month: Option<f64>,
}

/// A check result as stored, with who reported it.
#[derive(ToSchema)]
pub(super) struct StoredResult {
    #[serde(flatten)]
    result: CheckResult,
    location: String,
    agent_id: Uuid,
    received_at: DateTime<Utc>,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub(super) enum NotifierKind {
    Webhook,
}

#[derive(ToSchema)]
pub(super) struct Notifier {
    id: Uuid,
    kind: NotifierKind,
    /// Where the webhook's messages are posted.
    url: String,
    created_at: DateTime<Utc>,
}

#[derive(ToSchema)]
pub(super) struct MaintenanceWindow {
    id: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Empty: every endpoint of the organization, and its agents.
    endpoint_ids: Vec<Uuid>,
    reason: Option<String>,
    created_at: DateTime<Utc>,
}
