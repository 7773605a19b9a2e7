//! 200 runs under random faults: runners killed and restarted, runners
//! frozen and thawed, their network cut and restored, the coordinator
//! killed and restarted, all while normal runs go on. At the end every run
//! is in a final state, none was executed twice, and no stored log has a
//! gap. The seed is printed; `MUSTER_CHAOS_SEED` replays a run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use muster_tests::{signal, CoordinatorProcess, Proxy, RunnerProcess, TestDb};
use serde_json::{json, Value};

const RUNS: usize = 200;
const RUNNERS: usize = 3;
const LEASE_TTL_SECS: u64 = 5;

/// xorshift64*: enough randomness for fault schedules, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The HTTP API of the coordinator under test, riding out its restarts.
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&self.key);
            if let Some(body) = &body {
                req = req.json(body);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => return Ok(r.json().await?),
                Ok(r) => bail!("{method} {path}: {}: {}", r.status(), r.text().await?),
                // The coordinator is restarting.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn text(&self, path: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self
                .http
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.key)
                .send()
                .await
            {
                Ok(r) => return Ok(r.text().await?),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_runs_under_random_faults_end_final_once_and_whole() -> anyhow::Result<()> {
    let seed = std::env::var("MUSTER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    println!("chaos seed {seed} (MUSTER_CHAOS_SEED={seed} replays it)");
    let mut rng = Rng(seed);

    let db = TestDb::create().await?;
    let data = tempfile::tempdir()?;
    let lease = LEASE_TTL_SECS.to_string();
    let mut coordinator =
        CoordinatorProcess::start(&db.url, data.path(), &["--lease-ttl", &lease]).await?;
    let grpc = coordinator.grpc;
    let api = Api {
        http: reqwest::Client::new(),
        base: coordinator.url(),
        key: std::fs::read_to_string(data.path().join("admin-api-key"))?
            .trim()
            .to_owned(),
    };

    // Each job appends its run id to a ledger the test owns, then prints
    // numbered lines for a random while.
    let ledger_dir = tempfile::tempdir()?;
    let ledger = ledger_dir.path().join("ledger");
    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: chaos\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        "name: jobs\nactions:\n  - name: work\n    script:\n      - echo \"$MUSTER_RUN_ID\" >> \"$EXTRA_VARS_LEDGER\"\n      - for i in $(seq 1 \"$EXTRA_VARS_LINES\"); do echo \"line $i\"; sleep 0.05; done\n",
    )?;
    let bundle = muster_common::bundle::Bundle::from_dir(ws.path())?.to_tar_gz();
    let pushed = api
        .http
        .post(format!("{}/api/v1/workspaces/", api.base))
        .bearer_auth(&api.key)
        .header("Content-Type", "application/gzip")
        .body(bundle)
        .send()
        .await?;
    anyhow::ensure!(
        pushed.status().is_success(),
        "push: {}",
        pushed.text().await?
    );

    // Runners, each behind a proxy the test can cut.
    let mut proxies = Vec::new();
    let mut runners: Vec<RunnerProcess> = Vec::new();
    let target: std::net::SocketAddr = format!("127.0.0.1:{grpc}").parse()?;
    for _ in 0..RUNNERS {
        let proxy = Proxy::start(target).await?;
        let token = api
            .call(
                reqwest::Method::POST,
                "/api/v1/runners/join-tokens/",
                Some(json!({})),
            )
            .await?;
        let runner = start_runner(&api, &proxy, &token).await?;
        proxies.push(proxy);
        runners.push(runner);
    }

    let mut ids = Vec::new();
    let mut faults: HashMap<&str, usize> = HashMap::new();
    let began = Instant::now();
    while ids.len() < RUNS {
        // A burst of runs, then perhaps a fault.
        for _ in 0..(1 + rng.below(8)) {
            if ids.len() == RUNS {
                break;
            }
            let lines = 1 + rng.below(30);
            let run = api
                .call(
                    reqwest::Method::POST,
                    "/api/v1/workspaces/chaos/actions",
                    Some(json!({"block": "jobs", "action": "work",
                                "parameters": {"extra_vars": {"ledger": ledger, "lines": lines}}})),
                )
                .await?;
            ids.push(run["id"].as_str().context("no id")?.to_owned());
        }
        let victim = rng.below(RUNNERS as u64) as usize;
        match rng.below(10) {
            0 => {
                *faults.entry("runner killed and restarted").or_default() += 1;
                runners[victim].kill().await?;
                tokio::time::sleep(Duration::from_millis(rng.below(3000))).await;
                runners[victim].restart()?;
            }
            1 => {
                *faults.entry("runner frozen and thawed").or_default() += 1;
                // A runner that already exited has nothing to freeze.
                let pid = runners[victim].child.id();
                let _ = pid.map(|pid| signal(pid, "-STOP"));
                tokio::time::sleep(Duration::from_millis(500 + rng.below(8000))).await;
                let _ = pid.map(|pid| signal(pid, "-CONT"));
            }
            2 => {
                *faults.entry("network cut and restored").or_default() += 1;
                proxies[victim].cut();
                tokio::time::sleep(Duration::from_millis(500 + rng.below(10_000))).await;
                proxies[victim].restore();
            }
            3 if rng.below(3) == 0 => {
                *faults
                    .entry("coordinator killed and restarted")
                    .or_default() += 1;
                coordinator.kill().await?;
                tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
                coordinator.restart().await?;
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.below(1000))).await,
        }
    }

    // Every run reaches a final state.
    let mut finals: HashMap<String, Value> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while finals.len() < ids.len() {
        for id in &ids {
            if finals.contains_key(id) {
                continue;
            }
            let run = api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/action-runs/{id}/"),
                    None,
                )
                .await?;
            if !matches!(
                run["status"].as_str(),
                Some("queued" | "leased" | "running")
            ) {
                finals.insert(id.clone(), run);
            }
        }
        if Instant::now() > deadline {
            let stuck: Vec<_> = ids.iter().filter(|id| !finals.contains_key(*id)).collect();
            bail!("{} runs never ended (seed {seed}): {stuck:?}", stuck.len());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // None executed twice.
    let ledger_text = std::fs::read_to_string(&ledger).unwrap_or_default();
    let mut executions: HashMap<&str, usize> = HashMap::new();
    for id in ledger_text.lines() {
        *executions.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "runs executed more than once (seed {seed}): {twice:?}"
    );

    // No log with a gap; succeeded runs have every line.
    let mut statuses: HashMap<String, usize> = HashMap::new();
    let mut verified = 0;
    for id in &ids {
        let run = &finals[id];
        let status = run["status"].as_str().unwrap_or("?").to_owned();
        let log = api.text(&format!("/api/v1/action-runs/{id}/logs/")).await?;
        let numbers: Vec<u64> = log
            .lines()
            .filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok())
            .collect();
        assert!(
            numbers.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
            "run {id} ({status}) has a log with a gap or a duplicate (seed {seed}): {numbers:?}"
        );
        if status == "succeeded" {
            assert!(
                executions.get(id.as_str()) == Some(&1),
                "run {id} succeeded without its job running (seed {seed})"
            );
            if run["log"]["verified"] == true {
                verified += 1;
            } else {
                bail!("run {id} succeeded but its log is not verified (seed {seed}): {run}");
            }
        }
        *statuses.entry(status).or_default() += 1;
    }
    println!(
        "chaos: {} runs in {:?}; faults {faults:?}; outcomes {statuses:?}; {} jobs executed, none twice; {verified} logs verified, no gaps",
        ids.len(),
        began.elapsed(),
        executions.len()
    );
    assert!(
        statuses.get("succeeded").copied().unwrap_or(0) > RUNS / 2,
        "most runs succeed despite the faults (seed {seed}): {statuses:?}"
    );

    for runner in &mut runners {
        let _ = runner.kill().await;
    }
    coordinator.kill().await?;
    db.drop_db().await;
    Ok(())
}

async fn start_runner(api: &Api, proxy: &Proxy, token: &Value) -> anyhow::Result<RunnerProcess> {
    RunnerProcess::start(
        &format!("https://127.0.0.1:{}", proxy.addr.port()),
        token["token"].as_str().context("token")?,
        token["ca_cert_hash"].as_str().context("hash")?,
        &["--executor", "process", "--capacity", "4"],
    )
    .await
    .map_err(|e| e.context(format!("coordinator {}", api.base)))
}
