//! The real processes a scenario runs against, and their clean-up: a
//! throwaway PostgreSQL database (or the embedded SQLite file), the built
//! `muster-coordinator` and `muster-runner` binaries, the workspace the
//! benchmarks trigger, and an HTTP client holding the admin key.
//!
//! Everything started here goes away when its value is dropped — on success,
//! on an error and on Ctrl-C alike: processes are killed, temporary
//! directories removed, databases dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use muster_common::bundle::Bundle;
use serde_json::{json, Value};

/// Where the coordinator keeps its state in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Postgres,
    Sqlite,
}

impl StoreKind {
    pub fn parse(s: &str) -> anyhow::Result<StoreKind> {
        match s.trim() {
            "postgres" | "postgresql" | "pg" => Ok(StoreKind::Postgres),
            "sqlite" => Ok(StoreKind::Sqlite),
            other => bail!("--store: expected postgres or sqlite, found '{other}'"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Postgres => "PostgreSQL",
            StoreKind::Sqlite => "SQLite",
        }
    }
}

/// The built binaries the scenarios start.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub coordinator: PathBuf,
    pub runner: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, by default the directory of this executable
    /// (the same target directory and profile).
    pub fn locate(dir: Option<&Path>) -> anyhow::Result<Binaries> {
        let dir = match dir {
            Some(dir) => dir.to_path_buf(),
            None => std::env::current_exe()?
                .parent()
                .ok_or_else(|| anyhow!("this executable has no directory"))?
                .to_path_buf(),
        };
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(anyhow!(
                    "{} is missing: build it first with `cargo build --release -p muster-coordinator -p muster-runner` \
                     (the same profile as this benchmark), or name its directory with --bin-dir",
                    path.display()
                ))
            }
        };
        Ok(Binaries {
            coordinator: find("muster-coordinator")?,
            runner: find("muster-runner")?,
        })
    }
}

/// A PostgreSQL database of the benchmark's own, dropped with the value.
pub struct ScratchDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl ScratchDb {
    /// Creates `<prefix>_<random>` on the server of `admin_url` (a URL of a
    /// role that may create databases).
    pub async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<ScratchDb> {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let client = connect(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating the database {name}"))?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .ok_or_else(|| anyhow!("--database-url: expected postgres://user:password@host/db"))?;
        Ok(ScratchDb {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// Commits in this database so far (PostgreSQL's statistics, which lag
    /// by up to a second).
    pub async fn commits(&self) -> anyhow::Result<i64> {
        let client = connect(&self.admin_url).await?;
        let row = client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .await?;
        Ok(row.get(0))
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        // Drop runs inside the runtime, where blocking on a future is not
        // allowed: a thread of its own with a runtime of its own does it.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = connect(&admin_url).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "muster-bench: could not drop the database {}; drop it by hand",
                self.name
            );
        }
    }
}

/// A client of the PostgreSQL server at `url`, its connection driven by a task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL (--database-url, or MUSTER_TEST_DATABASE_URL from scripts/test-env.sh)")?;
    tokio::spawn(conn);
    Ok(client)
}

/// A free loopback port (bound, then released for a process to take).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits for `check` to say yes, looking every `every`, for at most `within`.
pub async fn wait_for<F, Fut>(
    within: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<()>
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
        tokio::time::sleep(every).await;
    }
}

/// The last lines of a log file, to show why a process failed.
pub(crate) fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A `muster-coordinator` process with a data directory of its own,
/// listening on loopback; its log is in `<data dir>/coordinator.log`.
pub struct Coordinator {
    _child: tokio::process::Child,
    grpc: u16,
    pub api: Api,
    data_dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts one on `database` (`None`: the embedded SQLite file) and
    /// returns once it answers `/readyz`.
    pub async fn start(
        bins: &Binaries,
        database: Option<&ScratchDb>,
    ) -> anyhow::Result<Coordinator> {
        Self::start_on(bins, database, None, None).await
    }

    /// Like [`Coordinator::start`], with the event bus at `redis_url`
    /// when given. A coordinator joining a database another one set up
    /// writes no admin key: `admin_key` is the first one's.
    pub async fn start_on(
        bins: &Binaries,
        database: Option<&ScratchDb>,
        redis_url: Option<&str>,
        admin_key: Option<&str>,
    ) -> anyhow::Result<Coordinator> {
        let data_dir = tempfile::Builder::new().prefix("muster-bench-").tempdir()?;
        let (http, grpc) = (free_port()?, free_port()?);
        let log = std::fs::File::create(data_dir.path().join("coordinator.log"))?;
        let mut command = tokio::process::Command::new(&bins.coordinator);
        command
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .env_remove("MUSTER_DATABASE_URL")
            .env_remove("MUSTER_DATABASE_URL_FILE")
            .env_remove("MUSTER_REDIS_URL")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(db) = database {
            command.env("MUSTER_DATABASE_URL", &db.url);
        }
        if let Some(url) = redis_url {
            command.env("MUSTER_REDIS_URL", url);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", bins.coordinator.display()))?;
        let log_path = data_dir.path().join("coordinator.log");
        let ready_url = format!("http://127.0.0.1:{http}/readyz");
        let probe = reqwest::Client::new();
        let ready = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "the coordinator to answer /readyz",
            || {
                let request = probe.get(&ready_url).send();
                let exited = child.try_wait();
                async move {
                    if let Some(status) = exited? {
                        bail!("the coordinator exited with {status}");
                    }
                    Ok(request.await.is_ok_and(|r| r.status().is_success()))
                }
            },
        )
        .await;
        if let Err(error) = ready {
            bail!("{error:#}; its log ends:\n{}", tail_of(&log_path));
        }
        let key_path = data_dir.path().join("admin-api-key");
        let admin_key = match admin_key {
            Some(key) => key.to_owned(),
            None => std::fs::read_to_string(&key_path)
                .with_context(|| format!("the coordinator wrote no {}", key_path.display()))?
                .trim()
                .to_owned(),
        };
        Ok(Coordinator {
            _child: child,
            grpc,
            api: Api::new(format!("http://127.0.0.1:{http}"), admin_key),
            data_dir,
        })
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self._child.id()
    }

    pub fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc)
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.data_dir.path().join("coordinator.log"))
    }
}

/// A scenario's coordinators: one, or two on one PostgreSQL database woken
/// by each other through a Redis event bus of the benchmark's own, `back`
/// holding the runners and the other taking the clients, so that what a
/// client sees has crossed the bus.
pub struct Coordinators {
    /// The runners' coordinator.
    pub back: Coordinator,
    /// With a bus: the clients' coordinator and the bus.
    front: Option<(Coordinator, crate::peers::Redis, tempfile::TempDir)>,
}

impl Coordinators {
    /// One coordinator on `database`, or, given `redis_server` (the binary
    /// the bus runs on), two on it.
    pub async fn start(
        bins: &Binaries,
        database: Option<&ScratchDb>,
        redis_server: Option<&str>,
    ) -> anyhow::Result<Coordinators> {
        let Some(redis_server) = redis_server else {
            return Ok(Coordinators {
                back: Coordinator::start(bins, database).await?,
                front: None,
            });
        };
        let Some(database) = database else {
            bail!("two coordinators share a PostgreSQL database, not the embedded SQLite file");
        };
        let dir = tempfile::Builder::new()
            .prefix("muster-bench-redis-")
            .tempdir()?;
        let redis = crate::peers::Redis::start(redis_server, dir.path()).await?;
        let url = redis.url();
        let back = Coordinator::start_on(bins, Some(database), Some(&url), None).await?;
        let front =
            Coordinator::start_on(bins, Some(database), Some(&url), Some(&back.api.key)).await?;
        Ok(Coordinators {
            back,
            front: Some((front, redis, dir)),
        })
    }

    /// Whether the clients' coordinator is another than the runners'.
    pub fn over_bus(&self) -> bool {
        self.front.is_some()
    }

    /// The API the clients use.
    pub fn clients(&self) -> &Api {
        self.front
            .as_ref()
            .map_or(&self.back.api, |(f, _, _)| &f.api)
    }

    /// The ends of their logs, for an error.
    pub fn log_tails(&self) -> String {
        let mut tails = format!("the coordinator's log ends:\n{}", self.back.log_tail());
        if let Some((front, _, _)) = &self.front {
            tails += &format!(
                "\nthe clients' coordinator's log ends:\n{}",
                front.log_tail()
            );
        }
        tails
    }
}

/// A `muster-runner` process, enrolled with a join token; its log is in
/// `<data dir>/runner.log`.
pub struct RunnerProcess {
    _child: tokio::process::Child,
    pub id: String,
    data_dir: tempfile::TempDir,
    /// The runner's `--work-dir`, when it was given one.
    _work_dir: Option<tempfile::TempDir>,
}

impl RunnerProcess {
    /// Starts one with the process executor and `capacity` slots and waits
    /// until the coordinator lists it online.
    pub async fn start(
        bins: &Binaries,
        coordinator: &Coordinator,
        name: &str,
        capacity: u32,
    ) -> anyhow::Result<RunnerProcess> {
        Self::start_with(bins, coordinator, name, capacity, "process", None).await
    }

    /// Like [`RunnerProcess::start`], its jobs' scratch directories in a
    /// new directory under `work_parent` (its `--work-dir`) when given.
    pub async fn start_in(
        bins: &Binaries,
        coordinator: &Coordinator,
        name: &str,
        capacity: u32,
        work_parent: Option<&Path>,
    ) -> anyhow::Result<RunnerProcess> {
        Self::start_with(bins, coordinator, name, capacity, "process", work_parent).await
    }

    /// Like [`RunnerProcess::start`], with `executor` (`process`, `docker`
    /// or `auto`, as `--executor` takes it).
    pub async fn start_with(
        bins: &Binaries,
        coordinator: &Coordinator,
        name: &str,
        capacity: u32,
        executor: &str,
        work_parent: Option<&Path>,
    ) -> anyhow::Result<RunnerProcess> {
        let join = coordinator.api.join_token(true).await?;
        let data_dir = tempfile::Builder::new()
            .prefix("muster-bench-runner-")
            .tempdir()?;
        let work_dir = work_parent
            .map(|parent| {
                tempfile::Builder::new()
                    .prefix("muster-bench-work-")
                    .tempdir_in(parent)
                    .with_context(|| format!("a work directory in {}", parent.display()))
            })
            .transpose()?;
        let log_path = data_dir.path().join("runner.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = tokio::process::Command::new(&bins.runner)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--coordinator", &coordinator.grpc_url()])
            .args(["--ca-cert-hash", &join.ca_cert_hash])
            .args(["--executor", executor])
            .args(["--capacity", &capacity.to_string()])
            .args(["--name", name])
            .args(
                work_dir
                    .iter()
                    .flat_map(|dir| ["--work-dir".as_ref(), dir.path().as_os_str()]),
            )
            .env("MUSTER_JOIN_TOKEN", &join.token)
            .env_remove("MUSTER_JOIN_TOKEN_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bins.runner.display()))?;
        let identity = data_dir.path().join("identity.json");
        let mut id = None;
        let online = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "the runner to enroll and connect",
            || {
                let exited = child.try_wait();
                if id.is_none() {
                    id = std::fs::read_to_string(&identity)
                        .ok()
                        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                        .and_then(|v| v["runner_id"].as_str().map(str::to_owned));
                }
                let id = id.clone();
                let api = &coordinator.api;
                async move {
                    if let Some(status) = exited? {
                        bail!("the runner exited with {status}");
                    }
                    match id {
                        Some(id) => api.runner_online(&id).await,
                        None => Ok(false),
                    }
                }
            },
        )
        .await;
        if let Err(error) = online {
            bail!("{error:#}; its log ends:\n{}", tail_of(&log_path));
        }
        Ok(RunnerProcess {
            _child: child,
            id: id.unwrap_or_default(),
            data_dir,
            _work_dir: work_dir,
        })
    }

    pub fn log_tail(&self) -> String {
        tail_of(&self.data_dir.path().join("runner.log"))
    }
}

/// A join token as the API hands it out.
pub struct JoinToken {
    pub token: String,
    pub ca_cert_hash: String,
}

/// The coordinator's HTTP API with the admin key.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: String, key: String) -> Api {
        Api {
            base,
            key,
            http: reqwest::Client::new(),
        }
    }

    /// The same API through a client (a connection pool) of its own.
    pub fn own_client(&self) -> Api {
        Api::new(self.base.clone(), self.key.clone())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn answer(response: reqwest::Response, what: &str) -> anyhow::Result<Value> {
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{what} answered {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{what} answered no JSON: {text}"))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.key)
            .send()
            .await?;
        Self::answer(response, &format!("GET {path}")).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        Self::answer(response, &format!("POST {path}")).await
    }

    /// A join token for instance-wide runners; `single_use: false` lets
    /// many simulated runners enroll with one.
    pub async fn join_token(&self, single_use: bool) -> anyhow::Result<JoinToken> {
        let answer = self
            .post(
                "/api/v1/runners/join-tokens/",
                json!({ "single_use": single_use }),
            )
            .await?;
        let field = |name: &str| {
            answer[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("the join token answer has no {name}: {answer}"))
        };
        Ok(JoinToken {
            token: field("token")?,
            ca_cert_hash: field("ca_cert_hash")?,
        })
    }

    /// Pushes the benchmark workspace (see [`bench_workspace`]).
    pub async fn push_bench_workspace(&self) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        bench_workspace(dir.path())?;
        let body = Bundle::from_dir(dir.path())?.to_tar_gz();
        let response = self
            .http
            .post(self.url("/api/v1/workspaces/"))
            .bearer_auth(&self.key)
            .header("Content-Type", "application/gzip")
            .body(body)
            .send()
            .await?;
        Self::answer(response, "pushing the benchmark workspace").await?;
        Ok(())
    }

    /// Triggers `action` of the benchmark block; returns the run id.
    pub async fn trigger(&self, action: &str, extra_vars: Value) -> anyhow::Result<String> {
        let answer = self
            .post(
                &format!("/api/v1/workspaces/{WORKSPACE}/actions/"),
                json!({
                    "block": BLOCK,
                    "action": action,
                    "reason": "muster-bench",
                    "parameters": { "extra_vars": extra_vars },
                }),
            )
            .await?;
        answer["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the trigger answered without an id: {answer}"))
    }

    /// Opens run `run_id`'s live log tail (`text/event-stream`; read it
    /// with [`crate::sse::Parser`]).
    pub async fn tail(&self, run_id: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(self.url(&format!("/api/v1/action-runs/{run_id}/logs/")))
            .bearer_auth(&self.key)
            .header("Accept", "text/event-stream")
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("the live tail answered {}", response.status());
        }
        Ok(response)
    }

    pub async fn run(&self, run_id: &str) -> anyhow::Result<Value> {
        self.get(&format!("/api/v1/action-runs/{run_id}/")).await
    }

    /// How many runs of the benchmark workspace have `status`.
    pub async fn count_runs(&self, status: &str) -> anyhow::Result<u64> {
        let list = self
            .get(&format!(
                "/api/v1/action-runs/?workspace={WORKSPACE}&status={status}&page_size=1"
            ))
            .await?;
        list["count"]
            .as_u64()
            .ok_or_else(|| anyhow!("the run list has no count: {list}"))
    }

    /// Waits for run `run_id` to reach a final status; returns its record.
    pub async fn wait_final(
        &self,
        run_id: &str,
        within: Duration,
        every: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let run = self.run(run_id).await?;
            if is_final(run["status"].as_str().unwrap_or_default()) {
                return Ok(run);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("run {run_id} did not end within {within:?}: {run}");
            }
            tokio::time::sleep(every).await;
        }
    }

    pub async fn runner_online(&self, id: &str) -> anyhow::Result<bool> {
        let mut page = 1;
        loop {
            let list = self
                .get(&format!("/api/v1/runners/?page_size=500&page={page}"))
                .await?;
            let results = list["results"].as_array().cloned().unwrap_or_default();
            if let Some(runner) = results.iter().find(|r| r["id"] == id) {
                return Ok(runner["status"] == "online");
            }
            if list["next"].is_null() || results.is_empty() {
                return Ok(false);
            }
            page += 1;
        }
    }
}

pub fn is_final(status: &str) -> bool {
    matches!(
        status,
        "succeeded" | "failed" | "canceled" | "timed_out" | "lost"
    )
}

pub const WORKSPACE: &str = "bench";
pub const BLOCK: &str = "jobs";

/// Writes the workspace every scenario triggers: one block with
/// - `noop`: `true` (dispatch and throughput),
/// - `flood`: `seq 1 $LINES`, as fast as it can (log ingest),
/// - `ticker`: `$LINES` numbered lines with the wall-clock time each was
///   printed (bash's `$EPOCHREALTIME`), about one a millisecond (live tail);
///   `read -t` on a pipe nobody writes to waits without starting a process;
/// - `ping`: the playbook [`PING_PLAYBOOK`], one play on localhost without
///   facts and one `ping` task (execution overhead, docker executor).
pub fn bench_workspace(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blocks").join(BLOCK))?;
    std::fs::write(
        dir.join("workspace.poly"),
        format!("name: {WORKSPACE}\norganization: bench\n"),
    )?;
    std::fs::write(
        dir.join("blocks").join(BLOCK).join("block.poly"),
        format!(
            "name: {BLOCK}\nversion: 1.0.0\nactions:\n\
             \x20 - name: noop\n    script: [\"true\"]\n\
             \x20 - name: flood\n    script: ['seq 1 \"$EXTRA_VARS_LINES\"']\n\
             \x20 - name: ticker\n    script:\n\
             \x20     - 'exec 3<> <(:)'\n\
             \x20     - 'for i in $(seq 1 \"$EXTRA_VARS_LINES\"); do echo \"$i $EPOCHREALTIME\"; read -t 0.001 -u 3 || true; done'\n\
             \x20 - name: ping\n    playbook: {PING_PLAYBOOK}\n"
        ),
    )?;
    std::fs::write(
        dir.join("blocks").join(BLOCK).join(PING_PLAYBOOK),
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n",
    )?;
    Ok(())
}

/// The trivial playbook of the `ping` action, in the block's directory.
pub const PING_PLAYBOOK: &str = "ping.yml";
