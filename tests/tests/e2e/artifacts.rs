//! Artifacts: files a job writes under its block's artifacts directory are
//! uploaded when it ends, listed and downloadable; files the workspace ships
//! there unchanged are not; over the coordinator's limit they are refused
//! with a clear line in the run's log, and the run's result stands.

use std::time::Duration;

use muster_tests::{TestCoordinator, TestDb};
use serde_json::json;

fn workspace(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blocks/report"))?;
    std::fs::create_dir_all(dir.join("artifacts/blocks/report"))?;
    std::fs::write(
        dir.join("workspace.poly"),
        "name: arts\norganization: acme\n",
    )?;
    std::fs::write(
        dir.join("artifacts/blocks/report/inventory.yml"),
        "all: {}\n",
    )?;
    std::fs::write(
        dir.join("blocks/report/block.poly"),
        r#"name: report
actions:
  - name: write
    script:
      - out="$POLYCRATE_WORKSPACE/artifacts/blocks/$POLYCRATE_BLOCK"
      - mkdir -p "$out/sub"
      - echo "report of $MUSTER_RUN_ID" > "$out/report.txt"
      - printf 'x' > "$out/sub/x.txt"
  - name: huge
    script:
      - head -c 3000000 /dev/urandom > "$POLYCRATE_WORKSPACE/artifacts/blocks/$POLYCRATE_BLOCK/big.bin"
"#,
    )?;
    Ok(())
}

async fn check_artifacts(c: &TestCoordinator, executor: &str) -> anyhow::Result<()> {
    let run_id = c
        .trigger("arts", json!({"block": "report", "action": "write"}))
        .await?;
    let run = c.wait_final(&run_id, Duration::from_secs(120)).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["executor"], executor, "{run}");
    let list = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/artifacts/"),
            None,
        )
        .await?;
    let paths: Vec<&str> = list["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        ["report.txt", "sub/x.txt"],
        "the workspace's own inventory is not an artifact: {list}"
    );
    let report = c
        .http
        .get(c.url(&format!(
            "/api/v1/action-runs/{run_id}/artifacts/report.txt"
        )))
        .bearer_auth(&c.admin_key)
        .send()
        .await?;
    assert_eq!(report.status().as_u16(), 200);
    assert_eq!(report.text().await?, format!("report of {run_id}\n"));
    assert!(c
        .log(&run_id)
        .await?
        .contains("uploaded 2 artifact file(s)"));
    let (code, _) = c
        .call(
            &c.admin_key,
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/artifacts/nothing.txt"),
            None,
        )
        .await?;
    assert_eq!(code, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_uploaded_listed_and_downloadable_from_both_executors() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let c = TestCoordinator::start_with(&db, |config| config.max_artifacts_mib = 1).await?;
    let ws = tempfile::tempdir()?;
    workspace(ws.path())?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "{answer}");

    let docker = c.start_runner(1).await?;
    check_artifacts(&c, "docker").await?;

    // Over the limit: refused, said in the log, the run still succeeds.
    let huge = c
        .trigger("arts", json!({"block": "report", "action": "huge"}))
        .await?;
    let run = c.wait_final(&huge, Duration::from_secs(120)).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    let log = c.log(&huge).await?;
    assert!(
        log.contains("artifacts not uploaded")
            && log.contains("limit of 1 MiB (--max-artifacts-mib)"),
        "{log}"
    );
    let list = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{huge}/artifacts/"),
            None,
        )
        .await?;
    assert_eq!(list["count"], 0, "{list}");
    docker.stop().await;

    let process = c
        .start_runner_configured(|r| r.executor = muster_runner::ExecutorChoice::Process)
        .await?;
    check_artifacts(&c, "process").await?;

    // Another organization sees nothing of them.
    c.admin(
        reqwest::Method::POST,
        "/api/v1/organizations/",
        Some(json!({"name": "beta"})),
    )
    .await?;
    let key = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/api-keys/",
            Some(json!({"name": "b", "identity": "beta-admin", "role": "org_admin", "organization": "beta"})),
        )
        .await?;
    let beta = key["key"].as_str().unwrap_or_default().to_owned();
    let (code, answer) = c
        .call(
            &beta,
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{huge}/artifacts/"),
            None,
        )
        .await?;
    assert_eq!(code, 404, "{answer}");

    process.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
