//! The throughput scenario's peers, the tools a user might pick instead for
//! "run a job on a worker and record the result", measured the way Muster is:
//!
//! - **Celery** with a Redis broker and a Redis result backend: a
//!   `redis-server` of the benchmark's own on a free loopback port, one
//!   `celery worker` with the prefork pool of `workers` processes;
//! - **procrastinate** on the same PostgreSQL, in a throwaway database:
//!   `workers` `procrastinate worker` processes of concurrency 1.
//!
//! The Python programs in `bench/peers/` (built into this binary and written
//! to a temporary directory) enqueue no-op jobs from `clients` processes and
//! time them from the first enqueue to the last result seen stored; they
//! print their figures as one line of JSON ([`parse_figures`]). Every process
//! started here runs in a process group of its own, killed when dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{free_port, tail_of, wait_for, ScratchDb};

/// The Python programs, by file name.
const PROGRAMS: [(&str, &str); 4] = [
    ("common.py", include_str!("../peers/common.py")),
    ("celery_bench.py", include_str!("../peers/celery_bench.py")),
    (
        "procrastinate_app.py",
        include_str!("../peers/procrastinate_app.py"),
    ),
    (
        "procrastinate_bench.py",
        include_str!("../peers/procrastinate_bench.py"),
    ),
];

pub struct Options<'a> {
    /// The virtualenv's python (`scripts/bench-env.sh`).
    pub python: &'a Path,
    pub redis_server: &'a str,
    pub database_url: &'a str,
    pub jobs: usize,
    pub clients: usize,
    /// Worker processes, each running one job at a time.
    pub workers: usize,
}

impl Options<'_> {
    /// Jobs run before the measured ones, as for Muster: two per worker.
    fn warmup(&self) -> usize {
        2 * self.workers
    }

    /// How long the measured phase may take.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60 + self.jobs as u64 / 2)
    }
}

/// What a peer's program reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub system: String,
    /// The peer and its version, e.g. `Celery 5.7.0`.
    pub version: String,
    pub jobs: usize,
    pub clients: usize,
    pub workers: usize,
    pub warmup: usize,
    /// First enqueue → last result seen stored.
    pub seconds: f64,
    /// First enqueue → every client done enqueuing.
    pub enqueue_seconds: f64,
}

impl Figures {
    pub fn jobs_per_second(&self) -> f64 {
        self.jobs as f64 / self.seconds
    }
}

/// The figures in a peer program's standard output: its last line that is
/// a JSON object.
pub fn parse_figures(stdout: &str) -> anyhow::Result<Figures> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("no line of JSON figures in its output:\n{stdout}"))?;
    let value: Value =
        serde_json::from_str(line).with_context(|| format!("figures not JSON: {line}"))?;
    let text = |field: &str| {
        value[field]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("figures without a string '{field}': {line}"))
    };
    let count = |field: &str| {
        value[field]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| anyhow!("figures without a whole number '{field}': {line}"))
    };
    let seconds = |field: &str| match value[field].as_f64() {
        Some(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(anyhow!(
            "figures without a positive number of seconds '{field}': {line}"
        )),
    };
    let figures = Figures {
        system: text("system")?,
        version: text("version")?,
        jobs: count("jobs")?,
        clients: count("clients")?,
        workers: count("workers")?,
        warmup: count("warmup")?,
        seconds: seconds("seconds")?,
        enqueue_seconds: seconds("enqueue_seconds")?,
    };
    if figures.jobs == 0 {
        bail!("figures with no jobs: {line}");
    }
    Ok(figures)
}

/// Fails early, naming `scripts/bench-env.sh`, when `python` cannot import
/// the peers.
pub async fn check_python(python: &Path) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(python)
        .args(["-c", "import celery, procrastinate, psycopg"])
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| {
            format!(
                "--python {}: cannot run it; run scripts/bench-env.sh and export the \
                 MUSTER_BENCH_PYTHON it prints (or pass --no-peers)",
                python.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "--python {}: it cannot import celery, procrastinate and psycopg; run \
             scripts/bench-env.sh and export the MUSTER_BENCH_PYTHON it prints (or pass \
             --no-peers):\n{}",
            python.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Celery with a Redis broker and result backend.
pub async fn celery(options: &Options<'_>) -> anyhow::Result<Figures> {
    let dir = unpack()?;
    let redis = Redis::start(options.redis_server, dir.path()).await?;
    let redis_url = redis.url();
    let worker = Owned::spawn(
        "celery worker",
        dir.path(),
        options.python,
        &[
            "-m",
            "celery",
            "-A",
            "celery_bench",
            "worker",
            "--pool=prefork",
            &format!("--concurrency={}", options.workers),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ],
        &[("MUSTER_PEER_REDIS_URL", &redis_url)],
        Stdout::Log,
    )?;
    let mut figures = drive(
        options,
        dir.path(),
        "celery_bench.py",
        &[("MUSTER_PEER_REDIS_URL", &redis_url)],
        &mut [worker],
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "redis-server's log ends:\n{}",
            redis.process.log_tail()
        ))
    })?;
    figures.version = format!("{}, Redis {}", figures.version, redis.version);
    Ok(figures)
}

/// procrastinate on a throwaway database of the same PostgreSQL.
pub async fn procrastinate(options: &Options<'_>) -> anyhow::Result<Figures> {
    let dir = unpack()?;
    let db = ScratchDb::create(options.database_url, "muster_bench_procrastinate").await?;
    let env = [("MUSTER_PEER_DATABASE_URL", db.url.as_str())];
    let app = "--app=procrastinate_app.app";
    let mut schema = Owned::spawn(
        "procrastinate schema --apply",
        dir.path(),
        options.python,
        &["-m", "procrastinate", app, "schema", "--apply"],
        &env,
        Stdout::Log,
    )?;
    let status = schema.child.wait().await?;
    if !status.success() {
        bail!(
            "procrastinate schema --apply exited with {status}:\n{}",
            schema.log_tail()
        );
    }
    let mut workers = (0..options.workers)
        .map(|i| {
            Owned::spawn(
                &format!("procrastinate worker {i}"),
                dir.path(),
                options.python,
                &[
                    "-m",
                    "procrastinate",
                    app,
                    "worker",
                    "--queues=bench",
                    "--concurrency=1",
                    &format!("--name=bench-{i}"),
                ],
                &env,
                Stdout::Log,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    drive(
        options,
        dir.path(),
        "procrastinate_bench.py",
        &env,
        &mut workers,
    )
    .await
}

/// Runs a peer's measuring program while its `workers` run; fails as soon as
/// one of them exits.
async fn drive(
    options: &Options<'_>,
    dir: &Path,
    program: &str,
    env: &[(&str, &str)],
    workers: &mut [Owned],
) -> anyhow::Result<Figures> {
    let args = [
        "-u".to_owned(),
        program.to_owned(),
        format!("--jobs={}", options.jobs),
        format!("--clients={}", options.clients),
        format!("--workers={}", options.workers),
        format!("--warmup={}", options.warmup()),
        format!("--timeout={}", options.timeout().as_secs()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut driver = Owned::spawn(program, dir, options.python, &args, env, Stdout::Piped)?;
    let mut stdout = driver
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{program}: no stdout"))?;
    let read = async {
        let mut text = String::new();
        stdout.read_to_string(&mut text).await?;
        let status = driver.child.wait().await?;
        anyhow::Ok((status, text))
    };
    // Readiness, warm-up and the measure each have a limit in the program;
    // this one is for a program that hangs anyway.
    let limit = options.timeout() + Duration::from_secs(300);
    let outcome = tokio::select! {
        read = read => read,
        failed = first_exit(workers) => Err(failed),
        _ = tokio::time::sleep(limit) => Err(anyhow!("{program} did not finish within {limit:?}")),
    };
    let worker_log = || workers.first().map(Owned::log_tail).unwrap_or_default();
    let (status, text) = outcome.map_err(|e| {
        e.context(format!(
            "the first worker's log ends:\n{}\n{program}'s log ends:\n{}",
            worker_log(),
            driver.log_tail()
        ))
    })?;
    if !status.success() {
        bail!(
            "{program} exited with {status}; its log ends:\n{}\nthe first worker's log ends:\n{}",
            driver.log_tail(),
            worker_log()
        );
    }
    parse_figures(&text).with_context(|| format!("reading the figures of {program}"))
}

/// Waits for one of `workers` to exit, and says which and why.
async fn first_exit(workers: &mut [Owned]) -> anyhow::Error {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for worker in workers.iter_mut() {
            match worker.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return anyhow!(
                        "{} exited with {status} while measuring; its log ends:\n{}",
                        worker.name,
                        worker.log_tail()
                    )
                }
                Err(error) => return anyhow!("waiting for {}: {error}", worker.name),
            }
        }
    }
}

/// Writes the Python programs into a temporary directory.
fn unpack() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("muster-bench-peers-")
        .tempdir()?;
    for (name, text) in PROGRAMS {
        std::fs::write(dir.path().join(name), text)
            .with_context(|| format!("writing {}", dir.path().join(name).display()))?;
    }
    Ok(dir)
}

/// A process in a process group of its own, its output in a log file;
/// dropping it kills the whole group (a prefork pool's children, a driver's
/// client processes).
struct Owned {
    name: String,
    child: tokio::process::Child,
    pgid: Option<Pid>,
    log: PathBuf,
}

/// Where an [`Owned`] process's standard output goes.
#[derive(Clone, Copy, PartialEq)]
enum Stdout {
    /// Into its log, with its standard error.
    Log,
    /// To the caller, through `child.stdout`.
    Piped,
}

impl Owned {
    /// Starts `program` in `dir` (also its `PYTHONPATH`), its standard error
    /// in `<dir>/<name>.log`.
    fn spawn(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stdout: Stdout,
    ) -> anyhow::Result<Owned> {
        let log = dir.join(format!("{}.log", name.replace(' ', "-")));
        let stderr = std::fs::File::create(&log)?;
        let stdout: std::process::Stdio = if stdout == Stdout::Piped {
            std::process::Stdio::piped()
        } else {
            stderr.try_clone()?.into()
        };
        let child = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("PYTHONPATH", dir)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        Ok(Owned {
            name: name.to_owned(),
            child,
            pgid,
            log,
        })
    }

    fn log_tail(&self) -> String {
        tail_of(&self.log)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            // The group may be gone already; nothing else to do then.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// A `redis-server` of the benchmark's own on a free loopback port, with
/// Redis' defaults apart from snapshots to disk, which are off.
pub(crate) struct Redis {
    process: Owned,
    port: u16,
    version: String,
}

impl Redis {
    /// Starts one from `binary`, its files in `dir`; returns once it
    /// answers PING.
    pub(crate) async fn start(binary: &str, dir: &Path) -> anyhow::Result<Redis> {
        let version = tokio::process::Command::new(binary)
            .arg("--version")
            .output()
            .await
            .with_context(|| {
                format!(
                    "--redis-server {binary}: cannot run it (scripts/test-env.sh installs redis-server)"
                )
            })?;
        let version = parse_redis_version(&String::from_utf8_lossy(&version.stdout))
            .unwrap_or_else(|| "(version unknown)".into());
        let port = free_port()?;
        let process = Owned::spawn(
            "redis-server",
            dir,
            Path::new(binary),
            &[
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.display().to_string(),
            ],
            &[],
            Stdout::Log,
        )?;
        let ready = wait_for(
            Duration::from_secs(20),
            Duration::from_millis(50),
            "redis-server to answer PING",
            || async move { Ok(ping(port).await.is_ok()) },
        )
        .await;
        if let Err(error) = ready {
            bail!("{error:#}; its log ends:\n{}", process.log_tail());
        }
        Ok(Redis {
            process,
            port,
            version,
        })
    }
}

impl Redis {
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

async fn ping(port: u16) -> anyhow::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).await?;
    anyhow::ensure!(&answer == b"+PONG\r\n", "not a PONG");
    Ok(())
}

/// The version in `redis-server --version` (`Redis server v=7.0.15 sha=…`).
fn parse_redis_version(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix("v="))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_figures_line_of_a_peer_program() {
        let stdout = "some banner\n\
            {\"system\": \"celery\", \"version\": \"Celery 5.7.0\", \"jobs\": 2000, \"clients\": 8, \
            \"workers\": 4, \"warmup\": 8, \"seconds\": 12.5, \"enqueue_seconds\": 2.25}\n";
        let figures = parse_figures(stdout).unwrap();
        assert_eq!(
            figures,
            Figures {
                system: "celery".into(),
                version: "Celery 5.7.0".into(),
                jobs: 2000,
                clients: 8,
                workers: 4,
                warmup: 8,
                seconds: 12.5,
                enqueue_seconds: 2.25,
            }
        );
        assert_eq!(figures.jobs_per_second(), 160.0);
    }

    #[test]
    fn rejects_figures_that_are_missing_or_malformed() {
        let error = |stdout: &str| format!("{:#}", parse_figures(stdout).unwrap_err());
        assert!(error("").contains("no line of JSON figures"));
        assert!(error("{not json\n").contains("figures not JSON"));
        let without_seconds = "{\"system\": \"x\", \"version\": \"x 1\", \"jobs\": 1, \
            \"clients\": 1, \"workers\": 1, \"warmup\": 2, \"enqueue_seconds\": 1.0}";
        assert!(error(without_seconds).contains("'seconds'"));
        let zero_seconds = without_seconds.replace("\"enqueue", "\"seconds\": 0, \"enqueue");
        assert!(error(&zero_seconds).contains("positive number of seconds 'seconds'"));
        let no_jobs = without_seconds
            .replace("\"jobs\": 1", "\"jobs\": 0")
            .replace("\"enqueue", "\"seconds\": 1.5, \"enqueue");
        assert!(error(&no_jobs).contains("no jobs"));
        let negative_jobs = no_jobs.replace("\"jobs\": 0", "\"jobs\": -3");
        assert!(error(&negative_jobs).contains("whole number 'jobs'"));
    }

    #[test]
    fn reads_the_version_redis_server_prints() {
        let text =
            "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d\n";
        assert_eq!(parse_redis_version(text).as_deref(), Some("7.0.15"));
        assert_eq!(parse_redis_version("redis-server: not found"), None);
    }
}
