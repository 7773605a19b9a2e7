//! The SQLite store's monitoring half (issue 6): the PostgreSQL store's
//! semantics, with the single writer standing in for row locks — every
//! evaluation runs inside one immediate transaction on it.

use chrono::{DateTime, Utc};
use muster_common::monitor::{AgentHealth, CheckResult, ConditionSpec};
use rusqlite::{params, Connection, Row, TransactionBehavior};
use uuid::Uuid;

use super::{
    count, get, id_text, json_col, micros, now_micros, opt_id_text, opt_micros, opt_time_col,
    opt_uuid_col, query_opt, query_vec, time_col, time_of, uuid_col, SqliteStore,
};
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

fn agent_from_row(row: &Row<'_>) -> Result<Agent> {
    Ok(Agent {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        name: get(row, "name")?,
        location: get(row, "location")?,
        prefix: get(row, "prefix")?,
        created_at: time_col(row, "created_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
        version: get(row, "version")?,
        endpoints_version: get(row, "endpoints_version")?,
        buffered_results: get(row, "buffered_results")?,
        checks_per_minute: get(row, "checks_per_minute")?,
        last_heartbeat_at: opt_time_col(row, "last_heartbeat_at")?,
        last_report_at: opt_time_col(row, "last_report_at")?,
        silent_since: opt_time_col(row, "silent_since")?,
        endpoint_count: get(row, "endpoint_count")?,
    })
}

const ENDPOINT_SELECT: &str =
    "SELECT e.*, (SELECT json_group_array(el.location ORDER BY el.location) \
    FROM endpoint_locations el WHERE el.endpoint_id = e.id) AS locations FROM endpoints e";

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn count_of(row: &Row<'_>, col: &str) -> Result<u32> {
    let n: i64 = get(row, col)?;
    u32::try_from(n).map_err(|e| corrupt(col, e))
}

fn status_of(text: &str) -> Result<Status> {
    Status::parse(text).ok_or_else(|| corrupt("status", format!("'{text}'")))
}

fn from_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, col: &str) -> Result<T> {
    serde_json::from_value(json_col(row, col)?).map_err(|e| corrupt(col, e))
}

fn endpoint_from_row(row: &Row<'_>) -> Result<Endpoint> {
    let kind: String = get(row, "kind")?;
    let conditions: Vec<ConditionSpec> = from_json(row, "conditions")?;
    let options: CheckOptions = from_json(row, "options")?;
    let status: String = get(row, "status")?;
    let incident = match (
        opt_uuid_col(row, "incident_id")?,
        opt_time_col(row, "incident_started_at")?,
    ) {
        (Some(id), Some(started_at)) => Some(Incident {
            id,
            started_at,
            muted: get(row, "incident_muted")?,
        }),
        _ => None,
    };
    Ok(Endpoint {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        config: EndpointConfig {
            name: get(row, "name")?,
            kind: parse_kind(&kind).ok_or_else(|| corrupt("kind", &kind))?,
            target: get(row, "target")?,
            interval: count_of(row, "interval_secs")?,
            timeout: count_of(row, "timeout_secs")?,
            locations: from_json(row, "locations")?,
            min_failing_locations: count_of(row, "min_failing_locations")?,
            failure_threshold: count_of(row, "failure_threshold")?,
            success_threshold: count_of(row, "success_threshold")?,
            conditions,
            options,
        },
        status: status_of(&status)?,
        status_changed_at: time_col(row, "status_changed_at")?,
        incident,
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

fn state_from_row(row: &Row<'_>) -> Result<LocationState> {
    let state: String = get(row, "state")?;
    let last_result = get::<Option<String>>(row, "last_result")?
        .map(|text| {
            serde_json::from_str::<CheckResult>(&text).map_err(|e| corrupt("last_result", e))
        })
        .transpose()?;
    Ok(LocationState {
        location: get(row, "location")?,
        state: status_of(&state)?,
        failures: count_of(row, "failures")?,
        successes: count_of(row, "successes")?,
        last_checked_at: opt_time_col(row, "last_checked_at")?,
        last_result,
        agent_id: opt_uuid_col(row, "agent_id")?,
    })
}

fn window_from_row(row: &Row<'_>) -> Result<MaintenanceWindow> {
    Ok(MaintenanceWindow {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        starts_at: time_col(row, "starts_at")?,
        ends_at: time_col(row, "ends_at")?,
        endpoint_ids: from_json(row, "endpoint_ids")?,
        reason: get(row, "reason")?,
        created_at: time_col(row, "created_at")?,
    })
}

fn notifier_from_row(row: &Row<'_>) -> Result<Notifier> {
    Ok(Notifier {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        kind: get(row, "kind")?,
        url: get(row, "url")?,
        created_at: time_col(row, "created_at")?,
    })
}

fn json_string<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn agent_by_id(conn: &Connection, id: &str) -> Result<Option<Agent>> {
    query_opt(
        conn,
        &format!("{AGENT_SELECT} WHERE a.id = ?1"),
        [id],
        agent_from_row,
    )
}

fn endpoint_by_id(conn: &Connection, id: &str) -> Result<Option<Endpoint>> {
    query_opt(
        conn,
        &format!("{ENDPOINT_SELECT} WHERE e.id = ?1"),
        [id],
        endpoint_from_row,
    )
}

fn states_of(conn: &Connection, endpoint_id: &str) -> Result<Vec<LocationState>> {
    query_vec(
        conn,
        "SELECT * FROM endpoint_locations WHERE endpoint_id = ?1 ORDER BY location",
        [endpoint_id],
        state_from_row,
    )
}

fn loaded(conn: &Connection, endpoints: Vec<Endpoint>) -> Result<Vec<Loaded>> {
    endpoints
        .into_iter()
        .map(|endpoint| {
            let states = states_of(conn, &id_text(endpoint.id))?;
            Ok(Loaded { endpoint, states })
        })
        .collect()
}

/// Writes back what evaluation changed.
fn write_back(conn: &Connection, before: &Loaded, after: &Loaded) -> Result<()> {
    let (b, a) = (&before.endpoint, &after.endpoint);
    let id = id_text(a.id);
    if (b.status, b.status_changed_at, &b.incident) != (a.status, a.status_changed_at, &a.incident)
    {
        conn.prepare(
            "UPDATE endpoints SET status = ?2, status_changed_at = ?3, incident_id = ?4, \
             incident_started_at = ?5, incident_muted = ?6 WHERE id = ?1",
        )?
        .execute(params![
            id,
            a.status.as_str(),
            micros(a.status_changed_at),
            opt_id_text(a.incident.as_ref().map(|i| i.id)),
            opt_micros(a.incident.as_ref().map(|i| i.started_at)),
            a.incident.as_ref().is_some_and(|i| i.muted),
        ])?;
    }
    for state in &after.states {
        if before.states.iter().any(|s| s == state) {
            continue;
        }
        conn.prepare(
            "UPDATE endpoint_locations SET state = ?3, failures = ?4, successes = ?5, \
             last_checked_at = ?6, last_result = ?7, agent_id = ?8 \
             WHERE endpoint_id = ?1 AND location = ?2",
        )?
        .execute(params![
            id,
            state.location,
            state.state.as_str(),
            state.failures,
            state.successes,
            opt_micros(state.last_checked_at),
            state.last_result.as_ref().map(json_string),
            opt_id_text(state.agent_id),
        ])?;
    }
    Ok(())
}

/// Queues `alert` for every notifier of its organization; returns how many.
fn queue(conn: &Connection, alert: &Alert, now: DateTime<Utc>) -> Result<usize> {
    let notifiers = query_vec(
        conn,
        "SELECT id FROM notifiers WHERE org_id = ?1 ORDER BY id",
        [id_text(alert.organization_id)],
        |row| get::<String>(row, "id"),
    )?;
    let payload = alert.payload().to_string();
    for notifier in &notifiers {
        conn.prepare(
            "INSERT INTO notification_outbox (id, org_id, notifier_id, subject_id, payload, created_at, next_attempt_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )?
        .execute(params![
            id_text(Uuid::now_v7()),
            id_text(alert.organization_id),
            notifier,
            id_text(alert.subject_id()),
            payload,
            micros(now),
        ])?;
    }
    Ok(notifiers.len())
}

fn windows_at(
    conn: &Connection,
    org_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<MaintenanceWindow>> {
    query_vec(
        conn,
        "SELECT * FROM maintenance_windows WHERE org_id = ?1 AND starts_at <= ?2 AND ends_at > ?2",
        params![id_text(org_id), micros(now)],
        window_from_row,
    )
}

/// The agent's location lost its last live agent: its states turn `unknown`.
fn location_went_dark(
    conn: &Connection,
    agent: &Agent,
    now: DateTime<Utc>,
    may_resolve: bool,
) -> Result<()> {
    let others = count(
        conn,
        "SELECT count(*) FROM agents WHERE org_id = ?1 AND location = ?2 AND id <> ?3 \
         AND revoked_at IS NULL AND silent_since IS NULL AND last_heartbeat_at IS NOT NULL",
        params![id_text(agent.org_id), agent.location, id_text(agent.id)],
    )?;
    if others > 0 {
        return Ok(());
    }
    let endpoints = query_vec(
        conn,
        &format!(
            "{ENDPOINT_SELECT} WHERE e.org_id = ?1 AND EXISTS (SELECT 1 FROM endpoint_locations el \
             WHERE el.endpoint_id = e.id AND el.location = ?2) ORDER BY e.id"
        ),
        params![id_text(agent.org_id), agent.location],
        endpoint_from_row,
    )?;
    for before in loaded(conn, endpoints)? {
        let mut after = before.clone();
        let alert = after.location_went_dark(&agent.location, now, may_resolve);
        write_back(conn, &before, &after)?;
        if let Some(alert) = alert {
            queue(conn, &alert, now)?;
        }
    }
    Ok(())
}

pub(super) async fn create_agent(s: &SqliteStore, agent: NewAgent) -> Result<Agent> {
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = id_text(Uuid::now_v7());
        tx.execute(
            "INSERT INTO agents (id, org_id, name, location, prefix, token_hash, created_by, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                id_text(agent.org_id),
                agent.name,
                agent.location,
                agent.prefix,
                agent.token_hash,
                id_text(agent.created_by),
                now_micros(),
            ],
        )?;
        let created = agent_by_id(&tx, &id)?;
        tx.commit()?;
        created.ok_or_else(|| StoreError::Database("inserted agent vanished".into()))
    })
    .await
}

pub(super) async fn authenticate_agent(s: &SqliteStore, token_hash: &str) -> Result<Option<Agent>> {
    let token_hash = token_hash.to_owned();
    s.read(move |conn| {
        query_opt(
            conn,
            &format!("{AGENT_SELECT} WHERE a.token_hash = ?1 AND a.revoked_at IS NULL"),
            [token_hash],
            agent_from_row,
        )
    })
    .await
}

pub(super) async fn list_agents(
    s: &SqliteStore,
    scope: Scope,
    page: Page,
) -> Result<(i64, Vec<Agent>)> {
    let org = opt_id_text(scope.org());
    s.read(move |conn| {
        let tx = conn.transaction()?;
        let n = count(
            &tx,
            "SELECT count(*) FROM agents WHERE (?1 IS NULL OR org_id = ?1)",
            [&org],
        )?;
        let agents = query_vec(
            &tx,
            &format!("{AGENT_SELECT} WHERE (?1 IS NULL OR a.org_id = ?1) ORDER BY a.location, a.name, a.id LIMIT ?2 OFFSET ?3"),
            params![org, i64::from(page.page_size), page.offset()],
            agent_from_row,
        )?;
        Ok((n, agents))
    })
    .await
}

pub(super) async fn revoke_agent(
    s: &SqliteStore,
    scope: Scope,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Agent>> {
    let org = opt_id_text(scope.org());
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = id_text(id);
        let Some(was_live) = query_opt(
            &tx,
            "SELECT revoked_at IS NULL AS live FROM agents WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
            params![id, org],
            |row| get::<bool>(row, "live"),
        )?
        else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE agents SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1",
            params![id, micros(now)],
        )?;
        let agent = agent_by_id(&tx, &id)?;
        if let (true, Some(agent)) = (was_live, &agent) {
            location_went_dark(&tx, agent, now, true)?;
        }
        tx.commit()?;
        Ok(agent)
    })
    .await
}

pub(super) async fn agent_heartbeat(
    s: &SqliteStore,
    id: Uuid,
    health: &AgentHealth,
    now: DateTime<Utc>,
) -> Result<Option<Agent>> {
    let health = health.clone();
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = id_text(id);
        let Some((before, incident, muted)) = query_opt(
            &tx,
            &format!("{AGENT_SELECT} WHERE a.id = ?1 AND a.revoked_at IS NULL"),
            [&id],
            |row| {
                Ok((
                    agent_from_row(row)?,
                    opt_uuid_col(row, "silent_incident_id")?,
                    get::<bool>(row, "silent_muted")?,
                ))
            },
        )?
        else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE agents SET version = ?2, endpoints_version = ?3, buffered_results = ?4, \
             checks_per_minute = ?5, last_heartbeat_at = ?6, silent_since = NULL, \
             silent_incident_id = NULL, silent_muted = 0 WHERE id = ?1",
            params![
                id,
                health.version,
                health.endpoints_version,
                i64::try_from(health.buffered_results).unwrap_or(i64::MAX),
                health.checks_per_minute,
                micros(now),
            ],
        )?;
        let agent = agent_by_id(&tx, &id)?;
        if let (Some(since), Some(incident), false, Some(agent)) =
            (before.silent_since, incident, muted, &agent)
        {
            queue(
                &tx,
                &Alert::agent_resolved(agent, incident, since, now),
                now,
            )?;
        }
        tx.commit()?;
        Ok(agent)
    })
    .await
}

pub(super) async fn mark_silent_agents(
    s: &SqliteStore,
    silent_before: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<Agent>> {
    const MOST: i64 = 100;
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let agents = query_vec(
            &tx,
            &format!(
                "{AGENT_SELECT} WHERE a.revoked_at IS NULL AND a.silent_since IS NULL \
                 AND a.last_heartbeat_at < ?1 ORDER BY a.last_heartbeat_at, a.id LIMIT ?2"
            ),
            params![micros(silent_before), MOST],
            agent_from_row,
        )?;
        let mut claimed = Vec::new();
        for agent in agents {
            let muted = windows_at(&tx, agent.org_id, now)?
                .iter()
                .any(|w| w.covers_agents(now));
            let incident = Uuid::now_v7();
            tx.execute(
                "UPDATE agents SET silent_since = ?2, silent_incident_id = ?3, silent_muted = ?4 WHERE id = ?1",
                params![id_text(agent.id), micros(now), id_text(incident), muted],
            )?;
            location_went_dark(&tx, &agent, now, false)?;
            if !muted {
                queue(&tx, &Alert::agent_silent(&agent, incident, now), now)?;
            }
            claimed.push(Agent {
                silent_since: Some(now),
                ..agent
            });
        }
        tx.commit()?;
        Ok(claimed)
    })
    .await
}

pub(super) async fn create_endpoint(
    s: &SqliteStore,
    org_id: Uuid,
    config: &EndpointConfig,
    now: DateTime<Utc>,
) -> Result<Endpoint> {
    let config = config.clone();
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = id_text(Uuid::now_v7());
        tx.execute(
            "INSERT INTO endpoints (id, org_id, name, kind, target, interval_secs, timeout_secs, \
             min_failing_locations, failure_threshold, success_threshold, conditions, options, \
             status, status_changed_at, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'unknown', ?13, ?13, ?13)",
            params![
                id,
                id_text(org_id),
                config.name,
                config.kind.as_str(),
                config.target,
                config.interval,
                config.timeout,
                config.min_failing_locations,
                config.failure_threshold,
                config.success_threshold,
                json_string(&config.conditions),
                json_string(&config.options),
                micros(now),
            ],
        )?;
        for location in &config.locations {
            tx.execute(
                "INSERT INTO endpoint_locations (endpoint_id, org_id, location, state) VALUES (?1, ?2, ?3, 'unknown')",
                params![id, id_text(org_id), location],
            )?;
        }
        let endpoint = endpoint_by_id(&tx, &id)?;
        tx.commit()?;
        endpoint.ok_or_else(|| StoreError::Database("inserted endpoint vanished".into()))
    })
    .await
}

pub(super) async fn update_endpoint(
    s: &SqliteStore,
    scope: Scope,
    id: Uuid,
    config: &EndpointConfig,
    now: DateTime<Utc>,
) -> Result<Option<Endpoint>> {
    let config = config.clone();
    let org = opt_id_text(scope.org());
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id_s = id_text(id);
        let Some(old) = query_opt(
            &tx,
            &format!("{ENDPOINT_SELECT} WHERE e.id = ?1 AND (?2 IS NULL OR e.org_id = ?2)"),
            params![id_s, org],
            endpoint_from_row,
        )?
        else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE endpoints SET name = ?2, kind = ?3, target = ?4, interval_secs = ?5, timeout_secs = ?6, \
             min_failing_locations = ?7, failure_threshold = ?8, success_threshold = ?9, conditions = ?10, \
             options = ?11, updated_at = ?12 WHERE id = ?1",
            params![
                id_s,
                config.name,
                config.kind.as_str(),
                config.target,
                config.interval,
                config.timeout,
                config.min_failing_locations,
                config.failure_threshold,
                config.success_threshold,
                json_string(&config.conditions),
                json_string(&config.options),
                micros(now),
            ],
        )?;
        tx.execute(
            "DELETE FROM endpoint_locations WHERE endpoint_id = ?1 \
             AND location NOT IN (SELECT value FROM json_each(?2))",
            params![id_s, json_string(&config.locations)],
        )?;
        for location in &config.locations {
            tx.execute(
                "INSERT INTO endpoint_locations (endpoint_id, org_id, location, state) \
                 VALUES (?1, ?2, ?3, 'unknown') ON CONFLICT DO NOTHING",
                params![id_s, id_text(old.org_id), location],
            )?;
        }
        let endpoint = endpoint_by_id(&tx, &id_s)?
            .ok_or_else(|| StoreError::Database("updated endpoint vanished".into()))?;
        let before = loaded(&tx, vec![endpoint])?.remove(0);
        let muted = windows_at(&tx, old.org_id, now)?
            .iter()
            .any(|w| w.covers_endpoint(id, now));
        let mut after = before.clone();
        if let Some(alert) = after.settle(now, muted, true) {
            queue(&tx, &alert, now)?;
        }
        write_back(&tx, &before, &after)?;
        tx.commit()?;
        Ok(Some(after.endpoint))
    })
    .await
}

pub(super) async fn delete_endpoint(s: &SqliteStore, scope: Scope, id: Uuid) -> Result<bool> {
    let org = opt_id_text(scope.org());
    s.write(move |conn| {
        let n = conn.execute(
            "DELETE FROM endpoints WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
            params![id_text(id), org],
        )?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn list_endpoints(
    s: &SqliteStore,
    scope: Scope,
    page: Page,
) -> Result<(i64, Vec<Endpoint>)> {
    let org = opt_id_text(scope.org());
    s.read(move |conn| {
        let tx = conn.transaction()?;
        let n = count(
            &tx,
            "SELECT count(*) FROM endpoints WHERE (?1 IS NULL OR org_id = ?1)",
            [&org],
        )?;
        let endpoints = query_vec(
            &tx,
            &format!("{ENDPOINT_SELECT} WHERE (?1 IS NULL OR e.org_id = ?1) ORDER BY e.name, e.id LIMIT ?2 OFFSET ?3"),
            params![org, i64::from(page.page_size), page.offset()],
            endpoint_from_row,
        )?;
        Ok((n, endpoints))
    })
    .await
}

pub(super) async fn endpoint_detail(
    s: &SqliteStore,
    scope: Scope,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<EndpointDetail>> {
    let org = opt_id_text(scope.org());
    s.read(move |conn| {
        let tx = conn.transaction()?;
        let id_s = id_text(id);
        let Some(endpoint) = query_opt(
            &tx,
            &format!("{ENDPOINT_SELECT} WHERE e.id = ?1 AND (?2 IS NULL OR e.org_id = ?2)"),
            params![id_s, org],
            endpoint_from_row,
        )?
        else {
            return Ok(None);
        };
        let locations = states_of(&tx, &id_s)?;
        let day = micros(now - chrono::Duration::days(1));
        let week = micros(now - chrono::Duration::days(7));
        let month = micros(now - chrono::Duration::days(30));
        let counts: [i64; 6] = tx.query_row(
            "SELECT coalesce(sum(checked_at >= ?2), 0), \
                    coalesce(sum(checked_at >= ?2 AND verdict <> 'down'), 0), \
                    coalesce(sum(checked_at >= ?3), 0), \
                    coalesce(sum(checked_at >= ?3 AND verdict <> 'down'), 0), \
                    count(*), coalesce(sum(verdict <> 'down'), 0) \
             FROM check_results WHERE endpoint_id = ?1 AND checked_at >= ?4 AND checked_at <= ?5",
            params![id_s, day, week, month, micros(now)],
            |row| {
                Ok([
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ])
            },
        )?;
        let share = |all: i64, good: i64| (all > 0).then(|| good as f64 * 100.0 / all as f64);
        Ok(Some(EndpointDetail {
            endpoint,
            locations,
            uptime: Uptime {
                day: share(counts[0], counts[1]),
                week: share(counts[2], counts[3]),
                month: share(counts[4], counts[5]),
            },
        }))
    })
    .await
}

pub(super) async fn endpoints_for_agent(s: &SqliteStore, agent: &Agent) -> Result<Vec<Endpoint>> {
    let (org, location) = (id_text(agent.org_id), agent.location.clone());
    s.read(move |conn| {
        query_vec(
            conn,
            &format!(
                "{ENDPOINT_SELECT} WHERE e.org_id = ?1 AND EXISTS (SELECT 1 FROM endpoint_locations el \
                 WHERE el.endpoint_id = e.id AND el.location = ?2) ORDER BY e.id"
            ),
            params![org, location],
            endpoint_from_row,
        )
    })
    .await
}

pub(super) async fn record_results(
    s: &SqliteStore,
    agent: &Agent,
    results: &[CheckResult],
    now: DateTime<Utc>,
) -> Result<RecordOutcome> {
    let agent = agent.clone();
    let results = results.to_vec();
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcome = RecordOutcome::default();
        let refuse = |r: &CheckResult, reason: &str| Refused {
            result_id: r.id,
            endpoint_id: r.endpoint_id,
            reason: reason.to_owned(),
        };
        let live = tx.execute(
            "UPDATE agents SET last_report_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id_text(agent.id), micros(now)],
        )?;
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
        let ids_json = json_string(&ids);
        let endpoints = query_vec(
            &tx,
            &format!(
                "{ENDPOINT_SELECT} WHERE e.id IN (SELECT value FROM json_each(?1)) AND e.org_id = ?2 \
                 AND EXISTS (SELECT 1 FROM endpoint_locations el WHERE el.endpoint_id = e.id AND el.location = ?3) \
                 ORDER BY e.id"
            ),
            params![ids_json, id_text(agent.org_id), agent.location],
            endpoint_from_row,
        )?;
        let loaded = loaded(&tx, endpoints)?;
        let (mine, others): (Vec<&CheckResult>, Vec<&CheckResult>) = results
            .iter()
            .partition(|r| loaded.iter().any(|l| l.endpoint.id == r.endpoint_id));
        outcome.refused = others
            .into_iter()
            .map(|r| refuse(r, "no endpoint with this id is assigned to this agent's location"))
            .collect();
        let mut inserted: Vec<(Uuid, Uuid)> = Vec::new();
        {
            let mut insert = tx.prepare(
                "INSERT INTO check_results (endpoint_id, id, agent_id, location, checked_at, verdict, received_at, result) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            )?;
            for r in &mine {
                let n = insert.execute(params![
                    id_text(r.endpoint_id),
                    id_text(r.id),
                    id_text(agent.id),
                    agent.location,
                    micros(r.checked_at),
                    verdict_str(r.verdict),
                    micros(now),
                    json_string(&for_storage(r)),
                ])?;
                if n == 1 {
                    inserted.push((r.endpoint_id, r.id));
                }
            }
        }
        outcome.stored = inserted.len();
        outcome.duplicates = mine.len() - inserted.len();
        let windows = windows_at(&tx, agent.org_id, now)?;
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
            write_back(&tx, before, &after)?;
            if let Some(alert) = alert {
                outcome.notifications += queue(&tx, &alert, now)?;
            }
        }
        tx.commit()?;
        Ok(outcome)
    })
    .await
}

pub(super) async fn list_results(
    s: &SqliteStore,
    scope: Scope,
    endpoint_id: Uuid,
    filter: &ResultFilter,
    page: Page,
) -> Result<Option<(i64, Vec<StoredResult>)>> {
    let org = opt_id_text(scope.org());
    let filter = filter.clone();
    s.read(move |conn| {
        let tx = conn.transaction()?;
        let id = id_text(endpoint_id);
        let exists = count(
            &tx,
            "SELECT count(*) FROM endpoints WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
            params![id, org],
        )?;
        if exists == 0 {
            return Ok(None);
        }
        let condition = "endpoint_id = ?1 AND (?2 IS NULL OR location = ?2) \
            AND (?3 IS NULL OR checked_at >= ?3) AND (?4 IS NULL OR checked_at < ?4)";
        let (since, until) = (opt_micros(filter.since), opt_micros(filter.until));
        let n = count(
            &tx,
            &format!("SELECT count(*) FROM check_results WHERE {condition}"),
            params![id, filter.location, since, until],
        )?;
        let results = query_vec(
            &tx,
            &format!("SELECT * FROM check_results WHERE {condition} ORDER BY checked_at DESC, id DESC LIMIT ?5 OFFSET ?6"),
            params![id, filter.location, since, until, i64::from(page.page_size), page.offset()],
            |row| {
                Ok(StoredResult {
                    agent_id: uuid_col(row, "agent_id")?,
                    location: get(row, "location")?,
                    received_at: time_col(row, "received_at")?,
                    result: from_json(row, "result")?,
                })
            },
        )?;
        Ok(Some((n, results)))
    })
    .await
}

pub(super) async fn prune_results(
    s: &SqliteStore,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<u64> {
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM check_results WHERE rowid IN \
             (SELECT rowid FROM check_results WHERE checked_at < ?1 LIMIT ?2)",
            params![micros(before), limit],
        )?;
        tx.execute(
            "DELETE FROM notification_outbox WHERE created_at < ?1 \
             AND (sent_at IS NOT NULL OR failed_at IS NOT NULL)",
            [micros(before)],
        )?;
        tx.commit()?;
        Ok(n as u64)
    })
    .await
}

pub(super) async fn create_notifier(
    s: &SqliteStore,
    org_id: Uuid,
    kind: &str,
    url: &str,
) -> Result<Notifier> {
    let notifier = Notifier {
        id: Uuid::now_v7(),
        org_id,
        kind: kind.to_owned(),
        url: url.to_owned(),
        created_at: time_of("created_at", now_micros())?,
    };
    s.write(move |conn| {
        conn.execute(
            "INSERT INTO notifiers (id, org_id, kind, url, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id_text(notifier.id),
                id_text(notifier.org_id),
                notifier.kind,
                notifier.url,
                micros(notifier.created_at),
            ],
        )?;
        Ok(notifier)
    })
    .await
}

pub(super) async fn list_notifiers(s: &SqliteStore, scope: Scope) -> Result<Vec<Notifier>> {
    let org = opt_id_text(scope.org());
    s.read(move |conn| {
        query_vec(
            conn,
            "SELECT * FROM notifiers WHERE (?1 IS NULL OR org_id = ?1) ORDER BY created_at, id",
            [org],
            notifier_from_row,
        )
    })
    .await
}

pub(super) async fn delete_notifier(s: &SqliteStore, scope: Scope, id: Uuid) -> Result<bool> {
    let org = opt_id_text(scope.org());
    s.write(move |conn| {
        let n = conn.execute(
            "DELETE FROM notifiers WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
            params![id_text(id), org],
        )?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn create_maintenance_window(
    s: &SqliteStore,
    w: NewMaintenanceWindow,
) -> Result<MaintenanceWindow> {
    s.write(move |conn| {
        let window = MaintenanceWindow {
            id: Uuid::now_v7(),
            org_id: w.org_id,
            starts_at: time_of("starts_at", micros(w.starts_at))?,
            ends_at: time_of("ends_at", micros(w.ends_at))?,
            endpoint_ids: w.endpoint_ids,
            reason: w.reason,
            created_at: time_of("created_at", now_micros())?,
        };
        conn.execute(
            "INSERT INTO maintenance_windows (id, org_id, starts_at, ends_at, endpoint_ids, reason, created_by, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id_text(window.id),
                id_text(window.org_id),
                micros(window.starts_at),
                micros(window.ends_at),
                json_string(&window.endpoint_ids),
                window.reason,
                id_text(w.created_by),
                micros(window.created_at),
            ],
        )?;
        Ok(window)
    })
    .await
}

pub(super) async fn list_maintenance_windows(
    s: &SqliteStore,
    scope: Scope,
) -> Result<Vec<MaintenanceWindow>> {
    let org = opt_id_text(scope.org());
    s.read(move |conn| {
        query_vec(
            conn,
            "SELECT * FROM maintenance_windows WHERE (?1 IS NULL OR org_id = ?1) ORDER BY starts_at, id",
            [org],
            window_from_row,
        )
    })
    .await
}

pub(super) async fn delete_maintenance_window(
    s: &SqliteStore,
    scope: Scope,
    id: Uuid,
) -> Result<bool> {
    let org = opt_id_text(scope.org());
    s.write(move |conn| {
        let n = conn.execute(
            "DELETE FROM maintenance_windows WHERE id = ?1 AND (?2 IS NULL OR org_id = ?2)",
            params![id_text(id), org],
        )?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn claim_notifications(
    s: &SqliteStore,
    owner: Uuid,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Notification>> {
    s.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // SQLite's RETURNING cannot name the notifier joined in: pick, mark,
        // then read; the writer's transaction keeps the three together.
        let due = query_vec(
            &tx,
            "SELECT d.seq FROM notification_outbox d \
             WHERE d.sent_at IS NULL AND d.failed_at IS NULL AND d.next_attempt_at <= ?1 \
               AND (d.lease_until IS NULL OR d.lease_until <= ?1) \
               AND NOT EXISTS (SELECT 1 FROM notification_outbox p \
                 WHERE p.notifier_id = d.notifier_id AND p.subject_id = d.subject_id AND p.seq < d.seq \
                   AND p.sent_at IS NULL AND p.failed_at IS NULL) \
             ORDER BY d.seq LIMIT ?2",
            params![micros(now), limit],
            |row| get::<i64>(row, "seq"),
        )?;
        let due = json_string(&due);
        tx.execute(
            "UPDATE notification_outbox SET lease_owner = ?2, lease_until = ?3, attempts = attempts + 1 \
             WHERE seq IN (SELECT value FROM json_each(?1))",
            params![due, id_text(owner), micros(lease_until)],
        )?;
        let claimed = query_vec(
            &tx,
            "SELECT o.id, o.notifier_id, n.url, o.payload, o.attempts, o.created_at \
             FROM notification_outbox o JOIN notifiers n ON n.id = o.notifier_id \
             WHERE o.seq IN (SELECT value FROM json_each(?1)) ORDER BY o.seq",
            [due],
            |row| {
                Ok(Notification {
                    id: uuid_col(row, "id")?,
                    notifier_id: uuid_col(row, "notifier_id")?,
                    url: get(row, "url")?,
                    payload: json_col(row, "payload")?,
                    attempts: get(row, "attempts")?,
                    created_at: time_col(row, "created_at")?,
                })
            },
        )?;
        tx.commit()?;
        Ok(claimed)
    })
    .await
}

pub(super) async fn settle_notification(
    s: &SqliteStore,
    id: Uuid,
    owner: Uuid,
    outcome: &Delivery,
    now: DateTime<Utc>,
) -> Result<bool> {
    let outcome = outcome.clone();
    s.write(move |conn| {
        let held = "id = ?1 AND lease_owner = ?2 AND sent_at IS NULL AND failed_at IS NULL";
        let (id, owner) = (id_text(id), id_text(owner));
        let n = match outcome {
            Delivery::Sent => conn.execute(
                &format!("UPDATE notification_outbox SET sent_at = ?3, lease_owner = NULL, lease_until = NULL WHERE {held}"),
                params![id, owner, micros(now)],
            )?,
            Delivery::Retry { at, error } => conn.execute(
                &format!("UPDATE notification_outbox SET next_attempt_at = ?3, last_error = ?4, lease_owner = NULL, lease_until = NULL WHERE {held}"),
                params![id, owner, micros(at), error],
            )?,
            Delivery::GaveUp { error } => conn.execute(
                &format!("UPDATE notification_outbox SET failed_at = ?3, last_error = ?4, lease_owner = NULL, lease_until = NULL WHERE {held}"),
                params![id, owner, micros(now), error],
            )?,
        };
        Ok(n == 1)
    })
    .await
}
