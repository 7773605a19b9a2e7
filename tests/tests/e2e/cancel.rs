//! Cancel, as CI or a person asks for it: a queued run ends at once; a
//! running container job is stopped (SIGTERM first) and ends `canceled` with
//! its log up to that point, and its container is gone.

use std::time::{Duration, Instant};

use muster_tests::{muster_cli, TestCoordinator, TestDb};
use serde_json::json;

/// Pushes `slow-ws`: its `sleep` action runs until it is stopped, and says
/// so on SIGTERM; its `quick` action says hello and ends.
pub(crate) async fn push_slow_workspace(c: &TestCoordinator) -> anyhow::Result<()> {
    let ws = tempfile::tempdir()?;
    slow_workspace(ws.path())?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    anyhow::ensure!(status == 201, "pushing slow-ws answered {status}: {answer}");
    Ok(())
}

fn slow_workspace(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blocks/slow"))?;
    std::fs::write(
        dir.join("workspace.poly"),
        "name: slow-ws\norganization: acme\n",
    )?;
    std::fs::write(
        dir.join("blocks/slow/block.poly"),
        "name: slow\nversion: 0.1.0\nactions:\n  - name: sleep\n    script:\n      - trap 'echo got SIGTERM; exit 143' TERM\n      - echo started\n      - sleep 600 & wait\n  - name: bounded\n    timeout: 2\n    script:\n      - echo started\n      - sleep 600\n  - name: quick\n    script:\n      - echo hello\n",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_queued_runs_at_once_and_stops_running_containers() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    push_slow_workspace(&c).await?;
    let runner = c.start_runner(1).await?;
    let body = json!({"block": "slow", "action": "sleep"});
    let running = c.trigger("slow-ws", body.clone()).await?;
    let queued = c.trigger("slow-ws", body).await?;

    // The first run is running once its log says so.
    muster_tests::wait_until(Duration::from_secs(60), "the job to start", || async {
        Ok(c.log(&running).await?.contains("started"))
    })
    .await?;

    // The queued one: canceled at once, and never runs.
    let (code, run) = c
        .call(
            &c.admin_key,
            reqwest::Method::POST,
            &format!("/api/v1/action-runs/{queued}/cancel/"),
            None,
        )
        .await?;
    assert_eq!(code, 200, "{run}");
    assert_eq!(run["status"], "canceled", "{run}");
    assert!(run["started_at"].is_null(), "{run}");

    // The running one, with the CLI: its runner stops the container.
    let asked = Instant::now();
    let cli = tokio::process::Command::new(muster_cli()?)
        .args(["runs", "cancel", &running, "--wait"])
        .env("MUSTER_URL", c.url(""))
        .env("MUSTER_API_KEY", &c.admin_key)
        .output()
        .await?;
    let took = asked.elapsed();
    assert_eq!(
        cli.status.code(),
        Some(130),
        "muster runs cancel --wait exits 130 for a canceled run: {cli:?}"
    );
    let run = c.wait_final(&running, Duration::from_secs(30)).await?;
    assert_eq!(run["status"], "canceled", "{run}");
    assert!(run["cancel_requested_at"].is_string(), "{run}");
    // The job handles SIGTERM, so it ends well within the 10 s grace.
    assert!(took < Duration::from_secs(12), "cancel took {took:?}");
    println!("cancel of a running container job took {took:?}");
    let log = c.log(&running).await?;
    assert!(
        log.contains("started"),
        "the log up to the cancel is kept: {log}"
    );
    assert!(log.contains("got SIGTERM"), "SIGTERM came first: {log}");
    // Removed right after the runner reports the result.
    muster_tests::wait_until(Duration::from_secs(10), "the container to go", || async {
        Ok(muster_tests::containers_of_run(&running)?.is_empty())
    })
    .await?;

    // An ended run cannot be canceled again.
    let (code, answer) = c
        .call(
            &c.admin_key,
            reqwest::Method::POST,
            &format!("/api/v1/action-runs/{running}/cancel/"),
            None,
        )
        .await?;
    assert_eq!(code, 409, "{answer}");
    assert!(answer.to_string().contains("already ended"), "{answer}");

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// An action's `timeout:` stops its container (here a job that ignores
/// SIGTERM, so the grace runs out and SIGKILL ends it) and the run ends
/// `timed_out`; `parameters.timeout` overrides it per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_job_past_its_timeout_ends_timed_out() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let ws = tempfile::tempdir()?;
    slow_workspace(ws.path())?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "{answer}");
    let runner = c.start_runner(2).await?;
    let by_action = c
        .trigger("slow-ws", json!({"block": "slow", "action": "bounded"}))
        .await?;
    let by_trigger = c
        .trigger(
            "slow-ws",
            json!({"block": "slow", "action": "sleep", "parameters": {"timeout": 1}}),
        )
        .await?;
    for (id, secs) in [(&by_action, 2), (&by_trigger, 1)] {
        let run = c.wait_final(id, Duration::from_secs(60)).await?;
        assert_eq!(run["status"], "timed_out", "{run}");
        assert_eq!(run["timeout"], secs, "{run}");
        let log = c.log(id).await?;
        assert!(log.contains("started"), "{log}");
        assert!(log.contains(&format!("timed out after {secs} s")), "{log}");
        muster_tests::wait_until(Duration::from_secs(10), "the container to go", || async {
            Ok(muster_tests::containers_of_run(id)?.is_empty())
        })
        .await?;
    }
    let (code, answer) = c
        .call(
            &c.admin_key,
            reqwest::Method::POST,
            "/api/v1/workspaces/slow-ws/actions",
            Some(json!({"block": "slow", "action": "sleep", "parameters": {"timeout": "soon"}})),
        )
        .await?;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.to_string().contains("parameters.timeout"),
        "{answer}"
    );

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
