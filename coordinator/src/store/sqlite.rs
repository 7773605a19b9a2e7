//! The embedded SQLite store: the default when no database URL is given, for
//! one coordinator. It keeps the PostgreSQL store's semantics exactly (the
//! conformance suite in `tests/tests/store_conformance.rs` runs the same
//! cases against both); where SQLite lacks a feature, the notes below say
//! what stands in for it.
//!
//! # Threads: SQLite never blocks the executor
//!
//! Every SQLite call blocks its thread, so none runs on a runtime worker. The
//! store owns one read-write connection (the writer) behind a
//! `tokio::sync::Mutex`, and `READERS` read-only connections behind a
//! semaphore. A call first waits for its connection *asynchronously*, then
//! moves the connection guard and its closure into `spawn_blocking`. So at
//! most `1 + READERS` blocking threads are ever busy with SQLite, a caller
//! waiting for its turn holds no thread, and nothing queues without bound
//! beyond the tasks that are waiting anyway.
//!
//! Everything that writes goes through the one writer, which serialises the
//! writes of this process; each multi-statement write runs in a
//! `BEGIN IMMEDIATE` transaction, which takes SQLite's write lock up front, so
//! even a second process on the same file (not a supported set-up, but not a
//! corrupting one) waits for it (`busy_timeout`) instead of failing halfway.
//! Reads use the reader connections; in WAL mode they see the last committed
//! state and neither wait for the writer nor hold it up. Reads of several
//! statements (a count and a page) run in one read transaction, so they see
//! one snapshot.
//!
//! A caller whose future is dropped does not cut a transaction short: the
//! blocking closure runs to its end and commits or rolls back whole.
//!
//! # What stands in for PostgreSQL features
//!
//! - `FOR UPDATE SKIP LOCKED`: a claim is a select and an update inside one
//!   immediate transaction on the single writer; no two claims interleave.
//! - The `fencing_tokens` sequence: a one-row counter table, incremented in
//!   the claim's transaction.
//! - `jsonb @>` on runner labels: `json_each` on both sides, every label the
//!   run requires must be present on the runner with an equal value.
//! - `trigger->>'key'`: `json_type`/`json_extract` rendering strings,
//!   booleans and integers as PostgreSQL renders them as text (fractional
//!   numbers and nested values may be spelt differently; triggers hold
//!   strings).
//! - Collation: names sort by their UTF-8 bytes (SQLite's `BINARY`), which is
//!   PostgreSQL's order under the `C` and `C.UTF-8` collations, not under a
//!   language's collation such as `en_US.UTF-8`.
//! - `timestamptz`: integer microseconds since the Unix epoch (the same
//!   precision, truncated the same way).
//! - `now()`: the coordinator's clock, read once per statement group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::FromSql;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Params, Row, TransactionBehavior,
};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::*;

mod monitoring;

/// Forward-only migrations, applied in order at open. The applied version is
/// kept in the database header (`PRAGMA user_version`), written in the same
/// transaction as the migration it records.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/sqlite/0001_init.sql")),
    (2, include_str!("migrations/sqlite/0002_cancel.sql")),
    (3, include_str!("migrations/sqlite/0003_leases.sql")),
    (4, include_str!("migrations/sqlite/0004_log_check.sql")),
    (5, include_str!("migrations/sqlite/0005_artifacts.sql")),
    (6, include_str!("migrations/sqlite/0006_revocation.sql")),
    (
        7,
        include_str!("migrations/sqlite/0007_cluster_settings.sql"),
    ),
    (8, include_str!("migrations/sqlite/0008_monitoring.sql")),
];

/// Read-only connections; reads beyond this many wait (asynchronously).
const READERS: usize = 4;

/// How long a statement waits for a lock another connection or process holds
/// before the store reports the database unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How far one `append_logs` call advances the acknowledgement at most, as in
/// the PostgreSQL store; the next call continues from there.
const ACK_SCAN_LIMIT: i64 = 100_000;

pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Readers>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("idle_readers", &self.readers.permits.available_permits())
            .finish()
    }
}

/// The pool of read-only connections. A semaphore permit entitles its holder
/// to one connection from `idle`, so `idle` is never empty when popped.
struct Readers {
    permits: Arc<Semaphore>,
    idle: std::sync::Mutex<Vec<Connection>>,
}

/// One reader connection out of the pool; it goes back on drop, including
/// when the closure using it panics.
struct ReaderLease {
    readers: Arc<Readers>,
    conn: Option<Connection>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ReaderLease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.readers
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

/// SQLite's errors in the store's terms. A unique or primary-key violation is
/// a conflict the caller can act on; a lock held past `BUSY_TIMEOUT` or a
/// file that cannot be opened is the database being unavailable; a value of
/// the wrong type in a column is corrupt data.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ffi::{self, ErrorCode};
        match &e {
            rusqlite::Error::SqliteFailure(failure, message) => match failure.code {
                ErrorCode::ConstraintViolation
                    if matches!(
                        failure.extended_code,
                        ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    ) =>
                {
                    StoreError::Conflict(conflicting_columns(message.as_deref()))
                }
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen => {
                    StoreError::Unavailable(e.to_string())
                }
                _ => StoreError::Database(e.to_string()),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Database(e.to_string()),
        }
    }
}

/// Turns SQLite's "UNIQUE constraint failed: workspaces.org_id, workspaces.name"
/// into "workspaces (org_id, name)", which reads well before "already exists".
fn conflicting_columns(message: Option<&str>) -> String {
    let Some(columns) = message.and_then(|m| m.split_once(": ")).map(|(_, c)| c) else {
        return "a row with these values".to_owned();
    };
    let mut table = None;
    let mut names = Vec::new();
    for column in columns.split(", ") {
        match column.split_once('.') {
            Some((t, c)) => {
                table.get_or_insert(t);
                names.push(c);
            }
            None => names.push(column),
        }
    }
    match table {
        Some(table) => format!("{table} ({})", names.join(", ")),
        None => columns.to_owned(),
    }
}

fn joined(e: tokio::task::JoinError) -> StoreError {
    StoreError::Database(format!("a SQLite task failed: {e}"))
}

// Conversions at the SQL boundary.

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn opt_micros(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(micros)
}

/// The coordinator's clock, at PostgreSQL's precision.
fn now_micros() -> i64 {
    micros(Utc::now())
}

fn id_text(id: Uuid) -> String {
    id.to_string()
}

fn opt_id_text(id: Option<Uuid>) -> Option<String> {
    id.map(id_text)
}

fn json_text(value: &serde_json::Value) -> String {
    value.to_string()
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

fn get<T: FromSql>(row: &Row<'_>, col: &str) -> Result<T> {
    Ok(row.get(col)?)
}

fn uuid_col(row: &Row<'_>, col: &str) -> Result<Uuid> {
    let text: String = get(row, col)?;
    Uuid::parse_str(&text).map_err(|e| StoreError::Corrupt(format!("{col} '{text}': {e}")))
}

fn opt_uuid_col(row: &Row<'_>, col: &str) -> Result<Option<Uuid>> {
    let text: Option<String> = get(row, col)?;
    text.map(|text| {
        Uuid::parse_str(&text).map_err(|e| StoreError::Corrupt(format!("{col} '{text}': {e}")))
    })
    .transpose()
}

fn time_of(col: &str, us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt(format!("{col}: {us} is no timestamp")))
}

fn time_col(row: &Row<'_>, col: &str) -> Result<DateTime<Utc>> {
    time_of(col, get(row, col)?)
}

fn opt_time_col(row: &Row<'_>, col: &str) -> Result<Option<DateTime<Utc>>> {
    get::<Option<i64>>(row, col)?
        .map(|us| time_of(col, us))
        .transpose()
}

fn json_col(row: &Row<'_>, col: &str) -> Result<serde_json::Value> {
    let text: String = get(row, col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn labels_col(row: &Row<'_>, col: &str) -> Result<BTreeMap<String, String>> {
    let text: String = get(row, col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

fn query_vec<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    mut map: impl FnMut(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl FnOnce(&Row<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params)?;
    rows.next()?.map(map).transpose()
}

fn count(conn: &Connection, sql: &str, params: impl Params) -> Result<i64> {
    Ok(conn.query_row(sql, params, |row| row.get(0))?)
}

fn fenced(changed: usize) -> Fenced {
    if changed == 1 {
        Fenced::Applied
    } else {
        Fenced::Stale
    }
}

const ORGANIZATION_SELECT: &str = "SELECT id, name, created_at FROM organizations";

fn organization_from_row(row: &Row<'_>) -> Result<Organization> {
    Ok(Organization {
        id: uuid_col(row, "id")?,
        name: get(row, "name")?,
        created_at: time_col(row, "created_at")?,
    })
}

const RUN_SELECT: &str = "SELECT r.id, r.org_id, o.name AS organization, r.workspace_id, r.workspace, \
    r.bundle_digest, r.block, r.block_version, r.action, r.parameters, r.reason, r.trigger, r.plan, \
    r.runner_labels, r.status, r.exit_code, r.error, r.runner_id, rn.name AS runner_name, r.executor, \
    r.image, r.image_digest, r.fencing_token, r.attempt, r.log_acked_seq, r.created_at, r.leased_at, \
    r.lease_expires_at, r.started_at, r.finished_at, r.cancel_requested_at, \
    r.max_attempts, r.timeout_secs, r.log_seq_base, r.log_bytes, r.log_sha256, r.log_verified \
    FROM runs r JOIN organizations o ON o.id = r.org_id LEFT JOIN runners rn ON rn.id = r.runner_id";

fn run_from_row(row: &Row<'_>) -> Result<Run> {
    let status: String = get(row, "status")?;
    Ok(Run {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        organization: get(row, "organization")?,
        workspace_id: uuid_col(row, "workspace_id")?,
        workspace: get(row, "workspace")?,
        bundle_digest: get(row, "bundle_digest")?,
        block: get(row, "block")?,
        block_version: get(row, "block_version")?,
        action: get(row, "action")?,
        parameters: json_col(row, "parameters")?,
        reason: get(row, "reason")?,
        trigger: json_col(row, "trigger")?,
        plan: json_col(row, "plan")?,
        runner_labels: labels_col(row, "runner_labels")?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status '{status}'")))?,
        exit_code: get(row, "exit_code")?,
        error: get(row, "error")?,
        runner_id: opt_uuid_col(row, "runner_id")?,
        runner_name: get(row, "runner_name")?,
        executor: get(row, "executor")?,
        image: get(row, "image")?,
        image_digest: get(row, "image_digest")?,
        fencing_token: get(row, "fencing_token")?,
        attempt: get(row, "attempt")?,
        log_acked_seq: get(row, "log_acked_seq")?,
        created_at: time_col(row, "created_at")?,
        leased_at: opt_time_col(row, "leased_at")?,
        lease_expires_at: opt_time_col(row, "lease_expires_at")?,
        started_at: opt_time_col(row, "started_at")?,
        finished_at: opt_time_col(row, "finished_at")?,
        cancel_requested_at: opt_time_col(row, "cancel_requested_at")?,
        max_attempts: get(row, "max_attempts")?,
        timeout_secs: get(row, "timeout_secs")?,
        log_seq_base: get(row, "log_seq_base")?,
        log_check: match (
            get::<Option<i64>>(row, "log_bytes")?,
            get::<Option<String>>(row, "log_sha256")?,
            get::<Option<bool>>(row, "log_verified")?,
        ) {
            (Some(bytes), Some(sha256), Some(verified)) => Some(LogCheck {
                bytes,
                sha256,
                verified,
            }),
            _ => None,
        },
    })
}

/// Records run `id`'s result in `tx` (see [`Store::finish_run`]).
fn finish_in(tx: &Connection, id: &str, token: i64, end: &RunEnd) -> Result<Option<Run>> {
    let base: Option<i64> = tx
        .query_row(
            "SELECT log_seq_base FROM runs \
             WHERE id = ?1 AND fencing_token = ?2 AND status IN ('leased', 'running')",
            params![id, token],
            |row| row.get(0),
        )
        .optional()?;
    let Some(base) = base else {
        return Ok(None);
    };
    let log_check = match &end.log_account {
        None => None,
        Some(account) => {
            // The stream delivers a run's messages in order, so every
            // chunk the runner sent before its result is stored by now.
            let mut digest = LogDigest::default();
            let mut stored = tx.prepare(
                "SELECT data FROM run_logs WHERE run_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq",
            )?;
            let mut rows = stored.query(params![id, base, end.last_seq])?;
            while let Some(row) = rows.next()? {
                digest.update(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?);
            }
            Some(digest.check(account))
        }
    };
    tx.execute(
        "UPDATE runs SET status = ?2, exit_code = ?3, error = ?4, log_last_seq = ?5, finished_at = ?6, \
           lease_expires_at = NULL, log_bytes = ?7, log_sha256 = ?8, log_verified = ?9 \
         WHERE id = ?1",
        params![
            id,
            end.status.as_str(),
            end.exit_code,
            end.error,
            end.last_seq,
            micros(end.finished_at),
            log_check.as_ref().map(|c| c.bytes),
            log_check.as_ref().map(|c| c.sha256.clone()),
            log_check.as_ref().map(|c| c.verified)
        ],
    )?;
    run_by_id(tx, id)
}

/// Leases the oldest queued run `claim`'s runner may take, in `tx` (see
/// [`Store::claim_run`]).
fn claim_in(tx: &Connection, claim: &Claim) -> Result<Option<Run>> {
    let runner_id = id_text(claim.runner_id);
    let next: Option<String> = tx
        .query_row(
            CLAIM_NEXT,
            params![
                opt_id_text(claim.runner_org),
                labels_text(&claim.labels),
                runner_id
            ],
            |row| row.get(0),
        )
        .optional()?;
    let Some(id) = next else { return Ok(None) };
    let token: i64 = tx.query_row(
        "UPDATE fencing_tokens SET last = last + 1 WHERE id = 1 RETURNING last",
        [],
        |row| row.get(0),
    )?;
    tx.execute(
        "UPDATE runs SET status = 'leased', runner_id = ?2, fencing_token = ?3, \
           attempt = attempt + 1, leased_at = ?4, lease_expires_at = ?5 WHERE id = ?1",
        params![
            id,
            runner_id,
            token,
            now_micros(),
            micros(claim.lease_expires_at)
        ],
    )?;
    run_by_id(tx, &id)
}

fn run_by_id(conn: &Connection, id: &str) -> Result<Option<Run>> {
    query_opt(
        conn,
        &format!("{RUN_SELECT} WHERE r.id = ?1"),
        [id],
        run_from_row,
    )
}

/// PostgreSQL's `r.trigger->>'key'`: a string as it is, `true`/`false` for
/// booleans, a number as text, SQL NULL for JSON null or a missing key.
/// (`json_extract` alone would turn booleans into 1 and 0.)
macro_rules! trigger_text {
    ($key:literal) => {
        concat!(
            "CASE json_type(r.trigger, '$.",
            $key,
            "') WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE CAST(json_extract(r.trigger, '$.",
            $key,
            "') AS TEXT) END"
        )
    };
}

/// The run list's filters; ?1 scope, ?2 workspace, ?3 block, ?4 action,
/// ?5 status, ?6 trigger (the API key's name, the user or the CI system).
const RUN_CONDITION: &str = concat!(
    "(?1 IS NULL OR r.org_id = ?1) AND (?2 IS NULL OR r.workspace = ?2) ",
    "AND (?3 IS NULL OR r.block = ?3) AND (?4 IS NULL OR r.action = ?4) ",
    "AND (?5 IS NULL OR r.status = ?5) AND (?6 IS NULL OR ?6 IN (",
    trigger_text!("api_key"),
    ", ",
    trigger_text!("user"),
    ", ",
    trigger_text!("ci"),
    "))"
);

/// The oldest queued run a runner may take: of its organization (?1, NULL
/// for an instance-wide runner), and every label the run requires present on
/// the runner (?2, a JSON object) with an equal value — PostgreSQL's
/// `runner_labels <@ labels`. A revoked runner (?3) gets nothing.
const CLAIM_NEXT: &str = "SELECT r.id FROM runs r \
    WHERE r.status = 'queued' AND (?1 IS NULL OR r.org_id = ?1) \
      AND NOT EXISTS (SELECT 1 FROM runners WHERE id = ?3 AND revoked_at IS NOT NULL) \
      AND NOT EXISTS ( \
        SELECT 1 FROM json_each(r.runner_labels) AS need \
        WHERE NOT EXISTS ( \
          SELECT 1 FROM json_each(?2) AS have \
          WHERE have.key = need.key AND have.type = need.type AND have.value = need.value)) \
    ORDER BY r.created_at, r.id LIMIT 1";

const WORKSPACE_SELECT: &str =
    "SELECT w.id, w.org_id, o.name AS organization, w.name, w.bundle_digest, \
    w.model, w.created_at, w.updated_at FROM workspaces w JOIN organizations o ON o.id = w.org_id";

fn workspace_from_row(row: &Row<'_>) -> Result<Workspace> {
    Ok(Workspace {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        organization: get(row, "organization")?,
        name: get(row, "name")?,
        bundle_digest: get(row, "bundle_digest")?,
        model: json_col(row, "model")?,
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

const API_KEY_COLUMNS: &str = "k.id, k.identity_id, k.org_id, k.name, k.prefix, k.created_at, \
    k.expires_at, k.last_used_at, k.revoked_at";

fn api_key_from_row(row: &Row<'_>) -> Result<ApiKey> {
    Ok(ApiKey {
        id: uuid_col(row, "id")?,
        identity_id: uuid_col(row, "identity_id")?,
        org_id: uuid_col(row, "org_id")?,
        name: get(row, "name")?,
        prefix: get(row, "prefix")?,
        created_at: time_col(row, "created_at")?,
        expires_at: opt_time_col(row, "expires_at")?,
        last_used_at: opt_time_col(row, "last_used_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
    })
}

const RUNNER_SELECT: &str = "SELECT rn.id, rn.org_id, rn.name, rn.labels, rn.capacity, rn.version, \
    rn.cert_serial, rn.cert_not_after, rn.previous_cert_serial, rn.connected, rn.created_at, \
    rn.last_seen_at, rn.revoked_at, \
    (SELECT count(*) FROM runs r WHERE r.runner_id = rn.id AND r.status IN ('leased', 'running')) AS active_runs \
    FROM runners rn";

fn runner_from_row(row: &Row<'_>) -> Result<Runner> {
    Ok(Runner {
        id: uuid_col(row, "id")?,
        org_id: opt_uuid_col(row, "org_id")?,
        name: get(row, "name")?,
        labels: labels_col(row, "labels")?,
        capacity: get(row, "capacity")?,
        version: get(row, "version")?,
        cert_serial: get(row, "cert_serial")?,
        cert_not_after: time_col(row, "cert_not_after")?,
        previous_cert_serial: get(row, "previous_cert_serial")?,
        connected: get(row, "connected")?,
        created_at: time_col(row, "created_at")?,
        last_seen_at: opt_time_col(row, "last_seen_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
        active_runs: get(row, "active_runs")?,
    })
}

fn runner_by_id(conn: &Connection, id: &str) -> Result<Option<Runner>> {
    query_opt(
        conn,
        &format!("{RUNNER_SELECT} WHERE rn.id = ?1"),
        [id],
        runner_from_row,
    )
}

fn open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("opening SQLite database {}: {e}", path.display()))
}

/// The writer: creates the file if missing and sets the pragmas every
/// connection that writes needs.
fn open_writer(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL lets the readers read while the writer commits; it is a property of
    // the file, so setting it once here holds for every later connection.
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "SQLite database {}: expected journal mode wal, the file system allows only {mode}",
            path.display()
        )));
    }
    // FULL, not NORMAL: in WAL mode NORMAL survives a crash of the process but
    // may lose the last commits on power loss. A lost commit here can be a
    // granted lease: after a restart the counter would hand the same fencing
    // token for the same run to a second runner while the first, which never
    // lost it, still runs the job — two runners executing one run. FULL syncs
    // the WAL at every commit, so a lease the coordinator sent is durable.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    let foreign_keys: bool = conn.pragma_query_value(None, "foreign_keys", |row| row.get(0))?;
    if !foreign_keys {
        return Err(StoreError::Database(
            "SQLite was built without foreign key support".into(),
        ));
    }
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Applies pending migrations, each in its own immediate transaction that
/// also records its version, so a crash leaves the schema at a version, and
/// two processes opening a new file at once migrate it once.
fn migrate(conn: &mut Connection) -> Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if applied > latest {
            return Err(StoreError::Corrupt(format!(
                "the database schema is version {applied}, newer than this coordinator knows ({latest}); upgrade the coordinator"
            )));
        }
        let Some((version, sql)) = MIGRATIONS.iter().find(|(v, _)| *v > applied) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
}

impl SqliteStore {
    /// Opens the database file at `path`, creating it if missing (its
    /// directory must exist), and applies pending migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut writer = open_writer(&path)?;
            migrate(&mut writer)?;
            let readers = (0..READERS)
                .map(|_| open_reader(&path))
                .collect::<Result<Vec<_>>>()?;
            Ok(SqliteStore {
                path,
                writer: Arc::new(Mutex::new(writer)),
                readers: Arc::new(Readers {
                    permits: Arc::new(Semaphore::new(READERS)),
                    idle: std::sync::Mutex::new(readers),
                }),
            })
        })
        .await
        .map_err(joined)?
    }

    /// The file this store keeps its data in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer connection on a blocking thread, once the
    /// writer is free.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let mut conn = Arc::clone(&self.writer).lock_owned().await;
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(joined)?
    }

    /// Runs `f` on a read-only connection on a blocking thread, once one is
    /// free.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite store is closed".into()))?;
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let conn = readers
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let mut lease = ReaderLease {
                readers,
                conn,
                _permit: permit,
            };
            match lease.conn.as_mut() {
                Some(conn) => f(conn),
                None => Err(StoreError::Database(
                    "no idle SQLite reader connection for a granted permit".into(),
                )),
            }
        })
        .await
        .map_err(joined)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_organization(&self, name: &str) -> Result<Organization> {
        let name = name.to_owned();
        self.write(move |conn| {
            let id = Uuid::now_v7();
            let now = now_micros();
            conn.execute(
                "INSERT INTO organizations (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![id_text(id), name, now],
            )?;
            Ok(Organization {
                id,
                name,
                created_at: time_of("created_at", now)?,
            })
        })
        .await
    }

    async fn organization_by_name(&self, name: &str) -> Result<Option<Organization>> {
        let name = name.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                &format!("{ORGANIZATION_SELECT} WHERE name = ?1"),
                [name],
                organization_from_row,
            )
        })
        .await
    }

    async fn list_organizations(&self, scope: Scope) -> Result<Vec<Organization>> {
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            query_vec(
                conn,
                &format!("{ORGANIZATION_SELECT} WHERE (?1 IS NULL OR id = ?1) ORDER BY name"),
                [org],
                organization_from_row,
            )
        })
        .await
    }

    async fn create_identity(&self, org_id: Uuid, name: &str, role: Role) -> Result<Identity> {
        let name = name.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = Uuid::now_v7();
            tx.execute(
                "INSERT INTO identities (id, org_id, name, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id_text(id), id_text(org_id), name, role.as_str(), now_micros()],
            )?;
            let org_name: String = tx.query_row(
                "SELECT name FROM organizations WHERE id = ?1",
                [id_text(org_id)],
                |row| row.get(0),
            )?;
            tx.commit()?;
            Ok(Identity {
                id,
                org_id,
                org_name,
                name,
                role,
            })
        })
        .await
    }

    async fn bootstrap(&self, admin: NewApiKeyForBootstrap) -> Result<bool> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_micros();
            let inserted = tx.execute(
                "INSERT INTO bootstrap (id, created_at) VALUES (1, ?1) ON CONFLICT DO NOTHING",
                [now],
            )?;
            if inserted == 0 {
                return Ok(false);
            }
            // An organization of that name may exist already; the admin joins it.
            let org_id: String = tx.query_row(
                "INSERT INTO organizations (id, name, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
                params![id_text(Uuid::now_v7()), admin.org_name, now],
                |row| row.get(0),
            )?;
            let identity_id = id_text(Uuid::now_v7());
            tx.execute(
                "INSERT INTO identities (id, org_id, name, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![identity_id, org_id, admin.identity_name, Role::SuperAdmin.as_str(), now],
            )?;
            tx.execute(
                "INSERT INTO api_keys (id, identity_id, org_id, name, prefix, token_hash, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id_text(Uuid::now_v7()),
                    identity_id,
                    org_id,
                    admin.key_name,
                    admin.prefix,
                    admin.token_hash,
                    now
                ],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn claim_setting(&self, name: &str, value: &str) -> Result<String> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO cluster_settings (name, value, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO NOTHING",
                params![name, value, now_micros()],
            )?;
            Ok(conn.query_row(
                "SELECT value FROM cluster_settings WHERE name = ?1",
                [&name],
                |row| row.get(0),
            )?)
        })
        .await
    }

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey> {
        self.write(move |conn| {
            let id = Uuid::now_v7();
            let now = now_micros();
            conn.execute(
                "INSERT INTO api_keys (id, identity_id, org_id, name, prefix, token_hash, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id_text(id),
                    id_text(key.identity_id),
                    id_text(key.org_id),
                    key.name,
                    key.prefix,
                    key.token_hash,
                    now,
                    opt_micros(key.expires_at)
                ],
            )?;
            Ok(ApiKey {
                id,
                identity_id: key.identity_id,
                org_id: key.org_id,
                name: key.name,
                prefix: key.prefix,
                created_at: time_of("created_at", now)?,
                expires_at: key
                    .expires_at
                    .map(|t| time_of("expires_at", micros(t)))
                    .transpose()?,
                last_used_at: None,
                revoked_at: None,
            })
        })
        .await
    }

    async fn authenticate_api_key(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(ApiKey, Identity)>> {
        let token_hash = token_hash.to_owned();
        let found = self
            .read(move |conn| {
                query_opt(
                    conn,
                    &format!(
                        "SELECT {API_KEY_COLUMNS}, i.name AS identity_name, i.role, o.name AS org_name \
                         FROM api_keys k JOIN identities i ON i.id = k.identity_id \
                         JOIN organizations o ON o.id = i.org_id \
                         WHERE k.token_hash = ?1 AND k.revoked_at IS NULL \
                           AND (k.expires_at IS NULL OR k.expires_at > ?2)"
                    ),
                    params![token_hash, micros(now)],
                    |row| {
                        let role: String = get(row, "role")?;
                        let identity = Identity {
                            id: uuid_col(row, "identity_id")?,
                            org_id: uuid_col(row, "org_id")?,
                            org_name: get(row, "org_name")?,
                            name: get(row, "identity_name")?,
                            role: Role::parse(&role)
                                .ok_or_else(|| StoreError::Corrupt(format!("role '{role}'")))?,
                        };
                        Ok((api_key_from_row(row)?, identity))
                    },
                )
            })
            .await?;
        let Some((mut key, identity)) = found else {
            return Ok(None);
        };
        if super::use_to_record(key.last_used_at, now) {
            let id = id_text(key.id);
            self.write(move |conn| {
                conn.execute(
                    "UPDATE api_keys SET last_used_at = ?2 \
                     WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
                    params![id, micros(now)],
                )?;
                Ok(())
            })
            .await?;
            key.last_used_at = Some(now);
        }
        Ok(Some((key, identity)))
    }

    async fn list_api_keys(&self, scope: Scope, page: Page) -> Result<(i64, Vec<ApiKey>)> {
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let total = count(
                &tx,
                "SELECT count(*) FROM api_keys WHERE (?1 IS NULL OR org_id = ?1)",
                [&org],
            )?;
            let keys = query_vec(
                &tx,
                &format!(
                    "SELECT {API_KEY_COLUMNS} FROM api_keys k WHERE (?1 IS NULL OR k.org_id = ?1) \
                     ORDER BY k.created_at, k.id LIMIT ?2 OFFSET ?3"
                ),
                params![org, i64::from(page.page_size), page.offset()],
                api_key_from_row,
            )?;
            Ok((total, keys))
        })
        .await
    }

    async fn revoke_api_key(&self, scope: Scope, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
        let org = opt_id_text(scope.org());
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?3) \
                 WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
                params![id_text(id), org, micros(now)],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn put_workspace(
        &self,
        org_id: Uuid,
        name: &str,
        digest: &str,
        model: &serde_json::Value,
        bundle: &[u8],
    ) -> Result<Workspace> {
        let name = name.to_owned();
        let digest = digest.to_owned();
        let model = json_text(model);
        let bundle = bundle.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_micros();
            let size = i64::try_from(bundle.len())
                .map_err(|_| StoreError::Database("bundle too large".into()))?;
            tx.execute(
                "INSERT INTO bundles (digest, size, data, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (digest) DO NOTHING",
                params![digest, size, bundle, now],
            )?;
            let id: String = tx.query_row(
                "INSERT INTO workspaces (id, org_id, name, bundle_digest, model, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
                 ON CONFLICT (org_id, name) DO UPDATE SET bundle_digest = excluded.bundle_digest, \
                   model = excluded.model, updated_at = excluded.updated_at RETURNING id",
                params![id_text(Uuid::now_v7()), id_text(org_id), name, digest, model, now],
                |row| row.get(0),
            )?;
            let workspace = query_opt(
                &tx,
                &format!("{WORKSPACE_SELECT} WHERE w.id = ?1"),
                [id],
                workspace_from_row,
            )?
            .ok_or_else(|| StoreError::Database("upserted workspace vanished".into()))?;
            tx.commit()?;
            Ok(workspace)
        })
        .await
    }

    async fn workspaces_named(&self, scope: Scope, name: &str) -> Result<Vec<Workspace>> {
        let name = name.to_owned();
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            query_vec(
                conn,
                &format!(
                    "{WORKSPACE_SELECT} WHERE w.name = ?1 AND (?2 IS NULL OR w.org_id = ?2) ORDER BY o.name"
                ),
                params![name, org],
                workspace_from_row,
            )
        })
        .await
    }

    async fn list_workspaces(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Workspace>)> {
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let total = count(
                &tx,
                "SELECT count(*) FROM workspaces WHERE (?1 IS NULL OR org_id = ?1)",
                [&org],
            )?;
            let workspaces = query_vec(
                &tx,
                &format!(
                    "{WORKSPACE_SELECT} WHERE (?1 IS NULL OR w.org_id = ?1) \
                     ORDER BY o.name, w.name LIMIT ?2 OFFSET ?3"
                ),
                params![org, i64::from(page.page_size), page.offset()],
                workspace_from_row,
            )?;
            Ok((total, workspaces))
        })
        .await
    }

    async fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let digest = digest.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                "SELECT data FROM bundles WHERE digest = ?1",
                [digest],
                |row| get(row, "data"),
            )
        })
        .await
    }

    async fn create_run(&self, run: NewRun) -> Result<Run> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = id_text(Uuid::now_v7());
            tx.execute(
                "INSERT INTO runs (id, org_id, workspace_id, workspace, bundle_digest, block, block_version, action, \
                 parameters, reason, trigger, plan, runner_labels, status, created_at, max_attempts, timeout_secs) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'queued', ?14, ?15, ?16)",
                params![
                    id,
                    id_text(run.org_id),
                    id_text(run.workspace_id),
                    run.workspace,
                    run.bundle_digest,
                    run.block,
                    run.block_version,
                    run.action,
                    json_text(&run.parameters),
                    run.reason,
                    json_text(&run.trigger),
                    json_text(&run.plan),
                    labels_text(&run.runner_labels),
                    now_micros(),
                    run.max_attempts,
                    run.timeout_secs
                ],
            )?;
            let created = run_by_id(&tx, &id)?
                .ok_or_else(|| StoreError::Database("inserted run vanished".into()))?;
            tx.commit()?;
            Ok(created)
        })
        .await
    }

    async fn run(&self, scope: Scope, id: Uuid) -> Result<Option<Run>> {
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            query_opt(
                conn,
                &format!("{RUN_SELECT} WHERE r.id = ?1 AND (?2 IS NULL OR r.org_id = ?2)"),
                params![id_text(id), org],
                run_from_row,
            )
        })
        .await
    }

    async fn list_runs(
        &self,
        scope: Scope,
        filter: &RunFilter,
        page: Page,
    ) -> Result<(i64, Vec<Run>)> {
        let org = opt_id_text(scope.org());
        let filter = filter.clone();
        self.read(move |conn| {
            let status = filter.status.map(RunStatus::as_str);
            let tx = conn.transaction()?;
            let total = count(
                &tx,
                &format!("SELECT count(*) FROM runs r WHERE {RUN_CONDITION}"),
                params![
                    org,
                    filter.workspace,
                    filter.block,
                    filter.action,
                    status,
                    filter.trigger
                ],
            )?;
            let runs = query_vec(
                &tx,
                &format!(
                    "{RUN_SELECT} WHERE {RUN_CONDITION} ORDER BY r.created_at DESC, r.id DESC LIMIT ?7 OFFSET ?8"
                ),
                params![
                    org,
                    filter.workspace,
                    filter.block,
                    filter.action,
                    status,
                    filter.trigger,
                    i64::from(page.page_size),
                    page.offset()
                ],
                run_from_row,
            )?;
            Ok((total, runs))
        })
        .await
    }

    async fn claim_run(&self, claim: &Claim) -> Result<Option<Run>> {
        let claim = claim.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let run = claim_in(&tx, &claim)?;
            tx.commit()?;
            Ok(run)
        })
        .await
    }

    async fn extend_leases(
        &self,
        runner_id: Uuid,
        held: &[(Uuid, i64)],
        expires_at: DateTime<Utc>,
    ) -> Result<LeaseRenewal> {
        if held.is_empty() {
            return Ok(LeaseRenewal::default());
        }
        let held = held.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut renewal = LeaseRenewal::default();
            {
                let mut extend = tx.prepare(
                    "UPDATE runs SET lease_expires_at = ?4 \
                     WHERE id = ?1 AND fencing_token = ?2 AND runner_id = ?3 \
                       AND status IN ('leased', 'running') \
                     RETURNING cancel_requested_at IS NOT NULL",
                )?;
                for (id, token) in held {
                    let canceled: Option<bool> = extend
                        .query_row(
                            params![id_text(id), token, id_text(runner_id), micros(expires_at)],
                            |row| row.get(0),
                        )
                        .optional()?;
                    match canceled {
                        None => renewal.stale.push((id, token)),
                        Some(true) => renewal.cancel.push((id, token)),
                        Some(false) => {}
                    }
                }
            }
            tx.commit()?;
            Ok(renewal)
        })
        .await
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<(Uuid, i64)>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, fencing_token FROM runs \
                 WHERE status IN ('leased', 'running') AND lease_expires_at < ?1 \
                 ORDER BY lease_expires_at LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![micros(now), limit])?;
            let mut expired = Vec::new();
            while let Some(row) = rows.next()? {
                expired.push((uuid_col(row, "id")?, get(row, "fencing_token")?));
            }
            Ok(expired)
        })
        .await
    }

    async fn queued_runs(&self) -> Result<i64> {
        self.read(|conn| {
            count(
                conn,
                "SELECT count(*) FROM runs WHERE status = 'queued'",
                [],
            )
        })
        .await
    }

    async fn abandon_run(
        &self,
        id: Uuid,
        token: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Run>> {
        let reason = reason.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // The same decision as the PostgreSQL store's one statement, in steps.
            let row: Option<(i32, i32, bool, Option<i64>, Option<i64>, i64)> = tx
                .query_row(
                    "SELECT attempt, max_attempts, cancel_requested_at IS NOT NULL, timeout_secs, started_at, log_acked_seq \
                     FROM runs WHERE id = ?1 AND fencing_token = ?2 AND status IN ('leased', 'running')",
                    params![id_text(id), token],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .optional()?;
            let Some((attempt, max_attempts, cancel_requested, timeout_secs, started_at, acked)) =
                row
            else {
                return Ok(None);
            };
            if attempt < max_attempts && !cancel_requested {
                let stored: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM run_logs WHERE run_id = ?1",
                    params![id_text(id)],
                    |r| r.get(0),
                )?;
                let base = stored.max(acked);
                tx.execute(
                    "UPDATE runs SET status = 'queued', error = ?2, finished_at = NULL, \
                       log_seq_base = ?3, log_acked_seq = ?3, runner_id = NULL, started_at = NULL, \
                       leased_at = NULL, lease_expires_at = NULL WHERE id = ?1",
                    params![
                        id_text(id),
                        format!("attempt {attempt}: {reason}; trying again"),
                        base
                    ],
                )?;
            } else {
                let timed_out = match (timeout_secs, started_at) {
                    (Some(t), Some(started)) => started + t * 1_000_000 <= micros(now),
                    _ => false,
                };
                let (status, error) = match (timed_out, timeout_secs) {
                    (true, Some(t)) => ("timed_out", format!("timed out after {t} s ({reason})")),
                    _ => ("lost", reason.clone()),
                };
                tx.execute(
                    "UPDATE runs SET status = ?2, error = ?3, finished_at = ?4, lease_expires_at = NULL \
                     WHERE id = ?1",
                    params![id_text(id), status, error, micros(now)],
                )?;
            }
            let run = query_opt(
                &tx,
                &format!("{RUN_SELECT} WHERE r.id = ?1"),
                params![id_text(id)],
                run_from_row,
            )?;
            tx.commit()?;
            Ok(run)
        })
        .await
    }

    async fn put_artifacts(
        &self,
        id: Uuid,
        token: i64,
        files: &[(String, Vec<u8>)],
    ) -> Result<Fenced> {
        let files = files.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let held = tx
                .query_row(
                    "SELECT 1 FROM runs WHERE id = ?1 AND fencing_token = ?2 \
                     AND status IN ('leased', 'running')",
                    params![id_text(id), token],
                    |_| Ok(()),
                )
                .optional()?;
            if held.is_none() {
                return Ok(Fenced::Stale);
            }
            {
                let mut put = tx.prepare(
                    "INSERT INTO run_artifacts (run_id, path, size, sha256, data) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (run_id, path) DO UPDATE SET size = ?3, sha256 = ?4, data = ?5",
                )?;
                for (path, data) in &files {
                    put.execute(params![
                        id_text(id),
                        path,
                        data.len() as i64,
                        sha256_hex(data),
                        data
                    ])?;
                }
            }
            tx.commit()?;
            Ok(Fenced::Applied)
        })
        .await
    }

    async fn artifacts(&self, scope: Scope, id: Uuid) -> Result<Option<Vec<Artifact>>> {
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let visible = tx
                .query_row(
                    "SELECT 1 FROM runs WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
                    params![id_text(id), org],
                    |_| Ok(()),
                )
                .optional()?;
            if visible.is_none() {
                return Ok(None);
            }
            let mut stmt = tx.prepare(
                "SELECT path, size, sha256 FROM run_artifacts WHERE run_id = ?1 ORDER BY path",
            )?;
            let mut rows = stmt.query(params![id_text(id)])?;
            let mut list = Vec::new();
            while let Some(row) = rows.next()? {
                list.push(Artifact {
                    path: get(row, "path")?,
                    size: get(row, "size")?,
                    sha256: get(row, "sha256")?,
                });
            }
            Ok(Some(list))
        })
        .await
    }

    async fn artifact(&self, scope: Scope, id: Uuid, path: &str) -> Result<Option<Vec<u8>>> {
        let org = opt_id_text(scope.org());
        let path = path.to_owned();
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT a.data FROM run_artifacts a JOIN runs r ON r.id = a.run_id \
                     WHERE a.run_id = ?1 AND a.path = ?2 AND (?3 IS NULL OR r.org_id = ?3)",
                    params![id_text(id), path, org],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }

    async fn cancel_run(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<CancelOutcome>> {
        let org = opt_id_text(scope.org());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let status: Option<String> = tx
                .query_row(
                    "SELECT status FROM runs WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
                    params![id_text(id), org],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(status) = status else {
                return Ok(None);
            };
            let was_queued = status == "queued";
            tx.execute(
                "UPDATE runs SET \
                   status = CASE WHEN status = 'queued' THEN 'canceled' ELSE status END, \
                   error = CASE WHEN status = 'queued' THEN 'canceled before it started' ELSE error END, \
                   finished_at = CASE WHEN status = 'queued' THEN ?2 ELSE finished_at END, \
                   cancel_requested_at = COALESCE(cancel_requested_at, ?2) \
                 WHERE id = ?1 AND status IN ('queued', 'leased', 'running')",
                params![id_text(id), micros(now)],
            )?;
            let run = query_opt(
                &tx,
                &format!("{RUN_SELECT} WHERE r.id = ?1"),
                params![id_text(id)],
                run_from_row,
            )?
            .ok_or_else(|| StoreError::Database("the canceled run vanished".into()))?;
            tx.commit()?;
            Ok(Some(if was_queued {
                CancelOutcome::Canceled(run)
            } else if run.status.is_final() {
                CancelOutcome::AlreadyFinal(run)
            } else {
                CancelOutcome::Requested(run)
            }))
        })
        .await
    }

    async fn release_lease(&self, id: Uuid, token: i64) -> Result<Fenced> {
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE runs SET status = 'queued', runner_id = NULL, leased_at = NULL, lease_expires_at = NULL \
                 WHERE id = ?1 AND fencing_token = ?2 AND status = 'leased'",
                params![id_text(id), token],
            )?;
            Ok(fenced(n))
        })
        .await
    }

    async fn mark_running(&self, id: Uuid, token: i64, start: &RunStart) -> Result<Option<Run>> {
        let start = start.clone();
        self.write(move |conn| {
            let id = id_text(id);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE runs SET status = 'running', executor = ?3, image = ?4, image_digest = ?5, started_at = ?6 \
                 WHERE id = ?1 AND fencing_token = ?2 AND status IN ('leased', 'running')",
                params![
                    id,
                    token,
                    start.executor,
                    start.image,
                    start.image_digest,
                    micros(start.started_at)
                ],
            )?;
            if n == 0 {
                return Ok(None);
            }
            let run = run_by_id(&tx, &id)?;
            tx.commit()?;
            Ok(run)
        })
        .await
    }

    async fn finish_run(&self, id: Uuid, token: i64, end: &RunEnd) -> Result<Option<Run>> {
        let end = end.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let run = finish_in(&tx, &id_text(id), token, &end)?;
            tx.commit()?;
            Ok(run)
        })
        .await
    }

    async fn finish_and_claim(
        &self,
        id: Uuid,
        token: i64,
        end: &RunEnd,
        next: &Claim,
    ) -> Result<Option<(Run, Option<Run>)>> {
        let (end, next) = (end.clone(), next.clone());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(run) = finish_in(&tx, &id_text(id), token, &end)? else {
                return Ok(None);
            };
            let next = claim_in(&tx, &next)?;
            tx.commit()?;
            Ok(Some((run, next)))
        })
        .await
    }

    async fn append_logs(
        &self,
        id: Uuid,
        token: i64,
        chunks: &[LogChunk],
    ) -> Result<std::result::Result<i64, Fenced>> {
        let chunks = chunks.to_vec();
        self.write(move |conn| {
            let id = id_text(id);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let acked: Option<i64> = tx
                .query_row(
                    "SELECT log_acked_seq FROM runs \
                     WHERE id = ?1 AND fencing_token = ?2 AND status IN ('leased', 'running')",
                    params![id, token],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(mut acked) = acked else {
                return Ok(Err(Fenced::Stale));
            };
            let mut fresh = chunks.iter().filter(|c| c.seq > acked).peekable();
            if fresh.peek().is_some() {
                {
                    // A chunk already stored keeps its first content: a resend
                    // is the same chunk, and the log never changes under a reader.
                    let mut insert = tx.prepare(
                        "INSERT INTO run_logs (run_id, seq, stream, ts, data) VALUES (?1, ?2, ?3, ?4, ?5) \
                         ON CONFLICT DO NOTHING",
                    )?;
                    for chunk in fresh {
                        insert.execute(params![
                            id,
                            chunk.seq,
                            chunk.stream,
                            micros(chunk.ts),
                            chunk.data
                        ])?;
                    }
                    // Advance the acknowledgement over whatever is now
                    // contiguous, including chunks that arrived earlier out
                    // of order; the cursor stops at the first gap.
                    let mut stored = tx.prepare(
                        "SELECT seq FROM run_logs WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                    )?;
                    let mut rows = stored.query(params![id, acked, ACK_SCAN_LIMIT])?;
                    while let Some(row) = rows.next()? {
                        let seq: i64 = row.get(0)?;
                        if seq != acked + 1 {
                            break;
                        }
                        acked = seq;
                    }
                }
                tx.execute(
                    "UPDATE runs SET log_acked_seq = ?2 WHERE id = ?1",
                    params![id, acked],
                )?;
            }
            tx.commit()?;
            Ok(Ok(acked))
        })
        .await
    }

    async fn logs(&self, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<LogChunk>> {
        // SQLite reads a negative LIMIT as none; PostgreSQL refuses it.
        if limit < 0 {
            return Err(StoreError::Database("LIMIT must not be negative".into()));
        }
        self.read(move |conn| {
            query_vec(
                conn,
                "SELECT seq, stream, ts, data FROM run_logs WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                params![id_text(id), after_seq, limit],
                |row| {
                    Ok(LogChunk {
                        seq: get(row, "seq")?,
                        stream: get(row, "stream")?,
                        ts: time_col(row, "ts")?,
                        data: get(row, "data")?,
                    })
                },
            )
        })
        .await
    }

    async fn active_runs_of_runner(&self, runner_id: Uuid) -> Result<Vec<Run>> {
        self.read(move |conn| {
            query_vec(
                conn,
                &format!(
                    "{RUN_SELECT} WHERE r.runner_id = ?1 AND r.status IN ('leased', 'running') ORDER BY r.leased_at"
                ),
                [id_text(runner_id)],
                run_from_row,
            )
        })
        .await
    }

    async fn create_join_token(&self, token: NewJoinToken) -> Result<JoinToken> {
        self.write(move |conn| {
            let id = Uuid::now_v7();
            conn.execute(
                "INSERT INTO join_tokens (id, token_hash, org_id, created_by, single_use, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id_text(id),
                    token.token_hash,
                    opt_id_text(token.org_id),
                    id_text(token.created_by),
                    token.single_use,
                    now_micros(),
                    micros(token.expires_at)
                ],
            )?;
            Ok(JoinToken {
                id,
                org_id: token.org_id,
                single_use: token.single_use,
                expires_at: time_of("expires_at", micros(token.expires_at))?,
            })
        })
        .await
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<std::result::Result<JoinToken, JoinTokenRefusal>> {
        let token_hash = token_hash.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found = query_opt(
                &tx,
                "SELECT id, org_id, single_use, expires_at, used_at FROM join_tokens WHERE token_hash = ?1",
                [token_hash],
                |row| {
                    let token = JoinToken {
                        id: uuid_col(row, "id")?,
                        org_id: opt_uuid_col(row, "org_id")?,
                        single_use: get(row, "single_use")?,
                        expires_at: time_col(row, "expires_at")?,
                    };
                    Ok((token, get::<Option<i64>>(row, "used_at")?))
                },
            )?;
            let Some((token, used_at)) = found else {
                return Ok(Err(JoinTokenRefusal::Unknown));
            };
            if token.expires_at <= now {
                return Ok(Err(JoinTokenRefusal::Expired));
            }
            if token.single_use && used_at.is_some() {
                return Ok(Err(JoinTokenRefusal::Used));
            }
            tx.execute(
                "UPDATE join_tokens SET used_at = coalesce(used_at, ?2) WHERE id = ?1",
                params![id_text(token.id), micros(now)],
            )?;
            tx.commit()?;
            Ok(Ok(token))
        })
        .await
    }

    async fn create_runner(&self, runner: NewRunner) -> Result<Runner> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = id_text(runner.id);
            tx.execute(
                "INSERT INTO runners (id, org_id, name, labels, capacity, cert_serial, cert_not_after, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    opt_id_text(runner.org_id),
                    runner.name,
                    labels_text(&runner.labels),
                    runner.capacity,
                    runner.cert_serial,
                    micros(runner.cert_not_after),
                    now_micros()
                ],
            )?;
            let created = runner_by_id(&tx, &id)?
                .ok_or_else(|| StoreError::Database("inserted runner vanished".into()))?;
            tx.commit()?;
            Ok(created)
        })
        .await
    }

    async fn runner(&self, id: Uuid) -> Result<Option<Runner>> {
        self.read(move |conn| runner_by_id(conn, &id_text(id)))
            .await
    }

    async fn list_runners(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Runner>)> {
        let org = opt_id_text(scope.org());
        self.read(move |conn| {
            // An organization sees its own runners and the instance-wide ones that serve it.
            let condition = "(?1 IS NULL OR rn.org_id = ?1 OR rn.org_id IS NULL)";
            let tx = conn.transaction()?;
            let total = count(
                &tx,
                &format!("SELECT count(*) FROM runners rn WHERE {condition}"),
                [&org],
            )?;
            let runners = query_vec(
                &tx,
                &format!(
                    "{RUNNER_SELECT} WHERE {condition} ORDER BY rn.created_at, rn.id LIMIT ?2 OFFSET ?3"
                ),
                params![org, i64::from(page.page_size), page.offset()],
                runner_from_row,
            )?;
            Ok((total, runners))
        })
        .await
    }

    async fn runner_connected(
        &self,
        id: Uuid,
        cert_serial: &str,
        labels: &BTreeMap<String, String>,
        capacity: i32,
        version: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let labels = labels_text(labels);
        let version = version.to_owned();
        let cert_serial = cert_serial.to_owned();
        self.write(move |conn| {
            conn.execute(
                "UPDATE runners SET connected = 1, labels = ?2, capacity = ?3, version = ?4, last_seen_at = ?5, \
                   previous_cert_serial = CASE WHEN cert_serial = ?6 THEN NULL ELSE previous_cert_serial END \
                 WHERE id = ?1",
                params![id_text(id), labels, capacity, version, micros(now), cert_serial],
            )?;
            Ok(())
        })
        .await
    }

    async fn runner_seen(&self, id: Uuid, now: DateTime<Utc>) -> Result<()> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE runners SET last_seen_at = ?2 WHERE id = ?1",
                params![id_text(id), micros(now)],
            )?;
            Ok(())
        })
        .await
    }

    async fn runner_disconnected(&self, id: Uuid, now: DateTime<Utc>) -> Result<()> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE runners SET connected = 0, last_seen_at = ?2 WHERE id = ?1",
                params![id_text(id), micros(now)],
            )?;
            Ok(())
        })
        .await
    }

    async fn revoke_runner(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Runner>> {
        let org = opt_id_text(scope.org());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = id_text(id);
            let n = tx.execute(
                "UPDATE runners SET revoked_at = coalesce(revoked_at, ?3) \
                 WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
                params![id, org, micros(now)],
            )?;
            if n == 0 {
                return Ok(None);
            }
            let runner = runner_by_id(&tx, &id)?;
            tx.commit()?;
            Ok(runner)
        })
        .await
    }

    async fn revoked_runners(&self) -> Result<Vec<RevokedRunner>> {
        self.read(move |conn| {
            query_vec(
                conn,
                "SELECT id, cert_serial, previous_cert_serial FROM runners \
                 WHERE revoked_at IS NOT NULL ORDER BY id",
                [],
                |row| {
                    Ok(RevokedRunner {
                        id: uuid_col(row, "id")?,
                        cert_serials: std::iter::once(get::<String>(row, "cert_serial")?)
                            .chain(get::<Option<String>>(row, "previous_cert_serial")?)
                            .collect(),
                    })
                },
            )
        })
        .await
    }

    async fn runner_cert_renewed(
        &self,
        id: Uuid,
        presented_serial: &str,
        serial: &str,
        not_after: DateTime<Utc>,
    ) -> Result<bool> {
        let presented = presented_serial.to_owned();
        let serial = serial.to_owned();
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE runners SET previous_cert_serial = ?2, cert_serial = ?3, cert_not_after = ?4 \
                 WHERE id = ?1 AND revoked_at IS NULL \
                   AND (cert_serial = ?2 OR previous_cert_serial = ?2)",
                params![id_text(id), presented, serial, micros(not_after)],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn create_agent(&self, agent: NewAgent) -> Result<Agent> {
        monitoring::create_agent(self, agent).await
    }

    async fn authenticate_agent(&self, token_hash: &str) -> Result<Option<Agent>> {
        monitoring::authenticate_agent(self, token_hash).await
    }

    async fn list_agents(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Agent>)> {
        monitoring::list_agents(self, scope, page).await
    }

    async fn revoke_agent(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Agent>> {
        monitoring::revoke_agent(self, scope, id, now).await
    }

    async fn agent_heartbeat(
        &self,
        id: Uuid,
        health: &AgentHealth,
        now: DateTime<Utc>,
    ) -> Result<Option<Agent>> {
        monitoring::agent_heartbeat(self, id, health, now).await
    }

    async fn mark_silent_agents(
        &self,
        silent_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Agent>> {
        monitoring::mark_silent_agents(self, silent_before, now).await
    }

    async fn create_endpoint(
        &self,
        org_id: Uuid,
        config: &EndpointConfig,
        now: DateTime<Utc>,
    ) -> Result<Endpoint> {
        monitoring::create_endpoint(self, org_id, config, now).await
    }

    async fn update_endpoint(
        &self,
        scope: Scope,
        id: Uuid,
        config: &EndpointConfig,
        now: DateTime<Utc>,
    ) -> Result<Option<Endpoint>> {
        monitoring::update_endpoint(self, scope, id, config, now).await
    }

    async fn delete_endpoint(&self, scope: Scope, id: Uuid) -> Result<bool> {
        monitoring::delete_endpoint(self, scope, id).await
    }

    async fn list_endpoints(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Endpoint>)> {
        monitoring::list_endpoints(self, scope, page).await
    }

    async fn endpoint_detail(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<EndpointDetail>> {
        monitoring::endpoint_detail(self, scope, id, now).await
    }

    async fn endpoints_for_agent(&self, agent: &Agent) -> Result<Vec<Endpoint>> {
        monitoring::endpoints_for_agent(self, agent).await
    }

    async fn record_results(
        &self,
        agent: &Agent,
        results: &[CheckResult],
        now: DateTime<Utc>,
    ) -> Result<RecordOutcome> {
        monitoring::record_results(self, agent, results, now).await
    }

    async fn list_results(
        &self,
        scope: Scope,
        endpoint_id: Uuid,
        filter: &ResultFilter,
        page: Page,
    ) -> Result<Option<(i64, Vec<StoredResult>)>> {
        monitoring::list_results(self, scope, endpoint_id, filter, page).await
    }

    async fn prune_results(&self, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        monitoring::prune_results(self, before, limit).await
    }

    async fn create_notifier(&self, org_id: Uuid, kind: &str, url: &str) -> Result<Notifier> {
        monitoring::create_notifier(self, org_id, kind, url).await
    }

    async fn list_notifiers(&self, scope: Scope) -> Result<Vec<Notifier>> {
        monitoring::list_notifiers(self, scope).await
    }

    async fn delete_notifier(&self, scope: Scope, id: Uuid) -> Result<bool> {
        monitoring::delete_notifier(self, scope, id).await
    }

    async fn create_maintenance_window(
        &self,
        window: NewMaintenanceWindow,
    ) -> Result<MaintenanceWindow> {
        monitoring::create_maintenance_window(self, window).await
    }

    async fn list_maintenance_windows(&self, scope: Scope) -> Result<Vec<MaintenanceWindow>> {
        monitoring::list_maintenance_windows(self, scope).await
    }

    async fn delete_maintenance_window(&self, scope: Scope, id: Uuid) -> Result<bool> {
        monitoring::delete_maintenance_window(self, scope, id).await
    }

    async fn claim_notifications(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Notification>> {
        monitoring::claim_notifications(self, owner, now, lease_until, limit).await
    }

    async fn settle_notification(
        &self,
        id: Uuid,
        owner: Uuid,
        outcome: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        monitoring::settle_notification(self, id, owner, outcome, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma<T: FromSql>(conn: &Connection, name: &str) -> T {
        conn.pragma_query_value(None, name, |row| row.get(0))
            .expect("a pragma")
    }

    #[tokio::test]
    async fn migrates_an_empty_file_and_reopens_a_populated_one() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("muster.db");
        let store = SqliteStore::open(&path).await.expect("open an empty file");
        let acme = store.create_organization("acme").await.expect("insert");
        let latest = MIGRATIONS.last().map(|(v, _)| *v).expect("a migration");
        {
            let conn = store.writer.lock().await;
            assert_eq!(pragma::<i64>(&conn, "user_version"), latest);
            assert_eq!(pragma::<String>(&conn, "journal_mode"), "wal");
            assert_eq!(pragma::<i64>(&conn, "synchronous"), 2, "synchronous=FULL");
            assert!(pragma::<bool>(&conn, "foreign_keys"));
        }
        drop(store);

        // Re-running a migration would fail (the fencing counter's row
        // exists), so reopening proves applied migrations are skipped.
        let store = SqliteStore::open(&path).await.expect("reopen");
        let found = store.organization_by_name("acme").await.expect("read");
        assert_eq!(found, Some(acme));
    }

    #[tokio::test]
    async fn refuses_a_schema_newer_than_it_knows() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("muster.db");
        drop(SqliteStore::open(&path).await.expect("open"));
        let conn = Connection::open(&path).expect("open directly");
        conn.pragma_update(None, "user_version", 99)
            .expect("set a future version");
        drop(conn);
        match SqliteStore::open(&path).await {
            Err(StoreError::Corrupt(message)) => {
                assert!(message.contains("version 99"), "{message}")
            }
            other => panic!("expected a corrupt-schema error, found {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_missing_directory_is_unavailable_and_named() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("absent").join("muster.db");
        match SqliteStore::open(&path).await {
            Err(StoreError::Unavailable(message)) => {
                assert!(message.contains("absent"), "{message}")
            }
            other => panic!("expected an unavailable database, found {other:?}"),
        }
    }

    #[test]
    fn unique_violations_name_their_table_and_columns() {
        assert_eq!(
            conflicting_columns(Some(
                "UNIQUE constraint failed: workspaces.org_id, workspaces.name"
            )),
            "workspaces (org_id, name)"
        );
        assert_eq!(
            conflicting_columns(Some("UNIQUE constraint failed: organizations.name")),
            "organizations (name)"
        );
        assert_eq!(conflicting_columns(None), "a row with these values");
    }
}
