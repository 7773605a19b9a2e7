//! Faults injected on purpose, with real processes: a runner killed in the
//! middle of a run. The run must not stay `running`, must not run twice
//! unless its action opts in to retries, and its log up to the fault is kept.

use std::time::{Duration, Instant};

use muster_tests::{process_alive, signal, CoordinatorProcess, TestCoordinator, TestDb};
use serde_json::json;

/// The shortest lease the coordinator accepts, so faults show quickly.
const LEASE_TTL_SECS: u64 = 5;

fn workspace(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blocks/jobs"))?;
    std::fs::write(
        dir.join("workspace.poly"),
        "name: faults\norganization: acme\n",
    )?;
    // `hang` never ends by itself. `flaky` hangs on its first attempt (the
    // marker directory does not exist yet) and succeeds on the next.
    std::fs::write(
        dir.join("blocks/jobs/block.poly"),
        r#"name: jobs
actions:
  - name: hang
    script:
      - echo "started as $$"
      - sleep 600
  - name: ticker
    script:
      - echo "ticking as $$"
      - for i in $(seq 1 100000); do echo "tick $i"; sleep 0.2; done
  - name: flaky
    retries: 1
    script:
      - if mkdir "$EXTRA_VARS_MARKER" 2>/dev/null; then echo "first attempt as $$"; sleep 600; fi
      - echo "second attempt done"
"#,
    )?;
    Ok(())
}

/// The pid a job printed after `prefix`, once it has.
async fn job_pid(c: &TestCoordinator, run_id: &str, prefix: &str) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = c.log(run_id).await?;
        if let Some(pid) = log
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|p| p.trim().parse().ok())
        {
            return Ok(pid);
        }
        anyhow::ensure!(Instant::now() < deadline, "the job never started: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends a job process the killed runner left behind.
fn kill_orphan(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

async fn setup() -> anyhow::Result<(TestDb, TestCoordinator, tempfile::TempDir)> {
    let db = TestDb::create().await?;
    let c =
        TestCoordinator::start_with(&db, |config| config.lease_ttl_secs = LEASE_TTL_SECS).await?;
    let ws = tempfile::tempdir()?;
    workspace(ws.path())?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    anyhow::ensure!(status == 201, "push: {answer}");
    Ok((db, c, ws))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runners_run_is_lost_within_the_lease_and_not_run_again() -> anyhow::Result<()> {
    let (db, c, _ws) = setup().await?;
    let mut runner = c.start_runner_process(&["--executor", "process"]).await?;
    let run_id = c
        .trigger("faults", json!({"block": "jobs", "action": "hang"}))
        .await?;
    let pid = job_pid(&c, &run_id, "started as ").await?;

    runner.kill().await?;
    let killed = Instant::now();
    // Another runner is there to take work: a run without retries is not
    // given to it.
    let other = c
        .start_runner_configured(|r| r.executor = muster_runner::ExecutorChoice::Process)
        .await?;
    let run = c
        .wait_final(&run_id, Duration::from_secs(LEASE_TTL_SECS + 5))
        .await?;
    let took = killed.elapsed();
    println!("a killed runner's run was recorded lost {took:?} after the kill (lease {LEASE_TTL_SECS} s)");
    kill_orphan(pid);
    assert_eq!(run["status"], "lost", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap_or("")
            .contains("stopped responding"),
        "the reason is recorded: {run}"
    );
    assert_eq!(run["attempt"], 1, "not run again: {run}");
    assert!(
        c.log(&run_id).await?.contains("started as"),
        "the log up to the kill is kept"
    );
    let running = c
        .admin(
            reqwest::Method::GET,
            "/api/v1/action-runs/?status=running",
            None,
        )
        .await?;
    assert_eq!(running["count"], 0, "no run is left running: {running}");
    let leased = c
        .admin(
            reqwest::Method::GET,
            "/api/v1/action-runs/?status=leased",
            None,
        )
        .await?;
    assert_eq!(leased["count"], 0, "no run is left leased: {leased}");

    other.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_run_whose_action_allows_retries_runs_again_elsewhere() -> anyhow::Result<()> {
    let (db, c, _ws) = setup().await?;
    let mut runner = c.start_runner_process(&["--executor", "process"]).await?;
    let marker = tempfile::tempdir()?;
    let marker = marker.path().join("first-attempt");
    let run_id = c
        .trigger(
            "faults",
            json!({"block": "jobs", "action": "flaky",
                   "parameters": {"extra_vars": {"marker": marker}}}),
        )
        .await?;
    let pid = job_pid(&c, &run_id, "first attempt as ").await?;
    let first = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/"),
            None,
        )
        .await?;

    runner.kill().await?;
    kill_orphan(pid);
    let other = c
        .start_runner_configured(|r| r.executor = muster_runner::ExecutorChoice::Process)
        .await?;
    let run = c
        .wait_final(&run_id, Duration::from_secs(LEASE_TTL_SECS + 30))
        .await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    assert_eq!(
        run["runner_id"].as_str(),
        Some(other_id(&c).await?.as_str())
    );
    assert!(
        run["fencing_token"].as_i64() > first["fencing_token"].as_i64(),
        "the new attempt holds a newer lease: {first} then {run}"
    );
    let log = c.log(&run_id).await?;
    let order = [
        "first attempt as",
        "attempt 2 of this run",
        "second attempt done",
    ]
    .map(|line| log.find(line));
    assert!(
        order.iter().all(Option::is_some) && order.windows(2).all(|w| w[0] < w[1]),
        "one log, both attempts in order: {log}"
    );

    other.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// A runner frozen (SIGSTOP) past its lease loses the run to the
/// coordinator; when it wakes, what it says about the run is refused, it
/// stops the job, and the run's record stays the coordinator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_runner_is_refused_when_it_wakes_and_stops_its_job() -> anyhow::Result<()> {
    frozen_runner("process").await
}

/// The same with the docker executor: the container is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_runner_is_refused_when_it_wakes_and_removes_its_container() -> anyhow::Result<()>
{
    frozen_runner("docker").await
}

async fn frozen_runner(executor: &str) -> anyhow::Result<()> {
    let (db, c, _ws) = setup().await?;
    let mut runner = c.start_runner_process(&["--executor", executor]).await?;
    let run_id = c
        .trigger("faults", json!({"block": "jobs", "action": "ticker"}))
        .await?;
    let job = job_pid(&c, &run_id, "ticking as ").await?;
    let runner_pid = runner.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;

    signal(runner_pid, "-STOP")?;
    let lost = c
        .wait_final(&run_id, Duration::from_secs(LEASE_TTL_SECS + 5))
        .await;
    signal(runner_pid, "-CONT")?;
    let lost = lost?;
    assert_eq!(lost["status"], "lost", "{lost}");

    // Awake again: it learns its lease is gone and stops the job.
    muster_tests::wait_until(
        Duration::from_secs(30),
        "the frozen runner to stop its job",
        || async {
            Ok(if executor == "docker" {
                muster_tests::containers_of_run(&run_id)?.is_empty()
            } else {
                !process_alive(job)
            })
        },
    )
    .await
    .map_err(|e| e.context(runner.log()))?;
    let after = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/"),
            None,
        )
        .await?;
    assert_eq!(
        after["status"], "lost",
        "the coordinator's outcome stands: {after}"
    );
    assert_eq!(after["finished_at"], lost["finished_at"], "{after}");
    assert_eq!(after["exit_code"], serde_json::Value::Null, "{after}");
    let log = c.log(&run_id).await?;
    let ticks: Vec<u64> = log
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "the stored log has no gap and no duplicate"
    );
    assert!(
        runner.log().contains("refused"),
        "the runner was told its messages are refused:\n{}",
        runner.log()
    );

    runner.kill().await?;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// The id of the one runner that is online.
async fn other_id(c: &TestCoordinator) -> anyhow::Result<String> {
    let list = c
        .admin(reqwest::Method::GET, "/api/v1/runners/", None)
        .await?;
    list["results"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["status"] == "online")
        .and_then(|r| r["id"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("no runner online: {list}"))
}

/// The coordinator killed with SIGKILL in the middle of a run and started
/// again: the runner reconnects, resends what was not acknowledged, and the
/// run completes with its log byte for byte as the job printed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_run_loses_nothing() -> anyhow::Result<()> {
    const LINES: usize = 300;
    let db = TestDb::create().await?;
    let data = tempfile::tempdir()?;
    let mut coordinator = CoordinatorProcess::start(&db.url, data.path(), &[]).await?;
    let grpc = coordinator.grpc;
    let key = std::fs::read_to_string(data.path().join("admin-api-key"))?
        .trim()
        .to_owned();
    let base = coordinator.url();
    let client = reqwest::Client::new();
    let api = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{base}{path}"))
            .bearer_auth(&key)
    };

    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: restart\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        format!("name: jobs\nactions:\n  - name: count\n    script:\n      - for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.02; done\n"),
    )?;
    let bundle = muster_common::bundle::Bundle::from_dir(ws.path())?.to_tar_gz();
    let pushed = api(reqwest::Method::POST, "/api/v1/workspaces/")
        .header("Content-Type", "application/gzip")
        .body(bundle)
        .send()
        .await?;
    assert_eq!(pushed.status().as_u16(), 201);

    let token: serde_json::Value = api(reqwest::Method::POST, "/api/v1/runners/join-tokens/")
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    let runner_dir = tempfile::tempdir()?;
    let mut config = muster_runner::Config::for_tests(
        format!("https://127.0.0.1:{grpc}"),
        token["token"].as_str().unwrap_or_default().to_owned(),
        token["ca_cert_hash"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        runner_dir.path().to_path_buf(),
    );
    config.executor = muster_runner::ExecutorChoice::Process;
    let stop = tokio_util::sync::CancellationToken::new();
    let runner = tokio::spawn(muster_runner::run(config, stop.clone()));

    let run: serde_json::Value = api(reqwest::Method::POST, "/api/v1/workspaces/restart/actions")
        .json(&json!({"block": "jobs", "action": "count"}))
        .send()
        .await?
        .json()
        .await?;
    let run_id = run["id"].as_str().unwrap_or_default().to_owned();
    let logs = format!("/api/v1/action-runs/{run_id}/logs/");
    muster_tests::wait_until(
        Duration::from_secs(60),
        "the job to be under way",
        || async {
            let log = api(reqwest::Method::GET, &logs)
                .send()
                .await?
                .text()
                .await?;
            Ok(log.contains("line 20\n"))
        },
    )
    .await?;

    coordinator.kill().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    coordinator.restart().await?;

    let path = format!("/api/v1/action-runs/{run_id}/");
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        last = api(reqwest::Method::GET, &path)
            .send()
            .await?
            .json()
            .await?;
        if !matches!(
            last["status"].as_str(),
            Some("queued" | "leased" | "running")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last["status"], "succeeded", "{last}");
    let log = api(reqwest::Method::GET, &logs)
        .send()
        .await?
        .text()
        .await?;
    let expected: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        log, expected,
        "the stored log is exactly what the job printed"
    );
    assert_eq!(
        last["log"]["verified"], true,
        "the runner's checksum matches: {last}"
    );
    assert_eq!(last["log"]["bytes"], expected.len(), "{last}");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), runner).await;
    drop(coordinator);
    db.drop_db().await;
    Ok(())
}

/// The network between runner and coordinator cut for 10 s in the middle
/// of a run (shorter than the lease): the run completes on the same runner
/// and attempt, and its log is complete and verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_shorter_than_the_lease_loses_nothing() -> anyhow::Result<()> {
    const LINES: usize = 400;
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?; // the default 30 s lease
    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: cut\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        format!("name: jobs\nactions:\n  - name: count\n    script:\n      - for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.04; done\n"),
    )?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "{answer}");
    let proxy = muster_tests::Proxy::start(c.coordinator.grpc_addr).await?;
    let proxied = format!("https://127.0.0.1:{}", proxy.addr.port());
    let runner = c
        .start_runner_configured(|r| {
            r.coordinator = proxied;
            r.executor = muster_runner::ExecutorChoice::Process;
        })
        .await?;
    let run_id = c
        .trigger("cut", json!({"block": "jobs", "action": "count"}))
        .await?;
    muster_tests::wait_until(
        Duration::from_secs(60),
        "the job to be under way",
        || async { Ok(c.log(&run_id).await?.contains("line 10\n")) },
    )
    .await?;

    proxy.cut();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/"),
            None,
        )
        .await?;
    proxy.restore();

    let run = c.wait_final(&run_id, Duration::from_secs(60)).await?;
    assert_eq!(
        during["status"], "running",
        "no false lost during the cut: {during}"
    );
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    let expected: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        c.log(&run_id).await?,
        expected,
        "the log is complete and in order"
    );
    assert_eq!(run["log"]["verified"], true, "{run}");

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// SIGTERM to a runner: it takes no new lease, lets its running job finish
/// within the drain timeout, reports it, and exits 0; what was queued waits
/// for another runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stopped_with_sigterm_drains_its_runs_and_exits() -> anyhow::Result<()> {
    let (db, c, ws) = setup().await?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        "name: jobs\nactions:\n  - name: short\n    script:\n      - for i in 1 2 3 4 5 6 7 8; do echo \"step $i\"; sleep 0.25; done\n",
    )?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "{answer}");
    let mut runner = c
        .start_runner_process(&[
            "--executor",
            "process",
            "--capacity",
            "1",
            "--drain-timeout",
            "30",
        ])
        .await?;
    let first = c
        .trigger("faults", json!({"block": "jobs", "action": "short"}))
        .await?;
    job_started(&c, &first, "step 1").await?;
    let second = c
        .trigger("faults", json!({"block": "jobs", "action": "short"}))
        .await?;

    signal(
        runner.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?,
        "-TERM",
    )?;
    let exit = tokio::time::timeout(Duration::from_secs(30), runner.child.wait())
        .await
        .map_err(|_| anyhow::anyhow!("the runner did not exit within 30 s:\n{}", runner.log()))??;
    assert!(
        exit.success(),
        "the runner exits 0 after draining: {exit}\n{}",
        runner.log()
    );
    let run = c.wait_final(&first, Duration::from_secs(5)).await?;
    assert_eq!(
        run["status"], "succeeded",
        "the running job was let finish: {run}"
    );
    assert!(c.log(&first).await?.contains("step 8"));
    let queued = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{second}/"),
            None,
        )
        .await?;
    assert_eq!(
        queued["status"], "queued",
        "no new lease was taken: {queued}"
    );

    c.stop().await;
    db.drop_db().await;
    Ok(())
}

async fn job_started(c: &TestCoordinator, run_id: &str, line: &str) -> anyhow::Result<()> {
    muster_tests::wait_until(Duration::from_secs(60), "the job to start", || async {
        Ok(c.log(run_id).await?.contains(line))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_given_a_work_dir_runs_jobs_there_and_keeps_it_to_itself() -> anyhow::Result<()> {
    let (db, c, _ws) = setup().await?;
    // A tmpfs where the machine has one, as an operator would choose.
    let parent = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm")?,
        false => tempfile::tempdir()?,
    };
    let work = parent.path().join("work");
    let work_arg = work.to_str().expect("a UTF-8 temporary path");
    let mut runner = c
        .start_runner_process(&["--executor", "process", "--work-dir", work_arg])
        .await?;
    let run_id = c
        .trigger("faults", json!({"block": "jobs", "action": "hang"}))
        .await?;
    let pid = job_pid(&c, &run_id, "started as ").await?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))?;
    assert!(
        cwd.starts_with(work.join(&run_id)),
        "the job runs in its scratch directory under --work-dir: {}",
        cwd.display()
    );

    // A second runner process given the same directory would remove the
    // first one's runs at start: it refuses instead, before enrolling.
    let second = c
        .start_runner_process(&["--executor", "process", "--work-dir", work_arg])
        .await;
    let error = format!(
        "{:#}",
        second.err().expect("the second runner must not start")
    );
    assert!(error.contains("in use by another runner"), "{error}");

    // A directory holding someone else's files is refused, and kept.
    std::fs::write(parent.path().join("notes.txt"), b"mine")?;
    let foreign = parent.path().to_str().expect("a UTF-8 temporary path");
    let refused = c
        .start_runner_process(&["--executor", "process", "--work-dir", foreign])
        .await;
    let error = format!(
        "{:#}",
        refused.err().expect("a shared directory is refused")
    );
    assert!(
        error.contains("'notes.txt'") || error.contains("'work'"),
        "{error}"
    );
    assert!(parent.path().join("notes.txt").exists());

    c.admin(
        reqwest::Method::POST,
        &format!("/api/v1/action-runs/{run_id}/cancel/"),
        None,
    )
    .await?;
    let run = c.wait_final(&run_id, Duration::from_secs(30)).await?;
    assert_eq!(run["status"], "canceled", "{run}");
    muster_tests::wait_until(
        Duration::from_secs(10),
        "the scratch directory to go",
        || {
            let work = work.clone();
            async move {
                let left: Vec<_> = std::fs::read_dir(&work)?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()?;
                Ok(left == [std::ffi::OsString::from(".muster-work")])
            }
        },
    )
    .await?;

    runner.kill().await?;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
