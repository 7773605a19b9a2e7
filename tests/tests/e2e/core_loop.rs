//! The product's spine: a workspace is pushed, CI triggers an action with one
//! HTTP call, an enrolled runner executes it in a container, and the result and
//! the whole log are recorded.

use std::collections::HashMap;
use std::time::Duration;

use muster_tests::{example_workspace, muster_cli, TestCoordinator, TestDb};
use serde_json::json;

const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// The trigger body exactly as DESIGN.md shows it.
const DESIGN_TRIGGER: &str = r#"{"block": "linux-patch", "action": "patch", "reason": "Nightly patch run from CI",
   "parameters": {"extra_vars": {"patch_profile": "security-only"}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_workspace_runs_in_a_container_over_mtls() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let (status, ws) = c.push_dir(&c.admin_key, &example_workspace()).await?;
    assert_eq!(status, 201, "push answered {ws}");
    assert_eq!(ws["organization"], "acme");
    assert!(ws["digest"].as_str().unwrap().starts_with("sha256:"));
    let runner = c.start_runner(1).await?;

    // The curl body from DESIGN.md, verbatim, as CI sends it.
    let response = c
        .http
        .post(c.url("/api/v1/workspaces/acme-corp-automation/actions"))
        .bearer_auth(&c.admin_key)
        .header("Content-Type", "application/json")
        .header("User-Agent", "gitlab-runner 17.0 (GitLab CI)")
        .body(DESIGN_TRIGGER)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 202);
    let accepted: serde_json::Value = response.json().await?;
    assert_eq!(accepted["status"], "queued");
    assert!(accepted["logs_url"].as_str().unwrap().ends_with("/logs/"));
    let id = accepted["id"].as_str().unwrap().to_owned();

    let run = c.wait_final(&id, RUN_DEADLINE).await?;
    let log = c.log(&id).await?;
    assert_eq!(run["status"], "succeeded", "run: {run}\nlog:\n{log}");
    assert_eq!(
        run["log"]["verified"], true,
        "the stored log matches the runner's byte count and SHA-256: {run}"
    );
    assert_eq!(run["log"]["bytes"], log.len(), "{run}");
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["executor"], "docker");
    assert_eq!(run["image"], "muster/ansible:bookworm");
    assert!(
        run["image_digest"].as_str().unwrap().starts_with("sha256:"),
        "{run}"
    );
    assert_eq!(run["bundle_digest"], ws["digest"]);
    assert_eq!(run["block_version"], "0.1.0");
    assert_eq!(run["trigger"]["ci"], "gitlab-ci");
    assert_eq!(run["reason"], "Nightly patch run from CI");
    for field in ["created_at", "leased_at", "started_at", "finished_at"] {
        let t = run[field].as_str().unwrap_or_default();
        assert!(
            t.contains('.') && t.ends_with('Z'),
            "{field} is not RFC 3339 with milliseconds: {t}"
        );
    }
    assert!(log.contains("PLAY RECAP"), "log:\n{log}");
    assert!(log.contains("TASK [Show patch profile]"), "log:\n{log}");
    // extra_vars reach the playbook as top-level variables.
    assert!(log.contains("security-only"), "log:\n{log}");

    // The CLI as a pipeline uses it: --wait prints the log and exits 0.
    let cli = muster_cli()?;
    let out = tokio::process::Command::new(&cli)
        .args([
            "run",
            "linux-patch",
            "patch",
            "-w",
            "acme-corp-automation",
            "--wait",
            "-e",
            "patch_profile=full",
        ])
        .env("MUSTER_URL", c.url(""))
        .env("MUSTER_API_KEY", &c.admin_key)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PLAY RECAP"), "{stdout}");

    // The run is listed, filterable, paginated.
    let list = c
        .admin(
            reqwest::Method::GET,
            "/api/v1/action-runs/?workspace=acme-corp-automation&status=succeeded&page_size=1",
            None,
        )
        .await?;
    assert_eq!(list["count"], 2);
    assert_eq!(list["results"].as_array().unwrap().len(), 1);
    assert!(list["next"].as_str().unwrap().contains("page=2"));

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_playbook_fails_with_its_exit_code() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    c.push_dir(&c.admin_key, &example_workspace()).await?;
    let runner = c.start_runner(1).await?;

    let id = c
        .trigger(
            "acme-corp-automation",
            json!({"block": "linux-patch", "action": "broken"}),
        )
        .await?;
    let run = c.wait_final(&id, RUN_DEADLINE).await?;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        run["exit_code"], 2,
        "ansible-playbook exits 2 when a task fails: {run}"
    );
    assert!(c.log(&id).await?.contains("PLAY RECAP"));

    let out = tokio::process::Command::new(muster_cli()?)
        .args([
            "run",
            "linux-patch",
            "broken",
            "-w",
            "acme-corp-automation",
            "--wait",
        ])
        .env("MUSTER_URL", c.url(""))
        .env("MUSTER_API_KEY", &c.admin_key)
        .output()
        .await?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// Two coordinators share one database, each holds one runner of capacity 1,
/// and five runs are queued: each runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_five_runs_each_executed_exactly_once() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let a = TestCoordinator::start(&db).await?;
    // The second coordinator shares the database (and so its CA) but has
    // its own data dir.
    let b = TestCoordinator::start_another(&db, &a).await?;
    a.push_dir(&a.admin_key, &example_workspace()).await?;
    let runner_a = a.start_runner(1).await?;
    let runner_b = b.start_runner(1).await?;

    let mut ids = Vec::new();
    for i in 0..5 {
        let trigger = if i % 2 == 0 { &a } else { &b };
        ids.push(
            trigger
                .trigger(
                    "acme-corp-automation",
                    json!({"block": "linux-patch", "action": "hello"}),
                )
                .await?,
        );
    }
    let mut by_runner: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let run = a.wait_final(id, RUN_DEADLINE).await?;
        let log = a.log(id).await?;
        assert_eq!(run["status"], "succeeded", "{run}\n{log}");
        assert_eq!(run["attempt"], 1, "a run was leased more than once: {run}");
        let marker = format!("Muster run {id}");
        assert_eq!(
            log.matches(&marker).count(),
            1,
            "run {id} executed other than once:\n{log}"
        );
        *by_runner
            .entry(run["runner"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    assert_eq!(by_runner.values().sum::<usize>(), 5);
    println!("runs per runner: {by_runner:?}");

    runner_a.stop().await;
    runner_b.stop().await;
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
    Ok(())
}

/// A run that requires runner labels goes only to a runner that has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_go_only_to_runners_with_the_labels_they_require() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    c.push_dir(&c.admin_key, &example_workspace()).await?;
    let runner = c.start_runner_with(2, &["site=fra1", "os=linux"]).await?;

    let elsewhere = c
        .trigger("acme-corp-automation", json!({"block": "linux-patch", "action": "hello", "parameters": {"runner_labels": {"site": "ber1"}}}))
        .await?;
    let here = c
        .trigger("acme-corp-automation", json!({"block": "linux-patch", "action": "hello", "parameters": {"runner_labels": {"site": "fra1"}}}))
        .await?;
    let run = c.wait_final(&here, RUN_DEADLINE).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    // Claims take the oldest run a runner may take: leasing the later run
    // means the earlier one was passed over for its labels, not missed.
    let waiting = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{elsewhere}/"),
            None,
        )
        .await?;
    assert_eq!(waiting["status"], "queued", "{waiting}");
    assert!(waiting["runner"].is_null());

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// A busy runner's freed slot is refilled in the transaction that records
/// the result of the run that held it. Working through a queue that way, a
/// runner of capacity 2 never holds a third run, and every run executes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_runner_works_through_its_queue_never_past_its_capacity() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    // Each job marks itself in `holding` while it runs and writes how many
    // marks it saw to `seen`.
    let shared = tempfile::tempdir()?;
    let holding = shared.path().join("holding");
    let seen = shared.path().join("seen");
    std::fs::create_dir(&holding)?;
    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/busy"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: busy-ws\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/busy/block.poly"),
        format!(
            "name: busy\nversion: 0.1.0\nactions:\n  - name: hold\n    script:\n      \
             - mkdir {h}/$MUSTER_RUN_ID\n      - ls {h} | wc -l >> {s}\n      \
             - sleep 0.3\n      - rmdir {h}/$MUSTER_RUN_ID\n",
            h = holding.display(),
            s = seen.display()
        ),
    )?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "push answered {answer}");
    // Queued before the runner connects, so that each slot is refilled from
    // a queue.
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(
            c.trigger("busy-ws", json!({"block": "busy", "action": "hold"}))
                .await?,
        );
    }
    let runner = c
        .start_runner_configured(|r| {
            r.executor = muster_runner::ExecutorChoice::Process;
            r.capacity = 2;
        })
        .await?;
    for id in &ids {
        let run = c.wait_final(id, RUN_DEADLINE).await?;
        let log = c.log(id).await?;
        assert_eq!(run["status"], "succeeded", "{run}\n{log}");
        assert_eq!(run["attempt"], 1, "a run was leased more than once: {run}");
    }
    let counts: Vec<usize> = std::fs::read_to_string(&seen)?
        .lines()
        .map(|l| l.trim().parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(counts.len(), 12, "every run executed once: {counts:?}");
    let most = counts.iter().copied().max().unwrap_or_default();
    assert!(
        most <= 2,
        "a runner of capacity 2 held {most} runs at once: {counts:?}"
    );
    assert_eq!(most, 2, "both slots were used: {counts:?}");

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
