//! The store conformance suite: every behaviour of the coordinator's `Store`
//! written once, as one async function over `Arc<dyn Store>`, and run against
//! each implementation — embedded SQLite (a fresh file in a temporary
//! directory) and PostgreSQL (a fresh database per case, from
//! `MUSTER_TEST_DATABASE_URL`). Whatever the one backend does, the other must
//! do too.
//!
//! A custom main (`harness = false`) so it can print its own summary. Every
//! case gets a store of its own, so cases share no state and a few run at
//! once. Without
//! `MUSTER_TEST_DATABASE_URL` the PostgreSQL half fails, it is not skipped.
//! Arguments that do not start with `-` filter cases by substring, as
//! libtest's do.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use chrono::{DateTime, TimeDelta, Utc};
use muster_common::condition::Measured;
use muster_common::monitor::{
    AgentHealth, CheckKind, CheckResult, ConditionSpec, Timings, Verdict,
};
use muster_coordinator::monitoring::{
    Agent, CheckOptions, Delivery, EndpointConfig, EndpointDetail, NewAgent, NewMaintenanceWindow,
    RecordOutcome, ResultFilter, Status, Uptime,
};
use muster_coordinator::store::postgres::PgStore;
use muster_coordinator::store::sqlite::SqliteStore;
use muster_coordinator::store::{
    ApiKey, CancelOutcome, Claim, Fenced, Identity, JoinToken, JoinTokenRefusal, LeaseRenewal,
    LogAccount, LogCheck, LogChunk, NewApiKey, NewApiKeyForBootstrap, NewJoinToken, NewRun,
    NewRunner, Organization, Page, RevokedRunner, Role, Run, RunEnd, RunFilter, RunStart,
    RunStatus, Runner, Scope, Store, StoreError, Workspace,
};
use muster_tests::TestDb;
use serde_json::json;
use uuid::Uuid;

type Outcome = anyhow::Result<()>;
type CaseFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;
type Case = fn(Arc<dyn Store>) -> CaseFuture;

/// The registry: each case's name is its function's name.
macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        const CASES: &[(&str, Case)] = &[
            $((stringify!($name), |store: Arc<dyn Store>| -> CaseFuture { Box::pin($name(store)) }),)*
        ];
    };
}

cases![
    organizations_create_and_find,
    organization_duplicate_name_conflicts,
    organizations_listed_by_scope,
    identities_created_unique_per_organization,
    bootstrap_happens_once,
    bootstrap_joins_an_existing_organization,
    cluster_settings_are_claimed_once,
    api_key_authenticates_and_records_use,
    api_key_expired_or_revoked_is_refused,
    api_keys_listed_paginated_and_scoped,
    api_key_revocation_is_scoped,
    workspace_put_then_updated_in_place,
    bundles_deduplicated_by_digest,
    workspaces_named_scoped,
    workspaces_listed_paginated_and_scoped,
    run_created_and_read_scoped,
    json_values_read_back_exactly,
    runs_listed_newest_first_paginated,
    runs_filtered_by_workspace_block_action,
    runs_filtered_by_status,
    runs_filtered_by_trigger,
    runs_listed_by_scope,
    claim_takes_oldest_first,
    claim_fencing_tokens_rise_across_grants,
    claim_by_org_runner_only_its_organization,
    claim_by_instance_runner_any_organization,
    claim_requires_every_run_label,
    claim_with_nothing_queued_is_none,
    concurrent_claims_lease_each_run_once,
    release_lease_requeues_only_a_leased_run,
    mark_running_is_fenced,
    finish_run_is_fenced,
    finish_and_claim_refills_the_runners_slot_in_one_step,
    finish_run_checks_the_stored_log_against_the_runners_account,
    cancel_ends_queued_runs_and_records_requests_for_held_ones,
    heartbeats_extend_only_the_leases_a_runner_holds,
    expired_leases_are_found_oldest_first,
    queued_runs_counts_the_queue_of_every_organization,
    abandoned_runs_end_lost_or_timed_out,
    abandoned_runs_with_attempts_left_are_queued_again,
    artifacts_stored_while_held_and_read_in_scope,
    append_logs_stores_duplicates_once,
    append_logs_acks_highest_contiguous,
    append_logs_refuses_stale_tokens,
    logs_read_after_seq_with_limit,
    active_runs_of_runner_are_leased_or_running,
    join_token_single_use,
    join_token_expired_or_unknown,
    join_token_multi_use,
    runners_created_and_read,
    runners_listed_by_scope,
    runner_connection_state,
    runner_revocation_is_scoped_and_kept,
    revoked_runner_is_leased_nothing,
    runner_cert_renewal_keeps_the_previous_until_used,
    agents_created_authenticated_and_revoked,
    agents_listed_with_heartbeats_and_endpoint_counts,
    endpoints_created_updated_and_deleted_in_scope,
    endpoints_for_an_agent_are_its_organizations_at_its_location,
    results_stored_once_and_only_for_assigned_endpoints,
    results_drive_states_incidents_and_the_outbox,
    endpoint_status_needs_the_quorum_of_locations,
    silent_agents_are_claimed_once_and_their_locations_turn_unknown,
    maintenance_windows_mute_incidents_and_are_scoped,
    notifiers_created_listed_and_deleted_in_scope,
    notifications_are_leased_retried_and_kept_in_order,
    old_results_are_pruned,
];

/// Each case's time limit, so a hang fails the case instead of the suite.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Cases running at once. Creating a PostgreSQL database and migrating it
/// dominates a case's time, so a few at a time cut the suite's time several
/// fold while keeping its connections (`PG_CONNECTIONS` each) well within the
/// server's limit, which other test binaries share.
const PARALLEL_CASES: usize = 4;

/// The pool size of each case's PostgreSQL store: enough for the concurrent
/// claim case to have every claim in flight at once.
const PG_CONNECTIONS: usize = 10;

// ---------------------------------------------------------------------------
// The runner of the suite.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// A store of its own for one case, and what must be cleaned up after it.
enum Fresh {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

async fn fresh_store(backend: Backend) -> anyhow::Result<(Arc<dyn Store>, Fresh)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().context("creating a temporary directory")?;
            let store = SqliteStore::open(&dir.path().join("muster.db"))
                .await
                .context("opening a fresh SQLite store")?;
            Ok((Arc::new(store), Fresh::Sqlite(dir)))
        }
        Backend::Postgres => {
            let db = TestDb::create().await?;
            match PgStore::connect(&db.url, PG_CONNECTIONS).await {
                Ok(store) => Ok((Arc::new(store), Fresh::Postgres(db))),
                Err(e) => {
                    db.drop_db().await;
                    Err(anyhow!(e).context("connecting to a fresh PostgreSQL database"))
                }
            }
        }
    }
}

/// Runs one case on a fresh store. A PostgreSQL database is dropped by a
/// task of its own, which the suite awaits at its end: a drop waits for a
/// checkpoint, and several waiting drops share one.
async fn run_case(
    backend: Backend,
    case: Case,
    cleanups: &std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
) -> Outcome {
    let (store, fresh) = fresh_store(backend).await?;
    // A task of its own, so a panicking case fails alone.
    let task = tokio::spawn(tokio::time::timeout(CASE_TIMEOUT, case(Arc::clone(&store))));
    let outcome = match task.await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(anyhow!("timed out after {CASE_TIMEOUT:?}")),
        Err(e) => Err(anyhow!("panicked: {e}")),
    };
    drop(store);
    match fresh {
        Fresh::Sqlite(dir) => drop(dir),
        Fresh::Postgres(db) => cleanups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tokio::spawn(db.drop_db())),
    }
    outcome
}

/// libtest's flags that take a value, so the value is not read as a filter.
const FLAGS_WITH_VALUE: &[&str] = &[
    "--test-threads",
    "--logfile",
    "--color",
    "--format",
    "--skip",
    "-Z",
];

fn filters() -> (Vec<String>, Vec<String>) {
    let mut include = Vec::new();
    let mut skip = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--skip" {
            skip.extend(args.next());
        } else if FLAGS_WITH_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            include.push(arg);
        }
    }
    (include, skip)
}

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(suite())
}

async fn suite() -> std::process::ExitCode {
    let started = Instant::now();
    let (include, skip) = filters();
    let selected: Vec<(&str, Case)> = CASES
        .iter()
        .copied()
        .filter(|(name, _)| include.is_empty() || include.iter().any(|f| name.contains(f.as_str())))
        .filter(|(name, _)| !skip.iter().any(|f| name.contains(f.as_str())))
        .collect();
    let backends = [Backend::Sqlite, Backend::Postgres];
    // What libtest answers to `--list`, for tools that ask.
    if std::env::args().any(|arg| arg == "--list") {
        for backend in backends {
            for (name, _) in &selected {
                println!("{}::{name}: test", backend.name());
            }
        }
        return std::process::ExitCode::SUCCESS;
    }
    println!(
        "\nrunning {} store conformance cases against {} backends",
        selected.len(),
        backends.len()
    );

    let pg_missing = std::env::var_os("MUSTER_TEST_DATABASE_URL").is_none();
    let mut passed = 0usize;
    let mut failed: Vec<String> = Vec::new();
    let cleanups = Arc::new(std::sync::Mutex::new(Vec::new()));
    for backend in backends {
        if backend == Backend::Postgres && pg_missing {
            println!(
                "{}: every case FAILED: MUSTER_TEST_DATABASE_URL is not set; start PostgreSQL and export it with \
                 `eval \"$(scripts/test-env.sh --print-env)\"` (the suite does not skip a backend)",
                backend.name()
            );
            failed.extend(
                selected
                    .iter()
                    .map(|(name, _)| format!("{}::{name}", backend.name())),
            );
            continue;
        }
        // Cases run a few at a time (each on a store of its own); results
        // are printed in the registry's order.
        let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_CASES));
        let mut tasks = Vec::new();
        for (_, case) in &selected {
            let (case, limit, cleanups) = (*case, Arc::clone(&limit), Arc::clone(&cleanups));
            tasks.push(tokio::spawn(async move {
                let _slot = limit.acquire_owned().await;
                let case_started = Instant::now();
                let outcome = run_case(backend, case, &cleanups).await;
                (outcome, case_started.elapsed().as_millis())
            }));
        }
        for ((name, _), task) in selected.iter().zip(tasks) {
            let (outcome, elapsed) = match task.await {
                Ok(done) => done,
                Err(e) => (Err(anyhow!("the case's task failed: {e}")), 0),
            };
            match outcome {
                Ok(()) => {
                    passed += 1;
                    println!("test {}::{name} ... ok ({elapsed} ms)", backend.name());
                }
                Err(e) => {
                    println!("test {}::{name} ... FAILED ({elapsed} ms)", backend.name());
                    println!("    {e:#}");
                    failed.push(format!("{}::{name}", backend.name()));
                }
            }
        }
    }

    let pending = std::mem::take(
        &mut *cleanups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for cleanup in pending {
        let _ = cleanup.await;
    }

    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
    println!(
        "\nstore conformance: {} cases × {} backends ({}): {passed} passed, {} failed",
        selected.len(),
        backends.len(),
        names.join(", "),
        failed.len()
    );
    println!(
        "test result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        (CASES.len() - selected.len()) * backends.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------
// Helpers.

/// Now, at the stores' precision (microseconds), so values round-trip equal.
fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("a representable time")
}

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

fn page(page: u32, page_size: u32) -> Page {
    Page { page, page_size }
}

fn all() -> Page {
    page(1, 1000)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn check_eq<T: PartialEq + std::fmt::Debug>(what: &str, found: T, expected: T) -> Outcome {
    ensure!(
        found == expected,
        "{what}: expected {expected:?}, found {found:?}"
    );
    Ok(())
}

fn expect_conflict<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) -> Outcome {
    match result {
        Err(StoreError::Conflict(_)) => Ok(()),
        other => bail!("{what}: expected a conflict, found {other:?}"),
    }
}

fn ids(runs: &[Run]) -> Vec<Uuid> {
    runs.iter().map(|r| r.id).collect()
}

async fn org(s: &Arc<dyn Store>, name: &str) -> anyhow::Result<Organization> {
    Ok(s.create_organization(name).await?)
}

async fn workspace(s: &Arc<dyn Store>, org_id: Uuid, name: &str) -> anyhow::Result<Workspace> {
    let digest = format!("sha256:{name}-{org_id}");
    Ok(s.put_workspace(
        org_id,
        name,
        &digest,
        &json!({ "name": name }),
        name.as_bytes(),
    )
    .await?)
}

/// An organization with one workspace in it.
async fn org_with_workspace(
    s: &Arc<dyn Store>,
    org_name: &str,
) -> anyhow::Result<(Organization, Workspace)> {
    let o = org(s, org_name).await?;
    let w = workspace(s, o.id, "infra").await?;
    Ok((o, w))
}

fn new_run(w: &Workspace, block: &str, action: &str) -> NewRun {
    NewRun {
        org_id: w.org_id,
        workspace_id: w.id,
        workspace: w.name.clone(),
        bundle_digest: w.bundle_digest.clone(),
        block: block.into(),
        block_version: None,
        action: action.into(),
        parameters: json!({}),
        reason: None,
        trigger: json!({ "api_key": "test" }),
        plan: json!({ "steps": [] }),
        runner_labels: BTreeMap::new(),
        max_attempts: 1,
        timeout_secs: None,
    }
}

async fn queue(s: &Arc<dyn Store>, w: &Workspace) -> anyhow::Result<Run> {
    Ok(s.create_run(new_run(w, "linux-patch", "patch")).await?)
}

async fn runner(
    s: &Arc<dyn Store>,
    org_id: Option<Uuid>,
    name: &str,
    with: &[(&str, &str)],
) -> anyhow::Result<Runner> {
    Ok(s.create_runner(NewRunner {
        id: Uuid::now_v7(),
        org_id,
        name: name.into(),
        labels: labels(with),
        capacity: 2,
        cert_serial: format!("serial-{name}"),
        cert_not_after: now() + secs(86_400),
    })
    .await?)
}

fn claim_for(r: &Runner) -> Claim {
    Claim {
        runner_id: r.id,
        runner_org: r.org_id,
        labels: r.labels.clone(),
        lease_expires_at: now() + secs(60),
    }
}

/// Claims one run, failing if there is none.
async fn lease(s: &Arc<dyn Store>, r: &Runner) -> anyhow::Result<Run> {
    s.claim_run(&claim_for(r))
        .await?
        .ok_or_else(|| anyhow!("runner {} found nothing to claim", r.name))
}

async fn get_run(s: &Arc<dyn Store>, id: Uuid) -> anyhow::Result<Run> {
    s.run(Scope::All, id)
        .await?
        .ok_or_else(|| anyhow!("run {id} not found"))
}

fn start(at: DateTime<Utc>) -> RunStart {
    RunStart {
        executor: "process".into(),
        image: Some("muster/ansible:bookworm".into()),
        image_digest: Some("sha256:image".into()),
        started_at: at,
    }
}

fn end(status: RunStatus, at: DateTime<Utc>) -> RunEnd {
    RunEnd {
        status,
        exit_code: Some(if status == RunStatus::Succeeded { 0 } else { 2 }),
        error: (status != RunStatus::Succeeded).then(|| "boom".to_owned()),
        last_seq: 0,
        finished_at: at,
        log_account: None,
    }
}

/// What a fenced change answered: `Applied` when it returned the run.
fn fenced(run: Option<Run>) -> Fenced {
    if run.is_some() {
        Fenced::Applied
    } else {
        Fenced::Stale
    }
}

fn chunk(seq: i64, data: &str) -> LogChunk {
    LogChunk {
        seq,
        stream: 1,
        ts: DateTime::from_timestamp_micros(1_700_000_000_000_000 + seq * 1_000)
            .expect("a representable time"),
        data: data.as_bytes().to_vec(),
    }
}

async fn identity_in(
    s: &Arc<dyn Store>,
    org_name: &str,
) -> anyhow::Result<(Organization, Identity)> {
    let o = org(s, org_name).await?;
    let i = s.create_identity(o.id, "alice", Role::OrgAdmin).await?;
    Ok((o, i))
}

fn new_key(identity: &Identity, name: &str, expires_at: Option<DateTime<Utc>>) -> NewApiKey {
    NewApiKey {
        identity_id: identity.id,
        org_id: identity.org_id,
        name: name.into(),
        prefix: format!("poly_{name}"),
        token_hash: format!("hash-{name}-{}", identity.org_id),
        expires_at,
    }
}

// ---------------------------------------------------------------------------
// Organizations and identities.

async fn organizations_create_and_find(s: Arc<dyn Store>) -> Outcome {
    let before = now() - secs(5);
    let acme = org(&s, "acme").await?;
    check_eq("name", acme.name.as_str(), "acme")?;
    ensure!(
        acme.created_at >= before && acme.created_at <= now() + secs(5),
        "created_at {} is not about now",
        acme.created_at
    );
    let found = s
        .organization_by_name("acme")
        .await?
        .context("acme not found by name")?;
    check_eq("found by name", found, acme)?;
    check_eq(
        "an unknown name",
        s.organization_by_name("nobody").await?,
        None,
    )
}

async fn organization_duplicate_name_conflicts(s: Arc<dyn Store>) -> Outcome {
    org(&s, "acme").await?;
    expect_conflict("a second acme", s.create_organization("acme").await)?;
    check_eq(
        "organizations",
        s.list_organizations(Scope::All).await?.len(),
        1,
    )
}

async fn organizations_listed_by_scope(s: Arc<dyn Store>) -> Outcome {
    let beta = org(&s, "beta").await?;
    let alpha = org(&s, "alpha").await?;
    let gamma = org(&s, "gamma").await?;
    check_eq(
        "all, by name",
        s.list_organizations(Scope::All).await?,
        vec![alpha, beta.clone(), gamma],
    )?;
    check_eq(
        "beta's scope",
        s.list_organizations(Scope::Org(beta.id)).await?,
        vec![beta],
    )?;
    check_eq(
        "an unknown organization's scope",
        s.list_organizations(Scope::Org(Uuid::now_v7())).await?,
        vec![],
    )
}

async fn identities_created_unique_per_organization(s: Arc<dyn Store>) -> Outcome {
    let acme = org(&s, "acme").await?;
    let other = org(&s, "other").await?;
    let alice = s.create_identity(acme.id, "alice", Role::User).await?;
    check_eq("org_id", alice.org_id, acme.id)?;
    check_eq("org_name", alice.org_name.as_str(), "acme")?;
    check_eq("name", alice.name.as_str(), "alice")?;
    check_eq("role", alice.role, Role::User)?;
    expect_conflict(
        "a second alice in acme",
        s.create_identity(acme.id, "alice", Role::Viewer).await,
    )?;
    let elsewhere = s.create_identity(other.id, "alice", Role::Viewer).await?;
    ensure!(elsewhere.id != alice.id, "two identities share an id");
    match s.create_identity(Uuid::now_v7(), "bob", Role::User).await {
        Err(StoreError::Database(_)) => Ok(()),
        other => bail!(
            "an identity in an unknown organization: expected a database error, found {other:?}"
        ),
    }
}

fn bootstrap_admin(hash: &str) -> NewApiKeyForBootstrap {
    NewApiKeyForBootstrap {
        org_name: "default".into(),
        identity_name: "admin".into(),
        key_name: "bootstrap admin".into(),
        prefix: "poly_boot".into(),
        token_hash: hash.into(),
    }
}

async fn bootstrap_happens_once(s: Arc<dyn Store>) -> Outcome {
    ensure!(
        s.bootstrap(bootstrap_admin("hash-first")).await?,
        "the first bootstrap did nothing"
    );
    ensure!(
        !s.bootstrap(bootstrap_admin("hash-second")).await?,
        "a second bootstrap did something"
    );
    let (key, admin) = s
        .authenticate_api_key("hash-first", now())
        .await?
        .context("the bootstrap key does not authenticate")?;
    check_eq("key name", key.name.as_str(), "bootstrap admin")?;
    check_eq("key prefix", key.prefix.as_str(), "poly_boot")?;
    check_eq("role", admin.role, Role::SuperAdmin)?;
    check_eq("identity", admin.name.as_str(), "admin")?;
    check_eq("organization", admin.org_name.as_str(), "default")?;
    check_eq(
        "the second bootstrap's key",
        s.authenticate_api_key("hash-second", now()).await?,
        None,
    )?;
    let orgs = s.list_organizations(Scope::All).await?;
    check_eq("organizations", orgs.len(), 1)?;
    check_eq("keys", s.list_api_keys(Scope::All, all()).await?.0, 1)
}

async fn cluster_settings_are_claimed_once(s: Arc<dyn Store>) -> Outcome {
    check_eq(
        "the first claim stores its value",
        s.claim_setting("ca", "first").await?,
        "first".to_owned(),
    )?;
    check_eq(
        "a later claim gets the first value",
        s.claim_setting("ca", "second").await?,
        "first".to_owned(),
    )?;
    check_eq(
        "settings are independent",
        s.claim_setting("other", "x").await?,
        "x".to_owned(),
    )?;
    // Coordinators starting together race for the claim: one value wins for all.
    let claims = (0..8).map(|i| {
        let s = s.clone();
        async move { s.claim_setting("raced", &format!("v{i}")).await }
    });
    let values: BTreeSet<String> = futures_util::future::try_join_all(claims)
        .await?
        .into_iter()
        .collect();
    check_eq("one value wins a race", values.len(), 1)
}

async fn bootstrap_joins_an_existing_organization(s: Arc<dyn Store>) -> Outcome {
    let existing = org(&s, "default").await?;
    ensure!(
        s.bootstrap(bootstrap_admin("hash-boot")).await?,
        "bootstrap did nothing"
    );
    let (_, admin) = s
        .authenticate_api_key("hash-boot", now())
        .await?
        .context("the bootstrap key does not authenticate")?;
    check_eq("the admin's organization", admin.org_id, existing.id)?;
    check_eq(
        "organizations",
        s.list_organizations(Scope::All).await?,
        vec![existing],
    )
}

// ---------------------------------------------------------------------------
// API keys.

async fn api_key_authenticates_and_records_use(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let created = s.create_api_key(new_key(&alice, "ci", None)).await?;
    check_eq("org_id", created.org_id, acme.id)?;
    check_eq("identity_id", created.identity_id, alice.id)?;
    check_eq("name", created.name.as_str(), "ci")?;
    check_eq("prefix", created.prefix.as_str(), "poly_ci")?;
    check_eq("last_used_at", created.last_used_at, None)?;
    check_eq("revoked_at", created.revoked_at, None)?;

    let at = now();
    let (key, identity) = s
        .authenticate_api_key(&format!("hash-ci-{}", acme.id), at)
        .await?
        .context("a fresh key does not authenticate")?;
    check_eq("authenticated key", key.id, created.id)?;
    check_eq("last_used_at", key.last_used_at, Some(at))?;
    check_eq("identity", identity, alice)?;
    let (_, listed) = s.list_api_keys(Scope::Org(acme.id), all()).await?;
    check_eq("listed last_used_at", listed[0].last_used_at, Some(at))?;

    // Uses are recorded to within a minute: one soon after is not written
    // (a write per request would cost every API call a commit), a later one is.
    let hash = format!("hash-ci-{}", acme.id);
    let (key, _) = s
        .authenticate_api_key(&hash, at + secs(30))
        .await?
        .context("the key does not authenticate again")?;
    check_eq("last_used_at 30 s after", key.last_used_at, Some(at))?;
    let later = at + secs(60);
    let (key, _) = s
        .authenticate_api_key(&hash, later)
        .await?
        .context("the key does not authenticate a minute later")?;
    check_eq("last_used_at a minute after", key.last_used_at, Some(later))?;
    let (_, listed) = s.list_api_keys(Scope::Org(acme.id), all()).await?;
    check_eq(
        "listed last_used_at a minute after",
        listed[0].last_used_at,
        Some(later),
    )?;
    check_eq(
        "an unknown hash",
        s.authenticate_api_key("hash-unknown", at).await?,
        None,
    )
}

async fn api_key_expired_or_revoked_is_refused(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let at = now();
    s.create_api_key(new_key(&alice, "expired", Some(at - secs(1))))
        .await?;
    s.create_api_key(new_key(&alice, "edge", Some(at))).await?;
    s.create_api_key(new_key(&alice, "later", Some(at + secs(3600))))
        .await?;
    let revoked = s.create_api_key(new_key(&alice, "revoked", None)).await?;
    let hash = |name: &str| format!("hash-{name}-{}", acme.id);

    check_eq(
        "an expired key",
        s.authenticate_api_key(&hash("expired"), at)
            .await?
            .is_some(),
        false,
    )?;
    check_eq(
        "a key expiring at this instant",
        s.authenticate_api_key(&hash("edge"), at).await?.is_some(),
        false,
    )?;
    check_eq(
        "a key expiring later",
        s.authenticate_api_key(&hash("later"), at).await?.is_some(),
        true,
    )?;
    ensure!(
        s.revoke_api_key(Scope::All, revoked.id, at).await?,
        "revocation reported nothing revoked"
    );
    check_eq(
        "a revoked key",
        s.authenticate_api_key(&hash("revoked"), at)
            .await?
            .is_some(),
        false,
    )?;
    // A refused key is not marked used.
    let (_, keys) = s.list_api_keys(Scope::All, all()).await?;
    for key in keys.iter().filter(|k| k.name != "later") {
        check_eq(
            &format!("{} last_used_at", key.name),
            key.last_used_at,
            None,
        )?;
    }
    Ok(())
}

async fn api_keys_listed_paginated_and_scoped(s: Arc<dyn Store>) -> Outcome {
    let (a, alice) = identity_in(&s, "alpha").await?;
    let (b, bob) = identity_in(&s, "beta").await?;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(
            s.create_api_key(new_key(&alice, &format!("a{i}"), None))
                .await?,
        );
    }
    for i in 0..2 {
        s.create_api_key(new_key(&bob, &format!("b{i}"), None))
            .await?;
    }
    let names = |keys: &[ApiKey]| keys.iter().map(|k| k.name.clone()).collect::<Vec<_>>();
    let (total, first) = s.list_api_keys(Scope::Org(a.id), page(1, 2)).await?;
    check_eq("alpha's count", total, 5)?;
    check_eq(
        "page 1",
        names(&first),
        vec!["a0".to_owned(), "a1".to_owned()],
    )?;
    check_eq("page 1 keys", first, made[..2].to_vec())?;
    let (total, second) = s.list_api_keys(Scope::Org(a.id), page(2, 2)).await?;
    check_eq("count on page 2", total, 5)?;
    check_eq(
        "page 2",
        names(&second),
        vec!["a2".to_owned(), "a3".to_owned()],
    )?;
    let (_, third) = s.list_api_keys(Scope::Org(a.id), page(3, 2)).await?;
    check_eq("page 3", names(&third), vec!["a4".to_owned()])?;
    let (total, beyond) = s.list_api_keys(Scope::Org(a.id), page(4, 2)).await?;
    check_eq("count past the end", total, 5)?;
    check_eq("past the end", beyond.len(), 0)?;
    let (total, beta) = s.list_api_keys(Scope::Org(b.id), all()).await?;
    check_eq("beta's count", total, 2)?;
    check_eq(
        "beta's keys",
        names(&beta),
        vec!["b0".to_owned(), "b1".to_owned()],
    )?;
    check_eq("all keys", s.list_api_keys(Scope::All, all()).await?.0, 7)
}

async fn api_key_revocation_is_scoped(s: Arc<dyn Store>) -> Outcome {
    let (a, alice) = identity_in(&s, "alpha").await?;
    let (b, _) = identity_in(&s, "beta").await?;
    let key = s.create_api_key(new_key(&alice, "ci", None)).await?;
    let hash = format!("hash-ci-{}", a.id);
    let first = now();
    ensure!(
        !s.revoke_api_key(Scope::Org(b.id), key.id, first).await?,
        "another organization revoked alpha's key"
    );
    ensure!(
        s.authenticate_api_key(&hash, first).await?.is_some(),
        "the key stopped working after another organization's revocation"
    );
    ensure!(
        s.revoke_api_key(Scope::Org(a.id), key.id, first).await?,
        "alpha could not revoke its own key"
    );
    check_eq(
        "a revoked key",
        s.authenticate_api_key(&hash, first).await?.is_some(),
        false,
    )?;
    ensure!(
        s.revoke_api_key(Scope::Org(a.id), key.id, first + secs(10))
            .await?,
        "revoking a revoked key reported nothing"
    );
    let (_, keys) = s.list_api_keys(Scope::Org(a.id), all()).await?;
    check_eq(
        "revoked_at keeps the first revocation",
        keys[0].revoked_at,
        Some(first),
    )?;
    check_eq(
        "revoking an unknown key",
        s.revoke_api_key(Scope::All, Uuid::now_v7(), first).await?,
        false,
    )
}

// ---------------------------------------------------------------------------
// Workspaces and bundles.

async fn workspace_put_then_updated_in_place(s: Arc<dyn Store>) -> Outcome {
    let acme = org(&s, "acme").await?;
    let first = s
        .put_workspace(
            acme.id,
            "infra",
            "sha256:aaa",
            &json!({"v": 1}),
            b"bundle-a",
        )
        .await?;
    check_eq("org_id", first.org_id, acme.id)?;
    check_eq("organization", first.organization.as_str(), "acme")?;
    check_eq("name", first.name.as_str(), "infra")?;
    check_eq("digest", first.bundle_digest.as_str(), "sha256:aaa")?;
    check_eq("model", first.model.clone(), json!({"v": 1}))?;
    check_eq(
        "updated_at of a new workspace",
        first.updated_at,
        first.created_at,
    )?;

    let second = s
        .put_workspace(
            acme.id,
            "infra",
            "sha256:bbb",
            &json!({"v": 2, "blocks": ["a", "b"]}),
            b"bundle-b",
        )
        .await?;
    check_eq("id after an update", second.id, first.id)?;
    check_eq(
        "created_at after an update",
        second.created_at,
        first.created_at,
    )?;
    ensure!(
        second.updated_at >= first.updated_at,
        "updated_at went back: {} < {}",
        second.updated_at,
        first.updated_at
    );
    check_eq(
        "digest after an update",
        second.bundle_digest.as_str(),
        "sha256:bbb",
    )?;
    check_eq(
        "model after an update",
        second.model.clone(),
        json!({"v": 2, "blocks": ["a", "b"]}),
    )?;
    check_eq(
        "the old bundle",
        s.bundle("sha256:aaa").await?,
        Some(b"bundle-a".to_vec()),
    )?;
    check_eq(
        "the new bundle",
        s.bundle("sha256:bbb").await?,
        Some(b"bundle-b".to_vec()),
    )?;
    let (total, listed) = s.list_workspaces(Scope::All, all()).await?;
    check_eq("workspaces", total, 1)?;
    check_eq("the listed workspace", listed, vec![second])
}

async fn bundles_deduplicated_by_digest(s: Arc<dyn Store>) -> Outcome {
    let acme = org(&s, "acme").await?;
    let one = s
        .put_workspace(acme.id, "one", "sha256:same", &json!({}), b"first")
        .await?;
    let two = s
        .put_workspace(acme.id, "two", "sha256:same", &json!({}), b"second")
        .await?;
    check_eq("digests", two.bundle_digest, one.bundle_digest)?;
    // Content-addressed: a digest's bytes are the first ones stored.
    check_eq(
        "the bundle",
        s.bundle("sha256:same").await?,
        Some(b"first".to_vec()),
    )?;
    check_eq("an unknown digest", s.bundle("sha256:none").await?, None)
}

async fn workspaces_named_scoped(s: Arc<dyn Store>) -> Outcome {
    let beta = org(&s, "beta").await?;
    let alpha = org(&s, "alpha").await?;
    let in_beta = workspace(&s, beta.id, "infra").await?;
    let in_alpha = workspace(&s, alpha.id, "infra").await?;
    workspace(&s, alpha.id, "other").await?;
    check_eq(
        "infra everywhere, by organization",
        s.workspaces_named(Scope::All, "infra").await?,
        vec![in_alpha, in_beta.clone()],
    )?;
    check_eq(
        "infra in beta",
        s.workspaces_named(Scope::Org(beta.id), "infra").await?,
        vec![in_beta],
    )?;
    check_eq(
        "alpha's other in beta's scope",
        s.workspaces_named(Scope::Org(beta.id), "other").await?,
        vec![],
    )?;
    check_eq(
        "an unknown name",
        s.workspaces_named(Scope::All, "nothing").await?,
        vec![],
    )
}

async fn workspaces_listed_paginated_and_scoped(s: Arc<dyn Store>) -> Outcome {
    let beta = org(&s, "beta").await?;
    let alpha = org(&s, "alpha").await?;
    let beta_b = workspace(&s, beta.id, "b").await?;
    let alpha_c = workspace(&s, alpha.id, "c").await?;
    let alpha_a = workspace(&s, alpha.id, "a").await?;
    let (total, first) = s.list_workspaces(Scope::All, page(1, 2)).await?;
    check_eq("count", total, 3)?;
    check_eq(
        "page 1, by organization then name",
        first,
        vec![alpha_a, alpha_c],
    )?;
    let (total, second) = s.list_workspaces(Scope::All, page(2, 2)).await?;
    check_eq("count on page 2", total, 3)?;
    check_eq("page 2", second, vec![beta_b.clone()])?;
    let (total, mine) = s.list_workspaces(Scope::Org(beta.id), all()).await?;
    check_eq("beta's count", total, 1)?;
    check_eq("beta's workspaces", mine, vec![beta_b])
}

// ---------------------------------------------------------------------------
// Runs.

async fn run_created_and_read_scoped(s: Arc<dyn Store>) -> Outcome {
    let (acme, w) = org_with_workspace(&s, "acme").await?;
    let other = org(&s, "other").await?;
    let before = now() - secs(5);
    let mut new = new_run(&w, "linux-patch", "patch");
    new.block_version = Some("1.2.3".into());
    new.parameters = json!({"extra_vars": {"patch_profile": "security-only", "n": 3}});
    new.reason = Some("Nightly patch run from CI".into());
    new.trigger = json!({"api_key": "nightly", "user": "alice", "ci": "gitlab"});
    new.plan = json!({"steps": [{"block": "linux-patch", "action": "patch"}]});
    new.runner_labels = labels(&[("site", "fra"), ("os", "linux")]);
    let run = s.create_run(new.clone()).await?;

    check_eq("org_id", run.org_id, acme.id)?;
    check_eq("organization", run.organization.as_str(), "acme")?;
    check_eq("workspace_id", run.workspace_id, w.id)?;
    check_eq("workspace", run.workspace.as_str(), "infra")?;
    check_eq(
        "bundle_digest",
        run.bundle_digest.as_str(),
        w.bundle_digest.as_str(),
    )?;
    check_eq("block", run.block.as_str(), "linux-patch")?;
    check_eq("block_version", run.block_version.as_deref(), Some("1.2.3"))?;
    check_eq("action", run.action.as_str(), "patch")?;
    check_eq("parameters", &run.parameters, &new.parameters)?;
    check_eq("reason", &run.reason, &new.reason)?;
    check_eq("trigger", &run.trigger, &new.trigger)?;
    check_eq("plan", &run.plan, &new.plan)?;
    check_eq("runner_labels", &run.runner_labels, &new.runner_labels)?;
    check_eq("status", run.status, RunStatus::Queued)?;
    check_eq("fencing_token", run.fencing_token, 0)?;
    check_eq("attempt", run.attempt, 0)?;
    check_eq("log_acked_seq", run.log_acked_seq, 0)?;
    check_eq("runner_id", run.runner_id, None)?;
    check_eq("runner_name", run.runner_name.clone(), None)?;
    check_eq("exit_code", run.exit_code, None)?;
    check_eq("leased_at", run.leased_at, None)?;
    check_eq("started_at", run.started_at, None)?;
    check_eq("finished_at", run.finished_at, None)?;
    ensure!(
        run.created_at >= before && run.created_at <= now() + secs(5),
        "created_at {} is not about now",
        run.created_at
    );

    check_eq(
        "read in all",
        s.run(Scope::All, run.id).await?,
        Some(run.clone()),
    )?;
    check_eq(
        "read in its organization",
        s.run(Scope::Org(acme.id), run.id).await?,
        Some(run.clone()),
    )?;
    check_eq(
        "read by another organization",
        s.run(Scope::Org(other.id), run.id).await?,
        None,
    )?;
    check_eq(
        "an unknown run",
        s.run(Scope::All, Uuid::now_v7()).await?,
        None,
    )
}

/// What a trigger or a workspace holds comes back as it went in, numbers at
/// the edges of f64 and u64 too: PostgreSQL gives JSONB numbers back in full
/// decimal (f64::MAX as 309 digits), and a reader that got one wrong failed
/// every later read of the run (schemathesis found it).
async fn json_values_read_back_exactly(s: Arc<dyn Store>) -> Outcome {
    let edges = json!({
        "max": f64::MAX,
        "almost_max": 1.797_693_134_862_315_5e308,
        "min": f64::MIN,
        "tiny": f64::MIN_POSITIVE,
        "subnormal": 5e-324,
        "third": 1.0 / 3.0,
        "u64_max": u64::MAX,
        "i64_min": i64::MIN,
        "nested": [{"x": -0.1, "y": 1e-300}],
    });
    let o = org(&s, "acme").await?;
    let w = s
        .put_workspace(
            o.id,
            "edges",
            "sha256:edges",
            &json!({ "config": edges }),
            b"edges",
        )
        .await?;
    let mut new = new_run(&w, "linux-patch", "patch");
    new.parameters = json!({ "extra_vars": edges });
    new.trigger = json!({ "ci": edges });
    new.plan = json!({ "vars": edges });
    let run = s.create_run(new.clone()).await?;
    let read = get_run(&s, run.id).await?;
    check_eq("parameters", &read.parameters, &new.parameters)?;
    check_eq("trigger", &read.trigger, &new.trigger)?;
    check_eq("plan", &read.plan, &new.plan)?;
    let (_, listed) = s
        .list_runs(Scope::All, &RunFilter::default(), all())
        .await?;
    check_eq("listed", ids(&listed), vec![run.id])?;
    let named = s.workspaces_named(Scope::All, "edges").await?;
    check_eq(
        "workspace model",
        named.first().map(|w| &w.model),
        Some(&json!({ "config": edges })),
    )?;
    Ok(())
}

async fn runs_listed_newest_first_paginated(s: Arc<dyn Store>) -> Outcome {
    let (acme, w) = org_with_workspace(&s, "acme").await?;
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(queue(&s, &w).await?);
    }
    let scope = Scope::Org(acme.id);
    let none = RunFilter::default();
    let (total, first) = s.list_runs(scope, &none, page(1, 2)).await?;
    check_eq("count", total, 5)?;
    check_eq(
        "page 1, newest first",
        ids(&first),
        vec![made[4].id, made[3].id],
    )?;
    check_eq("page 1 runs", first[0].clone(), made[4].clone())?;
    let (total, second) = s.list_runs(scope, &none, page(2, 2)).await?;
    check_eq("count on page 2", total, 5)?;
    check_eq("page 2", ids(&second), vec![made[2].id, made[1].id])?;
    let (_, third) = s.list_runs(scope, &none, page(3, 2)).await?;
    check_eq("page 3", ids(&third), vec![made[0].id])?;
    let (total, beyond) = s.list_runs(scope, &none, page(4, 2)).await?;
    check_eq("count past the end", total, 5)?;
    check_eq("past the end", beyond.len(), 0)
}

async fn runs_filtered_by_workspace_block_action(s: Arc<dyn Store>) -> Outcome {
    let (acme, infra) = org_with_workspace(&s, "acme").await?;
    let apps = workspace(&s, acme.id, "apps").await?;
    let patch = s
        .create_run(new_run(&infra, "linux-patch", "patch"))
        .await?;
    let reboot = s
        .create_run(new_run(&infra, "linux-patch", "reboot"))
        .await?;
    let deploy = s.create_run(new_run(&apps, "deploy", "patch")).await?;
    let list = |filter: RunFilter| {
        let s = Arc::clone(&s);
        async move {
            let (total, runs) = s.list_runs(Scope::All, &filter, all()).await?;
            ensure!(
                total == runs.len() as i64,
                "count {total} for {} listed runs",
                runs.len()
            );
            anyhow::Ok(ids(&runs))
        }
    };
    check_eq(
        "workspace infra",
        list(RunFilter {
            workspace: Some("infra".into()),
            ..RunFilter::default()
        })
        .await?,
        vec![reboot.id, patch.id],
    )?;
    check_eq(
        "block deploy",
        list(RunFilter {
            block: Some("deploy".into()),
            ..RunFilter::default()
        })
        .await?,
        vec![deploy.id],
    )?;
    check_eq(
        "action patch",
        list(RunFilter {
            action: Some("patch".into()),
            ..RunFilter::default()
        })
        .await?,
        vec![deploy.id, patch.id],
    )?;
    check_eq(
        "workspace infra and action reboot",
        list(RunFilter {
            workspace: Some("infra".into()),
            action: Some("reboot".into()),
            ..RunFilter::default()
        })
        .await?,
        vec![reboot.id],
    )?;
    check_eq(
        "an unknown block",
        list(RunFilter {
            block: Some("nothing".into()),
            ..RunFilter::default()
        })
        .await?,
        vec![],
    )
}

async fn runs_filtered_by_status(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let done = queue(&s, &w).await?;
    let leased = queue(&s, &w).await?;
    let queued = queue(&s, &w).await?;
    let first = lease(&s, &r).await?;
    check_eq("first leased", first.id, done.id)?;
    check_eq(
        "finish",
        fenced(
            s.finish_run(
                done.id,
                first.fencing_token,
                &end(RunStatus::Succeeded, now()),
            )
            .await?,
        ),
        Fenced::Applied,
    )?;
    check_eq("second leased", lease(&s, &r).await?.id, leased.id)?;
    for (status, expected) in [
        (RunStatus::Queued, vec![queued.id]),
        (RunStatus::Leased, vec![leased.id]),
        (RunStatus::Succeeded, vec![done.id]),
        (RunStatus::Failed, vec![]),
    ] {
        let filter = RunFilter {
            status: Some(status),
            ..RunFilter::default()
        };
        let (total, runs) = s.list_runs(Scope::All, &filter, all()).await?;
        check_eq(&format!("{status:?} count"), total, expected.len() as i64)?;
        check_eq(&format!("{status:?} runs"), ids(&runs), expected)?;
    }
    Ok(())
}

async fn runs_filtered_by_trigger(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let make = |trigger: serde_json::Value| {
        let mut run = new_run(&w, "b", "a");
        run.trigger = trigger;
        let s = Arc::clone(&s);
        async move { anyhow::Ok(s.create_run(run).await?.id) }
    };
    let nightly = make(json!({"api_key": "nightly"})).await?;
    let alice_user = make(json!({"user": "alice"})).await?;
    let gitlab = make(json!({"ci": "gitlab", "user": "bob"})).await?;
    let alice_key = make(json!({"api_key": "alice", "user": "carol"})).await?;
    // Only api_key, user and ci name a trigger; a null is no value.
    make(json!({"reason": "alice"})).await?;
    let boolean = make(json!({"ci": true})).await?;
    let number = make(json!({"user": 42})).await?;
    make(json!({"user": null})).await?;
    for (value, expected) in [
        ("alice", vec![alice_key, alice_user]),
        ("nightly", vec![nightly]),
        ("gitlab", vec![gitlab]),
        ("bob", vec![gitlab]),
        ("true", vec![boolean]),
        ("42", vec![number]),
        ("nobody", vec![]),
        ("null", vec![]),
    ] {
        let filter = RunFilter {
            trigger: Some(value.into()),
            ..RunFilter::default()
        };
        let (total, runs) = s.list_runs(Scope::All, &filter, all()).await?;
        check_eq(
            &format!("trigger {value} count"),
            total,
            expected.len() as i64,
        )?;
        check_eq(&format!("trigger {value}"), ids(&runs), expected)?;
    }
    Ok(())
}

async fn runs_listed_by_scope(s: Arc<dyn Store>) -> Outcome {
    let (a, wa) = org_with_workspace(&s, "alpha").await?;
    let (b, wb) = org_with_workspace(&s, "beta").await?;
    let ra = queue(&s, &wa).await?;
    let rb = queue(&s, &wb).await?;
    let none = RunFilter::default();
    let (total, runs) = s.list_runs(Scope::Org(a.id), &none, all()).await?;
    check_eq("alpha's count", total, 1)?;
    check_eq("alpha's runs", ids(&runs), vec![ra.id])?;
    let (total, runs) = s.list_runs(Scope::Org(b.id), &none, all()).await?;
    check_eq("beta's count", total, 1)?;
    check_eq("beta's runs", ids(&runs), vec![rb.id])?;
    let (total, runs) = s.list_runs(Scope::All, &none, all()).await?;
    check_eq("all count", total, 2)?;
    check_eq("all runs", ids(&runs), vec![rb.id, ra.id])?;
    let (total, runs) = s
        .list_runs(Scope::Org(Uuid::now_v7()), &none, all())
        .await?;
    check_eq("an unknown organization's count", total, 0)?;
    check_eq("an unknown organization's runs", runs.len(), 0)
}

// ---------------------------------------------------------------------------
// Claims and leases.

async fn claim_takes_oldest_first(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let made = [
        queue(&s, &w).await?,
        queue(&s, &w).await?,
        queue(&s, &w).await?,
    ];
    for expected in &made {
        let claim = claim_for(&r);
        let before = now() - secs(5);
        let run = s.claim_run(&claim).await?.context("nothing to claim")?;
        check_eq("claimed run", run.id, expected.id)?;
        check_eq("status", run.status, RunStatus::Leased)?;
        check_eq("runner_id", run.runner_id, Some(r.id))?;
        check_eq("runner_name", run.runner_name.as_deref(), Some("r1"))?;
        check_eq("attempt", run.attempt, 1)?;
        check_eq(
            "lease_expires_at",
            run.lease_expires_at,
            Some(claim.lease_expires_at),
        )?;
        ensure!(
            run.leased_at
                .is_some_and(|t| t >= before && t <= now() + secs(5)),
            "leased_at {:?} is not about now",
            run.leased_at
        );
        check_eq("stored as claimed", get_run(&s, run.id).await?, run)?;
    }
    check_eq("after the last", s.claim_run(&claim_for(&r)).await?, None)
}

async fn claim_fencing_tokens_rise_across_grants(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    for _ in 0..3 {
        queue(&s, &w).await?;
    }
    let first = lease(&s, &r).await?;
    let second = lease(&s, &r).await?;
    ensure!(
        first.fencing_token > 0,
        "a granted token is {}",
        first.fencing_token
    );
    ensure!(
        second.fencing_token > first.fencing_token,
        "tokens did not rise: {} then {}",
        first.fencing_token,
        second.fencing_token
    );
    check_eq(
        "release",
        s.release_lease(first.id, first.fencing_token).await?,
        Fenced::Applied,
    )?;
    // The released run is the oldest queued one again.
    let again = lease(&s, &r).await?;
    check_eq("re-leased run", again.id, first.id)?;
    check_eq("attempt of a re-lease", again.attempt, 2)?;
    ensure!(
        again.fencing_token > second.fencing_token,
        "a re-lease's token {} is not above the last grant's {}",
        again.fencing_token,
        second.fencing_token
    );
    let third = lease(&s, &r).await?;
    ensure!(
        third.fencing_token > again.fencing_token,
        "tokens did not rise: {} then {}",
        again.fencing_token,
        third.fencing_token
    );
    check_eq(
        "the superseded token",
        fenced(
            s.mark_running(first.id, first.fencing_token, &start(now()))
                .await?,
        ),
        Fenced::Stale,
    )
}

async fn claim_by_org_runner_only_its_organization(s: Arc<dyn Store>) -> Outcome {
    let (_, wa) = org_with_workspace(&s, "alpha").await?;
    let (b, wb) = org_with_workspace(&s, "beta").await?;
    let older = queue(&s, &wa).await?;
    let mine = queue(&s, &wb).await?;
    let r = runner(&s, Some(b.id), "beta-runner", &[]).await?;
    check_eq("beta's runner takes", lease(&s, &r).await?.id, mine.id)?;
    check_eq(
        "beta's runner and alpha's run",
        s.claim_run(&claim_for(&r)).await?.map(|run| run.id),
        None,
    )?;
    check_eq(
        "alpha's run",
        get_run(&s, older.id).await?.status,
        RunStatus::Queued,
    )
}

async fn claim_by_instance_runner_any_organization(s: Arc<dyn Store>) -> Outcome {
    let (_, wa) = org_with_workspace(&s, "alpha").await?;
    let (_, wb) = org_with_workspace(&s, "beta").await?;
    let first = queue(&s, &wb).await?;
    let second = queue(&s, &wa).await?;
    let r = runner(&s, None, "shared", &[]).await?;
    check_eq("first", lease(&s, &r).await?.id, first.id)?;
    check_eq("second", lease(&s, &r).await?.id, second.id)?;
    check_eq("then", s.claim_run(&claim_for(&r)).await?, None)
}

async fn claim_requires_every_run_label(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let labelled = |pairs: &[(&str, &str)]| {
        let mut run = new_run(&w, "b", "a");
        run.runner_labels = labels(pairs);
        let s = Arc::clone(&s);
        async move { anyhow::Ok(s.create_run(run).await?) }
    };
    let fra = labelled(&[("site", "fra")]).await?;
    let fra_gpu = labelled(&[("site", "fra"), ("gpu", "true")]).await?;
    let anywhere = labelled(&[]).await?;

    let plain = runner(&s, None, "plain", &[]).await?;
    check_eq(
        "an unlabelled runner takes",
        lease(&s, &plain).await?.id,
        anywhere.id,
    )?;
    check_eq(
        "an unlabelled runner then",
        s.claim_run(&claim_for(&plain)).await?,
        None,
    )?;

    let berlin = runner(&s, None, "berlin", &[("site", "ber"), ("gpu", "true")]).await?;
    check_eq(
        "a runner in another site",
        s.claim_run(&claim_for(&berlin)).await?,
        None,
    )?;

    let site_key = runner(&s, None, "keys-only", &[("fra", "site")]).await?;
    check_eq(
        "a runner with the value as key",
        s.claim_run(&claim_for(&site_key)).await?,
        None,
    )?;

    let frankfurt = runner(&s, None, "frankfurt", &[("site", "fra"), ("os", "linux")]).await?;
    check_eq(
        "a runner in fra takes",
        lease(&s, &frankfurt).await?.id,
        fra.id,
    )?;
    check_eq(
        "a runner in fra without a gpu",
        s.claim_run(&claim_for(&frankfurt)).await?,
        None,
    )?;

    let gpu = runner(
        &s,
        None,
        "gpu",
        &[("site", "fra"), ("gpu", "true"), ("os", "linux")],
    )
    .await?;
    check_eq(
        "a gpu runner in fra takes",
        lease(&s, &gpu).await?.id,
        fra_gpu.id,
    )?;
    Ok(())
}

async fn claim_with_nothing_queued_is_none(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    check_eq("an empty queue", s.claim_run(&claim_for(&r)).await?, None)?;
    let run = queue(&s, &w).await?;
    let leased = lease(&s, &r).await?;
    check_eq("leased", leased.id, run.id)?;
    check_eq(
        "only a leased run",
        s.claim_run(&claim_for(&r)).await?,
        None,
    )?;
    check_eq(
        "finish",
        fenced(
            s.finish_run(run.id, leased.fencing_token, &end(RunStatus::Failed, now()))
                .await?,
        ),
        Fenced::Applied,
    )?;
    check_eq(
        "only a finished run",
        s.claim_run(&claim_for(&r)).await?,
        None,
    )
}

async fn concurrent_claims_lease_each_run_once(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let mut made = BTreeSet::new();
    for _ in 0..5 {
        made.insert(queue(&s, &w).await?.id);
    }
    let mut runners = Vec::new();
    for i in 0..8 {
        runners.push(runner(&s, None, &format!("r{i}"), &[]).await?);
    }
    // All eight claims start together.
    let gate = Arc::new(tokio::sync::Barrier::new(runners.len()));
    let tasks: Vec<_> = runners
        .iter()
        .map(|r| {
            let s = Arc::clone(&s);
            let gate = Arc::clone(&gate);
            let claim = claim_for(r);
            tokio::spawn(async move {
                gate.wait().await;
                s.claim_run(&claim).await
            })
        })
        .collect();
    let mut leased = Vec::new();
    for task in tasks {
        if let Some(run) = task.await.context("a claim task panicked")?? {
            leased.push(run);
        }
    }
    let leased_ids: BTreeSet<Uuid> = leased.iter().map(|r| r.id).collect();
    check_eq("claims that got a run", leased.len(), 5)?;
    check_eq("distinct runs leased", leased_ids, made)?;
    let tokens: BTreeSet<i64> = leased.iter().map(|r| r.fencing_token).collect();
    check_eq("distinct fencing tokens", tokens.len(), 5)?;
    for run in &leased {
        let stored = get_run(&s, run.id).await?;
        check_eq("stored holder", stored.runner_id, run.runner_id)?;
        check_eq("stored token", stored.fencing_token, run.fencing_token)?;
        check_eq("attempt", stored.attempt, 1)?;
    }
    let filter = RunFilter {
        status: Some(RunStatus::Leased),
        ..RunFilter::default()
    };
    check_eq(
        "leased runs",
        s.list_runs(Scope::All, &filter, all()).await?.0,
        5,
    )?;
    check_eq(
        "a claim after",
        s.claim_run(&claim_for(&runners[0])).await?,
        None,
    )
}

async fn release_lease_requeues_only_a_leased_run(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let run = queue(&s, &w).await?;
    let leased = lease(&s, &r).await?;
    let token = leased.fencing_token;
    check_eq(
        "a wrong token",
        s.release_lease(run.id, token + 1).await?,
        Fenced::Stale,
    )?;
    check_eq(
        "an unknown run",
        s.release_lease(Uuid::now_v7(), token).await?,
        Fenced::Stale,
    )?;
    check_eq(
        "release",
        s.release_lease(run.id, token).await?,
        Fenced::Applied,
    )?;
    let requeued = get_run(&s, run.id).await?;
    check_eq("status", requeued.status, RunStatus::Queued)?;
    check_eq("runner_id", requeued.runner_id, None)?;
    check_eq("leased_at", requeued.leased_at, None)?;
    check_eq("lease_expires_at", requeued.lease_expires_at, None)?;
    check_eq("fencing_token kept", requeued.fencing_token, token)?;
    check_eq("attempt kept", requeued.attempt, 1)?;
    check_eq(
        "a second release",
        s.release_lease(run.id, token).await?,
        Fenced::Stale,
    )?;

    let again = lease(&s, &r).await?;
    check_eq(
        "mark running",
        fenced(
            s.mark_running(run.id, again.fencing_token, &start(now()))
                .await?,
        ),
        Fenced::Applied,
    )?;
    check_eq(
        "releasing a running run",
        s.release_lease(run.id, again.fencing_token).await?,
        Fenced::Stale,
    )?;
    check_eq(
        "still running",
        get_run(&s, run.id).await?.status,
        RunStatus::Running,
    )
}

async fn mark_running_is_fenced(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let queued = queue(&s, &w).await?;
    check_eq(
        "a queued run",
        fenced(s.mark_running(queued.id, 0, &start(now())).await?),
        Fenced::Stale,
    )?;
    let run = lease(&s, &r).await?;
    let token = run.fencing_token;
    check_eq(
        "a stale token",
        fenced(s.mark_running(run.id, token - 1, &start(now())).await?),
        Fenced::Stale,
    )?;
    check_eq(
        "after a stale token",
        get_run(&s, run.id).await?.status,
        RunStatus::Leased,
    )?;
    let at = now();
    check_eq(
        "mark running",
        fenced(s.mark_running(run.id, token, &start(at)).await?),
        Fenced::Applied,
    )?;
    let running = get_run(&s, run.id).await?;
    check_eq("status", running.status, RunStatus::Running)?;
    check_eq("executor", running.executor.as_deref(), Some("process"))?;
    check_eq(
        "image",
        running.image.as_deref(),
        Some("muster/ansible:bookworm"),
    )?;
    check_eq(
        "image_digest",
        running.image_digest.as_deref(),
        Some("sha256:image"),
    )?;
    check_eq("started_at", running.started_at, Some(at))?;
    check_eq(
        "mark running twice",
        fenced(s.mark_running(run.id, token, &start(at)).await?),
        Fenced::Applied,
    )?;
    check_eq(
        "finish",
        fenced(
            s.finish_run(run.id, token, &end(RunStatus::Succeeded, now()))
                .await?,
        ),
        Fenced::Applied,
    )?;
    check_eq(
        "a finished run",
        fenced(s.mark_running(run.id, token, &start(now())).await?),
        Fenced::Stale,
    )?;
    check_eq(
        "stays finished",
        get_run(&s, run.id).await?.status,
        RunStatus::Succeeded,
    )
}

async fn finish_run_is_fenced(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let run = queue(&s, &w).await?;
    let stale = lease(&s, &r).await?.fencing_token;
    s.release_lease(run.id, stale).await?;
    let token = lease(&s, &r).await?.fencing_token;
    check_eq(
        "a superseded token",
        fenced(
            s.finish_run(run.id, stale, &end(RunStatus::Succeeded, now()))
                .await?,
        ),
        Fenced::Stale,
    )?;
    check_eq(
        "an unknown run",
        fenced(
            s.finish_run(Uuid::now_v7(), token, &end(RunStatus::Succeeded, now()))
                .await?,
        ),
        Fenced::Stale,
    )?;
    // A leased run may finish without having started (its image failed to pull).
    let at = now();
    let mut failed = end(RunStatus::Failed, at);
    failed.last_seq = 7;
    // The runner's account of a log of which nothing is stored.
    failed.log_account = Some(LogAccount {
        bytes: 1234,
        sha256: "ab".repeat(32),
    });
    let check = LogCheck {
        bytes: 1234,
        sha256: "ab".repeat(32),
        verified: false,
    };
    check_eq(
        "finish",
        fenced(s.finish_run(run.id, token, &failed).await?),
        Fenced::Applied,
    )?;
    let done = get_run(&s, run.id).await?;
    check_eq("status", done.status, RunStatus::Failed)?;
    check_eq("exit_code", done.exit_code, Some(2))?;
    check_eq("error", done.error.as_deref(), Some("boom"))?;
    check_eq("finished_at", done.finished_at, Some(at))?;
    check_eq("log check", done.log_check, Some(check))?;
    check_eq("lease_expires_at", done.lease_expires_at, None)?;
    check_eq("runner_id kept", done.runner_id, Some(r.id))?;
    check_eq(
        "a finished run",
        fenced(
            s.finish_run(run.id, token, &end(RunStatus::Succeeded, now()))
                .await?,
        ),
        Fenced::Stale,
    )?;
    check_eq(
        "stays failed",
        get_run(&s, run.id).await?.status,
        RunStatus::Failed,
    )
}

async fn finish_and_claim_refills_the_runners_slot_in_one_step(s: Arc<dyn Store>) -> Outcome {
    let (acme, w) = org_with_workspace(&s, "acme").await?;
    let (_, other) = org_with_workspace(&s, "globex").await?;
    let r = runner(&s, Some(acme.id), "r1", &[]).await?;
    let first = queue(&s, &w).await?;
    let token = lease(&s, &r).await?.fencing_token;
    let elsewhere = queue(&s, &other).await?;
    let second = queue(&s, &w).await?;
    let third = queue(&s, &w).await?;

    let stale = s
        .finish_and_claim(
            first.id,
            token + 1,
            &end(RunStatus::Succeeded, now()),
            &claim_for(&r),
        )
        .await?;
    check_eq("a superseded token finishes nothing", stale.is_none(), true)?;
    check_eq(
        "and claims nothing",
        get_run(&s, second.id).await?.status,
        RunStatus::Queued,
    )?;

    let Some((done, next)) = s
        .finish_and_claim(
            first.id,
            token,
            &end(RunStatus::Succeeded, now()),
            &claim_for(&r),
        )
        .await?
    else {
        return Err(anyhow!("the result was not recorded"));
    };
    check_eq("the run ended", done.status, RunStatus::Succeeded)?;
    check_eq("its lease is gone", done.lease_expires_at, None)?;
    let next = next.ok_or_else(|| anyhow!("nothing claimed for the runner"))?;
    check_eq(
        "the runner's oldest queued run of its organization",
        next.id,
        second.id,
    )?;
    check_eq("leased", next.status, RunStatus::Leased)?;
    check_eq("to the runner", next.runner_id, Some(r.id))?;
    check_eq("with a newer token", next.fencing_token > token, true)?;
    check_eq(
        "as stored",
        get_run(&s, second.id).await?.fencing_token,
        next.fencing_token,
    )?;
    check_eq(
        "another organization's run waits",
        get_run(&s, elsewhere.id).await?.status,
        RunStatus::Queued,
    )?;

    // The last run of the queue, then an empty one.
    let (_, last) = s
        .finish_and_claim(
            second.id,
            next.fencing_token,
            &end(RunStatus::Failed, now()),
            &claim_for(&r),
        )
        .await?
        .ok_or_else(|| anyhow!("the second result was not recorded"))?;
    let last = last.ok_or_else(|| anyhow!("the third run was not claimed"))?;
    check_eq("the third", last.id, third.id)?;
    let (ended, none) = s
        .finish_and_claim(
            third.id,
            last.fencing_token,
            &end(RunStatus::Succeeded, now()),
            &claim_for(&r),
        )
        .await?
        .ok_or_else(|| anyhow!("the third result was not recorded"))?;
    check_eq(
        "recorded with nothing queued",
        ended.status,
        RunStatus::Succeeded,
    )?;
    check_eq("nothing left to claim", none.map(|run| run.id), None)
}

async fn finish_run_checks_the_stored_log_against_the_runners_account(
    s: Arc<dyn Store>,
) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    // The runner sent "a", "b", "c" as seqs 1 to 3: 3 bytes, SHA-256 of "abc".
    let account = LogAccount {
        bytes: 3,
        sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
    };
    let mut finished = end(RunStatus::Succeeded, now());
    finished.last_seq = 3;
    finished.log_account = Some(account.clone());
    let mut outcomes = Vec::new();
    for stored in [&["a", "b", "c"][..], &["a", "c"][..]] {
        queue(&s, &w).await?;
        let run = lease(&s, &r).await?;
        for (i, data) in stored.iter().enumerate() {
            // The hole leaves "c" at seq 3.
            let seq = if stored.len() == 3 || i == 0 {
                i as i64 + 1
            } else {
                3
            };
            s.append_logs(run.id, run.fencing_token, &[chunk(seq, data)])
                .await?
                .map_err(|_| anyhow!("log refused"))?;
        }
        let done = s
            .finish_run(run.id, run.fencing_token, &finished)
            .await?
            .context("finish")?;
        check_eq(
            "returned as stored",
            Some(&done),
            Some(&get_run(&s, run.id).await?),
        )?;
        outcomes.push(done.log_check.map(|c| (c.bytes, c.sha256, c.verified)));
    }
    check_eq(
        "complete, then with a hole",
        outcomes,
        vec![
            Some((3, account.sha256.clone(), true)),
            Some((3, account.sha256.clone(), false)),
        ],
    )
}

async fn cancel_ends_queued_runs_and_records_requests_for_held_ones(s: Arc<dyn Store>) -> Outcome {
    let (acme, w) = org_with_workspace(&s, "acme").await?;
    let (beta, _) = org_with_workspace(&s, "beta").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let held = queue(&s, &w).await?;
    let token = lease(&s, &r).await?.fencing_token;
    let queued = queue(&s, &w).await?;

    check_eq(
        "another organization's run",
        s.cancel_run(Scope::Org(beta.id), queued.id, now()).await?,
        None,
    )?;
    check_eq(
        "an unknown run",
        s.cancel_run(Scope::All, Uuid::now_v7(), now()).await?,
        None,
    )?;

    let at = now();
    let Some(CancelOutcome::Canceled(canceled)) =
        s.cancel_run(Scope::Org(acme.id), queued.id, at).await?
    else {
        bail!("a queued run is canceled at once");
    };
    check_eq("status", canceled.status, RunStatus::Canceled)?;
    check_eq("finished_at", canceled.finished_at, Some(at))?;
    check_eq(
        "cancel_requested_at",
        canceled.cancel_requested_at,
        Some(at),
    )?;
    check_eq(
        "nothing left to claim",
        s.claim_run(&claim_for(&r)).await?.map(|r| r.id),
        None,
    )?;

    let first = now();
    let Some(CancelOutcome::Requested(requested)) =
        s.cancel_run(Scope::All, held.id, first).await?
    else {
        bail!("a leased run gets a cancel request");
    };
    check_eq("still leased", requested.status, RunStatus::Leased)?;
    check_eq("requested at", requested.cancel_requested_at, Some(first))?;
    check_eq("holder", requested.runner_id, Some(r.id))?;
    check_eq("token", requested.fencing_token, token)?;
    let Some(CancelOutcome::Requested(again)) =
        s.cancel_run(Scope::All, held.id, first + secs(5)).await?
    else {
        bail!("asking twice is still a request");
    };
    check_eq(
        "the first request's time is kept",
        again.cancel_requested_at,
        Some(first),
    )?;
    check_eq(
        "the runner reports it canceled",
        fenced(
            s.finish_run(held.id, token, &end(RunStatus::Canceled, now()))
                .await?,
        ),
        Fenced::Applied,
    )?;
    let Some(CancelOutcome::AlreadyFinal(done)) = s.cancel_run(Scope::All, held.id, now()).await?
    else {
        bail!("an ended run is left alone");
    };
    check_eq("ended canceled", done.status, RunStatus::Canceled)
}

async fn heartbeats_extend_only_the_leases_a_runner_holds(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r1 = runner(&s, None, "r1", &[]).await?;
    let r2 = runner(&s, None, "r2", &[]).await?;
    let a = queue(&s, &w).await?;
    let b = queue(&s, &w).await?;
    let ta = lease(&s, &r1).await?.fencing_token;
    let tb = lease(&s, &r2).await?.fencing_token;
    let until = now() + secs(60);
    let unknown = Uuid::now_v7();
    let renewal = s
        .extend_leases(
            r1.id,
            &[(a.id, ta), (b.id, tb), (a.id, ta + 100), (unknown, 1)],
            until,
        )
        .await?;
    check_eq(
        "what r1 does not hold is stale",
        BTreeSet::from_iter(renewal.stale),
        BTreeSet::from([(b.id, tb), (a.id, ta + 100), (unknown, 1)]),
    )?;
    check_eq("nothing to cancel yet", renewal.cancel, vec![])?;
    check_eq(
        "a's lease runs on",
        get_run(&s, a.id).await?.lease_expires_at,
        Some(until),
    )?;
    ensure!(
        get_run(&s, b.id).await?.lease_expires_at != Some(until),
        "r1 extended r2's lease"
    );
    s.cancel_run(Scope::All, a.id, now()).await?;
    check_eq(
        "a cancel asked for is asked again at every heartbeat",
        s.extend_leases(r1.id, &[(a.id, ta)], until).await?,
        LeaseRenewal {
            stale: vec![],
            cancel: vec![(a.id, ta)],
        },
    )?;
    check_eq(
        "nothing reported",
        s.extend_leases(r1.id, &[], until).await?,
        LeaseRenewal::default(),
    )
}

/// The queue depth: runs waiting for a runner, whatever their
/// organization; leased, running and finished ones are not counted, and a
/// run given back counts again.
async fn queued_runs_counts_the_queue_of_every_organization(s: Arc<dyn Store>) -> Outcome {
    check_eq("an empty store", s.queued_runs().await?, 0)?;
    let (acme, w) = org_with_workspace(&s, "acme").await?;
    let (_, other) = org_with_workspace(&s, "beta").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let first = queue(&s, &w).await?;
    let second = queue(&s, &w).await?;
    queue(&s, &other).await?;
    check_eq(
        "three queued in two organizations",
        s.queued_runs().await?,
        3,
    )?;

    let leased = lease(&s, &r).await?;
    check_eq("oldest leased", leased.id, first.id)?;
    check_eq("one leased", s.queued_runs().await?, 2)?;
    s.mark_running(leased.id, leased.fencing_token, &start(now()))
        .await?;
    check_eq("one running", s.queued_runs().await?, 2)?;
    s.finish_run(
        leased.id,
        leased.fencing_token,
        &end(RunStatus::Succeeded, now()),
    )
    .await?;
    check_eq("one finished", s.queued_runs().await?, 2)?;

    let given_back = lease(&s, &r).await?;
    check_eq("second leased", given_back.id, second.id)?;
    check_eq("another leased", s.queued_runs().await?, 1)?;
    s.release_lease(given_back.id, given_back.fencing_token)
        .await?;
    check_eq("a lease given back", s.queued_runs().await?, 2)?;

    s.cancel_run(Scope::Org(acme.id), second.id, now()).await?;
    check_eq("a queued run canceled", s.queued_runs().await?, 1)
}

async fn expired_leases_are_found_oldest_first(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        queue(&s, &w).await?;
        let run = lease(&s, &r).await?;
        held.push((run.id, run.fencing_token));
    }
    let base = now();
    // Leases running out at base-10 s, base-20 s and base+60 s.
    for ((id, token), offset) in held.iter().zip([-10, -20, 60]) {
        s.extend_leases(r.id, &[(*id, *token)], base + secs(offset))
            .await?;
    }
    check_eq(
        "expired, oldest first",
        s.expired_leases(base, 10).await?,
        vec![held[1], held[0]],
    )?;
    check_eq("limited", s.expired_leases(base, 1).await?, vec![held[1]])?;
    s.finish_run(held[1].0, held[1].1, &end(RunStatus::Succeeded, now()))
        .await?;
    check_eq(
        "ended runs are not expired",
        s.expired_leases(base, 10).await?,
        vec![held[0]],
    )
}

async fn abandoned_runs_end_lost_or_timed_out(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let lost = queue(&s, &w).await?;
    let token = lease(&s, &r).await?.fencing_token;
    let at = now();
    check_eq(
        "a stale token changes nothing",
        s.abandon_run(lost.id, token + 1, "gone", at).await?,
        None,
    )?;
    let done = s
        .abandon_run(lost.id, token, "its runner stopped responding", at)
        .await?
        .context("the holder's token abandons the run")?;
    check_eq("lost", done.status, RunStatus::Lost)?;
    check_eq(
        "reason",
        done.error.as_deref(),
        Some("its runner stopped responding"),
    )?;
    check_eq("finished_at", done.finished_at, Some(at))?;
    check_eq("no longer leased", done.lease_expires_at, None)?;
    check_eq(
        "only once",
        s.abandon_run(lost.id, token, "again", now()).await?,
        None,
    )?;

    let mut timed = new_run(&w, "linux-patch", "patch");
    timed.timeout_secs = Some(30);
    let timed = s.create_run(timed).await?;
    let token = lease(&s, &r).await?.fencing_token;
    let started = now() - secs(60);
    s.mark_running(timed.id, token, &start(started)).await?;
    let done = s
        .abandon_run(timed.id, token, "its runner stopped responding", now())
        .await?
        .context("abandoned")?;
    check_eq("past its timeout", done.status, RunStatus::TimedOut)?;
    check_eq(
        "says so",
        done.error.as_deref(),
        Some("timed out after 30 s (its runner stopped responding)"),
    )
}

async fn abandoned_runs_with_attempts_left_are_queued_again(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r1 = runner(&s, None, "r1", &[]).await?;
    let r2 = runner(&s, None, "r2", &[]).await?;
    let mut retried = new_run(&w, "linux-patch", "patch");
    retried.max_attempts = 2;
    let run = s.create_run(retried).await?;
    let first = lease(&s, &r1).await?;
    check_eq("first attempt", first.attempt, 1)?;
    s.mark_running(run.id, first.fencing_token, &start(now()))
        .await?;
    s.append_logs(
        run.id,
        first.fencing_token,
        &[chunk(1, "a"), chunk(2, "b"), chunk(4, "d")],
    )
    .await?
    .map_err(|f| anyhow!("append refused: {f:?}"))?;
    let again = s
        .abandon_run(
            run.id,
            first.fencing_token,
            "its runner stopped responding",
            now(),
        )
        .await?
        .context("abandoned")?;
    check_eq("queued again", again.status, RunStatus::Queued)?;
    check_eq("no runner", again.runner_id, None)?;
    check_eq("not finished", again.finished_at, None)?;
    check_eq(
        "the next attempt's log goes after all that is stored",
        again.log_seq_base,
        4,
    )?;
    ensure!(
        again
            .error
            .as_deref()
            .is_some_and(|e| e.contains("attempt 1")),
        "the lost attempt is noted: {:?}",
        again.error
    );
    let second = lease(&s, &r2).await?;
    check_eq("same run", second.id, run.id)?;
    check_eq("second attempt", second.attempt, 2)?;
    ensure!(
        second.fencing_token > first.fencing_token,
        "a new lease has a higher token"
    );
    check_eq(
        "the old attempt's messages are refused",
        s.append_logs(run.id, first.fencing_token, &[chunk(5, "late")])
            .await?,
        Err(Fenced::Stale),
    )?;
    check_eq(
        "the new attempt continues the log",
        s.append_logs(run.id, second.fencing_token, &[chunk(5, "e")])
            .await?,
        Ok(5),
    )?;
    let done = s
        .abandon_run(run.id, second.fencing_token, "gone again", now())
        .await?
        .context("abandoned")?;
    check_eq("no attempts left: lost", done.status, RunStatus::Lost)
}

async fn artifacts_stored_while_held_and_read_in_scope(s: Arc<dyn Store>) -> Outcome {
    let (acme, w) = org_with_workspace(&s, "acme").await?;
    let (beta, _) = org_with_workspace(&s, "beta").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let run = queue(&s, &w).await?;
    let token = lease(&s, &r).await?.fencing_token;
    let files = vec![
        ("report.txt".to_owned(), b"ok\n".to_vec()),
        ("sub/data.bin".to_owned(), vec![0u8, 1, 2]),
    ];
    check_eq(
        "a stale token",
        s.put_artifacts(run.id, token + 1, &files).await?,
        Fenced::Stale,
    )?;
    check_eq(
        "stored",
        s.put_artifacts(run.id, token, &files).await?,
        Fenced::Applied,
    )?;
    check_eq(
        "a second upload replaces by path",
        s.put_artifacts(
            run.id,
            token,
            &[("report.txt".to_owned(), b"better\n".to_vec())],
        )
        .await?,
        Fenced::Applied,
    )?;
    let list = s
        .artifacts(Scope::Org(acme.id), run.id)
        .await?
        .context("listed in scope")?;
    check_eq(
        "listed by path",
        list.iter()
            .map(|a| (a.path.as_str(), a.size))
            .collect::<Vec<_>>(),
        vec![("report.txt", 7), ("sub/data.bin", 3)],
    )?;
    check_eq(
        "sha256",
        list[1].sha256.as_str(),
        "ae4b3280e56e2faf83f414a6e3dabe9d5fbe18976544c05fed121accb85b53fc",
    )?;
    check_eq(
        "read",
        s.artifact(Scope::All, run.id, "report.txt").await?,
        Some(b"better\n".to_vec()),
    )?;
    check_eq(
        "no such file",
        s.artifact(Scope::All, run.id, "nothing").await?,
        None,
    )?;
    check_eq(
        "another organization lists nothing",
        s.artifacts(Scope::Org(beta.id), run.id).await?,
        None,
    )?;
    check_eq(
        "another organization reads nothing",
        s.artifact(Scope::Org(beta.id), run.id, "report.txt")
            .await?,
        None,
    )?;
    s.finish_run(run.id, token, &end(RunStatus::Succeeded, now()))
        .await?;
    check_eq(
        "not after the run ended",
        s.put_artifacts(run.id, token, &files).await?,
        Fenced::Stale,
    )
}

// ---------------------------------------------------------------------------
// Logs.

async fn logs_of(s: &Arc<dyn Store>, id: Uuid) -> anyhow::Result<Vec<(i64, String)>> {
    Ok(s.logs(id, 0, 1000)
        .await?
        .into_iter()
        .map(|c| (c.seq, String::from_utf8_lossy(&c.data).into_owned()))
        .collect())
}

fn seqs_and_data(pairs: &[(i64, &str)]) -> Vec<(i64, String)> {
    pairs.iter().map(|(seq, d)| (*seq, d.to_string())).collect()
}

async fn append_logs_stores_duplicates_once(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    queue(&s, &w).await?;
    let run = lease(&s, &r).await?;
    let (id, token) = (run.id, run.fencing_token);
    check_eq(
        "first batch",
        s.append_logs(
            id,
            token,
            &[chunk(1, "one"), chunk(2, "two"), chunk(3, "three")],
        )
        .await?,
        Ok(3),
    )?;
    check_eq(
        "a resent batch",
        s.append_logs(id, token, &[chunk(2, "TWO"), chunk(3, "THREE")])
            .await?,
        Ok(3),
    )?;
    check_eq(
        "a batch repeating a chunk",
        s.append_logs(id, token, &[chunk(4, "four"), chunk(4, "FOUR")])
            .await?,
        Ok(4),
    )?;
    check_eq(
        "an empty batch",
        s.append_logs(id, token, &[]).await?,
        Ok(4),
    )?;
    check_eq(
        "stored",
        logs_of(&s, id).await?,
        seqs_and_data(&[(1, "one"), (2, "two"), (3, "three"), (4, "four")]),
    )?;
    check_eq("log_acked_seq", get_run(&s, id).await?.log_acked_seq, 4)
}

async fn append_logs_acks_highest_contiguous(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    queue(&s, &w).await?;
    let run = lease(&s, &r).await?;
    let (id, token) = (run.id, run.fencing_token);
    check_eq(
        "with a gap at 3",
        s.append_logs(
            id,
            token,
            &[chunk(1, "1"), chunk(2, "2"), chunk(4, "4"), chunk(5, "5")],
        )
        .await?,
        Ok(2),
    )?;
    check_eq(
        "acked while the gap is open",
        get_run(&s, id).await?.log_acked_seq,
        2,
    )?;
    check_eq(
        "stored past the gap",
        logs_of(&s, id).await?,
        seqs_and_data(&[(1, "1"), (2, "2"), (4, "4"), (5, "5")]),
    )?;
    check_eq(
        "filling the gap",
        s.append_logs(id, token, &[chunk(3, "3")]).await?,
        Ok(5),
    )?;
    check_eq(
        "with a gap at 6",
        s.append_logs(id, token, &[chunk(7, "7")]).await?,
        Ok(5),
    )?;
    check_eq(
        "filling it",
        s.append_logs(id, token, &[chunk(6, "6")]).await?,
        Ok(7),
    )?;
    check_eq(
        "chunks at or below the ack",
        s.append_logs(id, token, &[chunk(0, "zero"), chunk(2, "again")])
            .await?,
        Ok(7),
    )?;
    check_eq("stored", logs_of(&s, id).await?.len(), 7)?;
    check_eq("log_acked_seq", get_run(&s, id).await?.log_acked_seq, 7)
}

async fn append_logs_refuses_stale_tokens(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    let queued = queue(&s, &w).await?;
    check_eq(
        "a queued run",
        s.append_logs(queued.id, 0, &[chunk(1, "x")]).await?,
        Err(Fenced::Stale),
    )?;
    let first = lease(&s, &r).await?;
    s.release_lease(first.id, first.fencing_token).await?;
    let run = lease(&s, &r).await?;
    check_eq(
        "a superseded token",
        s.append_logs(run.id, first.fencing_token, &[chunk(1, "old")])
            .await?,
        Err(Fenced::Stale),
    )?;
    check_eq(
        "an unknown run",
        s.append_logs(Uuid::now_v7(), run.fencing_token, &[chunk(1, "x")])
            .await?,
        Err(Fenced::Stale),
    )?;
    check_eq(
        "the holder",
        s.append_logs(run.id, run.fencing_token, &[chunk(1, "new")])
            .await?,
        Ok(1),
    )?;
    s.finish_run(run.id, run.fencing_token, &end(RunStatus::Succeeded, now()))
        .await?;
    check_eq(
        "a finished run",
        s.append_logs(run.id, run.fencing_token, &[chunk(2, "late")])
            .await?,
        Err(Fenced::Stale),
    )?;
    check_eq(
        "stored",
        logs_of(&s, run.id).await?,
        seqs_and_data(&[(1, "new")]),
    )
}

async fn logs_read_after_seq_with_limit(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[]).await?;
    queue(&s, &w).await?;
    queue(&s, &w).await?;
    let run = lease(&s, &r).await?;
    let other = lease(&s, &r).await?;
    let mut chunks: Vec<LogChunk> = (1..=5)
        .map(|seq| chunk(seq, &format!("line {seq}\n")))
        .collect();
    chunks[1].stream = 2;
    chunks[4].stream = 3;
    chunks[2].data = vec![0, 159, 146, 150, 255];
    check_eq(
        "appended",
        s.append_logs(run.id, run.fencing_token, &chunks).await?,
        Ok(5),
    )?;
    check_eq(
        "appended to the other run",
        s.append_logs(other.id, other.fencing_token, &[chunk(1, "other")])
            .await?,
        Ok(1),
    )?;
    check_eq("everything", s.logs(run.id, 0, 100).await?, chunks.clone())?;
    check_eq(
        "after 2, two",
        s.logs(run.id, 2, 2).await?,
        chunks[2..4].to_vec(),
    )?;
    check_eq("after the last", s.logs(run.id, 5, 10).await?, vec![])?;
    check_eq("none wanted", s.logs(run.id, 0, 0).await?, vec![])?;
    check_eq(
        "an unknown run",
        s.logs(Uuid::now_v7(), 0, 10).await?,
        vec![],
    )?;
    check_eq(
        "the other run",
        s.logs(other.id, 0, 10).await?,
        vec![chunk(1, "other")],
    )
}

async fn active_runs_of_runner_are_leased_or_running(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let x = runner(&s, None, "x", &[]).await?;
    let y = runner(&s, None, "y", &[]).await?;
    for _ in 0..4 {
        queue(&s, &w).await?;
    }
    let done = lease(&s, &x).await?;
    let running = lease(&s, &x).await?;
    let leased = lease(&s, &x).await?;
    let theirs = lease(&s, &y).await?;
    s.finish_run(
        done.id,
        done.fencing_token,
        &end(RunStatus::Succeeded, now()),
    )
    .await?;
    s.mark_running(running.id, running.fencing_token, &start(now()))
        .await?;
    let active = s.active_runs_of_runner(x.id).await?;
    check_eq("x's active runs", ids(&active), vec![running.id, leased.id])?;
    check_eq("a running one", active[0].status, RunStatus::Running)?;
    check_eq(
        "y's active runs",
        ids(&s.active_runs_of_runner(y.id).await?),
        vec![theirs.id],
    )?;
    check_eq(
        "an unknown runner",
        s.active_runs_of_runner(Uuid::now_v7()).await?.len(),
        0,
    )?;
    check_eq(
        "x's active_runs",
        s.runner(x.id).await?.context("x vanished")?.active_runs,
        2,
    )
}

// ---------------------------------------------------------------------------
// Join tokens and runners.

async fn join_token(
    s: &Arc<dyn Store>,
    hash: &str,
    org_id: Option<Uuid>,
    single_use: bool,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<JoinToken> {
    let (_, admin) = identity_in(s, &format!("org-{hash}")).await?;
    Ok(s.create_join_token(NewJoinToken {
        token_hash: hash.into(),
        org_id,
        created_by: admin.id,
        single_use,
        expires_at,
    })
    .await?)
}

async fn join_token_single_use(s: Arc<dyn Store>) -> Outcome {
    let acme = org(&s, "acme").await?;
    let expires_at = now() + secs(3600);
    let token = join_token(&s, "hash-once", Some(acme.id), true, expires_at).await?;
    check_eq("org_id", token.org_id, Some(acme.id))?;
    check_eq("single_use", token.single_use, true)?;
    check_eq("expires_at", token.expires_at, expires_at)?;
    check_eq(
        "first use",
        s.consume_join_token("hash-once", now()).await?,
        Ok(token.clone()),
    )?;
    check_eq(
        "second use",
        s.consume_join_token("hash-once", now()).await?,
        Err(JoinTokenRefusal::Used),
    )?;
    // Two enrolments racing for one token: exactly one wins.
    join_token(&s, "hash-race", None, true, expires_at).await?;
    let (a, b) = tokio::join!(
        s.consume_join_token("hash-race", now()),
        s.consume_join_token("hash-race", now())
    );
    let wins = [a?, b?].iter().filter(|r| r.is_ok()).count();
    check_eq("racing enrolments that won", wins, 1)
}

async fn join_token_expired_or_unknown(s: Arc<dyn Store>) -> Outcome {
    let at = now();
    join_token(&s, "hash-old", None, false, at - secs(1)).await?;
    join_token(&s, "hash-edge", None, true, at).await?;
    check_eq(
        "an expired token",
        s.consume_join_token("hash-old", at).await?,
        Err(JoinTokenRefusal::Expired),
    )?;
    check_eq(
        "a token expiring at this instant",
        s.consume_join_token("hash-edge", at).await?,
        Err(JoinTokenRefusal::Expired),
    )?;
    check_eq(
        "an unknown token",
        s.consume_join_token("hash-none", at).await?,
        Err(JoinTokenRefusal::Unknown),
    )?;
    // An expired single-use token was not consumed by the refusal: it is
    // still refused as expired, not as used.
    check_eq(
        "the expired single-use token again",
        s.consume_join_token("hash-edge", at).await?,
        Err(JoinTokenRefusal::Expired),
    )
}

async fn join_token_multi_use(s: Arc<dyn Store>) -> Outcome {
    let token = join_token(&s, "hash-many", None, false, now() + secs(3600)).await?;
    check_eq("org_id", token.org_id, None)?;
    for i in 0..3 {
        check_eq(
            &format!("use {i}"),
            s.consume_join_token("hash-many", now()).await?,
            Ok(token.clone()),
        )?;
    }
    Ok(())
}

async fn runners_created_and_read(s: Arc<dyn Store>) -> Outcome {
    let acme = org(&s, "acme").await?;
    let new = NewRunner {
        id: Uuid::now_v7(),
        org_id: Some(acme.id),
        name: "jump-1".into(),
        labels: labels(&[("site", "fra"), ("os", "linux")]),
        capacity: 3,
        cert_serial: "0a1b2c".into(),
        cert_not_after: now() + secs(30 * 86_400),
    };
    let before = now() - secs(5);
    let created = s.create_runner(new.clone()).await?;
    check_eq("id", created.id, new.id)?;
    check_eq("org_id", created.org_id, new.org_id)?;
    check_eq("name", created.name.as_str(), "jump-1")?;
    check_eq("labels", &created.labels, &new.labels)?;
    check_eq("capacity", created.capacity, 3)?;
    check_eq("version", created.version.as_str(), "")?;
    check_eq("cert_serial", created.cert_serial.as_str(), "0a1b2c")?;
    check_eq("cert_not_after", created.cert_not_after, new.cert_not_after)?;
    check_eq("connected", created.connected, false)?;
    check_eq("last_seen_at", created.last_seen_at, None)?;
    check_eq("revoked_at", created.revoked_at, None)?;
    check_eq("active_runs", created.active_runs, 0)?;
    ensure!(
        created.created_at >= before && created.created_at <= now() + secs(5),
        "created_at {} is not about now",
        created.created_at
    );
    check_eq("read", s.runner(new.id).await?, Some(created))?;
    check_eq("an unknown runner", s.runner(Uuid::now_v7()).await?, None)?;
    expect_conflict("the same id again", s.create_runner(new).await)
}

async fn runners_listed_by_scope(s: Arc<dyn Store>) -> Outcome {
    let a = org(&s, "alpha").await?;
    let b = org(&s, "beta").await?;
    let ra = runner(&s, Some(a.id), "a", &[]).await?;
    let shared = runner(&s, None, "shared", &[]).await?;
    let rb = runner(&s, Some(b.id), "b", &[]).await?;
    let names = |runners: &[Runner]| runners.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let (total, mine) = s.list_runners(Scope::Org(a.id), all()).await?;
    check_eq("alpha's count", total, 2)?;
    check_eq(
        "alpha sees its own and the shared",
        names(&mine),
        vec!["a".to_owned(), "shared".to_owned()],
    )?;
    check_eq("alpha's runners", mine, vec![ra.clone(), shared.clone()])?;
    let (total, theirs) = s.list_runners(Scope::Org(b.id), all()).await?;
    check_eq("beta's count", total, 2)?;
    check_eq(
        "beta's runners",
        names(&theirs),
        vec!["shared".to_owned(), "b".to_owned()],
    )?;
    let (total, first) = s.list_runners(Scope::All, page(1, 2)).await?;
    check_eq("all count", total, 3)?;
    check_eq(
        "page 1, oldest first",
        names(&first),
        vec!["a".to_owned(), "shared".to_owned()],
    )?;
    let (total, second) = s.list_runners(Scope::All, page(2, 2)).await?;
    check_eq("count on page 2", total, 3)?;
    check_eq("page 2", second, vec![rb])
}

async fn runner_connection_state(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let r = runner(&s, None, "r1", &[("site", "fra")]).await?;
    let id = r.id;
    let read = move |s: Arc<dyn Store>| async move {
        s.runner(id)
            .await?
            .ok_or_else(|| anyhow!("the runner vanished"))
    };
    let connected_at = now();
    let new_labels = labels(&[("site", "ber"), ("os", "linux")]);
    s.runner_connected(r.id, "serial-r1", &new_labels, 5, "0.2.0", connected_at)
        .await?;
    let online = read(Arc::clone(&s)).await?;
    check_eq("connected", online.connected, true)?;
    check_eq("labels", &online.labels, &new_labels)?;
    check_eq("capacity", online.capacity, 5)?;
    check_eq("version", online.version.as_str(), "0.2.0")?;
    check_eq("last_seen_at", online.last_seen_at, Some(connected_at))?;

    let seen_at = connected_at + secs(10);
    s.runner_seen(r.id, seen_at).await?;
    let seen = read(Arc::clone(&s)).await?;
    check_eq("still connected", seen.connected, true)?;
    check_eq(
        "last_seen_at after a heartbeat",
        seen.last_seen_at,
        Some(seen_at),
    )?;

    queue(&s, &w).await?;
    let mut claim = claim_for(&online);
    claim.labels = new_labels.clone();
    s.claim_run(&claim).await?.context("nothing to claim")?;
    check_eq("active_runs", read(Arc::clone(&s)).await?.active_runs, 1)?;

    let gone_at = seen_at + secs(10);
    s.runner_disconnected(r.id, gone_at).await?;
    let offline = read(Arc::clone(&s)).await?;
    check_eq("connected after disconnect", offline.connected, false)?;
    check_eq(
        "last_seen_at after disconnect",
        offline.last_seen_at,
        Some(gone_at),
    )?;
    check_eq("labels kept", &offline.labels, &new_labels)?;
    // Updates of an unknown runner change nothing and are no error.
    s.runner_seen(Uuid::now_v7(), gone_at).await?;
    s.runner_disconnected(Uuid::now_v7(), gone_at).await?;
    Ok(())
}

async fn read_runner(s: &Arc<dyn Store>, id: Uuid) -> anyhow::Result<Runner> {
    s.runner(id)
        .await?
        .ok_or_else(|| anyhow!("runner {id} vanished"))
}

async fn runner_revocation_is_scoped_and_kept(s: Arc<dyn Store>) -> Outcome {
    let alpha = org(&s, "alpha").await?;
    let beta = org(&s, "beta").await?;
    let ra = runner(&s, Some(alpha.id), "a", &[]).await?;
    let shared = runner(&s, None, "shared", &[]).await?;
    let rb = runner(&s, Some(beta.id), "b", &[]).await?;
    let at = now();
    let mine = Scope::Org(alpha.id);
    check_eq(
        "another organization's runner",
        s.revoke_runner(mine, rb.id, at).await?,
        None,
    )?;
    check_eq(
        "an instance-wide runner, by an organization",
        s.revoke_runner(mine, shared.id, at).await?,
        None,
    )?;
    check_eq(
        "an unknown runner",
        s.revoke_runner(Scope::All, Uuid::now_v7(), at).await?,
        None,
    )?;
    check_eq("revoked runners so far", s.revoked_runners().await?, vec![])?;

    // A renewed runner's previous certificate is revoked with it.
    ensure!(
        s.runner_cert_renewed(ra.id, "serial-a", "serial-a2", now() + secs(60))
            .await?,
        "renewing a's certificate"
    );
    let revoked = s
        .revoke_runner(mine, ra.id, at)
        .await?
        .context("its own runner")?;
    check_eq("revoked_at", revoked.revoked_at, Some(at))?;
    check_eq("read back", read_runner(&s, ra.id).await?, revoked.clone())?;
    ensure!(
        !revoked.accepts_cert("serial-a2"),
        "a revoked runner's certificate is accepted"
    );
    let again = s
        .revoke_runner(Scope::All, ra.id, at + secs(10))
        .await?
        .context("revoking again")?;
    check_eq(
        "the first revocation's time kept",
        again.revoked_at,
        Some(at),
    )?;
    s.revoke_runner(Scope::All, shared.id, at)
        .await?
        .context("an instance-wide runner, by a super admin")?;
    check_eq(
        "beta's runner untouched",
        read_runner(&s, rb.id).await?.revoked_at,
        None,
    )?;

    let mut expected = vec![
        RevokedRunner {
            id: ra.id,
            cert_serials: vec!["serial-a2".into(), "serial-a".into()],
        },
        RevokedRunner {
            id: shared.id,
            cert_serials: vec!["serial-shared".into()],
        },
    ];
    expected.sort_by_key(|r| r.id);
    check_eq("revoked runners", s.revoked_runners().await?, expected)
}

async fn revoked_runner_is_leased_nothing(s: Arc<dyn Store>) -> Outcome {
    let (_, w) = org_with_workspace(&s, "acme").await?;
    let gone = runner(&s, None, "gone", &[]).await?;
    let other = runner(&s, None, "other", &[]).await?;
    let held = {
        queue(&s, &w).await?;
        lease(&s, &gone).await?
    };
    let queued = queue(&s, &w).await?;
    s.revoke_runner(Scope::All, gone.id, now())
        .await?
        .context("revoking")?;
    check_eq(
        "a claim by the revoked runner",
        s.claim_run(&claim_for(&gone)).await?.map(|r| r.id),
        None,
    )?;
    check_eq(
        "its run is still among its active ones",
        ids(&s.active_runs_of_runner(gone.id).await?),
        vec![held.id],
    )?;
    check_eq(
        "another runner takes the queued run",
        lease(&s, &other).await?.id,
        queued.id,
    )
}

async fn runner_cert_renewal_keeps_the_previous_until_used(s: Arc<dyn Store>) -> Outcome {
    let r = runner(&s, None, "r", &[]).await?;
    let not_after = now() + secs(3600);
    ensure!(
        !s.runner_cert_renewed(r.id, "serial-unknown", "s2", not_after)
            .await?,
        "renewed presenting a certificate the runner does not hold"
    );
    ensure!(
        !s.runner_cert_renewed(Uuid::now_v7(), "serial-r", "s2", not_after)
            .await?,
        "renewed an unknown runner"
    );
    check_eq("unchanged", read_runner(&s, r.id).await?, r.clone())?;

    ensure!(
        s.runner_cert_renewed(r.id, "serial-r", "s2", not_after)
            .await?,
        "renewing"
    );
    let renewed = read_runner(&s, r.id).await?;
    check_eq("cert_serial", renewed.cert_serial.as_str(), "s2")?;
    check_eq("cert_not_after", renewed.cert_not_after, not_after)?;
    check_eq(
        "previous_cert_serial",
        renewed.previous_cert_serial.as_deref(),
        Some("serial-r"),
    )?;
    ensure!(
        renewed.accepts_cert("s2") && renewed.accepts_cert("serial-r"),
        "both certificates accepted until the new one is used"
    );

    // The answer was lost: the runner asks again with its old certificate.
    let later = not_after + secs(60);
    ensure!(
        s.runner_cert_renewed(r.id, "serial-r", "s3", later).await?,
        "renewing again from the previous certificate"
    );
    let renewed = read_runner(&s, r.id).await?;
    check_eq("cert_serial", renewed.cert_serial.as_str(), "s3")?;
    check_eq(
        "previous_cert_serial",
        renewed.previous_cert_serial.as_deref(),
        Some("serial-r"),
    )?;
    ensure!(
        !renewed.accepts_cert("s2"),
        "the certificate whose answer was lost is accepted"
    );

    let labels = labels(&[]);
    s.runner_connected(r.id, "serial-r", &labels, 2, "0.1.0", now())
        .await?;
    check_eq(
        "previous kept after a connection with it",
        read_runner(&s, r.id).await?.previous_cert_serial,
        Some("serial-r".to_owned()),
    )?;
    s.runner_connected(r.id, "s3", &labels, 2, "0.1.0", now())
        .await?;
    let used = read_runner(&s, r.id).await?;
    check_eq(
        "previous dropped once the new one is used",
        used.previous_cert_serial.as_deref(),
        None,
    )?;
    ensure!(
        !used.accepts_cert("serial-r"),
        "the old certificate is accepted"
    );
    ensure!(
        !s.runner_cert_renewed(r.id, "serial-r", "s4", later).await?,
        "renewed from a superseded certificate"
    );

    s.revoke_runner(Scope::All, r.id, now())
        .await?
        .context("revoking")?;
    ensure!(
        !s.runner_cert_renewed(r.id, "s3", "s5", later).await?,
        "a revoked runner renewed its certificate"
    );
    check_eq(
        "the serial after the refused renewal",
        read_runner(&s, r.id).await?.cert_serial,
        "s3".to_owned(),
    )
}

// ---------------------------------------------------------------------------
// Monitoring (issue 6).

fn new_agent(identity: &Identity, name: &str, location: &str) -> NewAgent {
    NewAgent {
        org_id: identity.org_id,
        name: name.into(),
        location: location.into(),
        prefix: format!("agt_{name}"),
        token_hash: format!("agent-hash-{name}-{}", identity.org_id),
        created_by: identity.id,
    }
}

fn endpoint_config(name: &str, locations: &[&str], min_failing: u32) -> EndpointConfig {
    EndpointConfig {
        name: name.into(),
        kind: CheckKind::Http,
        target: "http://127.0.0.1:8000/".into(),
        interval: 5,
        timeout: 2,
        locations: locations.iter().map(|l| l.to_string()).collect(),
        min_failing_locations: min_failing,
        failure_threshold: 2,
        success_threshold: 2,
        conditions: vec![ConditionSpec {
            condition: "[STATUS] == 200".into(),
            degrades: false,
        }],
        options: CheckOptions::default(),
    }
}

fn check(endpoint: Uuid, at: DateTime<Utc>, verdict: Verdict) -> CheckResult {
    CheckResult {
        id: Uuid::now_v7(),
        endpoint_id: endpoint,
        checked_at: at,
        verdict,
        error: (verdict == Verdict::Down).then(|| "connection refused".to_owned()),
        measured: Measured {
            connected: verdict != Verdict::Down,
            status: (verdict != Verdict::Down).then_some(200),
            ..Measured::default()
        },
        timings: Timings {
            connect_ms: Some(1.5),
            total_ms: 3.0,
            ..Timings::default()
        },
        tls: Default::default(),
        conditions: Vec::new(),
    }
}

fn heartbeat(version: &str) -> AgentHealth {
    AgentHealth {
        version: version.into(),
        endpoints_version: Some("v1".into()),
        buffered_results: 7,
        checks_per_minute: 12.5,
    }
}

/// Feeds `n` results of `verdict` from `agent`, one second apart from `from`.
async fn feed(
    s: &Arc<dyn Store>,
    agent: &Agent,
    endpoint: Uuid,
    from: DateTime<Utc>,
    n: i64,
    verdict: Verdict,
) -> anyhow::Result<RecordOutcome> {
    let batch: Vec<CheckResult> = (0..n)
        .map(|i| check(endpoint, from + secs(i), verdict))
        .collect();
    Ok(s.record_results(agent, &batch, from + secs(n)).await?)
}

async fn status_of(s: &Arc<dyn Store>, id: Uuid) -> anyhow::Result<EndpointDetail> {
    s.endpoint_detail(Scope::All, id, now())
        .await?
        .ok_or_else(|| anyhow!("endpoint {id} not found"))
}

/// The events of the notifications due now, claimed by a fresh owner and
/// marked sent.
async fn deliver_all(s: &Arc<dyn Store>) -> anyhow::Result<Vec<String>> {
    let owner = Uuid::now_v7();
    let mut events = Vec::new();
    loop {
        let claimed = s
            .claim_notifications(owner, now(), now() + secs(60), 100)
            .await?;
        if claimed.is_empty() {
            return Ok(events);
        }
        for n in claimed {
            events.push(n.payload["event"].as_str().unwrap_or("?").to_owned());
            ensure!(
                s.settle_notification(n.id, owner, &Delivery::Sent, now())
                    .await?,
                "settling a claimed notification failed"
            );
        }
    }
}

async fn agents_created_authenticated_and_revoked(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let (globex, bob) = identity_in(&s, "globex").await?;
    let agent = s
        .create_agent(new_agent(&alice, "berlin-1", "site-a"))
        .await?;
    check_eq("org", agent.org_id, acme.id)?;
    check_eq("location", agent.location.as_str(), "site-a")?;
    check_eq("prefix", agent.prefix.as_str(), "agt_berlin-1")?;
    check_eq("heartbeat", agent.last_heartbeat_at, None)?;
    expect_conflict(
        "the same name in one organization",
        s.create_agent(NewAgent {
            token_hash: "another".into(),
            ..new_agent(&alice, "berlin-1", "site-b")
        })
        .await,
    )?;
    s.create_agent(new_agent(&bob, "berlin-1", "site-a"))
        .await?;

    let found = s
        .authenticate_agent(&format!("agent-hash-berlin-1-{}", acme.id))
        .await?
        .context("the agent's token does not authenticate")?;
    check_eq("authenticated", found.id, agent.id)?;
    check_eq(
        "an unknown hash",
        s.authenticate_agent("agent-hash-nobody").await?,
        None,
    )?;

    let at = now();
    check_eq(
        "revoked from another organization",
        s.revoke_agent(Scope::Org(globex.id), agent.id, at).await?,
        None,
    )?;
    let revoked = s
        .revoke_agent(Scope::Org(acme.id), agent.id, at)
        .await?
        .context("revoking in scope found nothing")?;
    check_eq("revoked_at", revoked.revoked_at, Some(at))?;
    let again = s
        .revoke_agent(Scope::All, agent.id, at + secs(5))
        .await?
        .context("revoking again found nothing")?;
    check_eq("revoked_at kept", again.revoked_at, Some(at))?;
    check_eq(
        "a revoked agent's token",
        s.authenticate_agent(&format!("agent-hash-berlin-1-{}", acme.id))
            .await?,
        None,
    )?;
    check_eq(
        "a revoked agent's heartbeat",
        s.agent_heartbeat(agent.id, &heartbeat("1.0"), now())
            .await?,
        None,
    )
}

async fn agents_listed_with_heartbeats_and_endpoint_counts(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let (globex, bob) = identity_in(&s, "globex").await?;
    let a = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    s.create_agent(new_agent(&alice, "b", "site-b")).await?;
    s.create_agent(new_agent(&bob, "c", "site-a")).await?;
    s.create_endpoint(
        acme.id,
        &endpoint_config("web", &["site-a", "site-b"], 1),
        now(),
    )
    .await?;
    s.create_endpoint(acme.id, &endpoint_config("db", &["site-a"], 1), now())
        .await?;
    s.create_endpoint(globex.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;

    let at = now();
    let seen = s
        .agent_heartbeat(a.id, &heartbeat("0.3.1"), at)
        .await?
        .context("a heartbeat of a live agent found nothing")?;
    check_eq("version", seen.version.as_deref(), Some("0.3.1"))?;
    check_eq("heartbeat", seen.last_heartbeat_at, Some(at))?;
    check_eq("checks per minute", seen.checks_per_minute, 12.5)?;
    check_eq("buffered", seen.buffered_results, 7)?;
    check_eq(
        "endpoints version",
        seen.endpoints_version.as_deref(),
        Some("v1"),
    )?;

    let (count, listed) = s.list_agents(Scope::Org(acme.id), all()).await?;
    check_eq("acme's agents", count, 2)?;
    let counts: Vec<(String, i64)> = listed
        .iter()
        .map(|a| (a.name.clone(), a.endpoint_count))
        .collect();
    check_eq(
        "endpoint counts",
        counts,
        vec![("a".to_owned(), 2), ("b".to_owned(), 1)],
    )?;
    check_eq("listed as seen", listed[0].last_heartbeat_at, Some(at))?;
    let (count, first) = s.list_agents(Scope::All, page(1, 2)).await?;
    check_eq("every agent", count, 3)?;
    check_eq("a page", first.len(), 2)?;
    let (_, globex_agents) = s.list_agents(Scope::Org(globex.id), all()).await?;
    check_eq(
        "globex's agent's endpoints",
        globex_agents[0].endpoint_count,
        1,
    )
}

async fn endpoints_created_updated_and_deleted_in_scope(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let (globex, _) = identity_in(&s, "globex").await?;
    let mut config = endpoint_config("web", &["site-a", "site-b"], 2);
    config.options.http.method = "HEAD".into();
    config.conditions.push(ConditionSpec {
        condition: "[RESPONSE_TIME] < 300".into(),
        degrades: true,
    });
    let at = now();
    let web = s.create_endpoint(acme.id, &config, at).await?;
    check_eq("config", &web.config, &config)?;
    check_eq("status", web.status, Status::Unknown)?;
    check_eq("created_at", web.created_at, at)?;
    check_eq("incident", web.incident.clone(), None)?;
    expect_conflict(
        "the same name in one organization",
        s.create_endpoint(acme.id, &config, at).await,
    )?;
    s.create_endpoint(globex.id, &config, at).await?;

    let detail = s
        .endpoint_detail(Scope::Org(acme.id), web.id, at)
        .await?
        .context("the endpoint is not found in its organization")?;
    check_eq("detail", &detail.endpoint, &web)?;
    let locations: Vec<(&str, Status)> = detail
        .locations
        .iter()
        .map(|l| (l.location.as_str(), l.state))
        .collect();
    check_eq(
        "states",
        locations,
        vec![("site-a", Status::Unknown), ("site-b", Status::Unknown)],
    )?;
    check_eq("no uptime without checks", detail.uptime, Uptime::default())?;
    check_eq(
        "read from another organization",
        s.endpoint_detail(Scope::Org(globex.id), web.id, at).await?,
        None,
    )?;
    let (count, listed) = s.list_endpoints(Scope::Org(acme.id), all()).await?;
    check_eq("acme's endpoints", (count, listed), (1, vec![web.clone()]))?;
    check_eq(
        "every endpoint",
        s.list_endpoints(Scope::All, all()).await?.0,
        2,
    )?;

    // site-a's state survives a change that keeps it; site-b goes, site-c comes.
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    feed(&s, &agent, web.id, now(), 2, Verdict::Up).await?;
    let mut changed = endpoint_config("web-2", &["site-a", "site-c"], 1);
    changed.interval = 30;
    check_eq(
        "changed from another organization",
        s.update_endpoint(Scope::Org(globex.id), web.id, &changed, now())
            .await?,
        None,
    )?;
    let updated = s
        .update_endpoint(Scope::Org(acme.id), web.id, &changed, now())
        .await?
        .context("updating in scope found nothing")?;
    check_eq("updated config", &updated.config, &changed)?;
    check_eq("status kept", updated.status, Status::Up)?;
    let states: Vec<(String, Status)> = status_of(&s, web.id)
        .await?
        .locations
        .into_iter()
        .map(|l| (l.location, l.state))
        .collect();
    check_eq(
        "states after the change",
        states,
        vec![
            ("site-a".to_owned(), Status::Up),
            ("site-c".to_owned(), Status::Unknown),
        ],
    )?;

    ensure!(
        !s.delete_endpoint(Scope::Org(globex.id), web.id).await?,
        "deleted from another organization"
    );
    ensure!(
        s.delete_endpoint(Scope::Org(acme.id), web.id).await?,
        "deleting in scope found nothing"
    );
    check_eq(
        "read after delete",
        s.endpoint_detail(Scope::All, web.id, now()).await?,
        None,
    )
}

async fn endpoints_for_an_agent_are_its_organizations_at_its_location(
    s: Arc<dyn Store>,
) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let (globex, _) = identity_in(&s, "globex").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let web = s
        .create_endpoint(
            acme.id,
            &endpoint_config("web", &["site-a", "site-b"], 1),
            now(),
        )
        .await?;
    s.create_endpoint(acme.id, &endpoint_config("db", &["site-b"], 1), now())
        .await?;
    s.create_endpoint(globex.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    let theirs: Vec<Uuid> = s
        .endpoints_for_agent(&agent)
        .await?
        .iter()
        .map(|e| e.id)
        .collect();
    check_eq("the agent's endpoints", theirs, vec![web.id])
}

async fn results_stored_once_and_only_for_assigned_endpoints(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let (globex, bob) = identity_in(&s, "globex").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let web = s
        .create_endpoint(acme.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    let elsewhere = s
        .create_endpoint(acme.id, &endpoint_config("db", &["site-b"], 1), now())
        .await?;
    let foreign = s
        .create_endpoint(globex.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    let t0 = now() - secs(60);
    let batch = vec![
        check(web.id, t0, Verdict::Up),
        check(web.id, t0 + secs(10), Verdict::Down),
        check(elsewhere.id, t0, Verdict::Up),
        check(foreign.id, t0, Verdict::Up),
    ];
    let outcome = s.record_results(&agent, &batch, now()).await?;
    check_eq("stored", outcome.stored, 2)?;
    check_eq("duplicates", outcome.duplicates, 0)?;
    let refused: Vec<Uuid> = outcome.refused.iter().map(|r| r.endpoint_id).collect();
    check_eq("refused", refused, vec![elsewhere.id, foreign.id])?;
    ensure!(
        outcome.refused[0].reason.contains("assigned to this agent"),
        "reason: {}",
        outcome.refused[0].reason
    );
    let replay = s.record_results(&agent, &batch[..2], now()).await?;
    check_eq(
        "a replayed batch",
        (replay.stored, replay.duplicates),
        (0, 2),
    )?;
    let seen = s
        .authenticate_agent(&format!("agent-hash-a-{}", acme.id))
        .await?
        .context("the agent vanished")?;
    ensure!(seen.last_report_at.is_some(), "the report was not recorded");

    let (count, results) = s
        .list_results(Scope::Org(acme.id), web.id, &ResultFilter::default(), all())
        .await?
        .context("no history in scope")?;
    check_eq("history", count, 2)?;
    check_eq(
        "newest first",
        results.iter().map(|r| r.result.id).collect::<Vec<_>>(),
        vec![batch[1].id, batch[0].id],
    )?;
    check_eq("kept whole", &results[1].result, &batch[0])?;
    check_eq("location", results[0].location.as_str(), "site-a")?;
    check_eq("agent", results[0].agent_id, agent.id)?;
    let since = ResultFilter {
        since: Some(t0 + secs(5)),
        ..ResultFilter::default()
    };
    check_eq(
        "since",
        s.list_results(Scope::All, web.id, &since, all())
            .await?
            .map(|(n, _)| n),
        Some(1),
    )?;
    let at_b = ResultFilter {
        location: Some("site-b".into()),
        ..ResultFilter::default()
    };
    check_eq(
        "another location",
        s.list_results(Scope::All, web.id, &at_b, all())
            .await?
            .map(|(n, _)| n),
        Some(0),
    )?;
    check_eq(
        "history from another organization",
        s.list_results(
            Scope::Org(globex.id),
            web.id,
            &ResultFilter::default(),
            all(),
        )
        .await?,
        None,
    )?;
    // Another organization's agent cannot report on acme's endpoint.
    let intruder = s.create_agent(new_agent(&bob, "b", "site-a")).await?;
    let outcome = s
        .record_results(&intruder, &[check(web.id, now(), Verdict::Down)], now())
        .await?;
    check_eq("intruder stored", outcome.stored, 0)?;
    check_eq("intruder refused", outcome.refused.len(), 1)?;
    // Nor can a revoked agent.
    s.revoke_agent(Scope::All, agent.id, now()).await?;
    let outcome = s
        .record_results(&agent, &[check(web.id, now(), Verdict::Up)], now())
        .await?;
    check_eq("revoked agent stored", outcome.stored, 0)?;
    ensure!(
        outcome
            .refused
            .first()
            .is_some_and(|r| r.reason.contains("revoked")),
        "a revoked agent's results: {outcome:?}"
    );
    Ok(())
}

async fn results_drive_states_incidents_and_the_outbox(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let web = s
        .create_endpoint(acme.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    s.create_notifier(acme.id, "webhook", "http://127.0.0.1:9/hook")
        .await?;
    let t0 = now() - secs(100);

    feed(&s, &agent, web.id, t0, 2, Verdict::Up).await?;
    check_eq(
        "up",
        status_of(&s, web.id).await?.endpoint.status,
        Status::Up,
    )?;
    // One failure is below the threshold (2).
    feed(&s, &agent, web.id, t0 + secs(10), 1, Verdict::Down).await?;
    let detail = status_of(&s, web.id).await?;
    check_eq("one failure", detail.endpoint.status, Status::Up)?;
    check_eq("failures counted", detail.locations[0].failures, 1)?;
    let outcome = feed(&s, &agent, web.id, t0 + secs(20), 1, Verdict::Down).await?;
    check_eq("alerts queued", outcome.notifications, 1)?;
    let detail = status_of(&s, web.id).await?;
    check_eq("down", detail.endpoint.status, Status::Down)?;
    let incident = detail
        .endpoint
        .incident
        .clone()
        .context("no incident opened")?;
    check_eq("incident started", incident.started_at, t0 + secs(21))?;
    let last = detail.locations[0]
        .last_result
        .clone()
        .context("no last result")?;
    check_eq("last result's verdict", last.verdict, Verdict::Down)?;
    check_eq("last result's timings", last.timings.connect_ms, Some(1.5))?;
    check_eq(
        "last checked",
        detail.locations[0].last_checked_at,
        Some(t0 + secs(20)),
    )?;
    check_eq("reporter", detail.locations[0].agent_id, Some(agent.id))?;
    // Still down: no second alert.
    let outcome = feed(&s, &agent, web.id, t0 + secs(30), 3, Verdict::Down).await?;
    check_eq("no second alert", outcome.notifications, 0)?;
    // One success is below the recovery threshold (2).
    feed(&s, &agent, web.id, t0 + secs(40), 1, Verdict::Up).await?;
    check_eq(
        "one success",
        status_of(&s, web.id).await?.endpoint.status,
        Status::Down,
    )?;
    let outcome = feed(&s, &agent, web.id, t0 + secs(50), 1, Verdict::Up).await?;
    check_eq("resolve queued", outcome.notifications, 1)?;
    let detail = status_of(&s, web.id).await?;
    check_eq("recovered", detail.endpoint.status, Status::Up)?;
    check_eq("incident closed", detail.endpoint.incident, None)?;
    // 2 up, 5 down, 2 up: 4 of 9 checks were not down.
    let day = detail.uptime.day.context("no uptime")?;
    ensure!((day - 400.0 / 9.0).abs() < 1e-9, "uptime {day}");
    check_eq("week = day", detail.uptime.week, Some(day))?;

    let owner = Uuid::now_v7();
    let claimed = s
        .claim_notifications(owner, now(), now() + secs(60), 10)
        .await?;
    // The resolve waits for its alert to be settled.
    check_eq("claimable", claimed.len(), 1)?;
    let alert = &claimed[0];
    check_eq(
        "event",
        alert.payload["event"].as_str(),
        Some("endpoint_down"),
    )?;
    check_eq("url", alert.url.as_str(), "http://127.0.0.1:9/hook")?;
    check_eq(
        "incident id",
        alert.payload["incident_id"].as_str(),
        Some(incident.id.to_string().as_str()),
    )?;
    check_eq(
        "endpoint",
        alert.payload["endpoint"]["name"].as_str(),
        Some("web"),
    )?;
    s.settle_notification(alert.id, owner, &Delivery::Sent, now())
        .await?;
    check_eq(
        "then the resolve",
        deliver_all(&s).await?,
        vec!["endpoint_resolved".to_owned()],
    )
}

async fn endpoint_status_needs_the_quorum_of_locations(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let a = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let b = s.create_agent(new_agent(&alice, "b", "site-b")).await?;
    let web = s
        .create_endpoint(
            acme.id,
            &endpoint_config("web", &["site-a", "site-b"], 2),
            now(),
        )
        .await?;
    let t0 = now() - secs(100);
    feed(&s, &a, web.id, t0, 2, Verdict::Up).await?;
    feed(&s, &b, web.id, t0, 2, Verdict::Up).await?;
    check_eq(
        "up",
        status_of(&s, web.id).await?.endpoint.status,
        Status::Up,
    )?;
    feed(&s, &a, web.id, t0 + secs(10), 2, Verdict::Down).await?;
    let detail = status_of(&s, web.id).await?;
    check_eq(
        "one location down",
        detail.endpoint.status,
        Status::Degraded,
    )?;
    check_eq(
        "no incident below the quorum",
        detail.endpoint.incident,
        None,
    )?;
    feed(&s, &b, web.id, t0 + secs(10), 2, Verdict::Down).await?;
    let detail = status_of(&s, web.id).await?;
    check_eq("both down", detail.endpoint.status, Status::Down)?;
    ensure!(
        detail.endpoint.incident.is_some(),
        "no incident at the quorum"
    );
    Ok(())
}

async fn silent_agents_are_claimed_once_and_their_locations_turn_unknown(
    s: Arc<dyn Store>,
) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let other = s.create_agent(new_agent(&alice, "b", "site-b")).await?;
    // An agent that never reported is not silent: it never spoke.
    s.create_agent(new_agent(&alice, "c", "site-c")).await?;
    let web = s
        .create_endpoint(
            acme.id,
            &endpoint_config("web", &["site-a", "site-b"], 1),
            now(),
        )
        .await?;
    s.create_notifier(acme.id, "webhook", "http://127.0.0.1:9/hook")
        .await?;
    let t0 = now() - secs(100);
    s.agent_heartbeat(agent.id, &heartbeat("1"), t0).await?;
    s.agent_heartbeat(other.id, &heartbeat("1"), now()).await?;
    feed(&s, &agent, web.id, t0, 2, Verdict::Down).await?;
    feed(&s, &other, web.id, t0, 2, Verdict::Up).await?;
    check_eq(
        "down at site-a",
        status_of(&s, web.id).await?.endpoint.status,
        Status::Down,
    )?;
    deliver_all(&s).await?;

    // Several coordinators look at once: one of them claims the agent.
    let before = now() - secs(30);
    let lookers: Vec<_> = (0..4)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.mark_silent_agents(before, now()).await })
        })
        .collect();
    let mut claimed = Vec::new();
    for looker in lookers {
        claimed.extend(looker.await??);
    }
    check_eq(
        "claimed once (never the agent that never reported)",
        claimed.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![agent.id],
    )?;
    ensure!(claimed[0].silent_since.is_some(), "not marked silent");
    check_eq(
        "claimed again",
        s.mark_silent_agents(before, now()).await?.len(),
        0,
    )?;
    let detail = status_of(&s, web.id).await?;
    let states: Vec<Status> = detail.locations.iter().map(|l| l.state).collect();
    check_eq("site-a unknown", states, vec![Status::Unknown, Status::Up])?;
    check_eq("status", detail.endpoint.status, Status::Up)?;
    ensure!(
        detail.endpoint.incident.is_some(),
        "silence ended the incident"
    );
    check_eq(
        "one agent alert",
        deliver_all(&s).await?,
        vec!["agent_silent".to_owned()],
    )?;

    let back = s
        .agent_heartbeat(agent.id, &heartbeat("1"), now())
        .await?
        .context("heartbeat found nothing")?;
    check_eq("silence over", back.silent_since, None)?;
    check_eq(
        "one resolve",
        deliver_all(&s).await?,
        vec!["agent_resolved".to_owned()],
    )?;
    // A location another live agent still covers does not go dark.
    let twin = s.create_agent(new_agent(&alice, "b2", "site-b")).await?;
    s.agent_heartbeat(twin.id, &heartbeat("1"), t0).await?;
    check_eq(
        "the twin claimed",
        s.mark_silent_agents(before, now()).await?.len(),
        1,
    )?;
    check_eq(
        "site-b still up",
        status_of(&s, web.id).await?.locations[1].state,
        Status::Up,
    )
}

async fn maintenance_windows_mute_incidents_and_are_scoped(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let (globex, _) = identity_in(&s, "globex").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let web = s
        .create_endpoint(acme.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    let db = s
        .create_endpoint(acme.id, &endpoint_config("db", &["site-a"], 1), now())
        .await?;
    s.create_notifier(acme.id, "webhook", "http://127.0.0.1:9/hook")
        .await?;
    let window = s
        .create_maintenance_window(NewMaintenanceWindow {
            org_id: acme.id,
            starts_at: now() - secs(600),
            ends_at: now() + secs(600),
            endpoint_ids: vec![web.id],
            reason: Some("upgrade".into()),
            created_by: alice.id,
        })
        .await?;
    check_eq("endpoints", window.endpoint_ids.clone(), vec![web.id])?;
    check_eq(
        "listed",
        s.list_maintenance_windows(Scope::Org(acme.id)).await?,
        vec![window.clone()],
    )?;
    check_eq(
        "listed elsewhere",
        s.list_maintenance_windows(Scope::Org(globex.id))
            .await?
            .len(),
        0,
    )?;

    let t0 = now() - secs(100);
    let outcome = feed(&s, &agent, web.id, t0, 2, Verdict::Down).await?;
    check_eq("muted", outcome.notifications, 0)?;
    let incident = status_of(&s, web.id)
        .await?
        .endpoint
        .incident
        .context("no incident")?;
    ensure!(incident.muted, "the incident is not marked muted");
    let outcome = feed(&s, &agent, db.id, t0, 2, Verdict::Down).await?;
    check_eq("another endpoint is not muted", outcome.notifications, 1)?;
    let outcome = feed(&s, &agent, web.id, t0 + secs(10), 2, Verdict::Up).await?;
    check_eq("no resolve of a muted incident", outcome.notifications, 0)?;

    ensure!(
        !s.delete_maintenance_window(Scope::Org(globex.id), window.id)
            .await?,
        "deleted from another organization"
    );
    ensure!(
        s.delete_maintenance_window(Scope::Org(acme.id), window.id)
            .await?,
        "deleting in scope found nothing"
    );
    check_eq(
        "after delete",
        s.list_maintenance_windows(Scope::All).await?.len(),
        0,
    )
}

async fn notifiers_created_listed_and_deleted_in_scope(s: Arc<dyn Store>) -> Outcome {
    let (acme, _) = identity_in(&s, "acme").await?;
    let (globex, _) = identity_in(&s, "globex").await?;
    let hook = s
        .create_notifier(acme.id, "webhook", "https://hooks.example/a")
        .await?;
    check_eq("kind", hook.kind.as_str(), "webhook")?;
    s.create_notifier(globex.id, "webhook", "https://hooks.example/b")
        .await?;
    check_eq(
        "acme's",
        s.list_notifiers(Scope::Org(acme.id)).await?,
        vec![hook.clone()],
    )?;
    check_eq("all", s.list_notifiers(Scope::All).await?.len(), 2)?;
    ensure!(
        !s.delete_notifier(Scope::Org(globex.id), hook.id).await?,
        "deleted from another organization"
    );
    ensure!(
        s.delete_notifier(Scope::Org(acme.id), hook.id).await?,
        "deleting in scope found nothing"
    );
    check_eq(
        "after delete",
        s.list_notifiers(Scope::Org(acme.id)).await?.len(),
        0,
    )
}

async fn notifications_are_leased_retried_and_kept_in_order(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let web = s
        .create_endpoint(acme.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    s.create_notifier(acme.id, "webhook", "http://127.0.0.1:9/hook")
        .await?;
    let t0 = now() - secs(100);
    feed(&s, &agent, web.id, t0, 2, Verdict::Down).await?;
    feed(&s, &agent, web.id, t0 + secs(10), 2, Verdict::Up).await?;

    let (one, two) = (Uuid::now_v7(), Uuid::now_v7());
    let at = now();
    let claimed = s.claim_notifications(one, at, at + secs(60), 10).await?;
    check_eq("the alert only", claimed.len(), 1)?;
    check_eq("first attempt", claimed[0].attempts, 1)?;
    let alert = claimed[0].id;
    check_eq(
        "leased to another",
        s.claim_notifications(two, at, at + secs(60), 10)
            .await?
            .len(),
        0,
    )?;
    ensure!(
        !s.settle_notification(alert, two, &Delivery::Sent, at)
            .await?,
        "settled by one that does not hold the lease"
    );
    // A failure: back after its retry time, to whoever claims it then.
    ensure!(
        s.settle_notification(
            alert,
            one,
            &Delivery::Retry {
                at: at + secs(30),
                error: "the webhook answered 500".into()
            },
            at
        )
        .await?,
        "recording a retry failed"
    );
    check_eq(
        "before its retry time",
        s.claim_notifications(two, at + secs(1), at + secs(60), 10)
            .await?
            .len(),
        0,
    )?;
    let again = s
        .claim_notifications(two, at + secs(31), at + secs(90), 10)
        .await?;
    check_eq(
        "retried",
        again.iter().map(|n| (n.id, n.attempts)).collect::<Vec<_>>(),
        vec![(alert, 2)],
    )?;
    // Its lease runs out (its coordinator died): claimed again.
    let taken = s
        .claim_notifications(one, at + secs(91), at + secs(150), 10)
        .await?;
    check_eq(
        "taken over",
        taken.iter().map(|n| n.id).collect::<Vec<_>>(),
        vec![alert],
    )?;
    ensure!(
        !s.settle_notification(alert, two, &Delivery::Sent, at)
            .await?,
        "the former holder settled it"
    );
    ensure!(
        s.settle_notification(
            alert,
            one,
            &Delivery::GaveUp {
                error: "the webhook answered 500".into()
            },
            at
        )
        .await?,
        "giving up failed"
    );
    // Given up, it no longer holds back the resolve, which goes once.
    let resolve = s
        .claim_notifications(one, at + secs(151), at + secs(200), 10)
        .await?;
    check_eq("the resolve", resolve.len(), 1)?;
    check_eq(
        "its event",
        resolve[0].payload["event"].as_str(),
        Some("endpoint_resolved"),
    )?;
    s.settle_notification(resolve[0].id, one, &Delivery::Sent, at)
        .await?;
    check_eq(
        "nothing left",
        s.claim_notifications(two, at + secs(10_000), at + secs(10_060), 10)
            .await?
            .len(),
        0,
    )
}

async fn old_results_are_pruned(s: Arc<dyn Store>) -> Outcome {
    let (acme, alice) = identity_in(&s, "acme").await?;
    let agent = s.create_agent(new_agent(&alice, "a", "site-a")).await?;
    let web = s
        .create_endpoint(acme.id, &endpoint_config("web", &["site-a"], 1), now())
        .await?;
    let old = now() - secs(40 * 86_400);
    feed(&s, &agent, web.id, old, 5, Verdict::Down).await?;
    feed(&s, &agent, web.id, now() - secs(60), 2, Verdict::Up).await?;
    let history = |s: Arc<dyn Store>| async move {
        anyhow::Ok(
            s.list_results(Scope::All, web.id, &ResultFilter::default(), all())
                .await?
                .map(|(n, _)| n),
        )
    };
    check_eq("before", history(Arc::clone(&s)).await?, Some(7))?;
    let cutoff = now() - secs(30 * 86_400);
    check_eq("a batch", s.prune_results(cutoff, 3).await?, 3)?;
    check_eq("the rest", s.prune_results(cutoff, 3).await?, 2)?;
    check_eq("nothing more", s.prune_results(cutoff, 3).await?, 0)?;
    check_eq("after", history(Arc::clone(&s)).await?, Some(2))?;
    let detail = status_of(&s, web.id).await?;
    check_eq("uptime over what is left", detail.uptime.month, Some(100.0))
}
