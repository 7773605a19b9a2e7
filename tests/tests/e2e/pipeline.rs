//! Muster as a CI pipeline uses it: the curl-only script in `examples/ci/`
//! and the `muster` CLI trigger a run, print its log live and exit with its
//! exit code; `--output json` keeps stdout parseable; an interrupt cancels
//! the run (`--cancel-on-interrupt`, `MUSTER_CANCEL_ON_INTERRUPT=1`) or
//! detaches and leaves it running; failures of the API itself have exit
//! codes of their own.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use muster_tests::{
    muster_cli, repo_root, signal, wait_until, TestCoordinator, TestDb, TestRunner,
};
use serde_json::Value;
use tokio::io::AsyncReadExt;

const RUNNER: &str = "pipeline-runner";

/// Every shape of text a log can hold: tabs, quotes, backslashes, printf
/// formats, escape sequences, UTF-8.
const BLOCK: &str = r#"name: jobs
actions:
  - name: ok
    script:
      - echo "hello from ok"
      - printf 'tab\there "quoted" back\\slash 100%% done\n'
      - printf '\033[1mbold\033[0m caf\xc3\xa9 \x01\n'
      - echo 'literal \n and %s and \\ and \u0041 stay'
  - name: fail
    script:
      - sleep 1
      - echo "about to fail"
      - exit 7
  - name: slow
    script:
      - echo started
      - for i in $(seq 1 15); do sleep 0.2; done
      - echo done
  - name: long
    script:
      - echo started
      - for i in $(seq 1 600); do sleep 0.1; done
"#;

/// A coordinator with the `pipeline` workspace and one process runner.
struct Setup {
    db: TestDb,
    c: TestCoordinator,
    runner: TestRunner,
    _ws: tempfile::TempDir,
}

impl Setup {
    async fn start() -> anyhow::Result<Setup> {
        let db = TestDb::create().await?;
        let c = TestCoordinator::start(&db).await?;
        let ws = tempfile::tempdir()?;
        std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
        std::fs::write(
            ws.path().join("workspace.poly"),
            "name: pipeline\norganization: acme\n",
        )?;
        std::fs::write(ws.path().join("blocks/jobs/block.poly"), BLOCK)?;
        let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
        anyhow::ensure!(status == 201, "push: {status} {answer}");
        let runner = c
            .start_runner_configured(|r| {
                r.executor = muster_runner::ExecutorChoice::Process;
                r.name = Some(RUNNER.into());
            })
            .await?;
        Ok(Setup {
            db,
            c,
            runner,
            _ws: ws,
        })
    }

    async fn stop(self) {
        self.runner.stop().await;
        self.c.stop().await;
        self.db.drop_db().await;
    }

    /// A command with the two variables a pipeline sets, and no CI system's.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        command
            .env("MUSTER_URL", self.c.url(""))
            .env("MUSTER_API_KEY", &self.c.admin_key)
            .env_remove("GITLAB_CI")
            .env_remove("GITHUB_ACTIONS")
            .env_remove("MUSTER_CANCEL_ON_INTERRUPT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    fn script(&self, shell: &str, action: &str) -> tokio::process::Command {
        let mut command = self.command(shell);
        command
            .arg(repo_root().join("examples/ci/muster-run.sh"))
            .args(["pipeline", "jobs", action]);
        command
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<tokio::process::Command> {
        let mut command = self.command(muster_cli()?);
        command.args(args);
        Ok(command)
    }
}

/// The run id in a "run ID queued" progress line.
fn queued_id(stderr: &str) -> anyhow::Result<String> {
    stderr
        .lines()
        .find_map(|l| l.split("run ").nth(1)?.strip_suffix(" queued"))
        .map(str::to_owned)
        .with_context(|| format!("no 'run ID queued' line in:\n{stderr}"))
}

/// A process whose output is collected as it comes, to wait on.
struct Watched {
    child: tokio::process::Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Watched {
    fn spawn(mut command: tokio::process::Command) -> anyhow::Result<Watched> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let collect = |mut from: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let into = Arc::new(Mutex::new(Vec::new()));
            let sink = into.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            into
        };
        let stdout = collect(Box::new(child.stdout.take().context("stdout")?));
        let stderr = collect(Box::new(child.stderr.take().context("stderr")?));
        Ok(Watched {
            child,
            stdout,
            stderr,
        })
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    async fn wait_for_stderr(&self, needle: &str) -> anyhow::Result<()> {
        wait_until(Duration::from_secs(30), needle, || async {
            Ok(self.stderr().contains(needle))
        })
        .await
        .with_context(|| format!("stderr so far:\n{}", self.stderr()))
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        signal(self.child.id().context("already exited")?, name)
    }

    /// Waits for the exit; returns the code. Output read by then is kept.
    async fn exit_code(&mut self) -> anyhow::Result<i32> {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .with_context(|| format!("no exit within 60 s; stderr:\n{}", self.stderr()))??;
        // The readers drain what is left in the pipes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status
            .code()
            .with_context(|| format!("killed by a signal: {status}; stderr:\n{}", self.stderr()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curl_script_prints_the_log_and_exits_with_the_runs_exit_code() -> anyhow::Result<()> {
    let s = Setup::start().await?;
    for shell in ["bash", "sh"] {
        // Succeeding: the log on stdout byte for byte, progress on stderr.
        let out = s
            .script(shell, "ok")
            .env("MUSTER_EXTRA_VARS", r#"{"greeting": "hi \"there\""}"#)
            .env("GITLAB_CI", "true")
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{shell}: {stderr}");
        let id = queued_id(&stderr)?;
        assert!(
            stderr.contains(&format!("run {id} succeeded")),
            "{shell}: {stderr}"
        );
        let log = s.c.log(&id).await?;
        assert!(log.contains("caf\u{e9}"), "{log}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            log,
            "{shell}: the script prints the stored log exactly"
        );
        let run =
            s.c.admin(
                reqwest::Method::GET,
                &format!("/api/v1/action-runs/{id}/"),
                None,
            )
            .await?;
        assert_eq!(
            run["parameters"]["extra_vars"]["greeting"], "hi \"there\"",
            "{run}"
        );
        assert_eq!(run["trigger"]["ci"], "gitlab-ci", "{run}");

        // Failing: the script's exit code is the job's.
        let out = s.script(shell, "fail").output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{shell}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "about to fail\n");
        assert!(
            stderr.contains(&format!("running on {RUNNER}")),
            "{shell}: {stderr}"
        );
        assert!(
            stderr.contains("failed with exit code 7"),
            "{shell}: {stderr}"
        );
    }

    // What the API refuses has exit codes of its own.
    let out = s.script("sh", "nosuch").output().await?;
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let out = s
        .script("sh", "ok")
        .env("MUSTER_API_KEY", "poly_wrong")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_with_progress_on_stderr_and_json_on_stdout() -> anyhow::Result<()> {
    let s = Setup::start().await?;

    // --output json: stdout is one JSON document, the final record; the log
    // and the progress go to stderr.
    let out = s
        .cli(&[
            "run", "jobs", "fail", "-w", "pipeline", "--wait", "--output", "json",
        ])?
        .env("GITLAB_CI", "true")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    let run: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stdout is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let id = queued_id(&stderr)?;
    assert_eq!(run["id"], id.as_str());
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 7, "{run}");
    assert_eq!(run["runner"], RUNNER, "{run}");
    assert!(run["finished_at"].is_string(), "{run}");
    // (Whether it was seen waiting for a runner depends on how fast it was leased.)
    let progress = [
        &format!("running on {RUNNER}"),
        "about to fail",
        &format!("run {id} failed with exit code 7"),
    ];
    let mut at = 0;
    for line in progress {
        let found = stderr[at..]
            .find(line)
            .with_context(|| format!("'{line}' missing or out of order in:\n{stderr}"))?;
        at += found;
    }
    println!("stderr of muster run --wait --output json:\n{stderr}");

    // Text: the log alone on stdout.
    let out = s
        .cli(&["run", "jobs", "ok", "-w", "pipeline", "--wait"])?
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let id = queued_id(&stderr)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), s.c.log(&id).await?);
    assert!(
        !stderr.contains("hello from ok"),
        "the log is not on stderr: {stderr}"
    );

    // runs show / runs list as JSON, with filters.
    let out = s
        .cli(&["runs", "show", &id, "--output", "json"])?
        .output()
        .await?;
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["status"], "succeeded", "{shown}");
    let out = s.cli(&["runs", "show", &id])?.output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("succeeded") && text.contains(RUNNER),
        "{text}"
    );
    let out = s
        .cli(&[
            "runs",
            "list",
            "--workspace",
            "pipeline",
            "--trigger",
            "gitlab-ci",
            "--output",
            "json",
        ])?
        .output()
        .await?;
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    let listed = listed
        .as_array()
        .context("runs list --output json is an array")?;
    assert_eq!(listed.len(), 1, "only the run from 'GitLab': {listed:?}");
    assert_eq!(listed[0]["status"], "failed");
    let out = s
        .cli(&[
            "runs",
            "list",
            "--block",
            "jobs",
            "--action",
            "ok",
            "--status",
            "succeeded",
            "--limit",
            "5",
            "--output",
            "json",
        ])?
        .output()
        .await?;
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());

    // Failures of muster's own, each with its code.
    let code = |out: std::process::Output| out.status.code();
    let unknown = s
        .cli(&["run", "jobs", "nosuch", "-w", "pipeline", "--wait"])?
        .output()
        .await?;
    assert_eq!(code(unknown), Some(65));
    let wrong_key = s
        .cli(&["runs", "list"])?
        .env("MUSTER_API_KEY", "poly_wrong")
        .output()
        .await?;
    assert_eq!(code(wrong_key), Some(77));
    let no_key = s
        .cli(&["runs", "list"])?
        .env_remove("MUSTER_API_KEY")
        .output()
        .await?;
    assert_eq!(code(no_key), Some(77));
    let closed = format!("http://127.0.0.1:{}", muster_tests::free_port()?);
    let unreachable = s
        .cli(&["runs", "list"])?
        .env("MUSTER_URL", closed)
        .output()
        .await?;
    assert_eq!(code(unreachable), Some(69));
    let usage = s
        .cli(&["run", "jobs", "ok", "-w", "pipeline", "-e", "novalue"])?
        .output()
        .await?;
    assert_eq!(code(usage), Some(2));
    let usage = s
        .cli(&["runs", "list", "--output", "yaml"])?
        .output()
        .await?;
    assert_eq!(code(usage), Some(2));

    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_cancels_the_run_when_asked_to() -> anyhow::Result<()> {
    let s = Setup::start().await?;

    // The CLI, SIGINT (GitHub Actions' first signal to a canceled job).
    let mut cli = Watched::spawn(s.cli(&[
        "run",
        "jobs",
        "long",
        "-w",
        "pipeline",
        "--wait",
        "--cancel-on-interrupt",
    ])?)?;
    cli.wait_for_stderr(&format!("running on {RUNNER}")).await?;
    wait_until(Duration::from_secs(30), "the first log line", || async {
        Ok(cli.stdout().contains("started"))
    })
    .await?;
    let id = queued_id(&cli.stderr())?;
    cli.signal("-INT")?;
    assert_eq!(cli.exit_code().await?, 130, "{}", cli.stderr());
    let stderr = cli.stderr();
    assert!(stderr.contains(&format!("canceling run {id}")), "{stderr}");
    assert!(
        stderr.contains(&format!("run {id} canceled")),
        "it followed the run to its end: {stderr}"
    );
    let run = s.c.wait_final(&id, Duration::from_secs(5)).await?;
    assert_eq!(run["status"], "canceled", "{run}");

    // The script, SIGTERM (GitLab's), MUSTER_CANCEL_ON_INTERRUPT=1.
    let mut script = s.script("sh", "long");
    script.env("MUSTER_CANCEL_ON_INTERRUPT", "1");
    let mut script = Watched::spawn(script)?;
    script
        .wait_for_stderr(&format!("running on {RUNNER}"))
        .await?;
    let id = queued_id(&script.stderr())?;
    script.signal("-TERM")?;
    assert_eq!(script.exit_code().await?, 130, "{}", script.stderr());
    assert!(
        script.stderr().contains(&format!("run {id} canceled")),
        "{}",
        script.stderr()
    );
    let run = s.c.wait_final(&id, Duration::from_secs(5)).await?;
    assert_eq!(run["status"], "canceled", "{run}");

    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_an_interrupt_detaches_and_the_run_goes_on() -> anyhow::Result<()> {
    let s = Setup::start().await?;
    for follower in ["cli", "script"] {
        let mut watched = Watched::spawn(match follower {
            "cli" => s.cli(&["run", "jobs", "slow", "-w", "pipeline", "--wait"])?,
            _ => s.script("bash", "slow"),
        })?;
        watched
            .wait_for_stderr(&format!("running on {RUNNER}"))
            .await?;
        let id = queued_id(&watched.stderr())?;
        watched.signal("-INT")?;
        assert_eq!(
            watched.exit_code().await?,
            130,
            "{follower}: {}",
            watched.stderr()
        );
        let stderr = watched.stderr();
        assert!(
            stderr.contains(&format!("detached; run {id} goes on")),
            "{follower}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("muster runs logs -f {id}")),
            "{follower}: {stderr}"
        );
        let run =
            s.c.admin(
                reqwest::Method::GET,
                &format!("/api/v1/action-runs/{id}/"),
                None,
            )
            .await?;
        if run["status"] != "running" {
            bail!("{follower}: the run is not running right after the detach: {run}");
        }
        let run = s.c.wait_final(&id, Duration::from_secs(30)).await?;
        assert_eq!(run["status"], "succeeded", "{follower}: {run}");
        assert!(s.c.log(&id).await?.ends_with("done\n"));
    }

    // Following again picks it up and exits as the run did.
    let id =
        s.c.trigger(
            "pipeline",
            serde_json::json!({"block": "jobs", "action": "fail"}),
        )
        .await?;
    let out = s.cli(&["runs", "logs", "-f", &id])?.output().await?;
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "about to fail\n");

    s.stop().await;
    Ok(())
}

/// The CI examples are valid YAML and call what this suite tests.
#[test]
fn the_ci_examples_parse_and_call_the_script_or_the_cli() -> anyhow::Result<()> {
    let dir = repo_root().join("examples/ci");
    let expect = [
        ("gitlab-ci-curl.yml", "muster-run.sh"),
        ("gitlab-ci-cli.yml", "muster run"),
        ("github-actions-curl.yml", "muster-run.sh"),
        ("github-actions-cli.yml", "muster run"),
    ];
    for (file, calls) in expect {
        let text = std::fs::read_to_string(dir.join(file)).with_context(|| file.to_owned())?;
        let _: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).with_context(|| format!("{file} is not YAML"))?;
        assert!(text.contains(calls), "{file} does not call {calls}");
        assert!(
            text.contains("MUSTER_API_KEY") && text.contains("MUSTER_URL"),
            "{file}"
        );
    }
    Ok(())
}
