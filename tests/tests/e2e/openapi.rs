//! The OpenAPI document at `/api/v1/schema/`: it lists every route the
//! coordinator serves, with its methods, and it is exact enough for
//! schemathesis to generate valid and invalid requests from it, none of which
//! gets a server error.
//!
//! Why "every route" needs no list of routes here: the coordinator's router
//! is built only from `api::endpoints`, where each handler is registered
//! together with its `#[utoipa::path]` description (utoipa-axum's
//! `OpenApiRouter`), so a route cannot be served without being documented;
//! a coordinator unit test (`api::openapi::tests`) reads the finished
//! router's route table and holds it to the document. This test checks the
//! other direction over HTTP: each documented path and method is answered by
//! a handler, not by the router's fallback (404 "no such endpoint") or its
//! 405, and every method not documented for a path is refused with 405.
//! The monitoring routes are in the same list; the agent routes are called
//! with an agent's token, as their security scheme (`agent_token`) says.
//!
//! The schemathesis test runs the tool scripts/test-env.sh installs
//! (`MUSTER_SCHEMATHESIS`). To look further: `MUSTER_SCHEMATHESIS_SEED`,
//! `MUSTER_SCHEMATHESIS_EXAMPLES`, and `MUSTER_SCHEMATHESIS_ARGS` (more
//! arguments for `st run`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::Utc;
use muster_common::monitor::Verdict;
use muster_tests::monitoring::{check_result, AgentClient};
use muster_tests::{example_workspace, TestCoordinator, TestDb};
use reqwest::Method;
use serde_json::{json, Value};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn schema(c: &TestCoordinator) -> anyhow::Result<Value> {
    // Public: no API key.
    let response = c.http.get(c.url("/api/v1/schema/")).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    Ok(response.json().await?)
}

/// The `{name}` parameters of a path template.
fn template_params(path: &str) -> BTreeSet<String> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_owned()))
        .collect()
}

/// Resolves a local `$ref` (`#/components/...`), failing on one that
/// points nowhere.
fn resolve<'a>(doc: &'a Value, reference: &str) -> anyhow::Result<&'a Value> {
    let pointer = reference
        .strip_prefix('#')
        .ok_or_else(|| anyhow!("$ref '{reference}' is not local"))?;
    doc.pointer(pointer)
        .ok_or_else(|| anyhow!("$ref '{reference}' points nowhere"))
}

fn check_refs(doc: &Value, value: &Value) -> anyhow::Result<()> {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                resolve(doc, reference)?;
            }
            map.values().try_for_each(|v| check_refs(doc, v))
        }
        Value::Array(items) => items.iter().try_for_each(|v| check_refs(doc, v)),
        _ => Ok(()),
    }
}

/// Whether an operation takes an agent's token rather than an API key.
fn for_agents(operation: &Value) -> bool {
    operation["security"] == json!([{ "agent_token": [] }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_in_the_openapi_document() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let doc = schema(&c).await?;
    let agent = c.create_agent("probe", "site-a").await?;

    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not an OpenAPI 3 document: {}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    check_refs(&doc, &doc)?;
    for name in ["api_key", "agent_token"] {
        let scheme = &doc["components"]["securitySchemes"][name];
        assert_eq!(scheme["type"], "http", "{name}: {scheme}");
        assert_eq!(scheme["scheme"], "bearer", "{name}: {scheme}");
    }

    let paths = doc["paths"]
        .as_object()
        .ok_or_else(|| anyhow!("the document has no paths"))?;
    // What DESIGN.md promises, so an empty or truncated document cannot pass.
    for (path, method) in [
        ("/api/v1/workspaces/{name}/actions", "post"),
        ("/api/v1/action-runs/", "get"),
        ("/api/v1/action-runs/{id}/", "get"),
        ("/api/v1/action-runs/{id}/logs/", "get"),
        ("/api/v1/action-runs/{id}/cancel/", "post"),
        ("/api/v1/schema/", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        // Monitoring (README, "Endpoint monitoring").
        ("/api/v1/agents/", "post"),
        ("/api/v1/agents/", "get"),
        ("/api/v1/agents/{id}/", "delete"),
        ("/api/v1/agent/health/", "post"),
        ("/api/v1/agent/endpoints/", "get"),
        ("/api/v1/agent/results/", "post"),
        ("/api/v1/endpoints/", "post"),
        ("/api/v1/endpoints/", "get"),
        ("/api/v1/endpoints/{id}/", "get"),
        ("/api/v1/endpoints/{id}/", "put"),
        ("/api/v1/endpoints/{id}/", "delete"),
        ("/api/v1/endpoints/{id}/results/", "get"),
        ("/api/v1/notifiers/", "post"),
        ("/api/v1/notifiers/", "get"),
        ("/api/v1/notifiers/{id}/", "delete"),
        ("/api/v1/maintenance-windows/", "post"),
        ("/api/v1/maintenance-windows/", "get"),
        ("/api/v1/maintenance-windows/{id}/", "delete"),
    ] {
        assert!(
            paths
                .get(path)
                .is_some_and(|item| item.get(method).is_some()),
            "{} {path} is not in the document",
            method.to_uppercase()
        );
    }

    let mut probed = 0;
    for (path, item) in paths {
        let documented: Vec<&str> = METHODS
            .into_iter()
            .filter(|m| item.get(*m).is_some())
            .collect();
        assert!(!documented.is_empty(), "{path} has no operation");
        // The agent routes and only they take an agent's token.
        let agents = path.starts_with("/api/v1/agent/");
        for method in &documented {
            assert_eq!(
                for_agents(&item[*method]),
                agents,
                "{method} {path}: security {}",
                item[*method]["security"]
            );
        }
        let token = if agents { &agent.token } else { &c.admin_key };
        // A request for each: placeholders for the path parameters.
        let mut concrete = path.clone();
        for name in template_params(path) {
            let value = if name == "id" {
                uuid::Uuid::nil().to_string()
            } else {
                "x".to_owned()
            };
            concrete = concrete.replace(&format!("{{{name}}}"), &value);
        }
        for method in METHODS {
            let operation = item.get(method);
            if let Some(operation) = operation {
                // Every parameter in the template is declared, and no other.
                let declared: BTreeSet<String> = operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                assert_eq!(
                    declared,
                    template_params(path),
                    "{method} {path}: path parameters"
                );
                assert!(
                    operation["responses"]
                        .as_object()
                        .is_some_and(|r| !r.is_empty()),
                    "{method} {path} documents no response"
                );
            }
            let request = c
                .http
                .request(method.to_uppercase().parse()?, c.url(&concrete))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body("{}");
            let response = request.send().await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            probed += 1;
            if operation.is_some() {
                assert_ne!(
                    status, 405,
                    "{method} {path}: the router has no such method"
                );
                assert!(
                    ![401, 403].contains(&status),
                    "{method} {path}: its token was refused: {status} {body}"
                );
                assert!(
                    !(status == 404 && body.contains("no such endpoint")),
                    "{method} {path}: answered by the router's fallback: {body}"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is served but not documented: {body}"
                );
            }
        }
    }
    assert!(
        probed >= METHODS.len() * 30,
        "only {probed} requests probed"
    );

    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// The schemathesis command-line tool, as scripts/test-env.sh installs it.
fn schemathesis() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("MUSTER_SCHEMATHESIS").map(PathBuf::from).ok_or_else(|| {
        anyhow!("MUSTER_SCHEMATHESIS is not set: run the suite with scripts/test.sh, which installs schemathesis (scripts/test-env.sh --print-env names it)")
    })?;
    if !path.is_file() {
        bail!(
            "MUSTER_SCHEMATHESIS={} is not a file: run scripts/test-env.sh to install schemathesis",
            path.display()
        );
    }
    Ok(path)
}

/// A workspace whose action writes output and artifacts, for the process
/// executor.
fn script_workspace(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blocks/report"))?;
    std::fs::write(
        dir.join("workspace.poly"),
        "name: reports\norganization: acme\n",
    )?;
    std::fs::write(
        dir.join("blocks/report/block.poly"),
        r#"name: report
actions:
  - name: write
    script:
      - out="$POLYCRATE_WORKSPACE/artifacts/blocks/$POLYCRATE_BLOCK"
      - mkdir -p "$out/sub"
      - echo "report of $MUSTER_RUN_ID" | tee "$out/report.txt"
      - printf 'x' > "$out/sub/x.txt"
      - echo done >&2
"#,
    )?;
    Ok(())
}

/// A TOML array of strings.
fn toml_strings(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// How long schemathesis may take: its run takes about 30 s on two idle
/// cores (40 operations), nearer 45 s while other builds share them.
const ST_DEADLINE: Duration = Duration::from_secs(180);

/// The monitoring objects the generated requests find: their ids, the ids
/// the DELETE operations may remove, and the agent the agent routes are
/// called as.
struct Monitored {
    ids: Vec<String>,
    doomed: Vec<String>,
    agent: AgentClient,
}

/// Something of each monitoring kind, with a double of each for the DELETE
/// operations to remove, so that the others keep finding theirs: an agent
/// that reports (a heartbeat; results up, degraded and down, so an endpoint
/// has an incident, location states and uptime), endpoints of every kind of
/// check, a notifier (to a port nothing listens on: its deliveries fail and
/// are retried in the background) and a maintenance window.
async fn monitored(c: &TestCoordinator) -> anyhow::Result<Monitored> {
    let agent = c.create_agent("schemathesis", "site-a").await?;
    let doomed_agent = c.create_agent("doomed", "site-b").await?;
    let mut endpoints = Vec::new();
    for body in [
        json!({
            "name": "web", "kind": "http", "target": "https://127.0.0.1:8443/health",
            "interval": 5, "timeout": 2, "locations": ["site-a", "site-b"],
            "failure_threshold": 1, "success_threshold": 1,
            "conditions": ["[STATUS] == 200", {"condition": "[RESPONSE_TIME] < 300", "degrades": true}],
            "http": {"method": "post", "headers": {"X-Probe": "1"}, "body": "{}", "insecure_tls": true},
        }),
        json!({"name": "db", "kind": "tcp", "target": "127.0.0.1:5432", "locations": ["site-a"],
               "conditions": ["[CONNECTED] == true"], "tcp": {"send": "PING\n", "expect": "PONG"}}),
        json!({"name": "gateway", "kind": "icmp", "target": "127.0.0.1", "locations": ["site-a"],
               "icmp": {"count": 2}}),
        json!({"name": "resolver", "kind": "dns", "target": "127.0.0.1:5353", "locations": ["site-a"],
               "dns": {"name": "example.org", "query_type": "aaaa", "expected": "::1"}}),
        json!({"name": "doomed", "kind": "tcp", "target": "127.0.0.1:1", "locations": ["site-a"]}),
    ] {
        endpoints.push(c.create_endpoint(body).await?);
    }
    let doomed_endpoint = endpoints.pop().context("the doomed endpoint")?;

    let (status, answer) = agent.heartbeat().await?;
    anyhow::ensure!(status == 200, "heartbeat: {status} {answer}");
    agent
        .report_all(
            &endpoints[0],
            &[Verdict::Up, Verdict::Degraded, Verdict::Down],
        )
        .await?;
    let tcp = uuid::Uuid::parse_str(&endpoints[1])?;
    let (status, answer) = agent
        .report(vec![check_result(tcp, agent.next_time(), Verdict::Up)])
        .await?;
    anyhow::ensure!(status == 202 && answer["stored"] == 1, "{status} {answer}");

    let create = |kind: &'static str, body: Value| async move {
        let answer = c
            .admin(Method::POST, &format!("/api/v1/{kind}/"), Some(body))
            .await?;
        Ok::<String, anyhow::Error>(
            answer["id"]
                .as_str()
                .with_context(|| format!("no id in {answer}"))?
                .to_owned(),
        )
    };
    let hook = json!({"kind": "webhook", "url": "http://127.0.0.1:9/hook"});
    let notifier = create("notifiers", hook.clone()).await?;
    let doomed_notifier = create("notifiers", hook).await?;
    let now = Utc::now();
    let window = json!({
        "start": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "end": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "endpoint_ids": [endpoints[0]],
        "reason": "schemathesis",
    });
    let maintenance = create("maintenance-windows", window.clone()).await?;
    let doomed_window = create("maintenance-windows", window).await?;

    let mut ids = endpoints;
    ids.extend([notifier, maintenance]);
    Ok(Monitored {
        ids,
        doomed: vec![
            doomed_agent.id,
            doomed_endpoint,
            doomed_notifier,
            doomed_window,
        ],
        agent,
    })
}

/// schemathesis' configuration: `ids` and `doomed` to draw on, and the
/// tokens of the two security schemes.
///
/// - Checks: no server error; statuses, content types, bodies and headers as
///   documented; schema-violating input refused; no answer without an API
///   key; undocumented methods refused with 405 and `Allow`. Not
///   `positive_data_acceptance`: the API checks what a schema cannot say (a
///   key's expiry lies ahead, the workspace defines the block).
/// - Real run ids, workspace, block, action and artifact names are drawn half
///   of the time, so generated requests reach stored objects as well as
///   missing ones; so are the monitoring objects' ids, but the DELETE
///   operations of monitoring draw theirs from doubles made for them
///   (`doomed`), or the first would remove what the others are to find.
/// - Each operation is called with the token its security scheme names: a
///   super admin's API key, or the agent's token on the agent routes.
/// - A fixed seed (`MUSTER_SCHEMATHESIS_SEED` to change it), 100 examples an
///   operation (`MUSTER_SCHEMATHESIS_EXAMPLES`): the same requests each run,
///   so the test is not flaky; other seeds were run clean when it was made.
///   Half as many for the monitoring operations, whose bodies are the
///   slowest to generate (an agent's batch of results most of all), so the
///   run stays within a minute while other builds share the cores; seeds 2
///   and 3 with 200 examples of each were run clean on them when they were
///   added.
/// - One worker: with two, Hypothesis' lambda descriptions race between
///   threads (a `KeyError` or an AST `SystemError` inside schemathesis).
/// - No stateful phase: it follows list answers to DELETE, and could revoke
///   the keys and runners the rest of the test relies on.
fn schemathesis_config(ids: &[&str], doomed: &[&str], api_key: &str, agent_token: &str) -> String {
    let examples: u32 = std::env::var("MUSTER_SCHEMATHESIS_EXAMPLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    format!(
        r#"
seed = {seed}
workers = 1
request-timeout = 10
max-failures = 20

[generation]
max-examples = {examples}
database = "none"

[phases.stateful]
enabled = false

[checks]
enabled = false

[checks.not_a_server_error]
enabled = true

[checks.status_code_conformance]
enabled = true

[checks.content_type_conformance]
enabled = true

[checks.response_schema_conformance]
enabled = true

[checks.response_headers_conformance]
enabled = true

[checks.negative_data_rejection]
enabled = true

[checks.ignored_auth]
enabled = true

[checks.unsupported_method]
enabled = true

[checks.allow_header_conformance]
enabled = true

[checks.missing_required_header]
enabled = true

[auth.openapi.api_key]
bearer = "{api_key}"

[auth.openapi.agent_token]
bearer = "{agent_token}"

[dictionaries.ids]
values = {ids}

[dictionaries.doomed]
values = {doomed}

[dictionaries.workspaces]
values = ["acme-corp-automation", "reports"]

[dictionaries.artifacts]
values = ["report.txt", "sub/x.txt"]

[dictionaries.blocks]
values = ["linux-patch", "report"]

[dictionaries.actions]
values = ["patch", "write"]

[parameters]
"path.id" = {{ dictionary = "ids", probability = 0.5 }}
"path.name" = {{ dictionary = "workspaces", probability = 0.5 }}
"path.path" = {{ dictionary = "artifacts", probability = 0.5 }}
"body.block" = {{ dictionary = "blocks", probability = 0.5 }}
"body.action" = {{ dictionary = "actions", probability = 0.5 }}

[[operations]]
include-method = "DELETE"
include-path-regex = "^/api/v1/(agents|endpoints|notifiers|maintenance-windows)/"
parameters = {{ "path.id" = {{ dictionary = "doomed", probability = 0.5 }} }}

[[operations]]
include-path-regex = "^/api/v1/(agent|agents|endpoints|notifiers|maintenance-windows)/"
generation = {{ max-examples = {monitoring_examples} }}
"#,
        seed = std::env::var("MUSTER_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into()),
        examples = examples,
        monitoring_examples = examples / 2,
        ids = toml_strings(ids),
        doomed = toml_strings(doomed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() -> anyhow::Result<()> {
    let st = schemathesis()?;
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;

    // Real objects for the generated requests to find: two workspaces, a
    // run that succeeded with a log and artifacts, one canceled, one queued.
    let (status, answer) = c.push_dir(&c.admin_key, &example_workspace()).await?;
    assert_eq!(status, 201, "{answer}");
    let scripts = tempfile::tempdir()?;
    script_workspace(scripts.path())?;
    let (status, answer) = c.push_dir(&c.admin_key, scripts.path()).await?;
    assert_eq!(status, 201, "{answer}");
    let runner = c
        .start_runner_configured(|r| r.executor = muster_runner::ExecutorChoice::Process)
        .await?;
    let succeeded = c
        .trigger("reports", json!({"block": "report", "action": "write"}))
        .await?;
    let run = c.wait_final(&succeeded, Duration::from_secs(60)).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    // No runner takes the runs from here on: they stay as they are made.
    runner.stop().await;
    let patch = json!({"block": "linux-patch", "action": "patch"});
    let canceled = c.trigger("acme-corp-automation", patch.clone()).await?;
    c.admin(
        reqwest::Method::POST,
        &format!("/api/v1/action-runs/{canceled}/cancel/"),
        None,
    )
    .await?;
    let queued = c.trigger("acme-corp-automation", patch).await?;
    let monitored = monitored(&c).await?;

    // A key of its own, a super admin's to reach everything: whatever it
    // does with it (revoke it, say), the checks after it use the admin's.
    let key = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/api-keys/",
            Some(json!({"name": "schemathesis", "identity": "fuzzer", "role": "super_admin"})),
        )
        .await?;
    let st_key = key["key"]
        .as_str()
        .ok_or_else(|| anyhow!("no key in {key}"))?
        .to_owned();

    let work = tempfile::tempdir()?;
    let config = work.path().join("schemathesis.toml");
    let mut ids = vec![succeeded.as_str(), canceled.as_str(), queued.as_str()];
    ids.extend(monitored.ids.iter().map(String::as_str));
    let doomed: Vec<&str> = monitored.doomed.iter().map(String::as_str).collect();
    std::fs::write(
        &config,
        schemathesis_config(&ids, &doomed, &st_key, &monitored.agent.token),
    )?;
    let operations = schema(&c).await?["paths"]
        .as_object()
        .map(|paths| {
            paths
                .values()
                .filter_map(|item| item.as_object())
                .map(|item| {
                    item.keys()
                        .filter(|k| METHODS.contains(&k.as_str()))
                        .count()
                })
                .sum::<usize>()
        })
        .unwrap_or_default();

    let started = Instant::now();
    let output = tokio::time::timeout(
        ST_DEADLINE,
        tokio::process::Command::new(&st)
            .arg("--config-file")
            .arg(&config)
            .args(["run", "--no-color"])
            .arg(c.url("/api/v1/schema/"))
            .args(
                std::env::var("MUSTER_SCHEMATHESIS_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .current_dir(work.path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("schemathesis did not finish within {ST_DEADLINE:?}"))?
    .with_context(|| format!("running {}", st.display()))?;
    let took = started.elapsed();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "schemathesis failed ({}) after {took:?}:\n{report}",
            output.status
        );
    }
    // It tested every operation (but the document's own, which it leaves
    // out): none was skipped as untestable.
    let count = |label: &str| -> Option<usize> {
        let line = report.lines().find(|l| l.trim_start().starts_with(label))?;
        line.trim_start()[label.len()..]
            .trim()
            .split('/')
            .next()?
            .parse()
            .ok()
    };
    let tested = count("Tested:").unwrap_or_default();
    assert!(
        tested + 1 >= operations && count("Selected:") == Some(tested),
        "schemathesis tested {tested} of {operations} operations:\n{report}"
    );
    eprintln!("schemathesis: no failure in {took:?}");

    // The coordinator is still whole: ready, the admin key works, the runs
    // made above are there.
    let ready = c.http.get(c.url("/readyz")).send().await?;
    assert_eq!(ready.status().as_u16(), 200);
    let run = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{succeeded}/"),
            None,
        )
        .await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    let (status, _, list) = monitored.agent.endpoints(None).await?;
    assert_eq!(status, 200, "the agent's token still opens its routes");
    assert!(list.is_some_and(|l| !l.endpoints.is_empty()));

    c.stop().await;
    db.drop_db().await;
    Ok(())
}
