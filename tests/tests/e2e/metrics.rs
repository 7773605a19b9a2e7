//! Prometheus metrics as an operator scrapes them: the coordinator's
//! `/metrics` on its HTTP port and a runner process's on `--metrics-addr`,
//! parsed as exposition text and checked against what the test did.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use muster_common::monitor::Verdict::{Down, Up};
use muster_tests::monitoring::{check_result, WebhookReceiver};
use muster_tests::{free_port, signal, TestCoordinator, TestDb};
use serde_json::json;

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format: `# HELP`/`# TYPE` lines and blank
/// lines are skipped; every other line is `name{label="value",…} value
/// [timestamp]`, label values escaped with `\\`, `\"` and `\n`.
fn parse_exposition(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_line(line).with_context(|| format!("line {}: {line}", number + 1))?;
        samples.push(sample);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = &line[..name_end];
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name '{name}'"
    );
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        loop {
            // Skip separators; `}` ends the set.
            while let Some((_, ' ' | ',')) = chars.peek() {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    rest = &after_brace[i + 1..];
                    break;
                }
                None => bail!("unterminated label set"),
                _ => {}
            }
            let mut label = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            ensure!(
                matches!(chars.next(), Some((_, '"'))),
                "label {label} has no quoted value"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => bail!("bad escape {other:?} in label {label}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated value of label {label}"),
                }
            }
            ensure!(
                labels.insert(label.trim().to_owned(), value).is_none(),
                "label {label} twice"
            );
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| anyhow!("no value"))?;
    let value: f64 = value
        .parse()
        .with_context(|| format!("value '{value}' is not a number"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .with_context(|| format!("timestamp '{timestamp}' is not an integer"))?;
    }
    ensure!(fields.next().is_none(), "trailing fields");
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A scrape: every sample, found by name and exact label set.
struct Scrape(Vec<Sample>);

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        self.get(name, labels)
            .ok_or_else(|| anyhow!("no sample {name}{labels:?} in the scrape"))
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Scrape> {
    let response = http.get(url).send().await?;
    ensure!(
        response.status().is_success(),
        "GET {url} answered {}",
        response.status()
    );
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "GET {url}: content type '{content_type}'"
    );
    let text = response.text().await?;
    let scrape = Scrape(parse_exposition(&text)?);
    // Prometheus's own client library reads it the same way.
    let official = prometheus_parse(&text)?;
    ensure!(
        official.len() == scrape.0.len(),
        "prometheus_client read {} samples, this test {}",
        official.len(),
        scrape.0.len()
    );
    for sample in &official {
        let labels: Vec<(&str, &str)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let ours = scrape.value(&sample.name, &labels)?;
        ensure!(
            ours == sample.value || (ours.is_nan() && sample.value.is_nan()),
            "{}{:?}: prometheus_client read {}, this test {ours}",
            sample.name,
            sample.labels,
            sample.value
        );
    }
    Ok(scrape)
}

/// The samples of an exposition as the official Python client library's
/// text-format parser reads them (from the test environment's virtualenv).
fn prometheus_parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    use std::io::Write;
    let python = std::env::var("MUSTER_TEST_PYTHON").map_err(|_| {
        anyhow!("MUSTER_TEST_PYTHON is not set: run the suite with scripts/test.sh, which installs prometheus-client")
    })?;
    const READ: &str = "import json, sys\n\
from prometheus_client.parser import text_string_to_metric_families\n\
out = [{'name': s.name, 'labels': s.labels, 'value': repr(float(s.value))}\n\
       for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
print(json.dumps(out))\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", READ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("python's stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "prometheus_client could not parse the exposition: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    read.into_iter()
        .map(|s| {
            let value = match s["value"].as_str().unwrap_or_default() {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                other => other.parse::<f64>()?,
            };
            let labels = s["labels"]
                .as_object()
                .map(|l| {
                    l.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Sample {
                name: s["name"].as_str().unwrap_or_default().to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// Scrapes `url` until `ready` holds, failing after `within`.
async fn scrape_until(
    http: &reqwest::Client,
    url: &str,
    within: Duration,
    what: &str,
    ready: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + within;
    loop {
        let scraped = scrape(http, url).await?;
        if ready(&scraped) {
            return Ok(scraped);
        }
        ensure!(
            Instant::now() < deadline,
            "{what} within {within:?}; last scrape: {:?}",
            scraped.0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pushes `metrics-ws`: `ok` says hello, `fail` complains and exits 3,
/// `ticker` prints its pid and ticks until stopped.
async fn push_workspace(c: &TestCoordinator) -> anyhow::Result<()> {
    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: metrics-ws\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        r#"name: jobs
actions:
  - name: ok
    script:
      - echo hello
  - name: fail
    script:
      - echo oops
      - exit 3
  - name: ticker
    script:
      - echo "ticking as $$"
      - for i in $(seq 1 100000); do echo "tick $i"; sleep 0.2; done
"#,
    )?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    ensure!(status == 201, "push answered {status}: {answer}");
    Ok(())
}

/// Whether any path segment of `value` is a UUID.
fn holds_uuid(value: &str) -> bool {
    value
        .split(['/', '{', '}'])
        .any(|part| uuid::Uuid::parse_str(part).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_runs_logs_requests_and_jobs_on_both_sides() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    push_workspace(&c).await?;
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let runner_metrics = format!("http://{metrics_addr}/metrics");
    let runner = c
        .start_runner_process(&["--executor", "process", "--metrics-addr", &metrics_addr])
        .await?;

    let ok = c
        .trigger("metrics-ws", json!({"block": "jobs", "action": "ok"}))
        .await?;
    let run = c.wait_final(&ok, Duration::from_secs(60)).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    let failing = c
        .trigger("metrics-ws", json!({"block": "jobs", "action": "fail"}))
        .await?;
    let run = c.wait_final(&failing, Duration::from_secs(60)).await?;
    assert_eq!(run["status"], "failed", "{run}");
    // No runner carries this label: the run waits in the queue.
    let waiting = c
        .trigger(
            "metrics-ws",
            json!({"block": "jobs", "action": "ok", "parameters": {"runner_labels": {"site": "nowhere"}}}),
        )
        .await?;
    let unknown = c.http.get(c.url("/no/such/endpoint")).send().await?;
    assert_eq!(unknown.status(), 404);

    // The coordinator counts a result just after it stores it: wait for both.
    let http = reqwest::Client::new();
    let url = c.url("/metrics");
    let m = scrape_until(
        &http,
        &url,
        Duration::from_secs(10),
        "both results counted",
        |m| {
            m.get("muster_runs_finished_total", &[("status", "succeeded")]) == Some(1.0)
                && m.get("muster_runs_finished_total", &[("status", "failed")]) == Some(1.0)
        },
    )
    .await?;
    for status in ["canceled", "timed_out", "lost"] {
        assert_eq!(
            m.value("muster_runs_finished_total", &[("status", status)])?,
            0.0,
            "{status}"
        );
    }
    assert_eq!(m.value("muster_runs_queued_total", &[])?, 3.0);
    assert_eq!(m.value("muster_queue_depth", &[])?, 1.0, "the waiting run");
    assert_eq!(
        m.value("muster_lease_dispatch_seconds_count", &[])?,
        2.0,
        "one dispatch per leased run"
    );
    let waited = m.value("muster_lease_dispatch_seconds_sum", &[])?;
    assert!(
        (0.0..10.0).contains(&waited),
        "dispatch took {waited} s in all"
    );
    assert_eq!(
        m.value("muster_lease_dispatch_seconds_bucket", &[("le", "+Inf")])?,
        2.0
    );
    for status in ["succeeded", "failed"] {
        assert_eq!(
            m.value("muster_run_duration_seconds_count", &[("status", status)])?,
            1.0,
            "{status}"
        );
    }
    assert_eq!(m.value("muster_runners_connected", &[])?, 1.0);
    assert_eq!(m.value("muster_lease_expirations_total", &[])?, 0.0);
    assert_eq!(m.value("muster_bus_publish_errors_total", &[])?, 0.0);
    let log_bytes = m.value("muster_log_ingested_bytes_total", &[])?;
    let log_chunks = m.value("muster_log_ingested_chunks_total", &[])?;
    assert!(
        log_chunks >= 2.0,
        "both runs wrote output: {log_chunks} chunks"
    );
    assert!(
        log_bytes >= ("hello\n".len() + "oops\n".len()) as f64,
        "{log_bytes} bytes"
    );

    // HTTP requests, by route template: the triggers, and the run reads
    // of `wait_final` by `{id}`, never by the id itself.
    let trigger = [
        ("method", "POST"),
        ("route", "/api/v1/workspaces/{name}/actions"),
        ("status", "202"),
    ];
    assert_eq!(
        m.value("muster_http_request_duration_seconds_count", &trigger)?,
        3.0
    );
    let reads = m.value(
        "muster_http_request_duration_seconds_count",
        &[
            ("method", "GET"),
            ("route", "/api/v1/action-runs/{id}/"),
            ("status", "200"),
        ],
    )?;
    assert!(reads >= 2.0, "{reads} run reads");
    assert_eq!(
        m.value(
            "muster_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")],
        )?,
        1.0
    );
    for sample in &m.0 {
        for (label, value) in &sample.labels {
            assert!(
                !holds_uuid(value) && !value.contains("acme") && !value.contains("metrics-ws"),
                "{}: label {label}=\"{value}\" names an object",
                sample.name
            );
        }
    }

    // The runner's side of the same two runs.
    let r = scrape(&http, &runner_metrics).await?;
    assert_eq!(
        r.value(
            "muster_runner_jobs_finished_total",
            &[("outcome", "succeeded")]
        )?,
        1.0
    );
    assert_eq!(
        r.value(
            "muster_runner_jobs_finished_total",
            &[("outcome", "failed")]
        )?,
        1.0
    );
    for outcome in ["canceled", "timed_out"] {
        assert_eq!(
            r.value("muster_runner_jobs_finished_total", &[("outcome", outcome)])?,
            0.0
        );
    }
    assert_eq!(r.value("muster_runner_jobs_running", &[])?, 0.0);
    assert_eq!(r.value("muster_runner_connected", &[])?, 1.0);
    assert_eq!(r.value("muster_runner_reconnects_total", &[])?, 0.0);
    assert_eq!(r.value("muster_runner_lease_rejections_total", &[])?, 0.0);
    assert_eq!(r.value("muster_runner_log_spilled_bytes_total", &[])?, 0.0);
    assert_eq!(
        r.value("muster_runner_log_sent_bytes_total", &[])?,
        log_bytes,
        "the coordinator stored every byte the runner sent, once"
    );

    // The queue depth comes from the store: a coordinator started on the
    // same database sees the waiting run; canceling it empties the queue.
    let other = TestCoordinator::start_another(&db, &c).await?;
    let fresh = scrape(&http, &other.url("/metrics")).await?;
    assert_eq!(fresh.value("muster_queue_depth", &[])?, 1.0);
    assert_eq!(fresh.value("muster_runs_queued_total", &[])?, 0.0);
    c.admin(
        reqwest::Method::POST,
        &format!("/api/v1/action-runs/{waiting}/cancel/"),
        None,
    )
    .await?;
    let m = scrape(&http, &url).await?;
    assert_eq!(m.value("muster_queue_depth", &[])?, 0.0);
    assert_eq!(
        m.value("muster_runs_finished_total", &[("status", "canceled")])?,
        1.0
    );
    assert_eq!(
        m.value(
            "muster_run_duration_seconds_count",
            &[("status", "canceled")]
        )?,
        0.0,
        "a run that never started has no duration"
    );

    drop(runner);
    other.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// A runner frozen past its lease: the coordinator counts the expiry and
/// the lost run; the runner, awake again, counts the refusal and the job it
/// stopped because of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_counted_by_the_coordinator_and_the_refusal_by_the_runner(
) -> anyhow::Result<()> {
    const LEASE_TTL_SECS: u64 = 5;
    let db = TestDb::create().await?;
    let c =
        TestCoordinator::start_with(&db, |config| config.lease_ttl_secs = LEASE_TTL_SECS).await?;
    push_workspace(&c).await?;
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let runner_metrics = format!("http://{metrics_addr}/metrics");
    let runner = c
        .start_runner_process(&["--executor", "process", "--metrics-addr", &metrics_addr])
        .await?;
    let run_id = c
        .trigger("metrics-ws", json!({"block": "jobs", "action": "ticker"}))
        .await?;
    let http = reqwest::Client::new();
    scrape_until(
        &http,
        &runner_metrics,
        Duration::from_secs(60),
        "the job to run",
        |r| r.get("muster_runner_jobs_running", &[]) == Some(1.0),
    )
    .await?;
    muster_tests::wait_until(Duration::from_secs(60), "the job's output", || async {
        Ok(c.log(&run_id).await?.contains("ticking as"))
    })
    .await?;

    let runner_pid = runner.child.id().ok_or_else(|| anyhow!("no pid"))?;
    signal(runner_pid, "-STOP")?;
    let lost = c
        .wait_final(&run_id, Duration::from_secs(LEASE_TTL_SECS + 10))
        .await;
    signal(runner_pid, "-CONT")?;
    assert_eq!(lost?["status"], "lost");

    let url = c.url("/metrics");
    let m = scrape(&http, &url).await?;
    assert_eq!(m.value("muster_lease_expirations_total", &[])?, 1.0);
    assert_eq!(
        m.value("muster_runs_finished_total", &[("status", "lost")])?,
        1.0
    );
    assert_eq!(
        m.value("muster_run_duration_seconds_count", &[("status", "lost")])?,
        1.0
    );

    // Awake, the runner is told its lease is gone and stops the job.
    let r = scrape_until(
        &http,
        &runner_metrics,
        Duration::from_secs(30),
        "the runner to stop the job it lost",
        |r| r.get("muster_runner_jobs_running", &[]) == Some(0.0),
    )
    .await
    .map_err(|e| e.context(runner.log()))?;
    assert!(r.value("muster_runner_lease_rejections_total", &[])? >= 1.0);
    assert_eq!(
        r.value(
            "muster_runner_jobs_finished_total",
            &[("outcome", "canceled")]
        )?,
        1.0
    );
    assert!(r.value("muster_runner_log_sent_bytes_total", &[])? > 0.0);

    drop(runner);
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_results_and_webhook_posts_are_counted() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    // The first post fails and is retried.
    let receiver = WebhookReceiver::start(1).await?;
    receiver.register(&c, &c.admin_key).await?;
    let agent = c.create_agent("berlin", "site-a").await?;
    let web = c
        .create_endpoint(json!({
            "name": "web", "kind": "http", "target": "http://127.0.0.1:9/",
            "interval": 5, "timeout": 2, "locations": ["site-a"],
            "min_failing_locations": 1, "failure_threshold": 1, "success_threshold": 1,
            "conditions": ["[STATUS] == 200"],
        }))
        .await?;
    agent.report_all(&web, &[Up, Down]).await?;
    // Said again (a replay) and one from the future, refused.
    let endpoint = uuid::Uuid::parse_str(&web)?;
    let once = check_result(endpoint, chrono::Utc::now(), Down);
    let future = check_result(
        endpoint,
        chrono::Utc::now() + chrono::Duration::hours(1),
        Down,
    );
    agent.report(vec![once.clone()]).await?;
    agent.report(vec![once, future]).await?;
    receiver.wait_for("endpoint_down", 1).await?;

    let http = reqwest::Client::new();
    let m = scrape_until(
        &http,
        &c.url("/metrics"),
        Duration::from_secs(10),
        "the webhook post to be counted",
        |m| m.get("muster_notifications_total", &[("outcome", "sent")]) == Some(1.0),
    )
    .await?;
    for (outcome, n) in [("stored", 3.0), ("duplicate", 1.0), ("refused", 1.0)] {
        assert_eq!(
            m.value("muster_check_results_total", &[("outcome", outcome)])?,
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        m.value("muster_notifications_total", &[("outcome", "retried")])?,
        1.0
    );

    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[test]
fn exposition_lines_parse_with_escapes_and_timestamps() {
    let samples = parse_exposition(
        "# HELP x_total Things.\n# TYPE x_total counter\n\
         x_total{a=\"1\",b=\"say \\\"hi\\\"\\n\\\\\",} 3 1700000000000\n\
         y_bucket{le=\"+Inf\"} 2\nz NaN\n",
    )
    .unwrap();
    assert_eq!(samples.len(), 3);
    assert_eq!(samples[0].labels["b"], "say \"hi\"\n\\");
    assert_eq!(samples[0].value, 3.0);
    assert_eq!(samples[1].labels["le"], "+Inf");
    assert!(samples[2].value.is_nan());
    assert!(parse_exposition("x{a=\"1\" 3\n").is_err());
    assert!(parse_exposition("x{a=1} 3\n").is_err());
    assert!(parse_exposition("x 3 4 5\n").is_err());
}
