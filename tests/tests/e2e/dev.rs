//! `muster dev`, the one-command embedded mode, run as a newcomer runs it:
//! the built binary, no database URL, and a Docker daemon it cannot reach,
//! so the coordinator uses SQLite and the runner runs jobs as processes.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use muster_tests::{example_workspace, muster_cli, process_alive, wait_until};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const DEADLINE: Duration = Duration::from_secs(60);

/// A running `muster dev` with its output captured line by line.
struct Dev {
    child: tokio::process::Child,
    output: Arc<Mutex<String>>,
    url: String,
    key: String,
    http: reqwest::Client,
}

impl Dev {
    async fn start(data_dir: &Path, args: &[&str]) -> anyhow::Result<Dev> {
        // A relative --data-dir, as the README's command has.
        let cwd = data_dir.parent().context("data dir has a parent")?;
        let relative = data_dir.file_name().context("data dir has a name")?;
        let mut command = tokio::process::Command::new(muster_cli()?);
        command
            .arg("dev")
            .args(["--data-dir".as_ref(), relative])
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(args)
            // No Docker daemon answers here, and no database is configured.
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .env_remove("MUSTER_DATABASE_URL")
            .env_remove("MUSTER_DATABASE_URL_FILE")
            .env_remove("MUSTER_DATA_DIR")
            .env_remove("RUST_LOG")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("starting muster dev")?;
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        for (pipe, tag) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                "out",
            ),
            (Box::new(stderr), "err"),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut all = output.lock().expect("output lock");
                    all.push_str(&format!("{tag}| {line}\n"));
                }
            });
        }
        let mut dev = Dev {
            child,
            output,
            url: String::new(),
            key: String::new(),
            http: reqwest::Client::new(),
        };
        let line = dev.wait_for_line("API on http://").await?;
        dev.url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(|w| w.trim_end_matches(',').to_owned())
            .ok_or_else(|| anyhow!("no URL in '{line}'"))?;
        dev.key = std::fs::read_to_string(data_dir.join("admin-api-key"))?
            .trim()
            .to_owned();
        Ok(dev)
    }

    fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// Waits for a line containing `needle` and returns it.
    async fn wait_for_line(&mut self, needle: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "muster dev exited ({status}) before printing '{needle}':\n{}",
                    self.output()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("muster dev did not print '{needle}':\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn wait_final(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let run = self.get(&format!("/api/v1/action-runs/{id}/")).await?;
            if !matches!(
                run["status"].as_str(),
                Some("queued" | "leased" | "running")
            ) {
                return Ok(run);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("run {id} did not finish: {run}\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn log(&self, id: &str) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/api/v1/action-runs/{id}/logs/", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?
            .text()
            .await?)
    }

    /// SIGTERM, as Ctrl-C would; returns the exit status.
    async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("already exited")?;
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        assert!(killed.success());
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .map_err(|_| anyhow!("muster dev did not stop on SIGTERM:\n{}", self.output()))??;
        Ok(status)
    }
}

/// The README's first command, with Docker unreachable and no database URL:
/// it runs the example's bash action to `succeeded`, prints its log and the
/// lines to paste, serves a second run triggered with the printed curl line,
/// stops cleanly on SIGTERM, and resumes with its history on the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn muster_dev_runs_the_example_without_docker_or_a_database_server() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let ws = example_workspace();
    let ws = ws.to_str().context("path")?;
    let mut dev = Dev::start(
        data.path(),
        &["--workspace", ws, "--run", "linux-patch:hello"],
    )
    .await?;
    dev.wait_for_line("ended with exit code 0").await?;
    let out = dev.output();
    assert!(
        out.contains("out| Hello from block linux-patch in workspace"),
        "the run's log is printed on stdout:\n{out}"
    );
    assert!(out.contains("out| Patch profile is full"), "{out}");
    assert!(
        out.contains("in workspace /"),
        "jobs see absolute paths whatever --data-dir was: {out}"
    );
    dev.wait_for_line("serving; press Ctrl-C").await?;
    assert!(data.path().join("muster.db").exists(), "state is in SQLite");

    let runs = dev.get("/api/v1/action-runs/").await?;
    assert_eq!(runs["count"], 1, "{runs}");
    let first = &runs["results"][0];
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["executor"], "process", "{first}");
    assert_eq!(first["exit_code"], 0);

    // A second terminal pastes the printed curl line.
    let curl = dev.wait_for_line("curl -sS -X POST").await?;
    let curl = curl.trim_start_matches("out|").trim();
    let answer = tokio::process::Command::new("bash")
        .args(["-c", curl])
        .current_dir(data.path().parent().context("parent")?)
        .output()
        .await?;
    assert!(answer.status.success(), "{answer:?}");
    let answer: Value = serde_json::from_slice(&answer.stdout)
        .with_context(|| format!("curl printed {}", String::from_utf8_lossy(&answer.stdout)))?;
    assert_eq!(answer["status"], "queued", "{answer}");
    let second = answer["id"].as_str().context("no id")?.to_owned();
    let run = dev.wait_final(&second).await?;
    assert_eq!(run["status"], "succeeded", "{run}");
    let log = dev.log(&second).await?;
    assert!(log.contains(&format!("Muster run {second}")), "{log}");

    let status = dev.terminate().await?;
    assert!(status.success(), "muster dev exited with {status}");

    // Started again on the same data directory: all history is there, and
    // the runner comes back with the identity it enrolled with.
    let dev = Dev::start(data.path(), &[]).await?;
    let runs = dev.get("/api/v1/action-runs/").await?;
    assert_eq!(runs["count"], 2, "{runs}");
    let runners = dev.get("/api/v1/runners/").await?;
    assert_eq!(
        runners["count"], 1,
        "the runner re-used its identity: {runners}"
    );
    let status = dev.terminate().await?;
    assert!(status.success());
    Ok(())
}

/// A workspace whose action runs until it is stopped.
fn slow_workspace(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blocks/slow"))?;
    std::fs::write(
        dir.join("workspace.poly"),
        "name: slow-ws\norganization: acme\n",
    )?;
    std::fs::write(
        dir.join("blocks/slow/block.poly"),
        "name: slow\nversion: 0.1.0\nactions:\n  - name: quick\n    script:\n      - echo quick done\n  - name: sleep\n    script:\n      - echo sleeping as $$\n      - sleep 600\n",
    )?;
    Ok(())
}

/// SIGKILL in the middle of a run: the next start opens the database
/// cleanly, completed runs and their logs are intact, the interrupted run
/// ends `lost` instead of staying `running`, and its orphaned process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn muster_dev_killed_mid_run_restarts_with_history_and_no_stuck_run() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let ws_dir = tempfile::tempdir()?;
    slow_workspace(ws_dir.path())?;
    let ws = ws_dir.path().to_str().context("path")?;

    let mut dev = Dev::start(data.path(), &["--workspace", ws, "--run", "slow:quick"]).await?;
    dev.wait_for_line("ended with exit code 0").await?;
    let quick = dev.get("/api/v1/action-runs/").await?["results"][0]["id"]
        .as_str()
        .context("no run")?
        .to_owned();

    let answer = dev
        .http
        .post(format!("{}/api/v1/workspaces/slow-ws/actions", dev.url))
        .bearer_auth(&dev.key)
        .json(&serde_json::json!({"block": "slow", "action": "sleep"}))
        .send()
        .await?
        .json::<Value>()
        .await?;
    let slow = answer["id"].as_str().context("no id")?.to_owned();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let pid = loop {
        let log = dev.log(&slow).await?;
        if let Some(pid) = log
            .lines()
            .find_map(|l| l.strip_prefix("sleeping as "))
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the slow run never started: {log}\n{}", dev.output());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    dev.child.start_kill()?;
    dev.child.wait().await?;
    drop(dev);

    let dev = Dev::start(data.path(), &[]).await?;
    let run = dev.wait_final(&slow).await?;
    assert_eq!(run["status"], "lost", "{run}");
    assert!(
        run["error"].as_str().unwrap_or("").contains("runner"),
        "the reason is recorded: {run}"
    );
    let done = dev.get(&format!("/api/v1/action-runs/{quick}/")).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let log = dev.log(&quick).await?;
    assert!(log.contains("quick done"), "{log}");
    wait_until(
        Duration::from_secs(15),
        "the orphaned job process to be killed",
        || async move { Ok(!process_alive(pid)) },
    )
    .await?;
    let status = dev.terminate().await?;
    assert!(status.success());
    Ok(())
}
