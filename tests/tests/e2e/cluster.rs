//! Several coordinators on one PostgreSQL and one Redis: a runner enrolled
//! through any is accepted by all, a run triggered through one starts at
//! once on a runner held by another, and its log is tailed live through any.
//! Redis going away slows that fan-out to the store's pace but loses no run
//! and no log line; when it returns, fan-out resumes without a restart.
//!
//! The coordinators here look at the store for what the bus did not bring
//! only every ten minutes while the bus is healthy, so whatever arrives
//! promptly was carried by Redis.

use std::time::{Duration, Instant};

use muster_common::secret::Secret;
use muster_tests::{wait_until, LogTail, RedisServer, TestCoordinator, TestDb};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_secs(600);
const TICKS: usize = 20;
/// Ticks of the run that Redis goes away and comes back during (15 s).
const LONG_TICKS: usize = 150;
const DEADLINE: Duration = Duration::from_secs(30);

async fn cluster(
    db: &TestDb,
    redis: &RedisServer,
) -> anyhow::Result<(TestCoordinator, TestCoordinator)> {
    let url = redis.url();
    let adjust = |config: &mut muster_coordinator::Config| {
        config.redis_url = Some(Secret::new(url.clone()));
        config.healthy_poll = Some(QUIET);
    };
    let a = TestCoordinator::start_with(db, adjust).await?;
    let b = TestCoordinator::start_another_with(db, &a, adjust).await?;
    assert_eq!(
        a.coordinator.ca_cert_hash, b.coordinator.ca_cert_hash,
        "coordinators on one database share its CA"
    );
    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: cluster\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        format!(
            "name: jobs\nactions:\n  - name: quick\n    script: [\"echo quick\"]\n  - name: ticker\n    script:\n      - for i in $(seq 1 {TICKS}); do echo \"tick $i $(date +%s%3N)\"; sleep 0.1; done\n  - name: long-ticker\n    script:\n      - for i in $(seq 1 {LONG_TICKS}); do echo \"tick $i $(date +%s%3N)\"; sleep 0.1; done\n  - name: sleepy\n    script: [\"echo waiting\", \"sleep 120\"]\n"
        ),
    )?;
    let (status, answer) = b.push_dir(&b.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "{answer}");
    Ok((a, b))
}

/// Enrolls a process-executor runner through `b`, then moves it to `a`: it
/// connects there with the certificate `b` issued.
async fn runner_on_a(
    a: &TestCoordinator,
    b: &TestCoordinator,
) -> anyhow::Result<muster_tests::TestRunner> {
    let runner = b
        .start_runner_configured(|r| {
            r.executor = muster_runner::ExecutorChoice::Process;
            r.capacity = 3;
        })
        .await?;
    a.take_runner(b, runner).await
}

fn ms_between(run: &Value, from: &str, to: &str) -> anyhow::Result<i64> {
    let at = |field: &str| -> anyhow::Result<i64> {
        let text = run[field]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("run without {field}: {run}"))?;
        Ok(chrono::DateTime::parse_from_rfc3339(text)?.timestamp_millis())
    };
    Ok(at(to)? - at(from)?)
}

fn millis_now() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Tails a `ticker` run through `c` to its end: checks every tick arrived
/// once, in order, and returns how long each took from `echo` to the client, in ms.
async fn tail_ticks(c: &TestCoordinator, run_id: &str) -> anyhow::Result<Vec<i64>> {
    read_ticks(LogTail::open(c, run_id).await?, TICKS).await
}

/// Reads a tail of a run printing `ticks` ticks to its end (see `tail_ticks`).
async fn read_ticks(mut tail: LogTail, ticks: usize) -> anyhow::Result<Vec<i64>> {
    let mut text = String::new();
    let mut delays = Vec::new();
    loop {
        let event = tail
            .next(DEADLINE)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the tail ended without an end event"))?;
        match event.event.as_str() {
            "log" => {
                let data = event.data["data"].as_str().unwrap_or_default().to_owned();
                for line in data.lines() {
                    if let Some(printed) =
                        line.rsplit(' ').next().and_then(|t| t.parse::<i64>().ok())
                    {
                        delays.push(millis_now() - printed);
                    }
                }
                text.push_str(&data);
            }
            "end" => {
                assert_eq!(event.data["status"], "succeeded", "{}", event.data);
                break;
            }
            _ => {}
        }
    }
    let seen: Vec<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("tick "))
        .map(|rest| rest.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = (1..=ticks).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "every tick once, in order:\n{text}");
    Ok(delays)
}

/// Triggers `sleepy` through `b`, cancels it through `b` once it runs, and
/// checks it ends `canceled`; returns how long that took, in ms.
async fn cancel_a_running_run(b: &TestCoordinator) -> anyhow::Result<u128> {
    let run_id = b
        .trigger("cluster", json!({"block": "jobs", "action": "sleepy"}))
        .await?;
    let path = format!("/api/v1/action-runs/{run_id}/");
    wait_until(DEADLINE, "the run to start", || async {
        let run = b.admin(reqwest::Method::GET, &path, None).await?;
        Ok(run["status"] == "running")
    })
    .await?;
    let asked = Instant::now();
    b.admin(reqwest::Method::POST, &format!("{path}cancel/"), None)
        .await?;
    let run = b.wait_final(&run_id, DEADLINE).await?;
    assert_eq!(run["status"], "canceled", "{run}");
    Ok(asked.elapsed().as_millis())
}

fn median(values: &mut [i64]) -> i64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_triggered_through_one_coordinator_start_at_once_on_another() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let db = TestDb::create().await?;
    let (a, b) = cluster(&db, &redis).await?;
    let runner = runner_on_a(&a, &b).await?;

    // Triggered through b; the runner is on a, which learns of the run only
    // through Redis.
    let mut started = Vec::new();
    for _ in 0..10 {
        let run_id = b
            .trigger("cluster", json!({"block": "jobs", "action": "quick"}))
            .await?;
        let run = a.wait_final(&run_id, DEADLINE).await?;
        assert_eq!(run["status"], "succeeded", "{run}");
        started.push(ms_between(&run, "created_at", "started_at")?);
    }
    let worst = *started.iter().max().unwrap_or(&0);
    println!(
        "run triggered through coordinator b, started on a runner held by a: median {} ms, worst {worst} ms over {} runs",
        median(&mut started),
        started.len()
    );

    // Its log, tailed live through b while a stores it.
    let run_id = b
        .trigger("cluster", json!({"block": "jobs", "action": "ticker"}))
        .await?;
    let mut delays = tail_ticks(&b, &run_id).await?;
    println!(
        "log line printed on a's runner → received by a tail client of b: median {} ms, worst {} ms",
        median(&mut delays),
        delays.iter().max().unwrap_or(&0)
    );

    // A cancel through b reaches the runner a holds.
    let took = cancel_a_running_run(&b).await?;
    println!("cancel through b of a run on a's runner took {took} ms");

    runner.stop().await;
    b.stop().await;
    a.stop().await;
    db.drop_db().await;
    Ok(())
}

async fn wait_health(c: &TestCoordinator, healthy: bool) -> anyhow::Result<()> {
    let mut health = c.coordinator.bus_health();
    tokio::time::timeout(DEADLINE, health.wait_for(|h| *h == healthy))
        .await
        .map_err(|_| anyhow::anyhow!("the bus did not become healthy={healthy}"))??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_slows_fan_out_but_loses_nothing() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let db = TestDb::create().await?;
    let (a, b) = cluster(&db, &redis).await?;
    let runner = runner_on_a(&a, &b).await?;

    // A run, tailed through b, during which Redis goes away and comes back.
    let long_run = b
        .trigger("cluster", json!({"block": "jobs", "action": "long-ticker"}))
        .await?;
    let long_tail = tokio::spawn(read_ticks(LogTail::open(&b, &long_run).await?, LONG_TICKS));
    tokio::time::sleep(Duration::from_secs(1)).await;

    redis.stop();
    wait_health(&a, false).await?;
    wait_health(&b, false).await?;
    let ready = b.http.get(b.url("/readyz")).send().await?;
    assert_eq!(
        ready.status(),
        200,
        "a bus outage does not make a coordinator unready"
    );
    assert!(ready.text().await?.contains("degraded"));
    let metrics = b.http.get(b.url("/metrics")).send().await?.text().await?;
    assert!(
        metrics.lines().any(|l| l == "muster_bus_healthy 0"),
        "{metrics}"
    );

    // Without Redis: a run triggered through b still starts on a, and b's
    // tail reads the store.
    let run_id = b
        .trigger("cluster", json!({"block": "jobs", "action": "ticker"}))
        .await?;
    tail_ticks(&b, &run_id).await?;
    let log = a.log(&run_id).await?;
    assert_eq!(log.matches("tick ").count(), TICKS, "{log}");

    // A cancel through b reaches a's runner at its next heartbeat.
    cancel_a_running_run(&b).await?;
    let metrics = b.http.get(b.url("/metrics")).send().await?.text().await?;
    assert!(
        !metrics
            .lines()
            .any(|l| l == "muster_bus_publish_errors_total 0"),
        "what b published during the outage is counted: {metrics}"
    );

    // Redis is back: fan-out resumes on its own, without a restart.
    redis.resume().await?;
    wait_health(&a, true).await?;
    wait_health(&b, true).await?;
    let status = a
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{long_run}/"),
            None,
        )
        .await?;
    println!("Redis back while the long run is {}", status["status"]);
    let run_id = b
        .trigger("cluster", json!({"block": "jobs", "action": "ticker"}))
        .await?;
    let mut delays = tail_ticks(&b, &run_id).await?;
    println!(
        "after Redis returned: log line → tail client of another coordinator median {} ms",
        median(&mut delays)
    );

    // The run that lived through it all: its tail got every line once, and
    // so did the store.
    long_tail.await??;
    let run = a.wait_final(&long_run, DEADLINE).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    let log = a.log(&long_run).await?;
    assert_eq!(log.matches("tick ").count(), LONG_TICKS, "{log}");

    runner.stop().await;
    b.stop().await;
    a.stop().await;
    db.drop_db().await;
    Ok(())
}
