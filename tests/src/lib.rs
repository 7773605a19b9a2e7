//! Harness for Muster's end-to-end tests: a fresh PostgreSQL database per
//! test, an in-process coordinator on ephemeral loopback ports, in-process
//! runners talking to it over real mTLS, and an HTTP client holding the admin
//! key. Every wait is on a condition with a deadline, never a bare sleep.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use muster_common::bundle::Bundle;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn example_workspace() -> PathBuf {
    repo_root().join("examples/acme-corp-automation")
}

/// A database of its own for one test, dropped by `drop_db`.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<TestDb> {
        let admin_url = std::env::var("MUSTER_TEST_DATABASE_URL").map_err(|_| {
            anyhow!("MUSTER_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts PostgreSQL")
        })?;
        let name = format!("muster_test_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .context("connecting to the test PostgreSQL")?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url);
        let url = format!("{base}/{name}");
        Ok(TestDb {
            admin_url,
            name,
            url,
        })
    }

    pub async fn drop_db(self) {
        if let Ok((client, conn)) =
            tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

/// A coordinator running in this process, and an admin client for it.
pub struct TestCoordinator {
    pub coordinator: muster_coordinator::Coordinator,
    pub data_dir: tempfile::TempDir,
    pub admin_key: String,
    pub http: reqwest::Client,
}

impl TestCoordinator {
    pub async fn start(db: &TestDb) -> anyhow::Result<TestCoordinator> {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(
        db: &TestDb,
        adjust: impl FnOnce(&mut muster_coordinator::Config),
    ) -> anyhow::Result<TestCoordinator> {
        muster_common::telemetry::init();
        let data_dir = tempfile::tempdir()?;
        let mut config =
            muster_coordinator::Config::for_tests(&db.url, data_dir.path().to_path_buf());
        adjust(&mut config);
        let coordinator = muster_coordinator::start(config).await?;
        let admin_key = std::fs::read_to_string(data_dir.path().join("admin-api-key"))
            .context("the coordinator wrote no admin-api-key")?
            .trim()
            .to_owned();
        Ok(TestCoordinator {
            coordinator,
            data_dir,
            admin_key,
            http: reqwest::Client::new(),
        })
    }

    /// A further coordinator on the same database: the database was
    /// bootstrapped by `first`, so it uses that admin key.
    pub async fn start_another(
        db: &TestDb,
        first: &TestCoordinator,
    ) -> anyhow::Result<TestCoordinator> {
        let data_dir = tempfile::tempdir()?;
        let config = muster_coordinator::Config::for_tests(&db.url, data_dir.path().to_path_buf());
        let coordinator = muster_coordinator::start(config).await?;
        if data_dir.path().join("admin-api-key").exists() {
            bail!("a second coordinator on a bootstrapped database wrote another admin key");
        }
        Ok(TestCoordinator {
            coordinator,
            data_dir,
            admin_key: first.admin_key.clone(),
            http: reqwest::Client::new(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.coordinator.http_addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.coordinator.grpc_addr.port())
    }

    /// A JSON request with `key`; returns the status and the parsed body.
    pub async fn call(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self
            .call(&self.admin_key, method.clone(), path, body)
            .await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} answered {status}: {value}");
        }
        Ok(value)
    }

    /// Pushes a workspace directory; returns the answer.
    pub async fn push_dir(&self, key: &str, dir: &Path) -> anyhow::Result<(u16, Value)> {
        let body = Bundle::from_dir(dir)?.to_tar_gz();
        self.push_bytes(key, body).await
    }

    pub async fn push_bytes(&self, key: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(self.url("/api/v1/workspaces/"))
            .bearer_auth(key)
            .header("Content-Type", "application/gzip")
            .body(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Starts an in-process runner enrolled with a fresh join token.
    pub async fn start_runner(&self, capacity: u32) -> anyhow::Result<TestRunner> {
        self.start_runner_with(capacity, &[]).await
    }

    /// Like `start_runner`, with labels (`key=value`).
    pub async fn start_runner_with(
        &self,
        capacity: u32,
        labels: &[&str],
    ) -> anyhow::Result<TestRunner> {
        let token = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/runners/join-tokens/",
                Some(json!({})),
            )
            .await?;
        let data_dir = tempfile::tempdir()?;
        let mut config = muster_runner::Config::for_tests(
            self.grpc_url(),
            token["token"].as_str().unwrap_or_default().to_owned(),
            token["ca_cert_hash"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            data_dir.path().to_path_buf(),
        );
        config.capacity = capacity;
        config.labels = labels.iter().map(|l| l.to_string()).collect();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(muster_runner::run(config, shutdown.clone()));
        let runner = TestRunner {
            shutdown,
            task,
            data_dir,
        };
        // Ready once the coordinator lists one more online runner.
        let before = self.online_runners().await?;
        wait_until(Duration::from_secs(30), "the runner to connect", || async {
            if runner.task.is_finished() {
                bail!("the runner stopped while starting");
            }
            Ok(self.online_runners().await? > before)
        })
        .await?;
        Ok(runner)
    }

    async fn online_runners(&self) -> anyhow::Result<usize> {
        let list = self
            .admin(reqwest::Method::GET, "/api/v1/runners/", None)
            .await?;
        Ok(list["results"]
            .as_array()
            .map(|r| r.iter().filter(|r| r["status"] == "online").count())
            .unwrap_or(0))
    }

    /// Triggers `block action` of a workspace; returns the run id.
    pub async fn trigger(&self, workspace: &str, body: Value) -> anyhow::Result<String> {
        let answer = self
            .admin(
                reqwest::Method::POST,
                &format!("/api/v1/workspaces/{workspace}/actions"),
                Some(body),
            )
            .await?;
        answer["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("trigger answered without an id: {answer}"))
    }

    /// Waits for a run to reach a final status and returns its record.
    pub async fn wait_final(&self, run_id: &str, within: Duration) -> anyhow::Result<Value> {
        let path = format!("/api/v1/action-runs/{run_id}/");
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let run = self.admin(reqwest::Method::GET, &path, None).await?;
            if matches!(
                run["status"].as_str(),
                Some("succeeded" | "failed" | "canceled" | "timed_out" | "lost")
            ) {
                return Ok(run);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("run {run_id} did not finish within {within:?}; last seen: {run}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn log(&self, run_id: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .get(self.url(&format!("/api/v1/action-runs/{run_id}/logs/")))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        Ok(response.text().await?)
    }

    pub async fn stop(self) {
        self.coordinator.shutdown(Duration::from_secs(5)).await;
    }
}

pub struct TestRunner {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub data_dir: tempfile::TempDir,
}

impl TestRunner {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Polls `check` until it says true, failing after `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The built `muster` CLI binary (cargo builds it for the workspace's tests).
pub fn muster_cli() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target dir"))?;
    let cli = dir.join("muster");
    if !cli.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p muster-cli`",
            cli.display()
        );
    }
    Ok(cli)
}
