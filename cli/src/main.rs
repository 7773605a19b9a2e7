//! `muster`: the command teams and CI pipelines use to push workspaces,
//! trigger runs, wait for them and read their logs.
//!
//! Following a run (`run --wait`, `runs logs -f`): progress goes to stderr,
//! the log to stdout — or to stderr with `--output json`, which keeps stdout
//! for the final run record. Exit codes are in [`EXIT_CODES`] (shown by
//! `muster --help`) and [`exit`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use muster_common::bundle::Bundle;
use muster_common::workspace;
use serde_json::{json, Value};

mod api;
mod dev;
mod follow;

use api::{Api, ApiError};
use follow::{Interrupts, OnInterrupt, Outcome, Sink};

/// What muster exits with. The codes of a run's end apply to `run --wait`,
/// `runs logs -f` and `runs cancel --wait`; the others to every command.
pub mod exit {
    /// The run succeeded; any other command did what it was asked.
    pub const OK: i32 = 0;
    /// The run failed without an exit code of its own (before its job ran),
    /// or muster failed for a reason not listed here.
    pub const FAILED: i32 = 1;
    /// A bad flag or value.
    pub const USAGE: i32 = 2;
    /// The API refused the request: an unknown workspace, block, action or
    /// run, invalid parameters, a run that has already ended (4xx).
    pub const REFUSED: i32 = 65;
    /// The coordinator could not be reached, or failed (5xx).
    pub const UNAVAILABLE: i32 = 69;
    /// No API key, or one the coordinator refused: unknown, expired,
    /// revoked, or without the role for this (401/403).
    pub const AUTH: i32 = 77;
    pub const TIMED_OUT: i32 = 124;
    pub const LOST: i32 = 125;
    pub const CANCELED: i32 = 130;
    /// Interrupted (SIGINT) and detached: the run goes on. 128 + SIGINT,
    /// as shells report it; the same number as a canceled run.
    pub const INTERRUPTED: i32 = 130;
    /// Terminated (SIGTERM) and detached: the run goes on. 128 + SIGTERM.
    pub const TERMINATED: i32 = 143;

    /// What muster exits with for a run that ended with `status`.
    pub fn for_run(status: &str, exit_code: Option<i64>) -> i32 {
        match status {
            "succeeded" => OK,
            "failed" => exit_code
                .filter(|c| *c != 0)
                .map(|c| c.clamp(1, 255) as i32)
                .unwrap_or(FAILED),
            "timed_out" => TIMED_OUT,
            "lost" => LOST,
            _ => CANCELED,
        }
    }
}

/// The exit codes, for `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0        the run succeeded (any other command: done)
  1-255    the run failed: its playbook's or script's own exit code
           (1 when it failed before its job ran; also any other error of muster's)
  124      the run timed out
  125      the run was lost (its runner stopped responding)
  130      the run was canceled; or muster was interrupted (Ctrl-C) and detached,
           the run goes on
  143      muster was terminated (SIGTERM) and detached; the run goes on
  2        usage error: a bad flag or value
  65       the API refused the request: unknown workspace, block, action or run,
           invalid parameters, a run that has already ended (HTTP 4xx)
  69       the coordinator could not be reached, or failed (HTTP 5xx)
  77       not authorized: no API key, or one that is wrong, expired, revoked or
           lacks the role for this (HTTP 401/403)
A run's own exit code can coincide with the others; `--output json` gives its
status and exit code unambiguously.

Interrupts while following a run (`run --wait`, `runs logs -f`): on a terminal,
Ctrl-C asks whether to cancel the remote run (then follows it until it ends
`canceled`); with --cancel-on-interrupt (or MUSTER_CANCEL_ON_INTERRUPT=1) SIGINT
and SIGTERM cancel it without asking; otherwise muster detaches, prints how to
follow again, and the run goes on.";

#[derive(Parser)]
#[command(
    name = "muster",
    version,
    about = "Trigger and follow Muster runs; push workspaces",
    after_help = "Exit codes and what Ctrl-C does: muster --help",
    after_long_help = EXIT_CODES
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// For people.
    Text,
    /// One JSON document on stdout, as the API gives it.
    Json,
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
    #[command(after_long_help = EXIT_CODES)]
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
        /// Follow the run until it ends: progress on stderr, the log on stdout;
        /// exit with the run's exit code.
        #[arg(long)]
        wait: bool,
        /// `json`: print the run record on stdout (with --wait, the final one,
        /// and the log goes to stderr); without --wait, the trigger's answer.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// With --wait: on SIGINT or SIGTERM, cancel the remote run without asking
        /// and follow it until it has ended (for CI jobs that get canceled).
        #[arg(long, env = "MUSTER_CANCEL_ON_INTERRUPT", value_parser = clap::builder::BoolishValueParser::new())]
        cancel_on_interrupt: bool,
    },
    /// Runs: list, show, logs, cancel.
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
    /// The latest runs, newest first.
    List {
        #[arg(long)]
        workspace: Option<String>,
        #[arg(long)]
        block: Option<String>,
        #[arg(long)]
        action: Option<String>,
        /// queued, leased, running, succeeded, failed, canceled, timed_out or lost.
        #[arg(long)]
        status: Option<String>,
        /// Who triggered them: the API key's name, the user, or the CI system
        /// (gitlab-ci, github-actions, …).
        #[arg(long)]
        trigger: Option<String>,
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// `json`: the runs as a JSON array of run records.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// One run's record.
    Show {
        id: String,
        /// `json`: the run record as the API gives it.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A run's log.
    #[command(after_long_help = EXIT_CODES)]
    Logs {
        id: String,
        /// Keep printing as the log grows until the run ends; exit as `run --wait` does.
        #[arg(short, long)]
        follow: bool,
        /// With --follow: on SIGINT or SIGTERM, cancel the run without asking.
        #[arg(long, env = "MUSTER_CANCEL_ON_INTERRUPT", value_parser = clap::builder::BoolishValueParser::new())]
        cancel_on_interrupt: bool,
    },
    /// Cancels a run: a queued one at once, a running one is stopped by its runner.
    Cancel {
        id: String,
        /// Wait until the run has ended and exit as `muster run --wait` would.
        #[arg(long)]
        wait: bool,
        /// `json`: print the run record (with --wait, the final one).
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
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

/// A bad flag value clap could not check.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn parse_extra_vars(pairs: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut vars = serde_json::Map::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| UsageError(format!("-e {pair}: expected key=value")))?;
        if k.is_empty() {
            bail!(UsageError(format!("-e {pair}: the key is empty")));
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
            if let Some(api) = error.downcast_ref::<ApiError>() {
                api.exit_code()
            } else if error.downcast_ref::<UsageError>().is_some() {
                exit::USAGE
            } else {
                exit::FAILED
            }
        }
    };
    std::process::exit(code);
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn on_interrupt(cancel: bool) -> OnInterrupt {
    if cancel {
        OnInterrupt::Cancel
    } else {
        OnInterrupt::AskOrDetach
    }
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
            Ok(exit::OK)
        }
        Command::Workspace(WorkspaceCommand::Push { dir }) => {
            push(&api, &dir).await?;
            Ok(exit::OK)
        }
        Command::Run {
            block,
            action,
            workspace,
            extra_vars,
            reason,
            wait,
            output,
            cancel_on_interrupt,
        } => {
            let body = json!({
                "block": block,
                "action": action,
                "reason": reason,
                "parameters": { "extra_vars": parse_extra_vars(&extra_vars)? },
            });
            // Before the trigger: an interrupt while it is on its way is not lost.
            let mut interrupts = if wait {
                Some(Interrupts::install()?)
            } else {
                None
            };
            let path = format!("/api/v1/workspaces/{workspace}/actions");
            let queued = api
                .json(api.request(reqwest::Method::POST, &path)?.json(&body))
                .await?;
            let id = api::run_id_of(&queued)?;
            let Some(interrupts) = interrupts.as_mut() else {
                match output {
                    Output::Text => println!("{id}"),
                    Output::Json => print_json(&queued)?,
                }
                return Ok(exit::OK);
            };
            eprintln!("muster: run {id} queued");
            let sink = match output {
                Output::Text => Sink::Stdout,
                Output::Json => Sink::Stderr,
            };
            let outcome = follow::follow(
                &api,
                &id,
                sink,
                on_interrupt(cancel_on_interrupt),
                interrupts,
            )
            .await?;
            finish(&api, &id, outcome, output).await
        }
        Command::Runs(RunsCommand::List {
            workspace,
            block,
            action,
            status,
            trigger,
            limit,
            output,
        }) => {
            let mut query: BTreeMap<&str, String> = BTreeMap::new();
            query.insert("page_size", limit.to_string());
            for (k, v) in [
                ("workspace", workspace),
                ("block", block),
                ("action", action),
                ("status", status),
                ("trigger", trigger),
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
            let runs = list["results"].as_array().cloned().unwrap_or_default();
            if output == Output::Json {
                print_json(&Value::Array(runs))?;
                return Ok(exit::OK);
            }
            println!(
                "{:<36}  {:<10}  {:<4}  {:<24}  {:<20}  {:<16}  created",
                "id", "status", "exit", "workspace", "block:action", "runner"
            );
            for r in &runs {
                println!(
                    "{:<36}  {:<10}  {:<4}  {:<24}  {:<20}  {:<16}  {}",
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
                    r["runner"].as_str().unwrap_or(""),
                    r["created_at"].as_str().unwrap_or(""),
                );
            }
            Ok(exit::OK)
        }
        Command::Runs(RunsCommand::Show { id, output }) => {
            let run = api
                .json(api.request(reqwest::Method::GET, &format!("/api/v1/action-runs/{id}/"))?)
                .await?;
            match output {
                Output::Json => print_json(&run)?,
                Output::Text => print!("{}", describe_run(&run)),
            }
            Ok(exit::OK)
        }
        Command::Runs(RunsCommand::Logs {
            id,
            follow: true,
            cancel_on_interrupt,
        }) => {
            let mut interrupts = Interrupts::install()?;
            let outcome = follow::follow(
                &api,
                &id,
                Sink::Stdout,
                on_interrupt(cancel_on_interrupt),
                &mut interrupts,
            )
            .await?;
            finish(&api, &id, outcome, Output::Text).await
        }
        Command::Runs(RunsCommand::Logs {
            id, follow: false, ..
        }) => {
            let response = api
                .send(api.request(
                    reqwest::Method::GET,
                    &format!("/api/v1/action-runs/{id}/logs/"),
                )?)
                .await?;
            use std::io::Write;
            std::io::stdout().write_all(&response.bytes().await?)?;
            Ok(exit::OK)
        }
        Command::Runs(RunsCommand::Cancel { id, wait, output }) => {
            let run = api
                .json(api.request(
                    reqwest::Method::POST,
                    &format!("/api/v1/action-runs/{id}/cancel/"),
                )?)
                .await?;
            let status = run["status"].as_str().unwrap_or("?");
            if status == "canceled" {
                eprintln!("muster: run {id} canceled");
            } else {
                eprintln!("muster: run {id} is {status}; its runner was asked to stop it");
            }
            if !wait {
                if output == Output::Json {
                    print_json(&run)?;
                }
                return Ok(exit::OK);
            }
            let run = wait_quietly(&api, &id).await?;
            if output == Output::Json {
                print_json(&run)?;
            }
            Ok(exit::for_run(
                run["status"].as_str().unwrap_or_default(),
                run["exit_code"].as_i64(),
            ))
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
            Ok(exit::OK)
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
            print_json(&token)?;
            Ok(exit::OK)
        }
    }
}

/// The exit code for a run followed to `outcome`; with `--output json`,
/// prints the final run record.
async fn finish(api: &Api, id: &str, outcome: Outcome, output: Output) -> anyhow::Result<i32> {
    match outcome {
        Outcome::Detached(code) => Ok(code),
        Outcome::Ended(ended) => {
            if output == Output::Json {
                print_json(&api.run_record(id).await?)?;
            }
            Ok(ended.exit_code())
        }
    }
}

/// A run record for people: one `key: value` line per field that is set.
fn describe_run(run: &Value) -> String {
    let text = |key: &str| match &run[key] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let mut lines: Vec<(&str, Option<String>)> = vec![
        ("id", text("id")),
        ("status", text("status")),
        ("exit code", text("exit_code")),
        ("error", text("error")),
        ("workspace", text("workspace")),
        (
            "block",
            text("block").map(|b| match text("block_version") {
                Some(v) => format!("{b} {v}"),
                None => b,
            }),
        ),
        ("action", text("action")),
        ("reason", text("reason")),
    ];
    let trigger = &run["trigger"];
    let who: Vec<String> = ["api_key", "user", "ci"]
        .iter()
        .filter_map(|k| trigger[*k].as_str().map(|v| format!("{k} {v}")))
        .collect();
    lines.push(("trigger", Some(who.join(", ")).filter(|s| !s.is_empty())));
    lines.extend([
        ("runner", text("runner")),
        ("executor", text("executor")),
        ("image", text("image")),
        ("attempt", text("attempt")),
        ("created", text("created_at")),
        ("started", text("started_at")),
        ("finished", text("finished_at")),
        (
            "log verified",
            run["log"]["verified"].as_bool().map(|v| v.to_string()),
        ),
        ("logs", text("logs_url")),
    ]);
    lines
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k:<13} {v}\n")))
        .collect()
}

/// Waits for a run to end without printing its log; returns its record.
async fn wait_quietly(api: &Api, id: &str) -> anyhow::Result<Value> {
    loop {
        let run = api.run_record(id).await?;
        let status = run["status"].as_str().unwrap_or_default();
        if !matches!(status, "queued" | "leased" | "running") {
            eprintln!(
                "muster: {}",
                follow::describe_end(
                    id,
                    &follow::Ended {
                        status: status.to_owned(),
                        exit_code: run["exit_code"].as_i64(),
                    }
                )
            );
            return Ok(run);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_end_maps_to_its_exit_code() {
        assert_eq!(exit::for_run("succeeded", Some(0)), 0);
        assert_eq!(exit::for_run("failed", Some(7)), 7);
        assert_eq!(exit::for_run("failed", None), exit::FAILED);
        assert_eq!(exit::for_run("failed", Some(0)), exit::FAILED);
        assert_eq!(exit::for_run("failed", Some(300)), 255);
        assert_eq!(exit::for_run("failed", Some(-1)), 1);
        assert_eq!(exit::for_run("timed_out", None), 124);
        assert_eq!(exit::for_run("lost", None), 125);
        assert_eq!(exit::for_run("canceled", Some(143)), 130);
    }

    #[test]
    fn extra_vars_are_json_when_they_parse_and_bad_ones_are_usage_errors() {
        let vars = parse_extra_vars(&["n=3".into(), "s=text".into(), "o={\"a\":1}".into()])
            .expect("valid");
        assert_eq!(
            Value::Object(vars),
            json!({"n": 3, "s": "text", "o": {"a": 1}})
        );
        for bad in ["novalue", "=x"] {
            let error = parse_extra_vars(&[bad.into()]).unwrap_err();
            assert!(
                error.downcast_ref::<UsageError>().is_some(),
                "{bad}: {error}"
            );
        }
    }
}
