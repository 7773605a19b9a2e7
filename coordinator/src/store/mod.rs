//! The coordinator's persistent state behind one interface.
//!
//! `Store` is implemented by PostgreSQL (production; several coordinators may
//! share it) and will be by embedded SQLite. Only this module knows SQL. Every
//! query that reads tenant data takes a [`Scope`], so a request can only ever
//! see its own organization's objects.

pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use muster_common::monitor::{AgentHealth, CheckResult};
use serde::Serialize;
use uuid::Uuid;

use crate::monitoring::{
    Agent, Delivery, Endpoint, EndpointConfig, EndpointDetail, MaintenanceWindow, NewAgent,
    NewMaintenanceWindow, Notification, Notifier, RecordOutcome, ResultFilter, StoredResult,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A value the database cannot hold, such as text with a NUL character.
    #[error("the database cannot hold this value: {0}")]
    Invalid(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How stale an API key's `last_used_at` may be: a use is recorded when the
/// recorded one is at least this old. Writing it on every request made
/// every API call wait for a commit (a WAL flush on PostgreSQL) and queued
/// concurrent requests with one key behind that key's row lock.
pub const API_KEY_USE_PRECISION: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Whether a key last used at `last_used` is to be recorded as used `now`.
fn use_to_record(last_used: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    last_used.is_none_or(|at| now - at >= API_KEY_USE_PRECISION)
}

/// Which organizations a request may see: one, or all (super admins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Org(Uuid),
}

impl Scope {
    fn org(self) -> Option<Uuid> {
        match self {
            Scope::All => None,
            Scope::Org(id) => Some(id),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    User,
    WorkspaceAdmin,
    OrgAdmin,
    SuperAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::User => "user",
            Role::WorkspaceAdmin => "workspace_admin",
            Role::OrgAdmin => "org_admin",
            Role::SuperAdmin => "super_admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "user" => Role::User,
            "workspace_admin" => Role::WorkspaceAdmin,
            "org_admin" => Role::OrgAdmin,
            "super_admin" => Role::SuperAdmin,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: Uuid,
    pub org_id: Uuid,
    pub org_name: String,
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub identity_id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub identity_id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub token_hash: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub id: Uuid,
    pub org_id: Uuid,
    pub organization: String,
    pub name: String,
    pub bundle_digest: String,
    /// The parsed `muster_common::workspace::LoadedWorkspace`, as JSON.
    pub model: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Canceled,
    TimedOut,
    Lost,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Leased,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Canceled,
        RunStatus::TimedOut,
        RunStatus::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Leased => "leased",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            RunStatus::Queued | RunStatus::Leased | RunStatus::Running
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: Uuid,
    pub org_id: Uuid,
    pub organization: String,
    pub workspace_id: Uuid,
    pub workspace: String,
    pub bundle_digest: String,
    pub block: String,
    pub block_version: Option<String>,
    pub action: String,
    pub parameters: serde_json::Value,
    pub reason: Option<String>,
    pub trigger: serde_json::Value,
    pub plan: serde_json::Value,
    pub runner_labels: BTreeMap<String, String>,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub runner_id: Option<Uuid>,
    pub runner_name: Option<String>,
    pub executor: Option<String>,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub fencing_token: i64,
    pub attempt: i32,
    pub log_acked_seq: i64,
    pub created_at: DateTime<Utc>,
    pub leased_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When someone asked to cancel the run while a runner held it.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Attempts the run may take when runners are lost (1 + the action's retries).
    pub max_attempts: i32,
    /// The action's or the trigger's timeout, in seconds.
    pub timeout_secs: Option<i64>,
    /// The current attempt's log continues after this seq.
    pub log_seq_base: i64,
    /// The runner's account of the log, and whether the stored log matched it.
    pub log_check: Option<LogCheck>,
}

/// The runner's account of a run's log at its end, checked against what
/// the coordinator stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCheck {
    pub bytes: i64,
    /// SHA-256 of the attempt's output in seq order, hex.
    pub sha256: String,
    pub verified: bool,
}

/// A file a job left in its artifacts directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Relative to the block's artifacts directory.
    pub path: String,
    pub size: i64,
    pub sha256: String,
}

/// An artifact's digest, as both stores record it.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// The runner's account of an attempt's log at its end: bytes and SHA-256
/// (hex) of its chunks' data in seq order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAccount {
    pub bytes: i64,
    pub sha256: String,
}

/// How many stored chunks a log check reads at a time.
const LOG_CHECK_PAGE: i64 = 1000;

/// Hashes an attempt's stored log, chunk by chunk in seq order, to check it
/// against the runner's account of it.
#[derive(Default)]
struct LogDigest {
    hasher: sha2::Sha256,
    bytes: i64,
}

impl LogDigest {
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        self.bytes += data.len() as i64;
        self.hasher.update(data);
    }

    /// Whether the stored log is the one the runner sent: a mismatch means
    /// it has a hole (or a chunk the runner never sent).
    fn check(self, account: &LogAccount) -> LogCheck {
        use sha2::Digest;
        let sha256 = hex::encode(self.hasher.finalize());
        LogCheck {
            bytes: account.bytes,
            verified: self.bytes == account.bytes && sha256 == account.sha256,
            sha256: account.sha256.clone(),
        }
    }
}

/// What asking to cancel a run did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// It was queued; it is now `canceled`.
    Canceled(Run),
    /// A runner holds it: the request is recorded and the runner must be told.
    Requested(Run),
    /// It had ended already; nothing changed.
    AlreadyFinal(Run),
}

#[derive(Debug, Clone)]
pub struct NewRun {
    pub org_id: Uuid,
    pub workspace_id: Uuid,
    pub workspace: String,
    pub bundle_digest: String,
    pub block: String,
    pub block_version: Option<String>,
    pub action: String,
    pub parameters: serde_json::Value,
    pub reason: Option<String>,
    pub trigger: serde_json::Value,
    pub plan: serde_json::Value,
    pub runner_labels: BTreeMap<String, String>,
    pub max_attempts: i32,
    pub timeout_secs: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub workspace: Option<String>,
    pub block: Option<String>,
    pub action: Option<String>,
    pub status: Option<RunStatus>,
    /// Matches the trigger's `api_key`, `user` or `ci` field.
    pub trigger: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// 1-based.
    pub page: u32,
    pub page_size: u32,
}

impl Page {
    fn offset(self) -> i64 {
        i64::from(self.page.saturating_sub(1)) * i64::from(self.page_size)
    }
}

/// What a runner asks for when it has a free slot.
#[derive(Debug, Clone)]
pub struct Claim {
    pub runner_id: Uuid,
    /// `None`: an instance-wide runner, which serves every organization.
    pub runner_org: Option<Uuid>,
    pub labels: BTreeMap<String, String>,
    pub lease_expires_at: DateTime<Utc>,
}

/// How a fenced update fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    Applied,
    /// The run is not held under this token (superseded, finished, unknown).
    Stale,
}

/// What a runner's heartbeat learns about the runs it reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRenewal {
    /// Runs it no longer holds (superseded, ended): it must stop them.
    pub stale: Vec<(Uuid, i64)>,
    /// Runs it still holds that were asked to cancel: asked again, so a
    /// cancel signal the event bus lost still arrives.
    pub cancel: Vec<(Uuid, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LogChunk {
    pub seq: i64,
    /// 1 stdout, 2 stderr, 3 system.
    pub stream: i16,
    pub ts: DateTime<Utc>,
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// Bytes as base64 text in serialized forms (the event bus's messages).
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone)]
pub struct RunStart {
    pub executor: String,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub started_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct RunEnd {
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub last_seq: i64,
    pub finished_at: DateTime<Utc>,
    /// The runner's account of the attempt's log (seqs after the run's
    /// `log_seq_base` up to `last_seq`), checked against the stored log as
    /// the result is recorded; `None` from a runner that keeps no account.
    pub log_account: Option<LogAccount>,
}

#[derive(Debug, Clone)]
pub struct NewJoinToken {
    pub token_hash: String,
    pub org_id: Option<Uuid>,
    pub created_by: Uuid,
    pub single_use: bool,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: Uuid,
    pub org_id: Option<Uuid>,
    pub single_use: bool,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenRefusal {
    #[error("join token is not known")]
    Unknown,
    #[error("join token has expired")]
    Expired,
    #[error("join token was already used")]
    Used,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Runner {
    pub id: Uuid,
    pub org_id: Option<Uuid>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: i32,
    pub version: String,
    /// The serial of the runner's current certificate.
    pub cert_serial: String,
    pub cert_not_after: DateTime<Utc>,
    /// The certificate the current one was renewed from, still accepted until
    /// the runner connects with the new one (the answer may have been lost).
    pub previous_cert_serial: Option<String>,
    pub connected: bool,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub active_runs: i64,
}

impl Runner {
    /// Whether a certificate with this serial may open a session.
    pub fn accepts_cert(&self, serial_hex: &str) -> bool {
        self.revoked_at.is_none()
            && (self.cert_serial == serial_hex
                || self.previous_cert_serial.as_deref() == Some(serial_hex))
    }
}

/// A revoked runner, as the TLS layer refuses it: by id and by the serials
/// of every certificate it may still hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedRunner {
    pub id: Uuid,
    pub cert_serials: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct NewRunner {
    pub id: Uuid,
    pub org_id: Option<Uuid>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: i32,
    pub cert_serial: String,
    pub cert_not_after: DateTime<Utc>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Organizations and identities.
    async fn create_organization(&self, name: &str) -> Result<Organization>;
    async fn organization_by_name(&self, name: &str) -> Result<Option<Organization>>;
    async fn list_organizations(&self, scope: Scope) -> Result<Vec<Organization>>;
    async fn create_identity(&self, org_id: Uuid, name: &str, role: Role) -> Result<Identity>;
    /// Creates the first super admin and its key once per database; returns
    /// false when the database was bootstrapped already (by this or another
    /// coordinator).
    async fn bootstrap(&self, admin_key: NewApiKeyForBootstrap) -> Result<bool>;
    /// The value of cluster-wide setting `name`: `value` if it was unset
    /// (stored now), else what the first coordinator to claim it stored.
    async fn claim_setting(&self, name: &str, value: &str) -> Result<String>;

    // API keys.
    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey>;
    /// Finds a usable key by hash (not revoked, not expired) and records its
    /// use, to within [`API_KEY_USE_PRECISION`].
    async fn authenticate_api_key(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(ApiKey, Identity)>>;
    async fn list_api_keys(&self, scope: Scope, page: Page) -> Result<(i64, Vec<ApiKey>)>;
    async fn revoke_api_key(&self, scope: Scope, id: Uuid, now: DateTime<Utc>) -> Result<bool>;

    // Workspaces and bundles.
    async fn put_workspace(
        &self,
        org_id: Uuid,
        name: &str,
        digest: &str,
        model: &serde_json::Value,
        bundle: &[u8],
    ) -> Result<Workspace>;
    async fn workspaces_named(&self, scope: Scope, name: &str) -> Result<Vec<Workspace>>;
    async fn list_workspaces(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Workspace>)>;
    async fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>>;

    // Runs.
    async fn create_run(&self, run: NewRun) -> Result<Run>;
    async fn run(&self, scope: Scope, id: Uuid) -> Result<Option<Run>>;
    async fn list_runs(
        &self,
        scope: Scope,
        filter: &RunFilter,
        page: Page,
    ) -> Result<(i64, Vec<Run>)>;
    /// Atomically leases the oldest queued run this runner may take, with a
    /// new fencing token. Two coordinators never lease one run twice.
    async fn claim_run(&self, claim: &Claim) -> Result<Option<Run>>;
    /// Puts a leased run back in the queue when its lease could not be delivered.
    async fn release_lease(&self, id: Uuid, token: i64) -> Result<Fenced>;
    /// Records that the job started, and returns the run as it is now;
    /// `None` when the token does not hold the run (superseded, ended).
    async fn mark_running(&self, id: Uuid, token: i64, start: &RunStart) -> Result<Option<Run>>;
    /// Records the run's result, with the check of its stored log against
    /// the runner's account in the same transaction, and returns the run as
    /// it is now; `None` when the token does not hold the run.
    async fn finish_run(&self, id: Uuid, token: i64, end: &RunEnd) -> Result<Option<Run>>;
    /// [`Store::finish_run`], then, in the same transaction and only when
    /// the result was recorded, [`Store::claim_run`] for `next` (the same
    /// runner, whose slot the run freed): a busy runner's next lease costs
    /// no commit of its own. `None` when the token does not hold the run
    /// (nothing is claimed then).
    async fn finish_and_claim(
        &self,
        id: Uuid,
        token: i64,
        end: &RunEnd,
        next: &Claim,
    ) -> Result<Option<(Run, Option<Run>)>>;
    /// Stores chunks once per `(run, seq)` and returns the highest contiguous
    /// stored seq, or `Stale` when the token does not hold the run.
    async fn append_logs(
        &self,
        id: Uuid,
        token: i64,
        chunks: &[LogChunk],
    ) -> Result<std::result::Result<i64, Fenced>>;
    async fn logs(&self, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<LogChunk>>;
    async fn active_runs_of_runner(&self, runner_id: Uuid) -> Result<Vec<Run>>;
    /// Extends the leases of the runs a runner reports executing, as
    /// `(run, fencing token)`.
    async fn extend_leases(
        &self,
        runner_id: Uuid,
        held: &[(Uuid, i64)],
        expires_at: DateTime<Utc>,
    ) -> Result<LeaseRenewal>;
    /// Leased or running runs whose lease ran out before `now`, oldest
    /// first, as `(run, fencing token)`.
    async fn expired_leases(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<(Uuid, i64)>>;
    /// How many runs wait in the queue, of every organization. The queue
    /// depth metric reads it at each scrape, so it holds whichever
    /// coordinator queued or leased the runs, and across restarts.
    async fn queued_runs(&self) -> Result<i64>;
    /// Takes a run from a runner that no longer executes it, if `token`
    /// still holds it: queued again when attempts remain (and no cancel was
    /// asked for), its log to continue after what is stored; `timed_out`
    /// when its timeout had passed; else `lost`, with `reason`. Returns the
    /// run as it is now, or `None` when the token no longer holds it.
    async fn abandon_run(
        &self,
        id: Uuid,
        token: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Run>>;
    /// Stores a run's artifacts (replacing any of the same path) while
    /// `token` holds the run; `Stale` otherwise.
    async fn put_artifacts(
        &self,
        id: Uuid,
        token: i64,
        files: &[(String, Vec<u8>)],
    ) -> Result<Fenced>;
    /// The run's artifacts by path; `None` when the run is not in scope.
    async fn artifacts(&self, scope: Scope, id: Uuid) -> Result<Option<Vec<Artifact>>>;
    /// One artifact's content; `None` when the run is not in scope or has no such file.
    async fn artifact(&self, scope: Scope, id: Uuid, path: &str) -> Result<Option<Vec<u8>>>;
    /// Cancels a queued run at once; for a leased or running one, records
    /// the request (the first one's time is kept). `None`: no such run in scope.
    async fn cancel_run(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<CancelOutcome>>;

    // Runners.
    async fn create_join_token(&self, token: NewJoinToken) -> Result<JoinToken>;
    /// Checks a join token and, if single-use, marks it used, atomically.
    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<std::result::Result<JoinToken, JoinTokenRefusal>>;
    async fn create_runner(&self, runner: NewRunner) -> Result<Runner>;
    async fn runner(&self, id: Uuid) -> Result<Option<Runner>>;
    async fn list_runners(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Runner>)>;
    /// Records a runner's new stream. `cert_serial` is the certificate it
    /// connected with: once that is the current one, the one it was renewed
    /// from is no longer accepted.
    async fn runner_connected(
        &self,
        id: Uuid,
        cert_serial: &str,
        labels: &BTreeMap<String, String>,
        capacity: i32,
        version: &str,
        now: DateTime<Utc>,
    ) -> Result<()>;
    async fn runner_seen(&self, id: Uuid, now: DateTime<Utc>) -> Result<()>;
    async fn runner_disconnected(&self, id: Uuid, now: DateTime<Utc>) -> Result<()>;
    /// Revokes a runner of the scope (an organization's own runners; an
    /// instance-wide runner only with `Scope::All`). Revoking again keeps the
    /// first time. Returns the runner as it is now, `None` when the scope has
    /// no such runner. A revoked runner is never leased another run.
    async fn revoke_runner(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Runner>>;
    /// Every revoked runner with the serials of its certificates.
    async fn revoked_runners(&self) -> Result<Vec<RevokedRunner>>;
    /// Records a certificate issued to a runner that presented the one with
    /// `presented_serial`: the new one becomes current, the presented one its
    /// predecessor. Refused (false) for a revoked or unknown runner, and when
    /// the presented certificate is neither the current nor the previous one.
    async fn runner_cert_renewed(
        &self,
        id: Uuid,
        presented_serial: &str,
        serial: &str,
        not_after: DateTime<Utc>,
    ) -> Result<bool>;

    // Monitoring (issue 6): agents, endpoints, results and their evaluation
    // (the rules of `crate::monitoring::eval`, run in the transaction that
    // stores the results), notifiers, maintenance windows, the outbox.
    async fn create_agent(&self, agent: NewAgent) -> Result<Agent>;
    /// The agent holding a token with this hash, unless revoked.
    async fn authenticate_agent(&self, token_hash: &str) -> Result<Option<Agent>>;
    async fn list_agents(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Agent>)>;
    /// Revokes an agent of the scope (its token is refused from now on);
    /// where no other live agent checks its location, the location's states
    /// turn `unknown`. `None`: no such agent in scope.
    async fn revoke_agent(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Agent>>;
    /// Records a heartbeat. An agent that was silent is not any more: its
    /// alert's resolve is queued. `None` for a revoked or unknown agent.
    async fn agent_heartbeat(
        &self,
        id: Uuid,
        health: &AgentHealth,
        now: DateTime<Utc>,
    ) -> Result<Option<Agent>>;
    /// Claims the agents whose last heartbeat is older than `silent_before`
    /// and that are not known silent yet, each for one caller only (several
    /// coordinators run this): marks them silent, queues their alert, and
    /// turns their locations `unknown` where no other live agent checks.
    /// Returns the agents claimed.
    async fn mark_silent_agents(
        &self,
        silent_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Agent>>;

    async fn create_endpoint(
        &self,
        org_id: Uuid,
        config: &EndpointConfig,
        now: DateTime<Utc>,
    ) -> Result<Endpoint>;
    /// Replaces an endpoint's configuration: states of locations it keeps
    /// stay, new ones start `unknown`, and the status is settled again.
    async fn update_endpoint(
        &self,
        scope: Scope,
        id: Uuid,
        config: &EndpointConfig,
        now: DateTime<Utc>,
    ) -> Result<Option<Endpoint>>;
    /// Deletes an endpoint with its states and results.
    async fn delete_endpoint(&self, scope: Scope, id: Uuid) -> Result<bool>;
    async fn list_endpoints(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Endpoint>)>;
    /// An endpoint with its state at each location and its uptime up to `now`.
    async fn endpoint_detail(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<EndpointDetail>>;
    /// The endpoints of the agent's organization assigned to its location.
    async fn endpoints_for_agent(&self, agent: &Agent) -> Result<Vec<Endpoint>>;
    /// Stores results once by `(endpoint, id)`, refusing those for endpoints
    /// not assigned to the agent's location in its organization, records
    /// the report, and evaluates what was new (queuing notifications), in
    /// one transaction.
    async fn record_results(
        &self,
        agent: &Agent,
        results: &[CheckResult],
        now: DateTime<Utc>,
    ) -> Result<RecordOutcome>;
    /// An endpoint's stored results, newest first; `None`: no such endpoint
    /// in scope.
    async fn list_results(
        &self,
        scope: Scope,
        endpoint_id: Uuid,
        filter: &ResultFilter,
        page: Page,
    ) -> Result<Option<(i64, Vec<StoredResult>)>>;
    /// Deletes up to `limit` results checked before `before` (and settled
    /// notifications created before it); returns the results deleted.
    async fn prune_results(&self, before: DateTime<Utc>, limit: i64) -> Result<u64>;

    async fn create_notifier(&self, org_id: Uuid, kind: &str, url: &str) -> Result<Notifier>;
    async fn list_notifiers(&self, scope: Scope) -> Result<Vec<Notifier>>;
    async fn delete_notifier(&self, scope: Scope, id: Uuid) -> Result<bool>;
    async fn create_maintenance_window(
        &self,
        window: NewMaintenanceWindow,
    ) -> Result<MaintenanceWindow>;
    async fn list_maintenance_windows(&self, scope: Scope) -> Result<Vec<MaintenanceWindow>>;
    async fn delete_maintenance_window(&self, scope: Scope, id: Uuid) -> Result<bool>;
    /// Claims up to `limit` due notifications for `owner` until
    /// `lease_until`, oldest first, each subject's only after its earlier
    /// ones to the same notifier are settled; a notification leased by
    /// someone else is skipped until its lease runs out.
    async fn claim_notifications(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Notification>>;
    /// Records how delivering went, if `owner` still holds the lease.
    async fn settle_notification(
        &self,
        id: Uuid,
        owner: Uuid,
        outcome: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<bool>;
}

/// The first admin: created with its organization, identity and key together.
#[derive(Debug, Clone)]
pub struct NewApiKeyForBootstrap {
    pub org_name: String,
    pub identity_name: String,
    pub key_name: String,
    pub prefix: String,
    pub token_hash: String,
}
