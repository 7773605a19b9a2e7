//! `muster`: the command teams and CI pipelines use to push workspaces,
//! trigger runs, wait for them and read their logs.
//!
//! Exit codes of `muster run --wait`: the run's own exit code when it failed
//! with one (0 when it succeeded); 1 when it failed without one; 124 timed
//! out; 125 lost; 130 canceled; 69 when the API could not be reached or
//! answered with an error; 2 for usage errors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use muster_common::bundle::Bundle;
use muster_common::workspace;
use serde_json::{json, Value};

mod dev;

const EXIT_API: i32 = 69;

#[derive(Parser)]
#[command(
    name = "muster",
    version,
    about = "Trigger and follow Muster runs; push workspaces"
)]
struct Cli {
    /// The coordinator's HTTP address.
    #[arg(
        long,
        env = "MUSTER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// API key (`poly_…`).
    #[arg(long, env = "MUSTER_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Muster in one process on its embedded defaults: a coordinator on SQLite
    /// and a runner (docker, or local processes without Docker); serves until Ctrl-C.
    Dev(Box<dev::DevArgs>),
    /// Workspaces: push and validate.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Trigger an action of a block; with --wait, print its log live and exit with its exit code.
    Run {
        block: String,
        action: String,
        #[arg(short, long)]
        workspace: String,
        /// Extra variable `key=value` (the value is read as JSON when it parses, else as text).
        #[arg(short = 'e', long = "extra-var")]
        extra_vars: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Runs: list, show, logs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Runners: join tokens and the fleet.
    #[command(subcommand)]
    Runners(RunnersCommand),
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// Uploads a workspace directory (creates or updates it).
    Push { dir: PathBuf },
    /// Checks a workspace directory locally, as the coordinator would.
    Validate { dir: PathBuf },
}

#[derive(Subcommand)]
enum RunsCommand {
    List {
        #[arg(long)]
        workspace: Option<String>,
        #[arg(long)]
        block: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    Show {
        id: String,
    },
    Logs {
        id: String,
        /// Keep printing as the log grows until the run ends; exit as `run --wait` does.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancels a run: a queued one at once, a running one is stopped by its runner.
    Cancel {
        id: String,
        /// Wait until the run has ended and exit as `muster run --wait` would.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum RunnersCommand {
    List,
    /// Creates a join token for enrolling a runner.
    JoinToken {
        /// Let the token enroll several runners until it expires.
        #[arg(long)]
        multi_use: bool,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
    },
}

struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

/// An error the API answered, or a failure to reach it.
#[derive(Debug)]
struct ApiError(String);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ApiError {}

impl Api {
    fn new(base: &str, key: Option<String>) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            key: key.filter(|k| !k.is_empty()),
        })
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let key = self
            .key
            .as_deref()
            .ok_or_else(|| anyhow!("no API key: set MUSTER_API_KEY or pass --api-key"))?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(ci) = ci_system() {
            req = req.header("X-Muster-CI", ci);
        }
        Ok(req)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = req.send().await.map_err(|e| {
            ApiError(format!(
                "cannot reach the coordinator at {}: {e}",
                self.base
            ))
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or(body);
        Err(ApiError(format!("{status}: {detail}")).into())
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = self.send(req).await?;
        response
            .json()
            .await
            .map_err(|e| ApiError(format!("unreadable answer from the coordinator: {e}")).into())
    }
}

fn ci_system() -> Option<&'static str> {
    let set = |name: &str| std::env::var_os(name).is_some();
    if set("GITLAB_CI") {
        Some("gitlab-ci")
    } else if set("GITHUB_ACTIONS") {
        Some("github-actions")
    } else if set("JENKINS_URL") {
        Some("jenkins")
    } else if set("BUILDKITE") {
        Some("buildkite")
    } else {
        None
    }
}

fn parse_extra_vars(pairs: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut vars = serde_json::Map::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("-e {pair}: expected key=value"))?;
        if k.is_empty() {
            bail!("-e {pair}: the key is empty");
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        vars.insert(k.to_owned(), value);
    }
    Ok(vars)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("muster: {error:#}");
            if error.downcast_ref::<ApiError>().is_some() {
                EXIT_API
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let api = Api::new(&cli.url, cli.api_key)?;
    match cli.command {
        Command::Dev(args) => dev::dev(*args).await,
        Command::Workspace(WorkspaceCommand::Validate { dir }) => {
            let bundle =
                Bundle::from_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
            let loaded = workspace::load(&bundle)?;
            println!(
                "{} (organization {}): valid, {} blocks, digest {}",
                loaded.workspace.name,
                loaded.workspace.organization,
                loaded.blocks.len(),
                bundle.digest()
            );
            Ok(0)
        }
        Command::Workspace(WorkspaceCommand::Push { dir }) => {
            push(&api, &dir).await?;
            Ok(0)
        }
        Command::Run {
            block,
            action,
            workspace,
            extra_vars,
            reason,
            wait,
        } => {
            let body = json!({
                "block": block,
                "action": action,
                "reason": reason,
                "parameters": { "extra_vars": parse_extra_vars(&extra_vars)? },
            });
            let path = format!("/api/v1/workspaces/{workspace}/actions");
            let run = api
                .json(api.request(reqwest::Method::POST, &path)?.json(&body))
                .await?;
            let id = run["id"]
                .as_str()
                .ok_or_else(|| ApiError("the coordinator answered without a run id".into()))?
                .to_owned();
            if !wait {
                println!("{id}");
                return Ok(0);
            }
            eprintln!("muster: run {id} queued");
            follow(&api, &id).await
        }
        Command::Runs(RunsCommand::List {
            workspace,
            block,
            action,
            status,
            limit,
        }) => {
            let mut query: BTreeMap<&str, String> = BTreeMap::new();
            query.insert("page_size", limit.clamp(1, 500).to_string());
            for (k, v) in [
                ("workspace", workspace),
                ("block", block),
                ("action", action),
                ("status", status),
            ] {
                if let Some(v) = v {
                    query.insert(k, v);
                }
            }
            let list = api
                .json(
                    api.request(reqwest::Method::GET, "/api/v1/action-runs/")?
                        .query(&query),
                )
                .await?;
            println!(
                "{:<36}  {:<10}  {:<4}  {:<24}  {:<20}  created",
                "id", "status", "exit", "workspace", "block:action"
            );
            for r in list["results"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<10}  {:<4}  {:<24}  {:<20}  {}",
                    r["id"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["exit_code"]
                        .as_i64()
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                    r["workspace"].as_str().unwrap_or(""),
                    format!(
                        "{}:{}",
                        r["block"].as_str().unwrap_or(""),
                        r["action"].as_str().unwrap_or("")
                    ),
                    r["created_at"].as_str().unwrap_or(""),
                );
            }
            Ok(0)
        }
        Command::Runs(RunsCommand::Show { id }) => {
            let run = api
                .json(api.request(reqwest::Method::GET, &format!("/api/v1/action-runs/{id}/"))?)
                .await?;
            println!("{}", serde_json::to_string_pretty(&run)?);
            Ok(0)
        }
        Command::Runs(RunsCommand::Logs { id, follow: true }) => follow(&api, &id).await,
        Command::Runs(RunsCommand::Logs { id, follow: false }) => {
            let response = api
                .send(api.request(
                    reqwest::Method::GET,
                    &format!("/api/v1/action-runs/{id}/logs/"),
                )?)
                .await?;
            std::io::stdout().write_all(&response.bytes().await?)?;
            Ok(0)
        }
        Command::Runs(RunsCommand::Cancel { id, wait }) => {
            let run = api
                .json(api.request(
                    reqwest::Method::POST,
                    &format!("/api/v1/action-runs/{id}/cancel/"),
                )?)
                .await?;
            let status = run["status"].as_str().unwrap_or("?");
            if status == "canceled" {
                eprintln!("muster: run {id} canceled");
                return Ok(if wait { 130 } else { 0 });
            }
            eprintln!("muster: run {id} is {status}; its runner was asked to stop it");
            if wait {
                return follow_quietly(&api, &id).await;
            }
            Ok(0)
        }
        Command::Runners(RunnersCommand::List) => {
            let list = api
                .json(api.request(reqwest::Method::GET, "/api/v1/runners/")?)
                .await?;
            for r in list["results"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<20}  {:<8}  capacity {}  active {}",
                    r["id"].as_str().unwrap_or(""),
                    r["name"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["capacity"],
                    r["active_runs"]
                );
            }
            Ok(0)
        }
        Command::Runners(RunnersCommand::JoinToken {
            multi_use,
            expires_in,
        }) => {
            let body = json!({ "single_use": !multi_use, "expires_in": expires_in });
            let token = api
                .json(
                    api.request(reqwest::Method::POST, "/api/v1/runners/join-tokens/")?
                        .json(&body),
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&token)?);
            Ok(0)
        }
    }
}

/// Validates and uploads a workspace directory; prints and returns the answer.
async fn push(api: &Api, dir: &std::path::Path) -> anyhow::Result<Value> {
    let bundle = Bundle::from_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    // Catch mistakes before uploading; the coordinator checks again.
    workspace::load(&bundle)?;
    let body = bundle.to_tar_gz();
    let req = api
        .request(reqwest::Method::POST, "/api/v1/workspaces/")?
        .header("Content-Type", "application/gzip")
        .body(body);
    let ws = api.json(req).await?;
    println!(
        "pushed {} (organization {}) {}",
        ws["name"].as_str().unwrap_or("?"),
        ws["organization"].as_str().unwrap_or("?"),
        ws["digest"].as_str().unwrap_or("?")
    );
    for block in ws["blocks"].as_array().into_iter().flatten() {
        let actions: Vec<&str> = block["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["name"].as_str())
            .collect();
        println!(
            "  {}: {}",
            block["name"].as_str().unwrap_or("?"),
            actions.join(", ")
        );
    }
    Ok(ws)
}

/// Prints the run's log live (server-sent events) and returns the exit
/// code for the run. A broken stream is resumed where it broke
/// (`Last-Event-ID`), so the log is printed whole and once, across network
/// blips and coordinator restarts.
async fn follow(api: &Api, id: &str) -> anyhow::Result<i32> {
    use futures_util::StreamExt;
    let path = format!("/api/v1/action-runs/{id}/logs/");
    let mut last: Option<String> = None;
    let mut stdout = std::io::stdout();
    let mut failures = 0u32;
    loop {
        let mut req = api
            .request(reqwest::Method::GET, &path)?
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(seq) = &last {
            req = req.header("Last-Event-ID", seq.as_str());
        }
        let response = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                // The API answered: that is no blip.
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                return Err(ApiError(format!("{status}: {body}")).into());
            }
            Err(error) => {
                failures += 1;
                if failures > 30 {
                    return Err(ApiError(format!(
                        "cannot reach the coordinator at {}: {error}",
                        api.base
                    ))
                    .into());
                }
                eprintln!("muster: lost the coordinator ({error}); reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        failures = 0;
        let mut body = response.bytes_stream();
        let mut buffer = Vec::new();
        while let Some(bytes) = body.next().await {
            let Ok(bytes) = bytes else { break };
            buffer.extend_from_slice(&bytes);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                let (mut event, mut seq, mut data) = ("message", None, String::new());
                let block = String::from_utf8_lossy(&block).into_owned();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = if v == "end" {
                            "end"
                        } else if v == "log" {
                            "log"
                        } else {
                            "other"
                        };
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        seq = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                let Ok(value) = serde_json::from_str::<Value>(&data) else {
                    continue; // a keep-alive
                };
                match event {
                    "log" => {
                        stdout.write_all(value["data"].as_str().unwrap_or_default().as_bytes())?;
                        stdout.flush()?;
                        if seq.is_some() {
                            last = seq;
                        }
                    }
                    "end" => {
                        let status = value["status"].as_str().unwrap_or_default();
                        eprintln!("muster: run {id} {status}");
                        return Ok(exit_code_for(status, value["exit_code"].as_i64()));
                    }
                    _ => {}
                }
            }
        }
        // The stream ended without the run's end: resume where it broke.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What `muster run --wait` exits with for a run that ended with `status`.
fn exit_code_for(status: &str, exit_code: Option<i64>) -> i32 {
    match status {
        "succeeded" => 0,
        "failed" => exit_code
            .filter(|c| *c != 0)
            .map(|c| c.clamp(1, 255) as i32)
            .unwrap_or(1),
        "timed_out" => 124,
        "lost" => 125,
        _ => 130,
    }
}

/// Waits for a run to end without printing its log.
async fn follow_quietly(api: &Api, id: &str) -> anyhow::Result<i32> {
    loop {
        let run = api
            .json(api.request(reqwest::Method::GET, &format!("/api/v1/action-runs/{id}/"))?)
            .await?;
        let status = run["status"].as_str().unwrap_or_default();
        if !matches!(status, "queued" | "leased" | "running") {
            eprintln!("muster: run {id} is {status}");
            return Ok(exit_code_for(status, run["exit_code"].as_i64()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
