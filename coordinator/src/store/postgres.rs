//! The PostgreSQL store: the production backend, shareable by several
//! coordinators. Runs are claimed with `FOR UPDATE SKIP LOCKED` in one
//! statement, and no transaction is ever held while a job runs.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use super::*;

mod monitoring;

/// Forward-only migrations, applied in order at start.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/postgres/0001_init.sql")),
    (2, include_str!("migrations/postgres/0002_cancel.sql")),
    (3, include_str!("migrations/postgres/0003_leases.sql")),
    (4, include_str!("migrations/postgres/0004_log_check.sql")),
    (5, include_str!("migrations/postgres/0005_artifacts.sql")),
    (6, include_str!("migrations/postgres/0006_revocation.sql")),
    (
        7,
        include_str!("migrations/postgres/0007_cluster_settings.sql"),
    ),
    (8, include_str!("migrations/postgres/0008_monitoring.sql")),
    (9, include_str!("migrations/postgres/0009_queue_order.sql")),
];

/// Serialises schema changes between coordinators starting at once.
const MIGRATION_LOCK: i64 = 0x6d75_7374_6572;

pub struct PgStore {
    pool: Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("status", &self.pool.status())
            .finish()
    }
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            // "Key (name)=(acme) already exists.": Conflict's message says the last part.
            let detail = db.detail().unwrap_or(db.message());
            let what = detail
                .trim_end_matches('.')
                .trim_end_matches(" already exists");
            return StoreError::Conflict(what.to_owned());
        }
        // Text with a NUL character, as a parameter or inside JSON, or a
        // time outside PostgreSQL's range (before 4713 BC): the value is
        // wrong, not the database.
        if [
            SqlState::CHARACTER_NOT_IN_REPERTOIRE,
            SqlState::UNTRANSLATABLE_CHARACTER,
            SqlState::DATETIME_FIELD_OVERFLOW,
        ]
        .contains(db.code())
        {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            return StoreError::Invalid(format!("{}{detail}", db.message()));
        }
        return StoreError::Database(db.message().to_owned());
    }
    if e.is_closed() {
        return StoreError::Unavailable(e.to_string());
    }
    StoreError::Database(e.to_string())
}

/// Every statement runs as a named prepared statement cached per pooled
/// connection (deadpool's statement cache, keyed by the statement's final
/// text, so one built with `format!` from constant parts is cached like a
/// literal). tokio-postgres would otherwise send a text statement as a
/// prepare of its own before executing it: two round trips each, and the
/// server parsing and planning it every time.
#[async_trait]
trait Cached: GenericClient {
    async fn query_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        self.query(&self.prepare_cached(sql).await?, params).await
    }

    async fn query_one_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Row, tokio_postgres::Error> {
        self.query_one(&self.prepare_cached(sql).await?, params)
            .await
    }

    async fn query_opt_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Option<Row>, tokio_postgres::Error> {
        self.query_opt(&self.prepare_cached(sql).await?, params)
            .await
    }

    async fn execute_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<u64, tokio_postgres::Error> {
        self.execute(&self.prepare_cached(sql).await?, params).await
    }
}

impl<C: GenericClient> Cached for C {}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_err(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// A JSONB column. One that does not read back is corrupt data, answered as
/// such, never a panic in the request that met it.
fn json_column(row: &Row, column: &str) -> Result<serde_json::Value> {
    row.try_get(column)
        .map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn labels_json(labels: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::to_value(labels).unwrap_or_default()
}

fn labels_from(v: serde_json::Value) -> Result<BTreeMap<String, String>> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

/// A run's columns, read from a row source named `r` (the runs table, or
/// a data-modifying CTE returning `runs.*`) joined as [`run_joins`] says.
macro_rules! run_columns {
    () => {
        "r.id, r.org_id, o.name AS organization, r.workspace_id, r.workspace, \
    r.bundle_digest, r.block, r.block_version, r.action, r.parameters, r.reason, r.trigger, r.plan, \
    r.runner_labels, r.status, r.exit_code, r.error, r.runner_id, rn.name AS runner_name, r.executor, \
    r.image, r.image_digest, r.fencing_token, r.attempt, r.log_acked_seq, r.created_at, r.leased_at, \
    r.lease_expires_at, r.started_at, r.finished_at, r.cancel_requested_at, \
    r.max_attempts, r.timeout_secs, r.log_seq_base, r.log_bytes, r.log_sha256, r.log_verified"
    };
}

macro_rules! run_joins {
    () => {
        "JOIN organizations o ON o.id = r.org_id LEFT JOIN runners rn ON rn.id = r.runner_id"
    };
}

/// A write to one run that returns it whole in the same statement, saving
/// the read after it: `$write` is an `INSERT` or `UPDATE` of `runs` ending
/// in `RETURNING runs.*`.
macro_rules! run_returning {
    ($write:literal) => {
        concat!(
            "WITH r AS (",
            $write,
            ") SELECT ",
            run_columns!(),
            " FROM r ",
            run_joins!()
        )
    };
}

/// Leases the oldest queued run `claim`'s runner may take (see
/// [`Store::claim_run`]), on a connection or in a transaction.
async fn claim_with<C: GenericClient + Sync>(client: &C, claim: &Claim) -> Result<Option<Run>> {
    // The runner's row is share-locked, so a revocation waits for a claim
    // in flight and then sees its run among the runner's active ones; a
    // claim after a revocation finds no runner and takes nothing. It is
    // locked only once there is a run to take: a row lock makes the
    // transaction a write, and an empty claim (most dispatch passes)
    // would wait for a WAL flush for nothing.
    let row = client
        .query_opt_cached(
            run_returning!(
                "WITH next AS (SELECT muster_next_queued_run($2::uuid, $3::jsonb) AS id), \
                 runner AS (SELECT id FROM runners WHERE id = $1 AND revoked_at IS NULL \
                   AND EXISTS (SELECT 1 FROM next WHERE id IS NOT NULL) FOR SHARE) \
                 UPDATE runs SET status = 'leased', runner_id = $1, fencing_token = nextval('fencing_tokens'), \
                   attempt = runs.attempt + 1, leased_at = now(), lease_expires_at = $4 \
                 FROM next, runner WHERE runs.id = next.id RETURNING runs.*"
            ),
            &[&claim.runner_id, &claim.runner_org, &labels_json(&claim.labels), &claim.lease_expires_at],
        )
        .await
        .map_err(db_err)?;
    row.as_ref().map(run_from_row).transpose()
}

/// Records run `id`'s result in `tx` (see [`Store::finish_run`]).
async fn finish_with(
    tx: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    token: i64,
    end: &RunEnd,
) -> Result<Option<Run>> {
    let Some(held) = tx
        .query_opt_cached(
            "SELECT log_seq_base FROM runs \
             WHERE id = $1 AND fencing_token = $2 AND status IN ('leased', 'running') FOR UPDATE",
            &[&id, &token],
        )
        .await
        .map_err(db_err)?
    else {
        return Ok(None);
    };
    let log_check = match &end.log_account {
        None => None,
        Some(account) => {
            // The stream delivers a run's messages in order, so every
            // chunk the runner sent before its result is stored by now.
            let mut digest = LogDigest::default();
            let mut after: i64 = held.get(0);
            while after < end.last_seq {
                let rows = tx
                    .query_cached(
                        "SELECT seq, data FROM run_logs WHERE run_id = $1 AND seq > $2 AND seq <= $3 \
                         ORDER BY seq LIMIT $4",
                        &[&id, &after, &end.last_seq, &LOG_CHECK_PAGE],
                    )
                    .await
                    .map_err(db_err)?;
                let Some(last) = rows.last() else { break };
                after = last.get(0);
                for row in &rows {
                    digest.update(row.get::<_, &[u8]>(1));
                }
            }
            Some(digest.check(account))
        }
    };
    let row = tx
        .query_one_cached(
            run_returning!(
                "UPDATE runs SET status = $2, exit_code = $3, error = $4, log_last_seq = $5, finished_at = $6, \
                   lease_expires_at = NULL, log_bytes = $7, log_sha256 = $8, log_verified = $9 \
                 WHERE id = $1 RETURNING runs.*"
            ),
            &[
                &id,
                &end.status.as_str(),
                &end.exit_code,
                &end.error,
                &end.last_seq,
                &end.finished_at,
                &log_check.as_ref().map(|c| c.bytes),
                &log_check.as_ref().map(|c| c.sha256.as_str()),
                &log_check.as_ref().map(|c| c.verified),
            ],
        )
        .await
        .map_err(db_err)?;
    run_from_row(&row).map(Some)
}

const RUN_SELECT: &str = concat!("SELECT ", run_columns!(), " FROM runs r ", run_joins!());

fn run_from_row(row: &Row) -> Result<Run> {
    let status: String = row.get("status");
    Ok(Run {
        id: row.get("id"),
        org_id: row.get("org_id"),
        organization: row.get("organization"),
        workspace_id: row.get("workspace_id"),
        workspace: row.get("workspace"),
        bundle_digest: row.get("bundle_digest"),
        block: row.get("block"),
        block_version: row.get("block_version"),
        action: row.get("action"),
        parameters: json_column(row, "parameters")?,
        reason: row.get("reason"),
        trigger: json_column(row, "trigger")?,
        plan: json_column(row, "plan")?,
        runner_labels: labels_from(json_column(row, "runner_labels")?)?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status '{status}'")))?,
        exit_code: row.get("exit_code"),
        error: row.get("error"),
        runner_id: row.get("runner_id"),
        runner_name: row.get("runner_name"),
        executor: row.get("executor"),
        image: row.get("image"),
        image_digest: row.get("image_digest"),
        fencing_token: row.get("fencing_token"),
        attempt: row.get("attempt"),
        log_acked_seq: row.get("log_acked_seq"),
        created_at: row.get("created_at"),
        leased_at: row.get("leased_at"),
        lease_expires_at: row.get("lease_expires_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        cancel_requested_at: row.get("cancel_requested_at"),
        max_attempts: row.get("max_attempts"),
        timeout_secs: row.get("timeout_secs"),
        log_seq_base: row.get("log_seq_base"),
        log_check: match (
            row.get::<_, Option<i64>>("log_bytes"),
            row.get::<_, Option<String>>("log_sha256"),
            row.get::<_, Option<bool>>("log_verified"),
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

const WORKSPACE_SELECT: &str =
    "SELECT w.id, w.org_id, o.name AS organization, w.name, w.bundle_digest, \
    w.model, w.created_at, w.updated_at FROM workspaces w JOIN organizations o ON o.id = w.org_id";

fn workspace_from_row(row: &Row) -> Result<Workspace> {
    Ok(Workspace {
        id: row.get("id"),
        org_id: row.get("org_id"),
        organization: row.get("organization"),
        name: row.get("name"),
        bundle_digest: row.get("bundle_digest"),
        model: json_column(row, "model")?,
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}

fn api_key_from_row(row: &Row) -> ApiKey {
    ApiKey {
        id: row.get("id"),
        identity_id: row.get("identity_id"),
        org_id: row.get("org_id"),
        name: row.get("name"),
        prefix: row.get("prefix"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        last_used_at: row.get("last_used_at"),
        revoked_at: row.get("revoked_at"),
    }
}

const RUNNER_SELECT: &str = "SELECT rn.id, rn.org_id, rn.name, rn.labels, rn.capacity, rn.version, \
    rn.cert_serial, rn.cert_not_after, rn.previous_cert_serial, rn.connected, rn.created_at, \
    rn.last_seen_at, rn.revoked_at, \
    (SELECT count(*) FROM runs r WHERE r.runner_id = rn.id AND r.status IN ('leased', 'running')) AS active_runs \
    FROM runners rn";

fn runner_from_row(row: &Row) -> Result<Runner> {
    Ok(Runner {
        id: row.get("id"),
        org_id: row.get("org_id"),
        name: row.get("name"),
        labels: labels_from(json_column(row, "labels")?)?,
        capacity: row.get("capacity"),
        version: row.get("version"),
        cert_serial: row.get("cert_serial"),
        cert_not_after: row.get("cert_not_after"),
        previous_cert_serial: row.get("previous_cert_serial"),
        connected: row.get("connected"),
        created_at: row.get("created_at"),
        last_seen_at: row.get("last_seen_at"),
        revoked_at: row.get("revoked_at"),
        active_runs: row.get("active_runs"),
    })
}

impl PgStore {
    /// Connects, and applies pending migrations.
    pub async fn connect(url: &str, max_connections: usize) -> Result<PgStore> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid database URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute_cached("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db_err)?;
        let result = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, \
                     applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await
                .map_err(db_err)?;
            let applied: i32 = client
                .query_one_cached("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(db_err)?
                .get(0);
            if let Some((latest, _)) = MIGRATIONS.last() {
                if applied > *latest {
                    return Err(StoreError::Corrupt(format!(
                        "the database schema is version {applied}, newer than this coordinator knows ({latest}); upgrade the coordinator"
                    )));
                }
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
                let tx = client.transaction().await.map_err(db_err)?;
                tx.batch_execute(sql).await.map_err(db_err)?;
                tx.execute_cached("INSERT INTO schema_migrations (version) VALUES ($1)", &[version]).await.map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                tracing::info!(version, "applied database migration");
            }
            Ok(())
        }
        .await;
        client
            .execute_cached("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db_err)?;
        result
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

#[async_trait]
impl Store for PgStore {
    async fn create_organization(&self, name: &str) -> Result<Organization> {
        let client = self.client().await?;
        let row = client
            .query_one_cached(
                "INSERT INTO organizations (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
                &[&Uuid::now_v7(), &name],
            )
            .await
            .map_err(db_err)?;
        Ok(Organization {
            id: row.get(0),
            name: row.get(1),
            created_at: row.get(2),
        })
    }

    async fn organization_by_name(&self, name: &str) -> Result<Option<Organization>> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT id, name, created_at FROM organizations WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(db_err)?;
        Ok(row.map(|row| Organization {
            id: row.get(0),
            name: row.get(1),
            created_at: row.get(2),
        }))
    }

    async fn list_organizations(&self, scope: Scope) -> Result<Vec<Organization>> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT id, name, created_at FROM organizations WHERE ($1::uuid IS NULL OR id = $1) ORDER BY name",
                &[&scope.org()],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|row| Organization {
                id: row.get(0),
                name: row.get(1),
                created_at: row.get(2),
            })
            .collect())
    }

    async fn create_identity(&self, org_id: Uuid, name: &str, role: Role) -> Result<Identity> {
        let client = self.client().await?;
        let row = client
            .query_one_cached(
                "WITH i AS (INSERT INTO identities (id, org_id, name, role) VALUES ($1, $2, $3, $4) RETURNING id, org_id, name) \
                 SELECT i.id, i.org_id, o.name, i.name FROM i JOIN organizations o ON o.id = i.org_id",
                &[&Uuid::now_v7(), &org_id, &name, &role.as_str()],
            )
            .await
            .map_err(db_err)?;
        Ok(Identity {
            id: row.get(0),
            org_id: row.get(1),
            org_name: row.get(2),
            name: row.get(3),
            role,
        })
    }

    async fn bootstrap(&self, admin: NewApiKeyForBootstrap) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let inserted = tx
            .execute_cached(
                "INSERT INTO bootstrap DEFAULT VALUES ON CONFLICT DO NOTHING",
                &[],
            )
            .await
            .map_err(db_err)?;
        if inserted == 0 {
            return Ok(false);
        }
        let org_id: Uuid = tx
            .query_one_cached(
                "INSERT INTO organizations (id, name) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                &[&Uuid::now_v7(), &admin.org_name],
            )
            .await
            .map_err(db_err)?
            .get(0);
        let identity_id = Uuid::now_v7();
        tx.execute_cached(
            "INSERT INTO identities (id, org_id, name, role) VALUES ($1, $2, $3, $4)",
            &[
                &identity_id,
                &org_id,
                &admin.identity_name,
                &Role::SuperAdmin.as_str(),
            ],
        )
        .await
        .map_err(db_err)?;
        tx.execute_cached(
            "INSERT INTO api_keys (id, identity_id, org_id, name, prefix, token_hash) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&Uuid::now_v7(), &identity_id, &org_id, &admin.key_name, &admin.prefix, &admin.token_hash],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn claim_setting(&self, name: &str, value: &str) -> Result<String> {
        let client = self.client().await?;
        client
            .execute_cached(
                "INSERT INTO cluster_settings (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &value],
            )
            .await
            .map_err(db_err)?;
        let row = client
            .query_one_cached(
                "SELECT value FROM cluster_settings WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(db_err)?;
        Ok(row.get(0))
    }

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey> {
        let client = self.client().await?;
        let row = client
            .query_one_cached(
                "INSERT INTO api_keys (id, identity_id, org_id, name, prefix, token_hash, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
                &[&Uuid::now_v7(), &key.identity_id, &key.org_id, &key.name, &key.prefix, &key.token_hash, &key.expires_at],
            )
            .await
            .map_err(db_err)?;
        Ok(api_key_from_row(&row))
    }

    async fn authenticate_api_key(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(ApiKey, Identity)>> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT k.*, i.name AS identity_name, i.role, o.name AS org_name \
                 FROM api_keys k JOIN identities i ON i.id = k.identity_id JOIN organizations o ON o.id = i.org_id \
                 WHERE k.token_hash = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2)",
                &[&token_hash, &now],
            )
            .await
            .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let role: String = row.get("role");
        let identity = Identity {
            id: row.get("identity_id"),
            org_id: row.get("org_id"),
            org_name: row.get("org_name"),
            name: row.get("identity_name"),
            role: Role::parse(&role)
                .ok_or_else(|| StoreError::Corrupt(format!("role '{role}'")))?,
        };
        let mut key = api_key_from_row(&row);
        if super::use_to_record(key.last_used_at, now) {
            client
                .execute_cached(
                    "UPDATE api_keys SET last_used_at = $2 \
                     WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
                    &[&key.id, &now],
                )
                .await
                .map_err(db_err)?;
            key.last_used_at = Some(now);
        }
        Ok(Some((key, identity)))
    }

    async fn list_api_keys(&self, scope: Scope, page: Page) -> Result<(i64, Vec<ApiKey>)> {
        let client = self.client().await?;
        let count: i64 = client
            .query_one_cached(
                "SELECT count(*) FROM api_keys WHERE ($1::uuid IS NULL OR org_id = $1)",
                &[&scope.org()],
            )
            .await
            .map_err(db_err)?
            .get(0);
        let rows = client
            .query_cached(
                "SELECT * FROM api_keys WHERE ($1::uuid IS NULL OR org_id = $1) ORDER BY created_at, id LIMIT $2 OFFSET $3",
                &[&scope.org(), &i64::from(page.page_size), &page.offset()],
            )
            .await
            .map_err(db_err)?;
        Ok((count, rows.iter().map(api_key_from_row).collect()))
    }

    async fn revoke_api_key(&self, scope: Scope, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute_cached(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $3) WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2)",
                &[&id, &scope.org(), &now],
            )
            .await
            .map_err(db_err)?;
        Ok(n == 1)
    }

    async fn put_workspace(
        &self,
        org_id: Uuid,
        name: &str,
        digest: &str,
        model: &serde_json::Value,
        bundle: &[u8],
    ) -> Result<Workspace> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        tx.execute_cached(
            "INSERT INTO bundles (digest, size, data) VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
            &[&digest, &(bundle.len() as i64), &bundle],
        )
        .await
        .map_err(db_err)?;
        let id: Uuid = tx
            .query_one_cached(
                "INSERT INTO workspaces (id, org_id, name, bundle_digest, model) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (org_id, name) DO UPDATE SET bundle_digest = EXCLUDED.bundle_digest, \
                   model = EXCLUDED.model, updated_at = now() RETURNING id",
                &[&Uuid::now_v7(), &org_id, &name, &digest, model],
            )
            .await
            .map_err(db_err)?
            .get(0);
        let row = tx
            .query_one_cached(&format!("{WORKSPACE_SELECT} WHERE w.id = $1"), &[&id])
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        workspace_from_row(&row)
    }

    async fn workspaces_named(&self, scope: Scope, name: &str) -> Result<Vec<Workspace>> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                &format!("{WORKSPACE_SELECT} WHERE w.name = $1 AND ($2::uuid IS NULL OR w.org_id = $2) ORDER BY o.name"),
                &[&name, &scope.org()],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(workspace_from_row).collect()
    }

    async fn list_workspaces(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Workspace>)> {
        let client = self.client().await?;
        let count: i64 = client
            .query_one_cached(
                "SELECT count(*) FROM workspaces WHERE ($1::uuid IS NULL OR org_id = $1)",
                &[&scope.org()],
            )
            .await
            .map_err(db_err)?
            .get(0);
        let rows = client
            .query_cached(
                &format!("{WORKSPACE_SELECT} WHERE ($1::uuid IS NULL OR w.org_id = $1) ORDER BY o.name, w.name LIMIT $2 OFFSET $3"),
                &[&scope.org(), &i64::from(page.page_size), &page.offset()],
            )
            .await
            .map_err(db_err)?;
        Ok((
            count,
            rows.iter().map(workspace_from_row).collect::<Result<_>>()?,
        ))
    }

    async fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached("SELECT data FROM bundles WHERE digest = $1", &[&digest])
            .await
            .map_err(db_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn create_run(&self, run: NewRun) -> Result<Run> {
        let client = self.client().await?;
        let row = client
            .query_one_cached(
                run_returning!(
                    "INSERT INTO runs (id, org_id, workspace_id, workspace, bundle_digest, block, block_version, action, \
                     parameters, reason, trigger, plan, runner_labels, status, max_attempts, timeout_secs) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'queued', $14, $15) \
                     RETURNING runs.*"
                ),
                &[
                    &Uuid::now_v7(),
                    &run.org_id,
                    &run.workspace_id,
                    &run.workspace,
                    &run.bundle_digest,
                    &run.block,
                    &run.block_version,
                    &run.action,
                    &run.parameters,
                    &run.reason,
                    &run.trigger,
                    &run.plan,
                    &labels_json(&run.runner_labels),
                    &run.max_attempts,
                    &run.timeout_secs,
                ],
            )
            .await
            .map_err(db_err)?;
        run_from_row(&row)
    }

    async fn run(&self, scope: Scope, id: Uuid) -> Result<Option<Run>> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                &format!("{RUN_SELECT} WHERE r.id = $1 AND ($2::uuid IS NULL OR r.org_id = $2)"),
                &[&id, &scope.org()],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn list_runs(
        &self,
        scope: Scope,
        filter: &RunFilter,
        page: Page,
    ) -> Result<(i64, Vec<Run>)> {
        let client = self.client().await?;
        let condition = "($1::uuid IS NULL OR r.org_id = $1) AND ($2::text IS NULL OR r.workspace = $2) \
            AND ($3::text IS NULL OR r.block = $3) AND ($4::text IS NULL OR r.action = $4) \
            AND ($5::text IS NULL OR r.status = $5) AND ($6::text IS NULL OR r.trigger->>'api_key' = $6 \
              OR r.trigger->>'user' = $6 OR r.trigger->>'ci' = $6)";
        let status = filter.status.map(RunStatus::as_str);
        let count: i64 = client
            .query_one_cached(
                &format!("SELECT count(*) FROM runs r WHERE {condition}"),
                &[
                    &scope.org(),
                    &filter.workspace,
                    &filter.block,
                    &filter.action,
                    &status,
                    &filter.trigger,
                ],
            )
            .await
            .map_err(db_err)?
            .get(0);
        let rows = client
            .query_cached(
                &format!("{RUN_SELECT} WHERE {condition} ORDER BY r.created_at DESC, r.id DESC LIMIT $7 OFFSET $8"),
                &[
                    &scope.org(),
                    &filter.workspace,
                    &filter.block,
                    &filter.action,
                    &status,
                    &filter.trigger,
                    &i64::from(page.page_size),
                    &page.offset(),
                ],
            )
            .await
            .map_err(db_err)?;
        Ok((count, rows.iter().map(run_from_row).collect::<Result<_>>()?))
    }

    async fn claim_run(&self, claim: &Claim) -> Result<Option<Run>> {
        let client = self.client().await?;
        claim_with(&client, claim).await
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
        let ids: Vec<Uuid> = held.iter().map(|(id, _)| *id).collect();
        let tokens: Vec<i64> = held.iter().map(|(_, t)| *t).collect();
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "UPDATE runs r SET lease_expires_at = $4 \
                 FROM UNNEST($2::uuid[], $3::bigint[]) AS h(id, token) \
                 WHERE r.id = h.id AND r.fencing_token = h.token AND r.runner_id = $1 \
                   AND r.status IN ('leased', 'running') \
                 RETURNING r.id, r.fencing_token, r.cancel_requested_at IS NOT NULL",
                &[&runner_id, &ids, &tokens, &expires_at],
            )
            .await
            .map_err(db_err)?;
        let mut renewal = LeaseRenewal::default();
        let mut extended = HashSet::new();
        for row in &rows {
            let held = (row.get(0), row.get(1));
            extended.insert(held);
            if row.get::<_, bool>(2) {
                renewal.cancel.push(held);
            }
        }
        renewal.stale = held
            .iter()
            .filter(|held| !extended.contains(held))
            .copied()
            .collect();
        Ok(renewal)
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<(Uuid, i64)>> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT id, fencing_token FROM runs \
                 WHERE status IN ('leased', 'running') AND lease_expires_at < $1 \
                 ORDER BY lease_expires_at LIMIT $2",
                &[&now, &limit],
            )
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn queued_runs(&self) -> Result<i64> {
        let client = self.client().await?;
        let row = client
            .query_one_cached("SELECT count(*) FROM runs WHERE status = 'queued'", &[])
            .await
            .map_err(db_err)?;
        Ok(row.get(0))
    }

    async fn abandon_run(
        &self,
        id: Uuid,
        token: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Run>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let n = tx
            .execute_cached(
                "UPDATE runs SET \
                   status = CASE \
                     WHEN attempt < max_attempts AND cancel_requested_at IS NULL THEN 'queued' \
                     WHEN timeout_secs IS NOT NULL AND started_at + timeout_secs * interval '1 second' <= $4 THEN 'timed_out' \
                     ELSE 'lost' END, \
                   error = CASE \
                     WHEN attempt < max_attempts AND cancel_requested_at IS NULL \
                       THEN 'attempt ' || attempt || ': ' || $3 || '; trying again' \
                     WHEN timeout_secs IS NOT NULL AND started_at + timeout_secs * interval '1 second' <= $4 \
                       THEN 'timed out after ' || timeout_secs || ' s (' || $3 || ')' \
                     ELSE $3 END, \
                   finished_at = CASE WHEN attempt < max_attempts AND cancel_requested_at IS NULL THEN NULL ELSE $4 END, \
                   log_seq_base = CASE WHEN attempt < max_attempts AND cancel_requested_at IS NULL \
                     THEN GREATEST(log_acked_seq, (SELECT COALESCE(MAX(seq), 0) FROM run_logs WHERE run_id = $1)) \
                     ELSE log_seq_base END, \
                   log_acked_seq = CASE WHEN attempt < max_attempts AND cancel_requested_at IS NULL \
                     THEN GREATEST(log_acked_seq, (SELECT COALESCE(MAX(seq), 0) FROM run_logs WHERE run_id = $1)) \
                     ELSE log_acked_seq END, \
                   runner_id = CASE WHEN attempt < max_attempts AND cancel_requested_at IS NULL THEN NULL ELSE runner_id END, \
                   started_at = CASE WHEN attempt < max_attempts AND cancel_requested_at IS NULL THEN NULL ELSE started_at END, \
                   leased_at = CASE WHEN attempt < max_attempts AND cancel_requested_at IS NULL THEN NULL ELSE leased_at END, \
                   lease_expires_at = NULL \
                 WHERE id = $1 AND fencing_token = $2 AND status IN ('leased', 'running')",
                &[&id, &token, &reason, &now],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Ok(None);
        }
        let row = tx
            .query_one_cached(&format!("{RUN_SELECT} WHERE r.id = $1"), &[&id])
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        run_from_row(&row).map(Some)
    }

    async fn put_artifacts(
        &self,
        id: Uuid,
        token: i64,
        files: &[(String, Vec<u8>)],
    ) -> Result<Fenced> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let held = tx
            .query_opt_cached(
                "SELECT 1 FROM runs WHERE id = $1 AND fencing_token = $2 \
                 AND status IN ('leased', 'running') FOR UPDATE",
                &[&id, &token],
            )
            .await
            .map_err(db_err)?;
        if held.is_none() {
            return Ok(Fenced::Stale);
        }
        for (path, data) in files {
            tx.execute_cached(
                "INSERT INTO run_artifacts (run_id, path, size, sha256, data) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (run_id, path) DO UPDATE SET size = $3, sha256 = $4, data = $5",
                &[&id, path, &(data.len() as i64), &sha256_hex(data), data],
            )
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(Fenced::Applied)
    }

    async fn artifacts(&self, scope: Scope, id: Uuid) -> Result<Option<Vec<Artifact>>> {
        if self.run(scope, id).await?.is_none() {
            return Ok(None);
        }
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT path, size, sha256 FROM run_artifacts WHERE run_id = $1 ORDER BY path",
                &[&id],
            )
            .await
            .map_err(db_err)?;
        Ok(Some(
            rows.iter()
                .map(|r| Artifact {
                    path: r.get(0),
                    size: r.get(1),
                    sha256: r.get(2),
                })
                .collect(),
        ))
    }

    async fn artifact(&self, scope: Scope, id: Uuid, path: &str) -> Result<Option<Vec<u8>>> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT a.data FROM run_artifacts a JOIN runs r ON r.id = a.run_id \
                 WHERE a.run_id = $1 AND a.path = $2 AND ($3::uuid IS NULL OR r.org_id = $3)",
                &[&id, &path, &scope.org()],
            )
            .await
            .map_err(db_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn cancel_run(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<CancelOutcome>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt_cached(
                "SELECT status FROM runs WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2) FOR UPDATE",
                &[&id, &scope.org()],
            )
            .await
            .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.get(0);
        let was_queued = status == "queued";
        tx.execute_cached(
            "UPDATE runs SET \
               status = CASE WHEN status = 'queued' THEN 'canceled' ELSE status END, \
               error = CASE WHEN status = 'queued' THEN 'canceled before it started' ELSE error END, \
               finished_at = CASE WHEN status = 'queued' THEN $2 ELSE finished_at END, \
               cancel_requested_at = COALESCE(cancel_requested_at, $2) \
             WHERE id = $1 AND status IN ('queued', 'leased', 'running')",
            &[&id, &now],
        )
        .await
        .map_err(db_err)?;
        let row = tx
            .query_one_cached(&format!("{RUN_SELECT} WHERE r.id = $1"), &[&id])
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        let run = run_from_row(&row)?;
        Ok(Some(if was_queued {
            CancelOutcome::Canceled(run)
        } else if run.status.is_final() {
            CancelOutcome::AlreadyFinal(run)
        } else {
            CancelOutcome::Requested(run)
        }))
    }

    async fn release_lease(&self, id: Uuid, token: i64) -> Result<Fenced> {
        let client = self.client().await?;
        let n = client
            .execute_cached(
                "UPDATE runs SET status = 'queued', runner_id = NULL, leased_at = NULL, lease_expires_at = NULL \
                 WHERE id = $1 AND fencing_token = $2 AND status = 'leased'",
                &[&id, &token],
            )
            .await
            .map_err(db_err)?;
        Ok(if n == 1 {
            Fenced::Applied
        } else {
            Fenced::Stale
        })
    }

    async fn mark_running(&self, id: Uuid, token: i64, start: &RunStart) -> Result<Option<Run>> {
        // The one commit of a run's life that does not wait for its WAL
        // flush (`synchronous_commit` off for this statement's transaction
        // only). Losing it in a crash loses nothing that matters: WAL is
        // replayed in order, so once a later durable commit (the result,
        // another run's claim) is on disk, this one is too; and what a
        // crash can take back is only the run's move from `leased` to
        // `running` with its start time and executor. The fencing token and
        // the lease are untouched by it, `finish_run` and `append_logs`
        // accept a `leased` run as well, and a runner resends its `Started`
        // when it reconnects, so the mark is made again. At worst a run
        // that a lost runner leaves behind ends `lost` instead of
        // `timed_out` (that needs the start time).
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                run_returning!(
                    "UPDATE runs SET status = 'running', executor = $3, image = $4, image_digest = $5, started_at = $6 \
                     FROM (SELECT set_config('synchronous_commit', 'off', true)) AS commit_mode \
                     WHERE runs.id = $1 AND runs.fencing_token = $2 AND runs.status IN ('leased', 'running') \
                     RETURNING runs.*"
                ),
                &[&id, &token, &start.executor, &start.image, &start.image_digest, &start.started_at],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn finish_run(&self, id: Uuid, token: i64, end: &RunEnd) -> Result<Option<Run>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let run = finish_with(&tx, id, token, end).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(run)
    }

    async fn finish_and_claim(
        &self,
        id: Uuid,
        token: i64,
        end: &RunEnd,
        next: &Claim,
    ) -> Result<Option<(Run, Option<Run>)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let Some(run) = finish_with(&tx, id, token, end).await? else {
            return Ok(None);
        };
        let next = claim_with(&tx, next).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(Some((run, next)))
    }

    async fn append_logs(
        &self,
        id: Uuid,
        token: i64,
        chunks: &[LogChunk],
    ) -> Result<std::result::Result<i64, Fenced>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt_cached(
                "SELECT log_acked_seq FROM runs WHERE id = $1 AND fencing_token = $2 AND status IN ('leased', 'running') FOR UPDATE",
                &[&id, &token],
            )
            .await
            .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(Err(Fenced::Stale));
        };
        let mut acked: i64 = row.get(0);
        let fresh: Vec<&LogChunk> = chunks.iter().filter(|c| c.seq > acked).collect();
        if !fresh.is_empty() {
            let seqs: Vec<i64> = fresh.iter().map(|c| c.seq).collect();
            let streams: Vec<i16> = fresh.iter().map(|c| c.stream).collect();
            let ts: Vec<DateTime<Utc>> = fresh.iter().map(|c| c.ts).collect();
            let data: Vec<&[u8]> = fresh.iter().map(|c| c.data.as_slice()).collect();
            tx.execute_cached(
                "INSERT INTO run_logs (run_id, seq, stream, ts, data) \
                 SELECT $1, * FROM UNNEST($2::bigint[], $3::smallint[], $4::timestamptz[], $5::bytea[]) \
                 ON CONFLICT DO NOTHING",
                &[&id, &seqs, &streams, &ts, &data],
            )
            .await
            .map_err(db_err)?;
            // Advance the acknowledgement over whatever is now contiguous,
            // including chunks that arrived earlier out of order. Only a chunk
            // that fills the first gap can advance it, so a gap that stays
            // open costs no scan; rows of the contiguous prefix have
            // `seq - row_number() = acked`.
            if fresh.iter().any(|c| c.seq == acked + 1) {
                let row = tx
                    .query_one_cached(
                        "SELECT COALESCE(MAX(seq), $2) FROM ( \
                           SELECT seq, seq - row_number() OVER (ORDER BY seq) AS base \
                           FROM run_logs WHERE run_id = $1 AND seq > $2) s \
                         WHERE base = $2",
                        &[&id, &acked],
                    )
                    .await
                    .map_err(db_err)?;
                acked = row.get(0);
            }
            tx.execute_cached(
                "UPDATE runs SET log_acked_seq = $2 WHERE id = $1",
                &[&id, &acked],
            )
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(Ok(acked))
    }

    async fn logs(&self, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<LogChunk>> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT seq, stream, ts, data FROM run_logs WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&id, &after_seq, &limit],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|row| LogChunk {
                seq: row.get(0),
                stream: row.get(1),
                ts: row.get(2),
                data: row.get(3),
            })
            .collect())
    }

    async fn active_runs_of_runner(&self, runner_id: Uuid) -> Result<Vec<Run>> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                &format!("{RUN_SELECT} WHERE r.runner_id = $1 AND r.status IN ('leased', 'running') ORDER BY r.leased_at"),
                &[&runner_id],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(run_from_row).collect()
    }

    async fn create_join_token(&self, token: NewJoinToken) -> Result<JoinToken> {
        let client = self.client().await?;
        let row = client
            .query_one_cached(
                "INSERT INTO join_tokens (id, token_hash, org_id, created_by, single_use, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, org_id, single_use, expires_at",
                &[&Uuid::now_v7(), &token.token_hash, &token.org_id, &token.created_by, &token.single_use, &token.expires_at],
            )
            .await
            .map_err(db_err)?;
        Ok(JoinToken {
            id: row.get(0),
            org_id: row.get(1),
            single_use: row.get(2),
            expires_at: row.get(3),
        })
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<std::result::Result<JoinToken, JoinTokenRefusal>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt_cached(
                "SELECT id, org_id, single_use, expires_at, used_at FROM join_tokens WHERE token_hash = $1 FOR UPDATE",
                &[&token_hash],
            )
            .await
            .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(Err(JoinTokenRefusal::Unknown));
        };
        let token = JoinToken {
            id: row.get(0),
            org_id: row.get(1),
            single_use: row.get(2),
            expires_at: row.get(3),
        };
        let used_at: Option<DateTime<Utc>> = row.get(4);
        if token.expires_at <= now {
            return Ok(Err(JoinTokenRefusal::Expired));
        }
        if token.single_use && used_at.is_some() {
            return Ok(Err(JoinTokenRefusal::Used));
        }
        tx.execute_cached(
            "UPDATE join_tokens SET used_at = coalesce(used_at, $2) WHERE id = $1",
            &[&token.id, &now],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(Ok(token))
    }

    async fn create_runner(&self, runner: NewRunner) -> Result<Runner> {
        {
            let client = self.client().await?;
            client
                .execute_cached(
                    "INSERT INTO runners (id, org_id, name, labels, capacity, cert_serial, cert_not_after) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &runner.id,
                        &runner.org_id,
                        &runner.name,
                        &labels_json(&runner.labels),
                        &runner.capacity,
                        &runner.cert_serial,
                        &runner.cert_not_after,
                    ],
                )
                .await
                .map_err(db_err)?;
        }
        self.runner(runner.id)
            .await?
            .ok_or_else(|| StoreError::Database("inserted runner vanished".into()))
    }

    async fn runner(&self, id: Uuid) -> Result<Option<Runner>> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(&format!("{RUNNER_SELECT} WHERE rn.id = $1"), &[&id])
            .await
            .map_err(db_err)?;
        row.as_ref().map(runner_from_row).transpose()
    }

    async fn list_runners(&self, scope: Scope, page: Page) -> Result<(i64, Vec<Runner>)> {
        let client = self.client().await?;
        // An organization sees its own runners and the instance-wide ones that serve it.
        let condition = "($1::uuid IS NULL OR rn.org_id = $1 OR rn.org_id IS NULL)";
        let count: i64 = client
            .query_one_cached(
                &format!("SELECT count(*) FROM runners rn WHERE {condition}"),
                &[&scope.org()],
            )
            .await
            .map_err(db_err)?
            .get(0);
        let rows = client
            .query_cached(
                &format!("{RUNNER_SELECT} WHERE {condition} ORDER BY rn.created_at, rn.id LIMIT $2 OFFSET $3"),
                &[&scope.org(), &i64::from(page.page_size), &page.offset()],
            )
            .await
            .map_err(db_err)?;
        Ok((
            count,
            rows.iter().map(runner_from_row).collect::<Result<_>>()?,
        ))
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
        let client = self.client().await?;
        client
            .execute_cached(
                "UPDATE runners SET connected = true, labels = $2, capacity = $3, version = $4, last_seen_at = $5, \
                   previous_cert_serial = CASE WHEN cert_serial = $6 THEN NULL ELSE previous_cert_serial END \
                 WHERE id = $1",
                &[&id, &labels_json(labels), &capacity, &version, &now, &cert_serial],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn runner_seen(&self, id: Uuid, now: DateTime<Utc>) -> Result<()> {
        let client = self.client().await?;
        client
            .execute_cached(
                "UPDATE runners SET last_seen_at = $2 WHERE id = $1",
                &[&id, &now],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn runner_disconnected(&self, id: Uuid, now: DateTime<Utc>) -> Result<()> {
        let client = self.client().await?;
        client
            .execute_cached(
                "UPDATE runners SET connected = false, last_seen_at = $2 WHERE id = $1",
                &[&id, &now],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn revoke_runner(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Runner>> {
        let n = {
            let client = self.client().await?;
            client
                .execute_cached(
                    "UPDATE runners SET revoked_at = coalesce(revoked_at, $3) \
                     WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2)",
                    &[&id, &scope.org(), &now],
                )
                .await
                .map_err(db_err)?
        };
        if n == 0 {
            return Ok(None);
        }
        self.runner(id).await
    }

    async fn revoked_runners(&self) -> Result<Vec<RevokedRunner>> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT id, cert_serial, previous_cert_serial FROM runners \
                 WHERE revoked_at IS NOT NULL ORDER BY id",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|row| RevokedRunner {
                id: row.get(0),
                cert_serials: std::iter::once(row.get::<_, String>(1))
                    .chain(row.get::<_, Option<String>>(2))
                    .collect(),
            })
            .collect())
    }

    async fn runner_cert_renewed(
        &self,
        id: Uuid,
        presented_serial: &str,
        serial: &str,
        not_after: DateTime<Utc>,
    ) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute_cached(
                "UPDATE runners SET previous_cert_serial = $2, cert_serial = $3, cert_not_after = $4 \
                 WHERE id = $1 AND revoked_at IS NULL \
                   AND (cert_serial = $2 OR previous_cert_serial = $2)",
                &[&id, &presented_serial, &serial, &not_after],
            )
            .await
            .map_err(db_err)?;
        Ok(n == 1)
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
