//! The PostgreSQL store's monitoring half (issue 6). Evaluation runs inside
//! the transaction that changes what it reads: the endpoints concerned are
//! locked (`FOR UPDATE`, in id order), so coordinators sharing the database
//! evaluate one endpoint one at a time. Lock order everywhere: the agent's
//! row, then endpoints by id.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use muster_common::monitor::{AgentHealth, CheckResult, ConditionSpec};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{db_err, Cached, PgStore};
use crate::monitoring::eval::{for_storage, Loaded};
use crate::monitoring::notify::Alert;
use crate::monitoring::{
    parse_kind, verdict_str, Agent, CheckOptions, Delivery, Endpoint, EndpointConfig,
    EndpointDetail, Incident, LocationState, MaintenanceWindow, NewAgent, NewMaintenanceWindow,
    Notification, Notifier, RecordOutcome, Refused, ResultFilter, Status, StoredResult, Uptime,
};
use crate::store::{Page, Result, Scope, StoreError};

const AGENT_SELECT: &str = "SELECT a.*, (SELECT count(*) FROM endpoint_locations el \
    WHERE el.org_id = a.org_id AND el.location = a.location) AS endpoint_count FROM agents a";

fn agent_from_row(row: &Row) -> Agent {
    Agent {
        id: row.get("id"),
        org_id: row.get("org_id"),
        name: row.get("name"),
        location: row.get("location"),
        prefix: row.get("prefix"),
        created_at: row.get("created_at"),
        revoked_at: row.get("revoked_at"),
        version: row.get("version"),
        endpoints_version: row.get("endpoints_version"),
        buffered_results: row.get("buffered_results"),
        checks_per_minute: row.get("checks_per_minute"),
        last_heartbeat_at: row.get("last_heartbeat_at"),
        last_report_at: row.get("last_report_at"),
        silent_since: row.get("silent_since"),
        endpoint_count: row.get("endpoint_count"),
    }
}

const ENDPOINT_SELECT: &str =
    "SELECT e.*, coalesce((SELECT array_agg(el.location ORDER BY el.location) \
    FROM endpoint_locations el WHERE el.endpoint_id = e.id), '{}') AS locations FROM endpoints e";

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn count_of(row: &Row, col: &str) -> Result<u32> {
    let n: i32 = row.get(col);
    u32::try_from(n).map_err(|e| corrupt(col, e))
}

fn status_of(text: &str) -> Result<Status> {
    Status::parse(text).ok_or_else(|| corrupt("status", format!("'{text}'")))
}

fn endpoint_from_row(row: &Row) -> Result<Endpoint> {
    let kind: String = row.get("kind");
    let conditions: Vec<ConditionSpec> =
        serde_json::from_value(row.get("conditions")).map_err(|e| corrupt("conditions", e))?;
    let options: CheckOptions =
        serde_json::from_value(row.get("options")).map_err(|e| corrupt("options", e))?;
    let status: String = row.get("status");
    let incident = match (
        row.get::<_, Option<Uuid>>("incident_id"),
        row.get::<_, Option<DateTime<Utc>>>("incident_started_at"),
    ) {
        (Some(id), Some(started_at)) => Some(Incident {
            id,
            started_at,
            muted: row.get("incident_muted"),
        }),
        _ => None,
    };
    Ok(Endpoint {
        id: row.get("id"),
        org_id: row.get("org_id"),
        config: EndpointConfig {
            name: row.get("name"),
            kind: parse_kind(&kind).ok_or_else(|| corrupt("kind", &kind))?,
            target: row.get("target"),
            interval: count_of(row, "interval_secs")?,
            timeout: count_of(row, "timeout_secs")?,
            locations: row.get("locations"),
            min_failing_locations: count_of(row, "min_failing_locations")?,
            failure_threshold: count_of(row, "failure_threshold")?,
            success_threshold: count_of(row, "success_threshold")?,
            conditions,
            options,
        },
        status: status_of(&status)?,
        status_changed_at: row.get("status_changed_at"),
        incident,
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}

fn state_from_row(row: &Row) -> Result<LocationState> {
    let state: String = row.get("state");
    let last_result = row
        .get::<_, Option<serde_json::Value>>("last_result")
        .map(|v| serde_json::from_value::<CheckResult>(v).map_err(|e| corrupt("last_result", e)))
        .transpose()?;
    Ok(LocationState {
        location: row.get("location"),
        state: status_of(&state)?,
        failures: count_of(row, "failures")?,
        successes: count_of(row, "successes")?,
        last_checked_at: row.get("last_checked_at"),
        last_result,
        agent_id: row.get("agent_id"),
    })
}

fn window_from_row(row: &Row) -> Result<MaintenanceWindow> {
    Ok(MaintenanceWindow {
        id: row.get("id"),
        org_id: row.get("org_id"),
        starts_at: row.get("starts_at"),
        ends_at: row.get("ends_at"),
        endpoint_ids: serde_json::from_value(row.get("endpoint_ids"))
            .map_err(|e| corrupt("endpoint_ids", e))?,
        reason: row.get("reason"),
        created_at: row.get("created_at"),
    })
}

fn notifier_from_row(row: &Row) -> Notifier {
    Notifier {
        id: row.get("id"),
        org_id: row.get("org_id"),
        kind: row.get("kind"),
        url: row.get("url"),
        created_at: row.get("created_at"),
    }
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

async fn agent_by_id(tx: &Transaction<'_>, id: Uuid) -> Result<Option<Agent>> {
    let row = tx
        .query_opt_cached(&format!("{AGENT_SELECT} WHERE a.id = $1"), &[&id])
        .await
        .map_err(db_err)?;
    Ok(row.as_ref().map(agent_from_row))
}

/// Loads endpoints with their states, locking the endpoints' rows in id order.
async fn load_locked(
    tx: &Transaction<'_>,
    condition: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Loaded>> {
    let rows = tx
        .query_cached(
            &format!("{ENDPOINT_SELECT} WHERE {condition} ORDER BY e.id FOR UPDATE OF e"),
            params,
        )
        .await
        .map_err(db_err)?;
    let endpoints = rows
        .iter()
        .map(endpoint_from_row)
        .collect::<Result<Vec<_>>>()?;
    let ids: Vec<Uuid> = endpoints.iter().map(|e| e.id).collect();
    let state_rows = tx
        .query_cached(
            "SELECT * FROM endpoint_locations WHERE endpoint_id = ANY($1) ORDER BY endpoint_id, location",
            &[&ids],
        )
        .await
        .map_err(db_err)?;
    let mut loaded: Vec<Loaded> = endpoints
        .into_iter()
        .map(|endpoint| Loaded {
            endpoint,
            states: Vec::new(),
        })
        .collect();
    for row in &state_rows {
        let endpoint_id: Uuid = row.get("endpoint_id");
        if let Some(l) = loaded.iter_mut().find(|l| l.endpoint.id == endpoint_id) {
            l.states.push(state_from_row(row)?);
        }
    }
    Ok(loaded)
}

/// Writes back what evaluation changed.
async fn write_back(tx: &Transaction<'_>, before: &Loaded, after: &Loaded) -> Result<()> {
    let (b, a) = (&before.endpoint, &after.endpoint);
    if (b.status, b.status_changed_at, &b.incident) != (a.status, a.status_changed_at, &a.incident)
    {
        tx.execute_cached(
            "UPDATE endpoints SET status = $2, status_changed_at = $3, incident_id = $4, \
             incident_started_at = $5, incident_muted = $6 WHERE id = $1",
            &[
                &a.id,
                &a.status.as_str(),
                &a.status_changed_at,
                &a.incident.as_ref().map(|i| i.id),
                &a.incident.as_ref().map(|i| i.started_at),
                &a.incident.as_ref().is_some_and(|i| i.muted),
            ],
        )
        .await
        .map_err(db_err)?;
    }
    for state in &after.states {
        if before.states.iter().any(|s| s == state) {
            continue;
        }
        tx.execute_cached(
            "UPDATE endpoint_locations SET state = $3, failures = $4, successes = $5, \
             last_checked_at = $6, last_result = $7, agent_id = $8 \
             WHERE endpoint_id = $1 AND location = $2",
            &[
                &a.id,
                &state.location,
                &state.state.as_str(),
                &to_i32(state.failures),
                &to_i32(state.successes),
                &state.last_checked_at,
                &state.last_result.as_ref().map(json),
                &state.agent_id,
            ],
        )
        .await
        .map_err(db_err)?;
    }
    Ok(())
}

/// Queues `alert` for every notifier of its organization; returns how many.
async fn queue(tx: &Transaction<'_>, alert: &Alert, now: DateTime<Utc>) -> Result<usize> {
    let notifiers: Vec<Uuid> = tx
        .query_cached(
            "SELECT id FROM notifiers WHERE org_id = $1 ORDER BY id",
            &[&alert.organization_id],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let payload = alert.payload();
    for notifier in &notifiers {
        tx.execute_cached(
            "INSERT INTO notification_outbox (id, org_id, notifier_id, subject_id, payload, created_at, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
            &[&Uuid::now_v7(), &alert.organization_id, notifier, &alert.subject_id(), &payload, &now],
        )
        .await
        .map_err(db_err)?;
    }
    Ok(notifiers.len())
}

async fn windows_at(
    tx: &Transaction<'_>,
    org_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<MaintenanceWindow>> {
    tx.query_cached(
        "SELECT * FROM maintenance_windows WHERE org_id = $1 AND starts_at <= $2 AND ends_at > $2",
        &[&org_id, &now],
    )
    .await
    .map_err(db_err)?
    .iter()
    .map(window_from_row)
    .collect()
}

/// Whether another agent still reports from the location.
async fn location_has_live_agent(tx: &Transaction<'_>, agent: &Agent) -> Result<bool> {
    Ok(tx
        .query_one_cached(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE org_id = $1 AND location = $2 AND id <> $3 \
               AND revoked_at IS NULL AND silent_since IS NULL AND last_heartbeat_at IS NOT NULL)",
            &[&agent.org_id, &agent.location, &agent.id],
        )
        .await
        .map_err(db_err)?
        .get(0))
}

/// The agent's location lost its last live agent: its states turn `unknown`.
async fn location_went_dark(
    tx: &Transaction<'_>,
    agent: &Agent,
    now: DateTime<Utc>,
    may_resolve: bool,
) -> Result<()> {
    if location_has_live_agent(tx, agent).await? {
        return Ok(());
    }
    let loaded = load_locked(
        tx,
        "e.org_id = $1 AND EXISTS (SELECT 1 FROM endpoint_locations el WHERE el.endpoint_id = e.id AND el.location = $2)",
        &[&agent.org_id, &agent.location],
    )
    .await?;
    for before in loaded {
        let mut after = before.clone();
        let alert = after.location_went_dark(&agent.location, now, may_resolve);
        write_back(tx, &before, &after).await?;
        if let Some(alert) = alert {
            queue(tx, &alert, now).await?;
        }
    }
    Ok(())
}

pub(super) async fn create_agent(s: &PgStore, agent: NewAgent) -> Result<Agent> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let id = Uuid::now_v7();
    tx.execute_cached(
        "INSERT INTO agents (id, org_id, name, location, prefix, token_hash, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &id,
            &agent.org_id,
            &agent.name,
            &agent.location,
            &agent.prefix,
            &agent.token_hash,
            &agent.created_by,
        ],
    )
    .await
    .map_err(db_err)?;
    let created = agent_by_id(&tx, id).await?;
    tx.commit().await.map_err(db_err)?;
    created.ok_or_else(|| StoreError::Database("inserted agent vanished".into()))
}

pub(super) async fn authenticate_agent(s: &PgStore, token_hash: &str) -> Result<Option<Agent>> {
    let client = s.client().await?;
    let row = client
        .query_opt_cached(
            &format!("{AGENT_SELECT} WHERE a.token_hash = $1 AND a.revoked_at IS NULL"),
            &[&token_hash],
        )
        .await
        .map_err(db_err)?;
    Ok(row.as_ref().map(agent_from_row))
}

pub(super) async fn list_agents(
    s: &PgStore,
    scope: Scope,
    page: Page,
) -> Result<(i64, Vec<Agent>)> {
    let client = s.client().await?;
    let count: i64 = client
        .query_one_cached(
            "SELECT count(*) FROM agents WHERE ($1::uuid IS NULL OR org_id = $1)",
            &[&scope.org()],
        )
        .await
        .map_err(db_err)?
        .get(0);
    let rows = client
        .query_cached(
            &format!("{AGENT_SELECT} WHERE ($1::uuid IS NULL OR a.org_id = $1) ORDER BY a.location, a.name, a.id LIMIT $2 OFFSET $3"),
            &[&scope.org(), &i64::from(page.page_size), &page.offset()],
        )
        .await
        .map_err(db_err)?;
    Ok((count, rows.iter().map(agent_from_row).collect()))
}

pub(super) async fn revoke_agent(
    s: &PgStore,
    scope: Scope,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Agent>> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let was_live: Option<bool> = tx
        .query_opt_cached(
            "SELECT revoked_at IS NULL FROM agents WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2) FOR UPDATE",
            &[&id, &scope.org()],
        )
        .await
        .map_err(db_err)?
        .map(|r| r.get(0));
    let Some(was_live) = was_live else {
        return Ok(None);
    };
    tx.execute_cached(
        "UPDATE agents SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1",
        &[&id, &now],
    )
    .await
    .map_err(db_err)?;
    let agent = agent_by_id(&tx, id).await?;
    if let (true, Some(agent)) = (was_live, &agent) {
        location_went_dark(&tx, agent, now, true).await?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(agent)
}

pub(super) async fn agent_heartbeat(
    s: &PgStore,
    id: Uuid,
    health: &AgentHealth,
    now: DateTime<Utc>,
) -> Result<Option<Agent>> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let Some(before) = tx
        .query_opt_cached(
            &format!("{AGENT_SELECT} WHERE a.id = $1 AND a.revoked_at IS NULL FOR UPDATE OF a"),
            &[&id],
        )
        .await
        .map_err(db_err)?
        .map(|row| {
            let incident: Option<Uuid> = row.get("silent_incident_id");
            let muted: bool = row.get("silent_muted");
            (agent_from_row(&row), incident, muted)
        })
    else {
        return Ok(None);
    };
    tx.execute_cached(
        "UPDATE agents SET version = $2, endpoints_version = $3, buffered_results = $4, \
         checks_per_minute = $5, last_heartbeat_at = $6, silent_since = NULL, \
         silent_incident_id = NULL, silent_muted = false WHERE id = $1",
        &[
            &id,
            &health.version,
            &health.endpoints_version,
            &i64::try_from(health.buffered_results).unwrap_or(i64::MAX),
            &health.checks_per_minute,
            &now,
        ],
    )
    .await
    .map_err(db_err)?;
    let agent = agent_by_id(&tx, id).await?;
    if let ((old, Some(incident), false), Some(agent)) = (&before, &agent) {
        if let Some(since) = old.silent_since {
            queue(
                &tx,
                &Alert::agent_resolved(agent, *incident, since, now),
                now,
            )
            .await?;
        }
    }
    tx.commit().await.map_err(db_err)?;
    Ok(agent)
}

pub(super) async fn mark_silent_agents(
    s: &PgStore,
    silent_before: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<Agent>> {
    const MOST: usize = 100;
    let mut client = s.client().await?;
    let mut claimed = Vec::new();
    // One agent per transaction: each locks its own endpoints in id order.
    while claimed.len() < MOST {
        let tx = client.transaction().await.map_err(db_err)?;
        let Some(agent) = tx
            .query_opt_cached(
                &format!(
                    "{AGENT_SELECT} WHERE a.revoked_at IS NULL AND a.silent_since IS NULL \
                     AND a.last_heartbeat_at < $1 ORDER BY a.last_heartbeat_at, a.id LIMIT 1 \
                     FOR UPDATE OF a SKIP LOCKED"
                ),
                &[&silent_before],
            )
            .await
            .map_err(db_err)?
            .as_ref()
            .map(agent_from_row)
        else {
            break;
        };
        let muted = windows_at(&tx, agent.org_id, now)
            .await?
            .iter()
            .any(|w| w.covers_agents(now));
        let incident = Uuid::now_v7();
        tx.execute_cached(
            "UPDATE agents SET silent_since = $2, silent_incident_id = $3, silent_muted = $4 WHERE id = $1",
            &[&agent.id, &now, &incident, &muted],
        )
        .await
        .map_err(db_err)?;
        location_went_dark(&tx, &agent, now, false).await?;
        if !muted {
            queue(&tx, &Alert::agent_silent(&agent, incident, now), now).await?;
        }
        tx.commit().await.map_err(db_err)?;
        claimed.push(Agent {
            silent_since: Some(now),
            ..agent
        });
    }
    Ok(claimed)
}

pub(super) async fn create_endpoint(
    s: &PgStore,
    org_id: Uuid,
    config: &EndpointConfig,
    now: DateTime<Utc>,
) -> Result<Endpoint> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let id = Uuid::now_v7();
    tx.execute_cached(
        "INSERT INTO endpoints (id, org_id, name, kind, target, interval_secs, timeout_secs, \
         min_failing_locations, failure_threshold, success_threshold, conditions, options, \
         status, status_changed_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'unknown', $13, $13, $13)",
        &[
            &id,
            &org_id,
            &config.name,
            &config.kind.as_str(),
            &config.target,
            &to_i32(config.interval),
            &to_i32(config.timeout),
            &to_i32(config.min_failing_locations),
            &to_i32(config.failure_threshold),
            &to_i32(config.success_threshold),
            &json(&config.conditions),
            &json(&config.options),
            &now,
        ],
    )
    .await
    .map_err(db_err)?;
    tx.execute_cached(
        "INSERT INTO endpoint_locations (endpoint_id, org_id, location, state) \
         SELECT $1, $2, l, 'unknown' FROM UNNEST($3::text[]) AS l",
        &[&id, &org_id, &config.locations],
    )
    .await
    .map_err(db_err)?;
    let row = tx
        .query_one_cached(&format!("{ENDPOINT_SELECT} WHERE e.id = $1"), &[&id])
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    endpoint_from_row(&row)
}

pub(super) async fn update_endpoint(
    s: &PgStore,
    scope: Scope,
    id: Uuid,
    config: &EndpointConfig,
    now: DateTime<Utc>,
) -> Result<Option<Endpoint>> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let locked = load_locked(
        &tx,
        "e.id = $1 AND ($2::uuid IS NULL OR e.org_id = $2)",
        &[&id, &scope.org()],
    )
    .await?;
    let Some(old) = locked.into_iter().next() else {
        return Ok(None);
    };
    tx.execute_cached(
        "UPDATE endpoints SET name = $2, kind = $3, target = $4, interval_secs = $5, timeout_secs = $6, \
         min_failing_locations = $7, failure_threshold = $8, success_threshold = $9, conditions = $10, \
         options = $11, updated_at = $12 WHERE id = $1",
        &[
            &id,
            &config.name,
            &config.kind.as_str(),
            &config.target,
            &to_i32(config.interval),
            &to_i32(config.timeout),
            &to_i32(config.min_failing_locations),
            &to_i32(config.failure_threshold),
            &to_i32(config.success_threshold),
            &json(&config.conditions),
            &json(&config.options),
            &now,
        ],
    )
    .await
    .map_err(db_err)?;
    tx.execute_cached(
        "DELETE FROM endpoint_locations WHERE endpoint_id = $1 AND location <> ALL($2)",
        &[&id, &config.locations],
    )
    .await
    .map_err(db_err)?;
    tx.execute_cached(
        "INSERT INTO endpoint_locations (endpoint_id, org_id, location, state) \
         SELECT $1, $2, l, 'unknown' FROM UNNEST($3::text[]) AS l ON CONFLICT DO NOTHING",
        &[&id, &old.endpoint.org_id, &config.locations],
    )
    .await
    .map_err(db_err)?;
    let before = load_locked(&tx, "e.id = $1", &[&id])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Database("updated endpoint vanished".into()))?;
    let muted = windows_at(&tx, before.endpoint.org_id, now)
        .await?
        .iter()
        .any(|w| w.covers_endpoint(id, now));
    let mut after = before.clone();
    if let Some(alert) = after.settle(now, muted, true) {
        queue(&tx, &alert, now).await?;
    }
    write_back(&tx, &before, &after).await?;
    tx.commit().await.map_err(db_err)?;
    Ok(Some(after.endpoint))
}

pub(super) async fn delete_endpoint(s: &PgStore, scope: Scope, id: Uuid) -> Result<bool> {
    let client = s.client().await?;
    let n = client
        .execute_cached(
            "DELETE FROM endpoints WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2)",
            &[&id, &scope.org()],
        )
        .await
        .map_err(db_err)?;
    Ok(n == 1)
}

pub(super) async fn list_endpoints(
    s: &PgStore,
    scope: Scope,
    page: Page,
) -> Result<(i64, Vec<Endpoint>)> {
    let client = s.client().await?;
    let count: i64 = client
        .query_one_cached(
            "SELECT count(*) FROM endpoints WHERE ($1::uuid IS NULL OR org_id = $1)",
            &[&scope.org()],
        )
        .await
        .map_err(db_err)?
        .get(0);
    let rows = client
        .query_cached(
            &format!("{ENDPOINT_SELECT} WHERE ($1::uuid IS NULL OR e.org_id = $1) ORDER BY e.name, e.id LIMIT $2 OFFSET $3"),
            &[&scope.org(), &i64::from(page.page_size), &page.offset()],
        )
        .await
        .map_err(db_err)?;
    Ok((
        count,
        rows.iter().map(endpoint_from_row).collect::<Result<_>>()?,
    ))
}

pub(super) async fn endpoint_detail(
    s: &PgStore,
    scope: Scope,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<EndpointDetail>> {
    let mut client = s.client().await?;
    // One snapshot for the endpoint, its states and its uptime.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_err)?;
    let Some(row) = tx
        .query_opt_cached(
            &format!("{ENDPOINT_SELECT} WHERE e.id = $1 AND ($2::uuid IS NULL OR e.org_id = $2)"),
            &[&id, &scope.org()],
        )
        .await
        .map_err(db_err)?
    else {
        return Ok(None);
    };
    let endpoint = endpoint_from_row(&row)?;
    let locations = tx
        .query_cached(
            "SELECT * FROM endpoint_locations WHERE endpoint_id = $1 ORDER BY location",
            &[&id],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(state_from_row)
        .collect::<Result<Vec<_>>>()?;
    let day = now - chrono::Duration::days(1);
    let week = now - chrono::Duration::days(7);
    let month = now - chrono::Duration::days(30);
    let row = tx
        .query_one_cached(
            "SELECT count(*) FILTER (WHERE checked_at >= $2), \
                    count(*) FILTER (WHERE checked_at >= $2 AND verdict <> 'down'), \
                    count(*) FILTER (WHERE checked_at >= $3), \
                    count(*) FILTER (WHERE checked_at >= $3 AND verdict <> 'down'), \
                    count(*), count(*) FILTER (WHERE verdict <> 'down') \
             FROM check_results WHERE endpoint_id = $1 AND checked_at >= $4 AND checked_at <= $5",
            &[&id, &day, &week, &month, &now],
        )
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    let share = |all: i64, good: i64| (all > 0).then(|| good as f64 * 100.0 / all as f64);
    Ok(Some(EndpointDetail {
        endpoint,
        locations,
        uptime: Uptime {
            day: share(row.get(0), row.get(1)),
            week: share(row.get(2), row.get(3)),
            month: share(row.get(4), row.get(5)),
        },
    }))
}

pub(super) async fn endpoints_for_agent(s: &PgStore, agent: &Agent) -> Result<Vec<Endpoint>> {
    let client = s.client().await?;
    let rows = client
        .query_cached(
            &format!(
                "{ENDPOINT_SELECT} WHERE e.org_id = $1 AND EXISTS (SELECT 1 FROM endpoint_locations el \
                 WHERE el.endpoint_id = e.id AND el.location = $2) ORDER BY e.id"
            ),
            &[&agent.org_id, &agent.location],
        )
        .await
        .map_err(db_err)?;
    rows.iter().map(endpoint_from_row).collect()
}

pub(super) async fn record_results(
    s: &PgStore,
    agent: &Agent,
    results: &[CheckResult],
    now: DateTime<Utc>,
) -> Result<RecordOutcome> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db_err)?;
    let mut outcome = RecordOutcome::default();
    let refuse = |r: &CheckResult, reason: &str| Refused {
        result_id: r.id,
        endpoint_id: r.endpoint_id,
        reason: reason.to_owned(),
    };
    let live = tx
        .execute_cached(
            "UPDATE agents SET last_report_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            &[&agent.id, &now],
        )
        .await
        .map_err(db_err)?;
    if live == 0 {
        outcome.refused = results
            .iter()
            .map(|r| refuse(r, "this agent has been revoked"))
            .collect();
        return Ok(outcome);
    }
    let mut ids: Vec<Uuid> = results.iter().map(|r| r.endpoint_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let loaded = load_locked(
        &tx,
        "e.id = ANY($1) AND e.org_id = $2 AND EXISTS (SELECT 1 FROM endpoint_locations el \
         WHERE el.endpoint_id = e.id AND el.location = $3)",
        &[&ids, &agent.org_id, &agent.location],
    )
    .await?;
    let (mine, others): (Vec<&CheckResult>, Vec<&CheckResult>) = results
        .iter()
        .partition(|r| loaded.iter().any(|l| l.endpoint.id == r.endpoint_id));
    outcome.refused = others
        .into_iter()
        .map(|r| {
            refuse(
                r,
                "no endpoint with this id is assigned to this agent's location",
            )
        })
        .collect();
    if mine.is_empty() {
        tx.commit().await.map_err(db_err)?;
        return Ok(outcome);
    }
    let endpoint_ids: Vec<Uuid> = mine.iter().map(|r| r.endpoint_id).collect();
    let result_ids: Vec<Uuid> = mine.iter().map(|r| r.id).collect();
    let checked_at: Vec<DateTime<Utc>> = mine.iter().map(|r| r.checked_at).collect();
    let verdicts: Vec<&str> = mine.iter().map(|r| verdict_str(r.verdict)).collect();
    let kept: Vec<serde_json::Value> = mine.iter().map(|r| json(&for_storage(r))).collect();
    let inserted: Vec<(Uuid, Uuid)> = tx
        .query_cached(
            "INSERT INTO check_results (endpoint_id, id, agent_id, location, checked_at, verdict, received_at, result) \
             SELECT u.endpoint_id, u.id, $3, $4, u.checked_at, u.verdict, $5, u.result \
             FROM UNNEST($1::uuid[], $2::uuid[], $6::timestamptz[], $7::text[], $8::jsonb[]) \
               AS u(endpoint_id, id, checked_at, verdict, result) \
             ON CONFLICT DO NOTHING RETURNING endpoint_id, id",
            &[&endpoint_ids, &result_ids, &agent.id, &agent.location, &now, &checked_at, &verdicts, &kept],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    outcome.stored = inserted.len();
    outcome.duplicates = mine.len() - inserted.len();
    let windows = windows_at(&tx, agent.org_id, now).await?;
    for before in &loaded {
        let id = before.endpoint.id;
        let fresh: Vec<&CheckResult> = mine
            .iter()
            .copied()
            .filter(|r| r.endpoint_id == id && inserted.contains(&(id, r.id)))
            .collect();
        if fresh.is_empty() {
            continue;
        }
        let muted = windows.iter().any(|w| w.covers_endpoint(id, now));
        let mut after = before.clone();
        let alert = after.results_arrived(&agent.location, agent.id, &fresh, now, muted);
        write_back(&tx, before, &after).await?;
        if let Some(alert) = alert {
            outcome.notifications += queue(&tx, &alert, now).await?;
        }
    }
    tx.commit().await.map_err(db_err)?;
    Ok(outcome)
}

pub(super) async fn list_results(
    s: &PgStore,
    scope: Scope,
    endpoint_id: Uuid,
    filter: &ResultFilter,
    page: Page,
) -> Result<Option<(i64, Vec<StoredResult>)>> {
    let client = s.client().await?;
    let exists = client
        .query_opt_cached(
            "SELECT 1 FROM endpoints WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2)",
            &[&endpoint_id, &scope.org()],
        )
        .await
        .map_err(db_err)?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let condition = "endpoint_id = $1 AND ($2::text IS NULL OR location = $2) \
        AND ($3::timestamptz IS NULL OR checked_at >= $3) AND ($4::timestamptz IS NULL OR checked_at < $4)";
    let count: i64 = client
        .query_one_cached(
            &format!("SELECT count(*) FROM check_results WHERE {condition}"),
            &[&endpoint_id, &filter.location, &filter.since, &filter.until],
        )
        .await
        .map_err(db_err)?
        .get(0);
    let rows = client
        .query_cached(
            &format!("SELECT * FROM check_results WHERE {condition} ORDER BY checked_at DESC, id DESC LIMIT $5 OFFSET $6"),
            &[&endpoint_id, &filter.location, &filter.since, &filter.until, &i64::from(page.page_size), &page.offset()],
        )
        .await
        .map_err(db_err)?;
    let results = rows
        .iter()
        .map(|row| {
            Ok(StoredResult {
                agent_id: row.get("agent_id"),
                location: row.get("location"),
                received_at: row.get("received_at"),
                result: serde_json::from_value(row.get("result"))
                    .map_err(|e| corrupt("result", e))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((count, results)))
}

pub(super) async fn prune_results(s: &PgStore, before: DateTime<Utc>, limit: i64) -> Result<u64> {
    let client = s.client().await?;
    let n = client
        .execute_cached(
            "DELETE FROM check_results WHERE ctid IN \
             (SELECT ctid FROM check_results WHERE checked_at < $1 LIMIT $2)",
            &[&before, &limit],
        )
        .await
        .map_err(db_err)?;
    client
        .execute_cached(
            "DELETE FROM notification_outbox WHERE created_at < $1 \
             AND (sent_at IS NOT NULL OR failed_at IS NOT NULL)",
            &[&before],
        )
        .await
        .map_err(db_err)?;
    Ok(n)
}

pub(super) async fn create_notifier(
    s: &PgStore,
    org_id: Uuid,
    kind: &str,
    url: &str,
) -> Result<Notifier> {
    let client = s.client().await?;
    let row = client
        .query_one_cached(
            "INSERT INTO notifiers (id, org_id, kind, url) VALUES ($1, $2, $3, $4) RETURNING *",
            &[&Uuid::now_v7(), &org_id, &kind, &url],
        )
        .await
        .map_err(db_err)?;
    Ok(notifier_from_row(&row))
}

pub(super) async fn list_notifiers(s: &PgStore, scope: Scope) -> Result<Vec<Notifier>> {
    let client = s.client().await?;
    let rows = client
        .query_cached(
            "SELECT * FROM notifiers WHERE ($1::uuid IS NULL OR org_id = $1) ORDER BY created_at, id",
            &[&scope.org()],
        )
        .await
        .map_err(db_err)?;
    Ok(rows.iter().map(notifier_from_row).collect())
}

pub(super) async fn delete_notifier(s: &PgStore, scope: Scope, id: Uuid) -> Result<bool> {
    let client = s.client().await?;
    let n = client
        .execute_cached(
            "DELETE FROM notifiers WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2)",
            &[&id, &scope.org()],
        )
        .await
        .map_err(db_err)?;
    Ok(n == 1)
}

pub(super) async fn create_maintenance_window(
    s: &PgStore,
    w: NewMaintenanceWindow,
) -> Result<MaintenanceWindow> {
    let client = s.client().await?;
    let row = client
        .query_one_cached(
            "INSERT INTO maintenance_windows (id, org_id, starts_at, ends_at, endpoint_ids, reason, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
            &[&Uuid::now_v7(), &w.org_id, &w.starts_at, &w.ends_at, &json(&w.endpoint_ids), &w.reason, &w.created_by],
        )
        .await
        .map_err(db_err)?;
    window_from_row(&row)
}

pub(super) async fn list_maintenance_windows(
    s: &PgStore,
    scope: Scope,
) -> Result<Vec<MaintenanceWindow>> {
    let client = s.client().await?;
    client
        .query_cached(
            "SELECT * FROM maintenance_windows WHERE ($1::uuid IS NULL OR org_id = $1) ORDER BY starts_at, id",
            &[&scope.org()],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(window_from_row)
        .collect()
}

pub(super) async fn delete_maintenance_window(s: &PgStore, scope: Scope, id: Uuid) -> Result<bool> {
    let client = s.client().await?;
    let n = client
        .execute_cached(
            "DELETE FROM maintenance_windows WHERE id = $1 AND ($2::uuid IS NULL OR org_id = $2)",
            &[&id, &scope.org()],
        )
        .await
        .map_err(db_err)?;
    Ok(n == 1)
}

pub(super) async fn claim_notifications(
    s: &PgStore,
    owner: Uuid,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Notification>> {
    let client = s.client().await?;
    let rows = client
        .query_cached(
            "WITH due AS ( \
               SELECT o.id FROM notification_outbox o \
               WHERE o.sent_at IS NULL AND o.failed_at IS NULL AND o.next_attempt_at <= $2 \
                 AND (o.lease_until IS NULL OR o.lease_until <= $2) \
                 AND NOT EXISTS (SELECT 1 FROM notification_outbox p \
                   WHERE p.notifier_id = o.notifier_id AND p.subject_id = o.subject_id AND p.seq < o.seq \
                     AND p.sent_at IS NULL AND p.failed_at IS NULL) \
               ORDER BY o.seq LIMIT $4 FOR UPDATE OF o SKIP LOCKED) \
             UPDATE notification_outbox o SET lease_owner = $1, lease_until = $3, attempts = o.attempts + 1 \
             FROM due, notifiers n WHERE o.id = due.id AND n.id = o.notifier_id \
             RETURNING o.id, o.notifier_id, n.url, o.payload, o.attempts, o.created_at, o.seq",
            &[&owner, &now, &lease_until, &limit],
        )
        .await
        .map_err(db_err)?;
    let mut claimed: Vec<(i64, Notification)> = rows
        .iter()
        .map(|row| {
            (
                row.get("seq"),
                Notification {
                    id: row.get("id"),
                    notifier_id: row.get("notifier_id"),
                    url: row.get("url"),
                    payload: row.get("payload"),
                    attempts: row.get("attempts"),
                    created_at: row.get("created_at"),
                },
            )
        })
        .collect();
    claimed.sort_by_key(|(seq, _)| *seq);
    Ok(claimed.into_iter().map(|(_, n)| n).collect())
}

pub(super) async fn settle_notification(
    s: &PgStore,
    id: Uuid,
    owner: Uuid,
    outcome: &Delivery,
    now: DateTime<Utc>,
) -> Result<bool> {
    let client = s.client().await?;
    let held = "id = $1 AND lease_owner = $2 AND sent_at IS NULL AND failed_at IS NULL";
    let n = match outcome {
        Delivery::Sent => client
            .execute_cached(
                &format!("UPDATE notification_outbox SET sent_at = $3, lease_owner = NULL, lease_until = NULL WHERE {held}"),
                &[&id, &owner, &now],
            )
            .await,
        Delivery::Retry { at, error } => client
            .execute_cached(
                &format!("UPDATE notification_outbox SET next_attempt_at = $3, last_error = $4, lease_owner = NULL, lease_until = NULL WHERE {held}"),
                &[&id, &owner, at, error],
            )
            .await,
        Delivery::GaveUp { error } => client
            .execute_cached(
                &format!("UPDATE notification_outbox SET failed_at = $3, last_error = $4, lease_owner = NULL, lease_until = NULL WHERE {held}"),
                &[&id, &owner, &now, error],
            )
            .await,
    }
    .map_err(db_err)?;
    Ok(n == 1)
}
