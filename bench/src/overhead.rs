//! Execution overhead: a trivial playbook (one play on localhost, no facts,
//! one `ping` task; see [`crate::harness::PING_PLAYBOOK`]) run
//!
//! - through Muster: a real coordinator and a `muster-runner` process with
//!   the docker executor; the wall time runs from just before the HTTP
//!   trigger is sent to the `end` event (`succeeded`) on the run's
//!   `text/event-stream` log tail, which the client opens as soon as the
//!   trigger answers; the run's recorded timestamps split it into phases;
//! - as `docker run --rm <the runner's image> ansible-playbook <playbook>`,
//!   the workspace bind-mounted at the path the executor uploads it to, and
//!   as `docker run --rm <image> true` (the container alone);
//! - through ansible-runner, AWX's engine, in-process from Python
//!   (`bench/peers/ansible_runner_bench.py`), as plain `ansible-playbook`
//!   from the same virtualenv on the host, the floor, and through
//!   ansible-runner with process isolation in the same image under docker,
//!   as AWX runs a job in an execution environment.
//!
//! Muster and the two `docker run`s take turns, one iteration each, so a
//! change in the machine's load touches all three alike; the Python program
//! runs its iterations afterwards, in one process, its three sides taking
//! turns the same way.
//!
//! Where the time goes: the daemon's own events (`docker events`: a
//! container created, started, died, destroyed) put the container's life on
//! the same clock as the run's recorded timestamps and the `docker run`
//! command's start and exit, so both are split into the same phases.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::{
    Api, Binaries, Coordinator, RunnerProcess, ScratchDb, StoreKind, BLOCK, PING_PLAYBOOK,
};
use crate::stats::{ms, percentile, Table};

pub struct Options {
    pub store: StoreKind,
    pub iterations: usize,
    pub warmup: usize,
    /// The Python of the virtualenv `scripts/bench-env.sh` makes; `None`
    /// with `ansible_runner` set is an error.
    pub python: Option<PathBuf>,
    /// Measure ansible-runner (and plain `ansible-playbook` on the host).
    pub ansible_runner: bool,
    pub database_url: Option<String>,
}

/// The image the runner uses for a workspace that names none (its
/// `--default-image` default); `scripts/test-env.sh` builds it.
pub const IMAGE: &str = "muster/ansible:bookworm";
/// Where the docker executor puts the workspace in the container.
const CONTAINER_WORKSPACE: &str = "/workspace";
/// The environment the docker executor gives every playbook that matters to
/// Ansible (the rest are the workspace's variables).
const ANSIBLE_ENV: [&str; 3] = [
    "ANSIBLE_HOST_KEY_CHECKING=False",
    "ANSIBLE_STDOUT_CALLBACK=default",
    "PYTHONUNBUFFERED=1",
];
/// The ansible-runner peer, written to a temporary file and run.
const PEER: &str = include_str!("../peers/ansible_runner_bench.py");
/// The longest one run of the trivial playbook may take, any way.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The label the docker executor puts on a job's container.
const RUN_LABEL: &str = "io.muster.run-id";
/// The label this benchmark puts on the containers of its `docker run`s.
const BENCH_LABEL: &str = "io.muster.bench";

/// One run through Muster; times in milliseconds since the epoch.
struct MusterRun {
    run_id: String,
    /// Trigger sent → `end` event received (a monotonic clock).
    wall: f64,
    sent: f64,
    leased: f64,
    /// As the runner reports them.
    started: f64,
    finished: f64,
    /// The `end` event received.
    seen: f64,
}

/// One `docker run`: its wall time, and when it was spawned and exited
/// (milliseconds since the epoch).
struct DockerRun {
    label: String,
    wall: f64,
    spawned: f64,
    exited: f64,
}

/// When the daemon says a container went through `create`, `start`, `die`
/// and `destroy`, in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Life {
    create: f64,
    start: f64,
    die: f64,
    destroy: f64,
}

/// A container event of one of the benchmark's containers: its label and
/// the label's value, the action, and when, in milliseconds since the epoch.
type Event = (String, String, String, f64);

/// Container events as `docker events` reports them while it runs.
struct DockerEvents {
    _child: tokio::process::Child,
    seen: Arc<Mutex<Vec<Event>>>,
}

impl DockerEvents {
    async fn start() -> anyhow::Result<DockerEvents> {
        let mut child = tokio::process::Command::new("docker")
            .args(["events", "--filter", "type=container"])
            .args(["--format", "{{json .}}"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting `docker events`")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("`docker events` has no output"))?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(event) = parse_event(&line) {
                    sink.lock().expect("events lock").push(event);
                }
            }
        });
        // `docker events` reports only what happens after it subscribed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(DockerEvents {
            _child: child,
            seen,
        })
    }

    /// The life of the container labelled `label=value`, if every step of
    /// it was seen.
    fn life(&self, label: &str, value: &str) -> Option<Life> {
        let seen = self.seen.lock().expect("events lock");
        let at = |action: &str| {
            seen.iter()
                .find(|(l, v, a, _)| l == label && v == value && a == action)
                .map(|(.., at)| *at)
        };
        Some(Life {
            create: at("create")?,
            start: at("start")?,
            die: at("die")?,
            destroy: at("destroy")?,
        })
    }
}

/// The [`Event`] of a line of `docker events`, if it is about one of the
/// benchmark's containers.
fn parse_event(line: &str) -> Option<Event> {
    let event: Value = serde_json::from_str(line).ok()?;
    let attributes = &event["Actor"]["Attributes"];
    let (label, value) = [RUN_LABEL, BENCH_LABEL]
        .into_iter()
        .find_map(|l| Some((l, attributes[l].as_str()?)))?;
    Some((
        label.to_owned(),
        value.to_owned(),
        event["Action"].as_str()?.to_owned(),
        event["timeNano"].as_i64()? as f64 / 1e6,
    ))
}

/// Min, p50, p90 and max of a set of milliseconds.
struct Spread {
    count: usize,
    min: f64,
    p50: f64,
    p90: f64,
    max: f64,
}

impl Spread {
    fn of(samples: &[f64]) -> Option<Spread> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Spread {
            count: sorted.len(),
            min: *sorted.first()?,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            max: *sorted.last()?,
        })
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.count.to_string(),
            ms(self.min),
            ms(self.p50),
            ms(self.p90),
            ms(self.max),
        ]
    }
}

/// What the Python peer measured.
#[derive(Debug)]
struct Peer {
    runner_version: String,
    runner_ms: Vec<f64>,
    core_version: String,
    playbook_ms: Vec<f64>,
    /// ansible-runner with process isolation in [`IMAGE`] (docker), as AWX
    /// runs a job in an execution environment.
    contained_ms: Vec<f64>,
}

pub async fn run(bins: &Binaries, options: &Options) -> anyhow::Result<()> {
    let python = match (&options.python, options.ansible_runner) {
        (_, false) => None,
        (Some(python), true) if python.is_file() => Some(python.clone()),
        (Some(python), true) => bail!(
            "--python / MUSTER_BENCH_PYTHON: {} does not exist; run scripts/bench-env.sh, \
             which makes the virtualenv and prints the line to set",
            python.display()
        ),
        (None, true) => bail!(
            "no Python with ansible-runner: run scripts/bench-env.sh and set the \
             MUSTER_BENCH_PYTHON it prints (or pass --python), or skip the peer with --no-ansible-runner"
        ),
    };
    let image_ansible = image_ansible_version().await?;

    let workspace = tempfile::Builder::new()
        .prefix("muster-bench-overhead-")
        .tempdir()?;
    crate::harness::bench_workspace(workspace.path())?;
    let block_dir = workspace.path().join("blocks").join(BLOCK);

    let db = match options.store {
        StoreKind::Postgres => Some(
            ScratchDb::create(crate::database_url(&options.database_url)?, "muster_bench").await?,
        ),
        StoreKind::Sqlite => None,
    };
    let coordinator = Coordinator::start(bins, db.as_ref()).await?;
    let events = DockerEvents::start().await?;
    let mut runner = None;
    let measured = async {
        coordinator.api.push_bench_workspace().await?;
        runner = Some(
            RunnerProcess::start_with(bins, &coordinator, "bench-overhead", 1, "docker", None)
                .await?,
        );
        eprintln!(
            "overhead: {} warm-up and {} measured iterations of Muster ({}, docker executor), \
             docker run, docker run true",
            options.warmup,
            options.iterations,
            options.store.name()
        );
        let (mut muster, mut docker, mut bare) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..options.warmup + options.iterations {
            let m = through_muster(&coordinator.api)
                .await
                .context("the playbook through Muster")?;
            let d = docker_run(workspace.path(), &["ansible-playbook", PING_PLAYBOOK])
                .await
                .context("docker run … ansible-playbook")?;
            let t = docker_run(workspace.path(), &["true"])
                .await
                .context("docker run … true")?;
            if i >= options.warmup {
                muster.push(m);
                docker.push(d);
                bare.push(t);
            }
        }
        anyhow::Ok((muster, docker, bare))
    }
    .await;
    let (muster, docker, bare) = measured.map_err(|e| {
        let runner_log = runner.as_ref().map(|r| r.log_tail()).unwrap_or_default();
        e.context(format!(
            "the coordinator's log ends:\n{}\nthe runner's log ends:\n{runner_log}",
            coordinator.log_tail()
        ))
    })?;
    drop(runner);
    drop(coordinator);
    drop(db);
    // The last container's destroy event may still be on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let timeline = Timeline::of(&events, &muster, &docker);
    drop(events);

    let peer = match python {
        Some(python) => {
            eprintln!(
                "overhead: {} warm-up and {} measured iterations of ansible-runner, ansible-playbook and ansible-runner in docker, in turn",
                options.warmup, options.iterations
            );
            Some(
                ansible_runner_peer(&python, &block_dir, options)
                    .await
                    .context("the ansible-runner peer (bench/peers/ansible_runner_bench.py)")?,
            )
        }
        None => None,
    };

    print_tables(
        options,
        &image_ansible,
        &muster,
        &docker,
        &bare,
        peer.as_ref(),
        &timeline,
    );
    Ok(())
}

/// The version of Debian's `ansible-core` package in [`IMAGE`]; fails,
/// naming the script that builds it, when the image is not there.
async fn image_ansible_version() -> anyhow::Result<String> {
    let inspect = tokio::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", IMAGE])
        .stdin(Stdio::null())
        .output()
        .await
        .context("starting `docker` (the Docker CLI must be installed)")?;
    if !inspect.status.success() {
        bail!(
            "the image {IMAGE} is not on this host ({}); build it with scripts/test-env.sh \
             (images are built from Debian packages, never pulled)",
            String::from_utf8_lossy(&inspect.stderr).trim()
        );
    }
    let query = tokio::process::Command::new("docker")
        .args(["run", "--rm", IMAGE])
        .args(["dpkg-query", "-W", "-f", "${Version}", "ansible-core"])
        .stdin(Stdio::null())
        .output()
        .await?;
    Ok(if query.status.success() {
        String::from_utf8_lossy(&query.stdout).trim().to_owned()
    } else {
        "unknown".into()
    })
}

/// Seconds since the epoch of an RFC 3339 field of a run, in milliseconds.
fn epoch_ms(run: &Value, field: &str) -> anyhow::Result<f64> {
    let text = run[field]
        .as_str()
        .ok_or_else(|| anyhow!("the run has no {field}: {run}"))?;
    Ok(chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("{field} '{text}'"))?
        .timestamp_micros() as f64
        / 1000.0)
}

fn epoch_ms_of(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Triggers the `ping` action and follows its log tail to the `end` event.
async fn through_muster(api: &Api) -> anyhow::Result<MusterRun> {
    let sent_at = SystemTime::now();
    let began = Instant::now();
    let run_id = api.trigger("ping", json!({})).await?;
    let (end, log) = tokio::time::timeout(RUN_LIMIT, follow(api, &run_id))
        .await
        .map_err(|_| anyhow!("run {run_id} did not end within {RUN_LIMIT:?}"))??;
    let wall = began.elapsed().as_secs_f64() * 1000.0;
    let seen = epoch_ms_of(SystemTime::now());
    if end["status"] != "succeeded" {
        bail!("run {run_id} ended {end}; its log:\n{log}");
    }
    check_recap(&log).with_context(|| format!("run {run_id}"))?;
    let run = api.run(&run_id).await?;
    Ok(MusterRun {
        wall,
        sent: epoch_ms_of(sent_at),
        leased: epoch_ms(&run, "leased_at")?,
        started: epoch_ms(&run, "started_at")?,
        finished: epoch_ms(&run, "finished_at")?,
        seen,
        run_id,
    })
}

/// Reads run `run_id`'s `text/event-stream` tail to its end; returns the
/// `end` event's data and the log.
async fn follow(api: &Api, run_id: &str) -> anyhow::Result<(Value, String)> {
    let mut body = api.tail(run_id).await?.bytes_stream();
    let mut parser = crate::sse::Parser::default();
    let mut log = String::new();
    while let Some(bytes) = body.next().await {
        parser.push(&bytes?);
        while let Some(event) = parser.next_event() {
            let data: Value = serde_json::from_str(&event.data)
                .with_context(|| format!("event data '{}'", event.data))?;
            match event.event.as_str() {
                "log" => log.push_str(data["data"].as_str().unwrap_or_default()),
                "end" => return Ok((data, log)),
                _ => {}
            }
        }
    }
    bail!("the tail of run {run_id} ended without an end event; the log so far:\n{log}")
}

/// Checks that the playbook's recap says its one task ran on localhost.
pub fn check_recap(output: &str) -> anyhow::Result<()> {
    let recap = output
        .lines()
        .find(|l| l.starts_with("localhost") && l.contains("ok="))
        .ok_or_else(|| anyhow!("the output has no recap for localhost:\n{output}"))?;
    let field = |name: &str| {
        recap
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.parse::<u32>().ok())
    };
    if field("ok=") != Some(1) || field("failed=") != Some(0) || field("unreachable=") != Some(0) {
        bail!("the playbook's recap is not ok=1 failed=0 unreachable=0: {recap}");
    }
    Ok(())
}

/// Wall time of `docker run --rm` of [`IMAGE`] with the workspace mounted
/// where the executor puts it and the block's directory as the working
/// directory, running `command`; an `ansible-playbook` run must succeed.
async fn docker_run(workspace: &Path, command: &[&str]) -> anyhow::Result<DockerRun> {
    let label = uuid::Uuid::new_v4().simple().to_string();
    let mut docker = tokio::process::Command::new("docker");
    docker
        .args(["run", "--rm", "--label", &format!("{BENCH_LABEL}={label}")])
        .arg("--volume")
        .arg(format!(
            "{}:{CONTAINER_WORKSPACE}",
            workspace
                .to_str()
                .ok_or_else(|| anyhow!("the temporary directory's path is not UTF-8"))?
        ))
        .args([
            "--workdir",
            &format!("{CONTAINER_WORKSPACE}/blocks/{BLOCK}"),
        ]);
    for variable in ANSIBLE_ENV {
        docker.args(["--env", variable]);
    }
    docker
        .arg(IMAGE)
        .args(command)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let spawned = epoch_ms_of(SystemTime::now());
    let began = Instant::now();
    let done = tokio::time::timeout(RUN_LIMIT, docker.output())
        .await
        .map_err(|_| anyhow!("docker run did not end within {RUN_LIMIT:?}"))??;
    let wall = began.elapsed().as_secs_f64() * 1000.0;
    let exited = epoch_ms_of(SystemTime::now());
    let stdout = String::from_utf8_lossy(&done.stdout);
    if !done.status.success() {
        bail!(
            "docker run exited with {}:\n{stdout}{}",
            done.status,
            String::from_utf8_lossy(&done.stderr)
        );
    }
    if command[0] == "ansible-playbook" {
        check_recap(&stdout)?;
    }
    Ok(DockerRun {
        label,
        wall,
        spawned,
        exited,
    })
}

/// Medians of where the time of Muster's runs and of the `docker run`s of
/// the playbook goes (milliseconds), over the runs whose container's whole
/// life `docker events` saw.
struct Timeline {
    muster_runs: usize,
    docker_runs: usize,
    /// Trigger sent → lease taken (accept, queue, dispatch).
    to_lease: f64,
    /// Lease → the runner reports started (bundle, image inspect).
    lease_to_start: f64,
    /// The runner's started (the command's spawn) → container created.
    to_create: [f64; 2],
    /// Created → started (Muster uploads the bundle and the vars first).
    create_to_start: [f64; 2],
    /// Started → died: the playbook in the container.
    in_container: [f64; 2],
    /// Died → destroyed (the output's end, the exit code, artifacts looked
    /// for, the removal).
    die_to_destroy: [f64; 2],
    /// Destroyed → the runner reports finished (the command exits).
    destroy_to_done: [f64; 2],
    /// The runner's finished → `end` event received.
    finish_to_seen: f64,
}

impl Timeline {
    fn of(events: &DockerEvents, muster: &[MusterRun], docker: &[DockerRun]) -> Timeline {
        let p50 = |v: Vec<f64>| Spread::of(&v).map_or(f64::NAN, |s| s.p50);
        let m: Vec<(&MusterRun, Life)> = muster
            .iter()
            .filter_map(|r| Some((r, events.life(RUN_LABEL, &r.run_id)?)))
            .collect();
        let d: Vec<(&DockerRun, Life)> = docker
            .iter()
            .filter_map(|r| Some((r, events.life(BENCH_LABEL, &r.label)?)))
            .collect();
        let both = |muster: fn(&MusterRun, &Life) -> f64, docker: fn(&DockerRun, &Life) -> f64| {
            [
                p50(m.iter().map(|(r, l)| muster(r, l)).collect()),
                p50(d.iter().map(|(r, l)| docker(r, l)).collect()),
            ]
        };
        let life = |f: fn(&Life) -> f64| -> [f64; 2] {
            [
                p50(m.iter().map(|(_, l)| f(l)).collect()),
                p50(d.iter().map(|(_, l)| f(l)).collect()),
            ]
        };
        Timeline {
            muster_runs: m.len(),
            docker_runs: d.len(),
            to_lease: p50(muster.iter().map(|r| r.leased - r.sent).collect()),
            lease_to_start: p50(muster.iter().map(|r| r.started - r.leased).collect()),
            to_create: both(|r, l| l.create - r.started, |r, l| l.create - r.spawned),
            create_to_start: life(|l| l.start - l.create),
            in_container: life(|l| l.die - l.start),
            die_to_destroy: life(|l| l.destroy - l.die),
            destroy_to_done: both(|r, l| r.finished - l.destroy, |r, l| r.exited - l.destroy),
            finish_to_seen: p50(muster.iter().map(|r| r.seen - r.finished).collect()),
        }
    }
}

/// Runs the Python peer with `python` on the playbook in `block_dir`.
async fn ansible_runner_peer(
    python: &Path,
    block_dir: &Path,
    options: &Options,
) -> anyhow::Result<Peer> {
    let dir = tempfile::Builder::new()
        .prefix("muster-bench-peer-")
        .tempdir()?;
    let script = dir.path().join("ansible_runner_bench.py");
    std::fs::write(&script, PEER)?;
    let done = tokio::process::Command::new(python)
        .arg(&script)
        .arg("--playbook-dir")
        .arg(block_dir)
        .args(["--playbook", PING_PLAYBOOK])
        .args(["--iterations", &options.iterations.to_string()])
        .args(["--warmup", &options.warmup.to_string()])
        .args(["--container-image", IMAGE])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("starting {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&done.stdout);
    if !done.status.success() {
        bail!(
            "{} exited with {}:\n{stdout}{}",
            python.display(),
            done.status,
            String::from_utf8_lossy(&done.stderr)
        );
    }
    parse_peer(&stdout)
}

/// Reads the peer's JSON line (the last line it printed).
fn parse_peer(stdout: &str) -> anyhow::Result<Peer> {
    let line = stdout
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("the peer printed nothing"))?;
    let report: Value =
        serde_json::from_str(line).with_context(|| format!("the peer printed '{line}'"))?;
    let part = |name: &str| -> anyhow::Result<(String, Vec<f64>)> {
        let version = report[name]["version"].as_str().unwrap_or("unknown");
        let samples = report[name]["ms"]
            .as_array()
            .ok_or_else(|| anyhow!("the peer's report has no {name}.ms: {line}"))?
            .iter()
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| anyhow!("{name}.ms holds '{v}', not a number"))
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        if samples.is_empty() {
            bail!("the peer's report has no samples of {name}");
        }
        Ok((version.to_owned(), samples))
    };
    let (runner_version, runner_ms) = part("ansible_runner")?;
    let (core_version, playbook_ms) = part("ansible_playbook")?;
    let (_, contained_ms) = part("ansible_runner_container")?;
    Ok(Peer {
        runner_version,
        runner_ms,
        core_version,
        playbook_ms,
        contained_ms,
    })
}

fn print_tables(
    options: &Options,
    image_ansible: &str,
    muster: &[MusterRun],
    docker: &[DockerRun],
    bare: &[DockerRun],
    peer: Option<&Peer>,
    timeline: &Timeline,
) {
    let walls = |runs: &[DockerRun]| runs.iter().map(|r| r.wall).collect::<Vec<f64>>();
    let (docker, bare) = (&walls(docker)[..], &walls(bare)[..]);
    let column = |f: fn(&MusterRun) -> f64| muster.iter().map(f).collect::<Vec<f64>>();
    let muster_wall = column(|r| r.wall);
    let mut table = Table::new(&["system", "runs", "min ms", "p50 ms", "p90 ms", "max ms"]);
    let mut row = |label: String, samples: &[f64]| {
        if let Some(spread) = Spread::of(samples) {
            let mut cells = vec![label];
            cells.extend(spread.cells());
            table.row(cells);
        }
    };
    row(
        format!(
            "Muster ({}, docker executor): trigger → `succeeded` seen on the SSE tail",
            options.store.name()
        ),
        &muster_wall,
    );
    row(
        "Muster: the runner's own started → finished".into(),
        &column(|r| r.finished - r.started),
    );
    row(
        format!("`docker run --rm` {IMAGE} `ansible-playbook` (ansible-core {image_ansible})"),
        docker,
    );
    row(
        format!("`docker run --rm` {IMAGE} `true` (the container alone)"),
        bare,
    );
    if let Some(peer) = peer {
        row(
            format!(
                "ansible-runner {} `run()` in-process (ansible-core {}, host)",
                peer.runner_version, peer.core_version
            ),
            &peer.runner_ms,
        );
        row(
            format!(
                "`ansible-playbook` on the host, same virtualenv (ansible-core {})",
                peer.core_version
            ),
            &peer.playbook_ms,
        );
        row(
            format!(
                "ansible-runner {} `run()`, process isolation in docker, {IMAGE} (as AWX, in a container)",
                peer.runner_version
            ),
            &peer.contained_ms,
        );
    }
    println!("\nExecution overhead: a one-task playbook on localhost\n");
    print!("{}", table.render());

    let p50 = |samples: &[f64]| Spread::of(samples).map_or(0.0, |s| s.p50);
    let paired: Vec<f64> = muster_wall.iter().zip(docker).map(|(m, d)| m - d).collect();
    let mut overhead = Table::new(&["Muster's overhead", "ms"]);
    overhead.row(vec![
        "over `docker run`: p50 − p50".into(),
        ms(p50(&muster_wall) - p50(docker)),
    ]);
    overhead.row(vec![
        "over `docker run`: median of the paired differences".into(),
        ms(p50(&paired)),
    ]);
    if let Some(peer) = peer {
        overhead.row(vec![
            "beside ansible-runner: p50 − p50 (negative: Muster is faster)".into(),
            ms(p50(&muster_wall) - p50(&peer.runner_ms)),
        ]);
        overhead.row(vec![
            "ansible-runner's own, over `ansible-playbook` on the host: p50 − p50".into(),
            ms(p50(&peer.runner_ms) - p50(&peer.playbook_ms)),
        ]);
        // The peer alternates the two as Muster and `docker run` alternate,
        // so each engine's own cost over running the playbook directly is
        // read the same way on both sides.
        let peer_paired: Vec<f64> = peer
            .runner_ms
            .iter()
            .zip(&peer.playbook_ms)
            .map(|(r, p)| r - p)
            .collect();
        overhead.row(vec![
            "ansible-runner's own, over `ansible-playbook` on the host: median of the paired differences".into(),
            ms(p50(&peer_paired)),
        ]);
        overhead.row(vec![
            "Muster's own minus ansible-runner's own, medians of the paired differences (negative: Muster adds less)".into(),
            ms(p50(&paired) - p50(&peer_paired)),
        ]);
        overhead.row(vec![
            "beside ansible-runner in docker, same image: p50 − p50 (negative: Muster is faster)"
                .into(),
            ms(p50(&muster_wall) - p50(&peer.contained_ms)),
        ]);
        overhead.row(vec![
            "ansible-runner in docker, over `docker run`: p50 − p50".into(),
            ms(p50(&peer.contained_ms) - p50(docker)),
        ]);
    }
    println!();
    print!("{}", overhead.render());

    let t = timeline;
    let mut phases = Table::new(&["where the time goes, p50 ms", "Muster", "docker run"]);
    let cell = |v: f64| if v.is_nan() { "–".to_owned() } else { ms(v) };
    let mut phase = |label: &str, cells: [f64; 2]| {
        phases.row(vec![label.into(), cell(cells[0]), cell(cells[1])]);
    };
    phase(
        "trigger sent → lease taken (accept, queue, dispatch)",
        [t.to_lease, f64::NAN],
    );
    phase(
        "lease → runner reports started (bundle from cache, image inspected)",
        [t.lease_to_start, f64::NAN],
    );
    phase(
        "runner's started / command spawned → container created",
        t.to_create,
    );
    phase(
        "created → started (Muster uploads the workspace and vars first)",
        t.create_to_start,
    );
    phase(
        "started → exited: `ansible-playbook` in the container",
        t.in_container,
    );
    phase(
        "exited → removed (output's end, exit code, artifacts looked for, removal)",
        t.die_to_destroy,
    );
    phase(
        "removed → runner reports finished / command exits",
        t.destroy_to_done,
    );
    phase(
        "runner finished → `end` event received (result stored, tail told)",
        [t.finish_to_seen, f64::NAN],
    );
    println!(
        "\nWhere the time goes (medians of each phase; container steps from `docker events`, \
         {} Muster runs and {} `docker run`s):\n",
        t.muster_runs, t.docker_runs
    );
    print!("{}", phases.render());
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECAP: &str = "PLAY RECAP *********\n\
        localhost                  : ok=1    changed=0    unreachable=0    failed=0    skipped=0    rescued=0    ignored=0   \n";

    #[test]
    fn a_successful_recap_passes_and_others_fail() {
        check_recap(RECAP).unwrap();
        let failed = RECAP.replace(
            "ok=1    changed=0    unreachable=0    failed=0",
            "ok=0    changed=0    unreachable=0    failed=1",
        );
        assert!(format!("{:#}", check_recap(&failed).unwrap_err()).contains("not ok=1"));
        assert!(format!("{:#}", check_recap("PLAY RECAP\n").unwrap_err()).contains("no recap"));
    }

    #[test]
    fn the_peers_report_is_read() {
        let peer = parse_peer(
            "noise\n{\"ansible_runner\": {\"version\": \"2.4.3\", \"ms\": [1.5, 2]}, \
             \"ansible_playbook\": {\"version\": \"2.19.14\", \"ms\": [1]}, \
             \"ansible_runner_container\": {\"image\": \"i\", \"ms\": [3]}}\n",
        )
        .unwrap();
        assert_eq!(
            (
                peer.runner_version.as_str(),
                peer.runner_ms,
                peer.playbook_ms
            ),
            ("2.4.3", vec![1.5, 2.0], vec![1.0])
        );
        assert_eq!(peer.core_version, "2.19.14");
        assert_eq!(peer.contained_ms, [3.0]);
        let error = |s: &str| format!("{:#}", parse_peer(s).unwrap_err());
        assert!(error("").contains("printed nothing"));
        assert!(error("Traceback").contains("printed 'Traceback'"));
        assert!(error("{\"ansible_runner\": {\"ms\": []}}").contains("no samples"));
        assert!(error("{\"ansible_runner\": {\"ms\": [\"x\"]}}").contains("not a number"));
    }

    #[test]
    fn docker_events_of_the_benchmarks_containers_are_read() {
        let line = r#"{"status":"die","id":"e1a9","Type":"container","Action":"die","Actor":{"ID":"e1a9","Attributes":{"exitCode":"0","image":"muster/ansible:bookworm","io.muster.run-id":"0192","name":"muster-run-0192"}},"scope":"local","time":1795493919,"timeNano":1795493919167284123}"#;
        let (label, value, action, at) = parse_event(line).unwrap();
        assert_eq!(
            (label.as_str(), value.as_str(), action.as_str()),
            (RUN_LABEL, "0192", "die")
        );
        assert!((at - 1_795_493_919_167.284).abs() < 0.01, "{at}");
        let other = line.replace("io.muster.run-id", "com.example");
        assert_eq!(parse_event(&other), None);
        assert_eq!(parse_event("not json"), None);
    }

    #[test]
    fn spreads_give_min_p50_p90_max() {
        let samples: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let s = Spread::of(&samples).unwrap();
        assert_eq!(
            (s.count, s.min, s.p50, s.p90, s.max),
            (20, 1.0, 10.0, 18.0, 20.0)
        );
        assert!(Spread::of(&[]).is_none());
    }
}
