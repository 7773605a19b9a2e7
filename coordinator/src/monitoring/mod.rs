//! Endpoint monitoring (issue 6), the coordinator's side: agents and their
//! tokens, the endpoints they check, the state those checks put each
//! endpoint in, and the notifications that tell people about it.
//!
//! - [`api`]: the HTTP routes, for people (`/api/v1/agents/`,
//!   `/api/v1/endpoints/`, `/api/v1/notifiers/`,
//!   `/api/v1/maintenance-windows/`) and for agents (`/api/v1/agent/…`, agent
//!   token only). The wire types agents use are `muster_common::monitor`.
//! - [`eval`]: the rules that turn check results into a state per location
//!   and a status per endpoint, and open or end incidents. They are pure:
//!   the store runs them inside the transaction that stores the results, so
//!   several coordinators on one database never evaluate one endpoint from
//!   two different pasts.
//! - [`notify`]: the webhook payloads and the task that delivers them from
//!   the store's outbox (claimed with a lease, retried with backoff).
//!
//! Background tasks, safe to run on every coordinator at once: the agent
//! silence watcher (a conditional update claims each silent agent once), the
//! outbox delivery (leases), and the pruning of old results (idempotent).
//!
//! Decisions the issue left open:
//! - A location's state: a `down` verdict counts towards `failure_threshold`
//!   consecutive failures before the location is `down`; leaving `down` takes
//!   `success_threshold` consecutive results that are not `down`. Outside
//!   `down`, an `up` or `degraded` verdict shows at once. A location with no
//!   result yet is `unknown`, and stays so while its first failures are
//!   still below the threshold.
//! - Several agents may share a location: their results feed one state. A
//!   location turns `unknown` when its last live agent goes silent (or is
//!   revoked), not before.
//! - An incident opens when the endpoint becomes `down`, and ends when it is
//!   `up` or `degraded` with no location `down` any more. An agent going
//!   silent never ends one: a location without data has not recovered.
//! - A maintenance window mutes the incidents that open during it (their
//!   alert and their resolve message); an incident open before the window
//!   still sends its resolve. A window without endpoint ids covers every
//!   endpoint of the organization and its agents' silence alerts.
//! - Revoking an agent turns its location `unknown` like silence does (no
//!   other live agent there), but may end an incident, and sends no agent
//!   message: it is an operator's act, not an event to be told about.
//! - Uptime is the share of checks, over all locations, whose verdict was
//!   not `down`, over the last 24 hours, 7 days and 30 days (`null` with no
//!   checks in that time).

pub mod api;
pub mod destination;
pub mod eval;
pub mod notify;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use muster_common::monitor::{
    CheckKind, CheckResult, ConditionSpec, DnsOptions, EndpointSpec, HttpOptions, IcmpOptions,
    TcpOptions, Verdict,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::store::Store;

/// How long an agent may go without a heartbeat before it is silent, unless
/// configured otherwise: three heartbeats of an agent that sends one every
/// 10 s.
pub const DEFAULT_AGENT_SILENCE: Duration = Duration::from_secs(30);

/// Most results one `POST /api/v1/agent/results/` may carry.
pub const MAX_BATCH: usize = 1000;

/// The status of an endpoint, and the state of an endpoint at one location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Up,
    Degraded,
    Down,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Degraded => "degraded",
            Status::Down => "down",
            Status::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "up" => Status::Up,
            "degraded" => Status::Degraded,
            "down" => Status::Down,
            "unknown" => Status::Unknown,
            _ => return None,
        })
    }
}

/// `http`, `tcp`, `icmp` or `dns` (the wire names of `CheckKind`).
pub fn parse_kind(s: &str) -> Option<CheckKind> {
    [
        CheckKind::Http,
        CheckKind::Tcp,
        CheckKind::Icmp,
        CheckKind::Dns,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

/// A verdict's wire name, as results are stored and counted.
pub fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Up => "up",
        Verdict::Degraded => "degraded",
        Verdict::Down => "down",
    }
}

/// A new agent, with the hash of the token it was given.
#[derive(Debug, Clone)]
pub struct NewAgent {
    pub org_id: Uuid,
    pub name: String,
    pub location: String,
    pub prefix: String,
    pub token_hash: String,
    pub created_by: Uuid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub location: String,
    /// The token's non-secret beginning (`agt_AbC1…`).
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// From its last heartbeat.
    pub version: Option<String>,
    pub endpoints_version: Option<String>,
    pub buffered_results: i64,
    pub checks_per_minute: f64,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When it last delivered results.
    pub last_report_at: Option<DateTime<Utc>>,
    /// Since when it is known silent (its alert was raised then); cleared by
    /// its next heartbeat.
    pub silent_since: Option<DateTime<Utc>>,
    /// The endpoints of its organization assigned to its location.
    pub endpoint_count: i64,
}

/// Options of every kind of check; only the endpoint's kind's are used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckOptions {
    pub http: HttpOptions,
    pub tcp: TcpOptions,
    pub icmp: IcmpOptions,
    pub dns: DnsOptions,
}

/// What a user configures on an endpoint (validated by the API).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub name: String,
    pub kind: CheckKind,
    pub target: String,
    /// Seconds.
    pub interval: u32,
    /// Seconds.
    pub timeout: u32,
    /// Sorted, without duplicates.
    pub locations: Vec<String>,
    pub min_failing_locations: u32,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub conditions: Vec<ConditionSpec>,
    pub options: CheckOptions,
}

/// An endpoint that is down, from when, and whether its messages are muted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    /// It opened during a maintenance window: no alert, no resolve.
    pub muted: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub id: Uuid,
    pub org_id: Uuid,
    pub config: EndpointConfig,
    pub status: Status,
    pub status_changed_at: DateTime<Utc>,
    pub incident: Option<Incident>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Endpoint {
    /// The endpoint as agents check it.
    pub fn spec(&self) -> EndpointSpec {
        let c = &self.config;
        EndpointSpec {
            id: self.id,
            name: c.name.clone(),
            kind: c.kind,
            target: c.target.clone(),
            interval: c.interval,
            timeout: c.timeout,
            conditions: c.conditions.clone(),
            http: c.options.http.clone(),
            tcp: c.options.tcp.clone(),
            icmp: c.options.icmp.clone(),
            dns: c.options.dns.clone(),
        }
    }
}

/// An endpoint's state at one location, from the results reported there.
#[derive(Debug, Clone, PartialEq)]
pub struct LocationState {
    pub location: String,
    pub state: Status,
    /// Consecutive `down` verdicts.
    pub failures: u32,
    /// Consecutive verdicts that were not `down`.
    pub successes: u32,
    /// The newest result applied; older ones arriving later are history only.
    pub last_checked_at: Option<DateTime<Utc>>,
    pub last_result: Option<CheckResult>,
    /// The agent that reported it.
    pub agent_id: Option<Uuid>,
}

impl LocationState {
    pub fn unknown(location: &str) -> LocationState {
        LocationState {
            location: location.to_owned(),
            state: Status::Unknown,
            failures: 0,
            successes: 0,
            last_checked_at: None,
            last_result: None,
            agent_id: None,
        }
    }
}

/// Share of checks not `down`, in percent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Uptime {
    pub day: Option<f64>,
    pub week: Option<f64>,
    pub month: Option<f64>,
}

/// An endpoint with its state at each location and its uptime.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointDetail {
    pub endpoint: Endpoint,
    pub locations: Vec<LocationState>,
    pub uptime: Uptime,
}

/// A stored check result and who reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub agent_id: Uuid,
    pub location: String,
    pub received_at: DateTime<Utc>,
    pub result: CheckResult,
}

#[derive(Debug, Clone, Default)]
pub struct ResultFilter {
    pub location: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// A result the store would not take, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub result_id: Uuid,
    pub endpoint_id: Uuid,
    pub reason: String,
}

/// What storing a batch of results did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Stored now.
    pub stored: usize,
    /// Stored before (a replayed batch).
    pub duplicates: usize,
    pub refused: Vec<Refused>,
    /// Notifications queued (alerts and resolves, once per notifier).
    pub notifications: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    pub id: Uuid,
    pub org_id: Uuid,
    /// `webhook`, the only kind so far.
    pub kind: String,
    pub url: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewMaintenanceWindow {
    pub org_id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// Empty: every endpoint of the organization, and its agents.
    pub endpoint_ids: Vec<Uuid>,
    pub reason: Option<String>,
    pub created_by: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    pub id: Uuid,
    pub org_id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub endpoint_ids: Vec<Uuid>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl MaintenanceWindow {
    pub fn covers_endpoint(&self, id: Uuid, at: DateTime<Utc>) -> bool {
        self.starts_at <= at
            && at < self.ends_at
            && (self.endpoint_ids.is_empty() || self.endpoint_ids.contains(&id))
    }

    pub fn covers_agents(&self, at: DateTime<Utc>) -> bool {
        self.starts_at <= at && at < self.ends_at && self.endpoint_ids.is_empty()
    }
}

/// A message to deliver, claimed from the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: Uuid,
    pub notifier_id: Uuid,
    pub url: String,
    pub payload: serde_json::Value,
    /// Including the one now under way.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// How delivering a notification went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// Try again at this time.
    Retry {
        at: DateTime<Utc>,
        error: String,
    },
    GaveUp {
        error: String,
    },
}

/// The coordinator's monitoring settings, shared by the routes and the
/// background tasks.
#[derive(Debug, Clone)]
pub struct Settings {
    /// No heartbeat for this long: the agent is silent.
    pub agent_silence: Duration,
    /// Results older than this are deleted (and refused when reported).
    pub retention: Duration,
    /// Where webhooks may be posted.
    pub webhooks: destination::Destinations,
}

/// What the monitoring routes need beyond the API's state: the settings,
/// and the outbox's wake-up, so an alert queued here goes out at once.
#[derive(Debug, Clone)]
pub struct Monitoring {
    pub settings: Settings,
    pub outbox: Arc<Notify>,
}

/// Starts the monitoring background tasks on `tracker`; the returned
/// context goes to the HTTP routes (as an axum `Extension`).
pub fn start(
    store: Arc<dyn Store>,
    settings: Settings,
    metrics: Arc<crate::metrics::Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<Monitoring> {
    let outbox = Arc::new(Notify::new());
    let client = notify::client(settings.webhooks.clone())?;
    tracker.spawn(watch_agents(
        store.clone(),
        settings.agent_silence,
        outbox.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(notify::deliver(
        store.clone(),
        client,
        settings.webhooks.clone(),
        metrics,
        outbox.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(prune_results(store, settings.retention, shutdown));
    Ok(Monitoring { settings, outbox })
}

/// Finds agents whose heartbeats stopped, on every coordinator: each is
/// claimed by one (a conditional update in the store), which raises its
/// alert and turns its location `unknown` where no other agent checks.
async fn watch_agents(
    store: Arc<dyn Store>,
    silence: Duration,
    outbox: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let every = (silence / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    // A coordinator that just started cannot tell an agent's silence from
    // its own absence (every coordinator was down, say): agents get one
    // silence period to say they are there before any is judged.
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = tokio::time::sleep(silence) => {}
    }
    let silence = chrono::Duration::from_std(silence).unwrap_or(chrono::Duration::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = Utc::now();
        match store.mark_silent_agents(now - silence, now).await {
            Ok(agents) => {
                for agent in &agents {
                    tracing::warn!(agent_id = %agent.id, agent = %agent.name, location = %agent.location, "monitoring agent went silent");
                }
                if !agents.is_empty() {
                    outbox.notify_one();
                }
            }
            Err(error) => tracing::warn!(%error, "looking for silent agents failed"),
        }
    }
}

/// Deletes results (and delivered notifications) older than the retention,
/// in batches, every ten minutes.
async fn prune_results(store: Arc<dyn Store>, retention: Duration, shutdown: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(600);
    const BATCH: i64 = 10_000;
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    loop {
        let before = Utc::now() - retention;
        loop {
            match store.prune_results(before, BATCH).await {
                Ok(n) if n >= BATCH as u64 && !shutdown.is_cancelled() => continue,
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(deleted = n, "old check results pruned");
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "pruning old check results failed");
                    break;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}
