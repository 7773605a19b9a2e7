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

pub mod monitoring;

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
            muster_coordinator::Config::for_tests(Some(&db.url), data_dir.path().to_path_buf());
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
        Self::start_another_with(db, first, |_| {}).await
    }

    /// Like `start_another`, with its configuration adjusted.
    pub async fn start_another_with(
        db: &TestDb,
        first: &TestCoordinator,
        adjust: impl FnOnce(&mut muster_coordinator::Config),
    ) -> anyhow::Result<TestCoordinator> {
        let data_dir = tempfile::tempdir()?;
        let mut config =
            muster_coordinator::Config::for_tests(Some(&db.url), data_dir.path().to_path_buf());
        adjust(&mut config);
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
        self.start_runner_from(json!({}), capacity, labels).await
    }

    /// Like `start_runner`, for one organization's runs only (the runners
    /// above serve every organization).
    pub async fn start_runner_of(
        &self,
        organization: &str,
        capacity: u32,
    ) -> anyhow::Result<TestRunner> {
        self.start_runner_from(json!({ "organization": organization }), capacity, &[])
            .await
    }

    /// Starts a runner enrolled with a join token created with `token_body`.
    async fn start_runner_from(
        &self,
        token_body: Value,
        capacity: u32,
        labels: &[&str],
    ) -> anyhow::Result<TestRunner> {
        let (mut config, data_dir) = self.runner_config(token_body).await?;
        config.capacity = capacity;
        config.labels = labels.iter().map(|l| l.to_string()).collect();
        self.spawn_runner(config, data_dir).await
    }

    /// A runner configuration with a fresh join token created with
    /// `token_body` and a fresh data directory, to start or only enroll.
    pub async fn runner_config(
        &self,
        token_body: Value,
    ) -> anyhow::Result<(muster_runner::Config, tempfile::TempDir)> {
        let token = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/runners/join-tokens/",
                Some(token_body),
            )
            .await?;
        let data_dir = tempfile::tempdir()?;
        let config = muster_runner::Config::for_tests(
            self.grpc_url(),
            token["token"].as_str().unwrap_or_default().to_owned(),
            token["ca_cert_hash"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            data_dir.path().to_path_buf(),
        );
        Ok((config, data_dir))
    }

    /// Stops a runner and starts it again on its data directory, as a
    /// restarted runner process: it connects with the identity stored there.
    pub async fn restart_runner(&self, runner: TestRunner) -> anyhow::Result<TestRunner> {
        self.take_runner(self, runner).await
    }

    /// Stops `runner`, connected to `from`, and starts it again on its data
    /// directory connecting to this coordinator instead, with the identity
    /// it enrolled with there.
    pub async fn take_runner(
        &self,
        from: &TestCoordinator,
        runner: TestRunner,
    ) -> anyhow::Result<TestRunner> {
        let id = runner.runner_id()?;
        runner.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), runner.task)
            .await
            .context("the runner did not stop within 15 s")???;
        // Offline first, so the old stream's end is not taken for the new one's.
        wait_until(
            Duration::from_secs(10),
            "the runner to go offline",
            || async { Ok(!from.runner_online(&id).await?) },
        )
        .await?;
        let mut config = runner.config;
        config.coordinator = self.grpc_url();
        self.spawn_runner(config, runner.data_dir).await
    }

    async fn spawn_runner(
        &self,
        config: muster_runner::Config,
        data_dir: tempfile::TempDir,
    ) -> anyhow::Result<TestRunner> {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(muster_runner::run(config.clone(), shutdown.clone()));
        let runner = TestRunner {
            shutdown,
            task,
            data_dir,
            config,
        };
        // Ready once the runner has enrolled (its identity file names its id)
        // and the coordinator lists that runner online.
        wait_until(Duration::from_secs(30), "the runner to connect", || async {
            if runner.task.is_finished() {
                bail!("the runner stopped while starting");
            }
            let Ok(identity) = runner.identity() else {
                return Ok(false);
            };
            let Some(id) = identity["runner_id"].as_str() else {
                return Ok(false);
            };
            self.runner_online(id).await
        })
        .await?;
        Ok(runner)
    }

    /// An in-process runner with its configuration adjusted.
    pub async fn start_runner_configured(
        &self,
        adjust: impl FnOnce(&mut muster_runner::Config),
    ) -> anyhow::Result<TestRunner> {
        let (mut config, data_dir) = self.runner_config(json!({})).await?;
        adjust(&mut config);
        self.spawn_runner(config, data_dir).await
    }

    /// A runner in a process of its own (the built `muster-runner`), for
    /// tests that kill, freeze or cut it off. `args` are extra flags.
    pub async fn start_runner_process(&self, args: &[&str]) -> anyhow::Result<RunnerProcess> {
        self.start_runner_process_via(&self.grpc_url(), args).await
    }

    /// Like `start_runner_process`, reaching the coordinator at `coordinator`
    /// (a proxy in front of it, say).
    pub async fn start_runner_process_via(
        &self,
        coordinator: &str,
        args: &[&str],
    ) -> anyhow::Result<RunnerProcess> {
        let (config, _unused) = self.runner_config(json!({})).await?;
        let token = config
            .join_token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .unwrap_or_default();
        let hash = config.ca_cert_hash.clone().unwrap_or_default();
        let runner = RunnerProcess::start(coordinator, &token, &hash, args).await?;
        wait_until(Duration::from_secs(30), "the runner to connect", || async {
            self.runner_online(&runner.id).await
        })
        .await
        .with_context(|| runner.log())?;
        Ok(runner)
    }

    /// Whether the coordinator lists runner `id` as online.
    pub async fn runner_online(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .runner_listed(id)
            .await?
            .is_some_and(|r| r["status"] == "online"))
    }

    /// Runner `id` as `GET /api/v1/runners/` lists it to the admin.
    pub async fn runner_listed(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let mut path = "/api/v1/runners/?page_size=100".to_owned();
        loop {
            let list = self.admin(reqwest::Method::GET, &path, None).await?;
            let found = list["results"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["id"] == id);
            if let Some(runner) = found {
                return Ok(Some(runner.clone()));
            }
            match list["next"].as_str() {
                Some(next) => {
                    path = next
                        .split_once("/api/")
                        .map(|(_, rest)| format!("/api/{rest}"))
                        .unwrap_or_default()
                }
                None => return Ok(None),
            }
        }
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
    pub config: muster_runner::Config,
}

impl TestRunner {
    /// The runner's stored identity (`identity.json`): its id, certificate,
    /// key and the coordinator's CA.
    pub fn identity(&self) -> anyhow::Result<Value> {
        let path = self.data_dir.path().join("identity.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn runner_id(&self) -> anyhow::Result<String> {
        self.identity()?["runner_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("identity.json names no runner"))
    }

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

/// The built `muster` CLI binary (scripts/test.sh builds every binary first).
pub fn muster_cli() -> anyhow::Result<PathBuf> {
    built_binary("muster")
}

/// A binary of the workspace, built next to the test binaries.
pub fn built_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target dir"))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// A runner process started by `TestCoordinator::start_runner_process`.
pub struct RunnerProcess {
    pub child: tokio::process::Child,
    pub data_dir: tempfile::TempDir,
    pub id: String,
    args: Vec<String>,
}

impl RunnerProcess {
    /// Starts a runner process that enrolls at `coordinator` with a join
    /// token; returns once it has enrolled.
    pub async fn start(
        coordinator: &str,
        join_token: &str,
        ca_cert_hash: &str,
        args: &[&str],
    ) -> anyhow::Result<RunnerProcess> {
        let data_dir = tempfile::tempdir()?;
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--coordinator".into(), coordinator.into()]);
        args.extend(["--ca-cert-hash".into(), ca_cert_hash.into()]);
        let mut child = Self::spawn(data_dir.path(), &args, Some(join_token))?;
        let identity = data_dir.path().join("identity.json");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let id = loop {
            let id = std::fs::read_to_string(&identity)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .and_then(|v| v["runner_id"].as_str().map(str::to_owned));
            if let Some(id) = id {
                break id;
            }
            let log =
                std::fs::read_to_string(data_dir.path().join("runner.log")).unwrap_or_default();
            if child.try_wait()?.is_some() {
                bail!("the runner exited while enrolling:\n{log}");
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the runner did not enroll within 30 s:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(RunnerProcess {
            child,
            data_dir,
            id,
            args,
        })
    }

    fn spawn(
        data_dir: &Path,
        args: &[String],
        join_token: Option<&str>,
    ) -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("runner.log"))?;
        let mut command = tokio::process::Command::new(built_binary("muster-runner")?);
        command
            .args(["--data-dir".as_ref(), data_dir.as_os_str()])
            .args(args)
            .env_remove("MUSTER_JOIN_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(token) = join_token {
            command.env("MUSTER_JOIN_TOKEN", token);
        }
        command.spawn().context("starting muster-runner")
    }

    /// Starts the runner again (after `kill`) with its stored identity.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child = Self::spawn(self.data_dir.path(), &self.args, None)?;
        Ok(())
    }

    /// SIGKILL: the runner ends with no chance to say anything.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("runner.log")).unwrap_or_default()
    }
}

/// A TCP proxy the test controls, to cut the network between a runner and
/// the coordinator: while cut, open connections are dropped and new ones
/// are closed at once.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> anyhow::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = std::sync::Arc::new(cut);
        let task = tokio::spawn({
            let cut = cut.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if *cut.borrow() {
                        continue; // dropped: closed at once
                    }
                    let mut watch = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = watch.wait_for(|cut| *cut) => {}
                        }
                    });
                }
            }
        });
        Ok(Proxy { addr, cut, task })
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ids of the Docker containers (running or not) of a run, by the
/// label the docker executor gives them.
pub fn containers_of_run(run_id: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=io.muster.run-id={run_id}"),
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A free loopback port (bound, then released for a process to take).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sends `signal` (`-STOP`, `-TERM`, …) to process `pid`.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// Whether `pid` is a live process (not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// A coordinator in a process of its own (the built `muster-coordinator`)
/// on fixed loopback ports, so a test can kill it and start it again.
pub struct CoordinatorProcess {
    child: tokio::process::Child,
    db_url: String,
    data_dir: PathBuf,
    args: Vec<String>,
    pub http: u16,
    pub grpc: u16,
}

impl CoordinatorProcess {
    /// Starts one on `db_url` and `data_dir` with extra flags `args`;
    /// returns once it answers `/readyz`.
    pub async fn start(
        db_url: &str,
        data_dir: &Path,
        args: &[&str],
    ) -> anyhow::Result<CoordinatorProcess> {
        let (http, grpc) = (free_port()?, free_port()?);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = Self::spawn(db_url, data_dir, http, grpc, &args)?;
        let coordinator = CoordinatorProcess {
            child,
            db_url: db_url.to_owned(),
            data_dir: data_dir.to_path_buf(),
            args,
            http,
            grpc,
        };
        coordinator.wait_ready().await?;
        Ok(coordinator)
    }

    fn spawn(
        db_url: &str,
        data_dir: &Path,
        http: u16,
        grpc: u16,
        args: &[String],
    ) -> anyhow::Result<tokio::process::Child> {
        tokio::process::Command::new(built_binary("muster-coordinator")?)
            .args(["--data-dir".as_ref(), data_dir.as_os_str()])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(args)
            .env("MUSTER_DATABASE_URL", db_url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting muster-coordinator")
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.url());
        wait_until(Duration::from_secs(30), "the coordinator to answer", || {
            let request = client.get(&url).send();
            async move { Ok(request.await.is_ok_and(|r| r.status().is_success())) }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// SIGKILL: it ends with no chance to say anything.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts it again on the same ports, database and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child = Self::spawn(
            &self.db_url,
            &self.data_dir,
            self.http,
            self.grpc,
            &self.args,
        )?;
        self.wait_ready().await
    }
}

/// A Redis server of the test's own, on a free loopback port, that the test
/// may stop and start again (the shared one of the test environment must stay up).
pub struct RedisServer {
    child: Option<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> anyhow::Result<RedisServer> {
        let mut server = RedisServer {
            child: None,
            port: free_port()?,
            dir: tempfile::tempdir()?,
        };
        server.resume().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: connections drop at once, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on its port, and waits until it answers.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the Redis server runs already");
        let log = std::fs::File::create(self.dir.path().join("redis.log"))?;
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting redis-server (installed by scripts/test-env.sh)")?;
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until(
            Duration::from_secs(10),
            "redis-server to answer",
            || async { Ok(tokio::net::TcpStream::connect(&addr).await.is_ok()) },
        )
        .await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One server-sent event of a live log tail.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A live log tail (`Accept: text/event-stream`) read event by event.
pub struct LogTail {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl LogTail {
    /// Opens the tail of `run_id` on coordinator `c`.
    pub async fn open(c: &TestCoordinator, run_id: &str) -> anyhow::Result<LogTail> {
        Self::resume(c, run_id, None).await
    }

    /// Opens the tail of `run_id` after the event `last_event_id`, as a
    /// client that reconnects does.
    pub async fn resume(
        c: &TestCoordinator,
        run_id: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<LogTail> {
        let mut request = c
            .http
            .get(c.url(&format!("/api/v1/action-runs/{run_id}/logs/")))
            .bearer_auth(&c.admin_key)
            .header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        Ok(LogTail {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        })
    }

    /// The next event with data, waiting at most `within`; `None` when the
    /// stream ended.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<Option<SseEvent>> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                event.data = serde_json::from_str(&data)?;
                return Ok(Some(event));
            }
            let Some(bytes) = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .with_context(|| format!("no event within {within:?}"))?
            else {
                return Ok(None);
            };
            self.buffer.push_str(&String::from_utf8_lossy(&bytes?));
        }
    }
}
