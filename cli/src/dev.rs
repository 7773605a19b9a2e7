//! `muster dev`: the whole of Muster in one process, on its embedded
//! defaults — a coordinator on SQLite in the data directory and a runner
//! that enrolls with a join token and holds an mTLS stream to it exactly as
//! a remote runner would, executing jobs in containers when a Docker daemon
//! answers and as local processes otherwise.
//!
//! Started again on the same data directory, it resumes with all history:
//! the runner keeps its identity, and runs that were interrupted by a crash
//! are recorded as lost when the runner comes back without them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::follow::{tail, Sink};
use crate::push;

#[derive(clap::Args)]
pub struct DevArgs {
    /// A workspace directory to push at start (again at every start).
    #[arg(long)]
    workspace: Option<PathBuf>,

    /// Run BLOCK:ACTION of that workspace once it is pushed and print its log.
    #[arg(long, value_name = "BLOCK:ACTION", requires = "workspace")]
    run: Option<String>,

    /// How many runs the built-in runner executes at once.
    #[arg(long, env = "MUSTER_CAPACITY", default_value_t = 2)]
    capacity: u32,

    /// Where the built-in runner executes jobs: `docker`, `process`, or
    /// `auto` (docker when the daemon answers, else process).
    #[arg(long, env = "MUSTER_EXECUTOR", default_value = "auto")]
    executor: muster_runner::config::ExecutorChoice,

    #[command(flatten)]
    coordinator: muster_coordinator::Config,
}

pub async fn dev(args: DevArgs) -> anyhow::Result<i32> {
    // The run's log goes to stdout; warnings (and RUST_LOG's choice) to stderr.
    muster_common::telemetry::init_with_default("warn");
    let run = args
        .run
        .as_deref()
        .map(|spec| {
            spec.split_once(':')
                .filter(|(b, a)| !b.is_empty() && !a.is_empty())
                .map(|(b, a)| (b.to_owned(), a.to_owned()))
                .with_context(|| format!("--run: expected BLOCK:ACTION, found '{spec}'"))
        })
        .transpose()?;
    let data_dir = args.coordinator.data_dir.clone();
    let database = match args.coordinator.database().map_err(anyhow::Error::msg)? {
        muster_coordinator::config::Database::Sqlite(path) => path.display().to_string(),
        muster_coordinator::config::Database::Postgres(_) => "PostgreSQL".to_owned(),
    };

    let coordinator = muster_coordinator::start(args.coordinator)
        .await
        .context("starting the coordinator")?;
    let url = format!("http://{}", coordinator.http_addr);
    let key_path = data_dir.join("admin-api-key");
    let key = std::fs::read_to_string(&key_path)
        .with_context(|| {
            format!(
                "reading the admin API key {} (written when the database was created; \
                 with a database created elsewhere, use that database's key)",
                key_path.display()
            )
        })?
        .trim()
        .to_owned();
    let api = Api::new(&url, Some(key))?;
    println!("muster dev: API on {url}, state in {database}");
    println!("muster dev: the admin API key is in {}", key_path.display());

    // The runner enrolls over the real join-token path the first time and
    // reuses its certificate afterwards.
    let runner_dir = data_dir.join("runner");
    let mut runner = muster_runner::Config::for_tests(
        format!("https://127.0.0.1:{}", coordinator.grpc_addr.port()),
        String::new(),
        coordinator.ca_cert_hash.clone(),
        runner_dir.clone(),
    );
    runner.join_token = None;
    if !runner_dir.join("identity.json").exists() {
        let token = api
            .json(
                api.request(reqwest::Method::POST, "/api/v1/runners/join-tokens/")?
                    .json(&serde_json::json!({ "single_use": true, "expires_in": 300 })),
            )
            .await
            .context("creating a join token for the built-in runner")?;
        let token = token["token"]
            .as_str()
            .context("the join-token answer has no token")?;
        runner.join_token = Some(muster_common::secret::Secret::new(token));
    }
    runner.capacity = args.capacity;
    runner.name = Some("dev".to_owned());
    runner.executor = args.executor;
    runner.drain_timeout = 10;
    let runner_stop = CancellationToken::new();
    let mut runner_task = tokio::spawn(muster_runner::run(runner, runner_stop.clone()));

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            muster_common::shutdown::requested().await;
            stop.cancel();
        }
    });

    let served = async {
        let mut workspace_name = None;
        if let Some(dir) = &args.workspace {
            let ws = push(&api, dir).await?;
            workspace_name = ws["name"].as_str().map(str::to_owned);
        }
        print_how_to_trigger(&url, &key_path, workspace_name.as_deref(), run.as_ref());
        if let (Some((block, action)), Some(ws)) = (&run, &workspace_name) {
            let body = serde_json::json!({ "block": block, "action": action, "reason": "muster dev --run" });
            let path = format!("/api/v1/workspaces/{ws}/actions");
            let queued = api
                .json(api.request(reqwest::Method::POST, &path)?.json(&body))
                .await?;
            let id = queued["id"].as_str().unwrap_or_default().to_owned();
            eprintln!("muster dev: run {id} queued ({block}:{action})");
            let code = tail(&api, &id, Sink::Stdout).await?.exit_code();
            eprintln!("muster dev: run {id} ended with exit code {code}");
        }
        println!("muster dev: serving; press Ctrl-C to stop");
        Ok::<(), anyhow::Error>(())
    };

    let outcome = tokio::select! {
        result = served => match result {
            Ok(()) => {
                tokio::select! {
                    _ = stop.cancelled() => Ok(()),
                    ended = &mut runner_task => runner_ended(ended),
                }
            }
            Err(error) => Err(error),
        },
        ended = &mut runner_task => runner_ended(ended),
        _ = stop.cancelled() => Ok(()),
    };

    eprintln!(
        "muster dev: stopping: the runner finishes or cancels its runs, then the coordinator stops"
    );
    runner_stop.cancel();
    if !runner_task.is_finished() {
        match tokio::time::timeout(Duration::from_secs(120), &mut runner_task).await {
            Ok(ended) => {
                if let Err(error) = runner_ended(ended) {
                    eprintln!("muster dev: {error:#}");
                }
            }
            Err(_) => eprintln!("muster dev: the runner did not stop within 120 s"),
        }
    }
    coordinator.shutdown(Duration::from_secs(10)).await;
    outcome.map(|()| 0)
}

fn runner_ended(ended: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.context("the built-in runner stopped")),
        Err(error) => bail!("the built-in runner failed: {error}"),
    }
}

/// The lines a user pastes into a second terminal.
fn print_how_to_trigger(
    url: &str,
    key_path: &Path,
    workspace: Option<&str>,
    run: Option<&(String, String)>,
) {
    let (ws, block, action) = match (workspace, run) {
        (Some(ws), Some((b, a))) => (ws, b.as_str(), a.as_str()),
        (Some(ws), None) => (ws, "BLOCK", "ACTION"),
        _ => ("WORKSPACE", "BLOCK", "ACTION"),
    };
    let key = shell_quote(&key_path.display().to_string());
    let cli = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let cwd = std::env::current_dir().ok()?;
            Some(
                exe.strip_prefix(&cwd)
                    .map(|p| p.to_path_buf())
                    .unwrap_or(exe),
            )
        })
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|| "muster".to_owned());
    println!("muster dev: trigger a run from another terminal with");
    println!(
        "  curl -sS -X POST {url}/api/v1/workspaces/{ws}/actions \
         -H \"Authorization: Bearer $(cat {key})\" -H 'Content-Type: application/json' \
         -d '{{\"block\": \"{block}\", \"action\": \"{action}\"}}'"
    );
    println!("  or");
    println!(
        "  MUSTER_URL={url} MUSTER_API_KEY=$(cat {key}) {cli} run {block} {action} -w {ws} --wait"
    );
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
