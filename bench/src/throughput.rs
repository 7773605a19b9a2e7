//! Throughput: no-op runs per second through the whole lifecycle — trigger
//! over HTTP from several concurrent clients, lease, `muster-runner`
//! processes with the process executor running `true`, result recorded —
//! and, in the same invocation, `pgbench -N` on the same PostgreSQL with the
//! same number of clients: the rate of simple write transactions the
//! database can commit, which bounds any queue kept in it — and the
//! [`peers`](crate::peers), Celery and procrastinate, with as many worker
//! processes as Muster has runner slots, as many clients and as many jobs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;

use crate::harness::{wait_for, Binaries, Coordinator, RunnerProcess, ScratchDb, StoreKind};
use crate::peers::{self, Figures};
use crate::stats::{ms, rate, Summary, Table};

pub struct Options {
    pub store: StoreKind,
    pub runs: usize,
    pub clients: usize,
    pub runner_processes: usize,
    pub capacity: u32,
    /// Where each runner's `--work-dir` is made; `None`: the default, in
    /// the runner's data directory.
    pub runner_work_dir: Option<PathBuf>,
    pub pgbench: bool,
    pub pgbench_seconds: u64,
    pub pgbench_scale: u32,
    pub database_url: Option<String>,
    /// The Python that runs the peers (`scripts/bench-env.sh`); `None`
    /// skips them.
    pub python: Option<PathBuf>,
    /// The `redis-server` binary Celery's broker and backend run on.
    pub redis_server: String,
}

/// How long to wait for PostgreSQL's statistics to include the commits of
/// connections that went idle (they report at most every 10 s when idle).
const STATS_SETTLE: Duration = Duration::from_secs(11);

struct Measured {
    elapsed: Duration,
    accepted_in: Duration,
    commits_per_run: Option<f64>,
    phases: Phases,
}

/// Medians over the measured runs of where a run's time goes, from the
/// timestamps the coordinator records (milliseconds).
struct Phases {
    /// Lease taken → the runner reports the job started (delivery, bundle
    /// from cache, scratch directory, workspace unpacked, vars written).
    lease_to_start: f64,
    /// Job started → the runner reports it finished (process spawned,
    /// `true` ran, output drained, scratch directory removed).
    start_to_finish: f64,
}

pub async fn run(bins: &Binaries, options: &Options) -> anyhow::Result<()> {
    if let Some(python) = &options.python {
        peers::check_python(python).await?;
    }
    eprintln!(
        "throughput: {} runs on {}, {} client(s), {} runner process(es) × capacity {}",
        options.runs,
        options.store.name(),
        options.clients,
        options.runner_processes,
        options.capacity
    );
    // The systems run one after the other on a machine that may be doing
    // other things: the load when each started goes under the table.
    let mut loads = vec![("Muster", crate::load_average())];
    let muster = measure(bins, options).await.context("Muster throughput")?;
    let muster_rate = options.runs as f64 / muster.elapsed.as_secs_f64();
    eprintln!(
        "throughput: {} runs in {:.1} s ({} runs/s)",
        options.runs,
        muster.elapsed.as_secs_f64(),
        rate(muster_rate)
    );
    let pgbench = if options.pgbench && options.store == StoreKind::Postgres {
        eprintln!(
            "throughput: pgbench -N, {} client(s), {} s",
            options.clients, options.pgbench_seconds
        );
        loads.push(("pgbench -N", crate::load_average()));
        Some(pgbench(options).await.context("pgbench -N")?)
    } else {
        None
    };

    let workers = options.runner_processes * options.capacity as usize;
    let peers = match &options.python {
        Some(python) => {
            let peer_options = peers::Options {
                python,
                redis_server: &options.redis_server,
                database_url: crate::database_url(&options.database_url)?,
                jobs: options.runs,
                clients: options.clients,
                workers,
            };
            eprintln!("throughput: Celery, {workers} worker process(es)");
            loads.push(("Celery", crate::load_average()));
            let celery = peers::celery(&peer_options).await.context("Celery")?;
            eprintln!("throughput: procrastinate, {workers} worker process(es)");
            loads.push(("procrastinate", crate::load_average()));
            let procrastinate = peers::procrastinate(&peer_options)
                .await
                .context("procrastinate")?;
            vec![
                (
                    format!(
                        "{} (broker and result backend), prefork pool",
                        celery.version
                    ),
                    celery,
                ),
                (
                    format!("{} (same PostgreSQL)", procrastinate.version),
                    procrastinate,
                ),
            ]
        }
        None => Vec::new(),
    };

    let versus_pgbench = |jobs_per_second: f64| {
        pgbench
            .map(|tps| format!("{:.1} %", 100.0 * jobs_per_second / tps))
            .unwrap_or_default()
    };
    let versus_muster =
        |jobs_per_second: f64| format!("{:.0} %", 100.0 * jobs_per_second / muster_rate);
    let mut table = Table::new(&[
        "system",
        "clients",
        "workers",
        "jobs",
        "seconds",
        "jobs/s",
        "vs pgbench -N",
        "vs Muster",
    ]);
    table.row(vec![
        match &options.runner_work_dir {
            None => format!(
                "Muster ({}, process executor, `true`)",
                options.store.name()
            ),
            Some(dir) => format!(
                "Muster ({}, process executor, `true`, scratch in {})",
                options.store.name(),
                dir.display()
            ),
        },
        options.clients.to_string(),
        workers.to_string(),
        options.runs.to_string(),
        format!("{:.1}", muster.elapsed.as_secs_f64()),
        rate(muster_rate),
        versus_pgbench(muster_rate),
        "100 %".into(),
    ]);
    if let Some(tps) = pgbench {
        table.row(vec![
            "pgbench -N (same PostgreSQL), transactions".into(),
            options.clients.to_string(),
            String::new(),
            String::new(),
            options.pgbench_seconds.to_string(),
            rate(tps),
            "100 %".into(),
            versus_muster(tps),
        ]);
    }
    for (name, figures) in &peers {
        let jobs_per_second = figures.jobs_per_second();
        table.row(vec![
            name.clone(),
            figures.clients.to_string(),
            figures.workers.to_string(),
            figures.jobs.to_string(),
            format!("{:.1}", figures.seconds),
            rate(jobs_per_second),
            versus_pgbench(jobs_per_second),
            versus_muster(jobs_per_second),
        ]);
    }
    println!("\nThroughput: no-op runs through the whole lifecycle\n");
    print!("{}", table.render());
    let loads: Vec<String> = loads
        .iter()
        .map(|(system, load)| format!("{system} {load}"))
        .collect();
    println!(
        "\nLoad average (1 min) as each started: {}.",
        loads.join(", ")
    );
    println!(
        "Triggers accepted at {} runs/s (all {} in {:.1} s).",
        rate(options.runs as f64 / muster.accepted_in.as_secs_f64()),
        options.runs,
        muster.accepted_in.as_secs_f64()
    );
    for (
        _,
        Figures {
            version,
            jobs,
            enqueue_seconds,
            ..
        },
    ) in &peers
    {
        println!(
            "{version}: jobs enqueued at {} jobs/s (all {jobs} in {enqueue_seconds:.1} s).",
            rate(*jobs as f64 / enqueue_seconds)
        );
    }
    if let Some(commits) = muster.commits_per_run {
        println!("PostgreSQL transactions per run (pg_stat_database xact_commit, reads included): {commits:.1}.");
    }
    let slot = options.capacity as f64
        * options.runner_processes as f64
        * muster.elapsed.as_secs_f64()
        * 1000.0
        / options.runs as f64;
    println!(
        "Per run slot: {} ms each on average; medians: lease → started {} ms, started → finished {} ms, \
         the rest (result recorded, next lease) {} ms.",
        ms(slot),
        ms(muster.phases.lease_to_start),
        ms(muster.phases.start_to_finish),
        ms((slot - muster.phases.lease_to_start - muster.phases.start_to_finish).max(0.0)),
    );
    Ok(())
}

async fn measure(bins: &Binaries, options: &Options) -> anyhow::Result<Measured> {
    let db = match options.store {
        StoreKind::Postgres => Some(
            ScratchDb::create(crate::database_url(&options.database_url)?, "muster_bench").await?,
        ),
        StoreKind::Sqlite => None,
    };
    let coordinator = Coordinator::start(bins, db.as_ref()).await?;
    let mut runners = Vec::new();
    let result = async {
        coordinator.api.push_bench_workspace().await?;
        for i in 0..options.runner_processes {
            runners.push(
                RunnerProcess::start_in(
                    bins,
                    &coordinator,
                    &format!("bench-{i}"),
                    options.capacity,
                    options.runner_work_dir.as_deref(),
                )
                .await?,
            );
        }
        let api = &coordinator.api;
        // Warm-up: every runner slot runs a job (bundles cached, connections open).
        let warmup = options.runner_processes * options.capacity as usize * 2;
        for _ in 0..warmup {
            api.trigger("noop", json!({})).await?;
        }
        wait_ended(&coordinator, warmup as u64, Duration::from_secs(120)).await?;
        let commits_before = match &db {
            Some(db) => {
                tokio::time::sleep(STATS_SETTLE).await;
                Some(db.commits().await?)
            }
            None => None,
        };

        let began = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..options.clients {
            let (api, next, runs) = (api.own_client(), next.clone(), options.runs);
            clients.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < runs {
                    api.trigger("noop", json!({})).await?;
                }
                anyhow::Ok(())
            });
        }
        let ended = wait_ended(
            &coordinator,
            (warmup + options.runs) as u64,
            Duration::from_secs(60 + options.runs as u64 / 2),
        );
        let triggered = async {
            while let Some(done) = clients.join_next().await {
                done??;
            }
            anyhow::Ok(began.elapsed())
        };
        let (accepted_in, ()) = tokio::try_join!(triggered, ended)?;
        let elapsed = began.elapsed();

        let commits_per_run = match (&db, commits_before) {
            (Some(db), Some(before)) => {
                tokio::time::sleep(STATS_SETTLE).await;
                Some((db.commits().await? - before) as f64 / options.runs as f64)
            }
            _ => None,
        };
        let phases = phases(api, options.runs).await?;
        Ok(Measured {
            elapsed,
            accepted_in,
            commits_per_run,
            phases,
        })
    }
    .await;
    result.map_err(|e: anyhow::Error| {
        let runner_log = runners.first().map(|r| r.log_tail()).unwrap_or_default();
        e.context(format!(
            "the coordinator's log ends:\n{}\nthe first runner's log ends:\n{runner_log}",
            coordinator.log_tail()
        ))
    })
}

/// Waits until `total` runs of the benchmark workspace have succeeded; fails
/// as soon as one ended otherwise.
async fn wait_ended(coordinator: &Coordinator, total: u64, within: Duration) -> anyhow::Result<()> {
    let api = &coordinator.api;
    let mut polls = 0u32;
    wait_for(
        within,
        Duration::from_millis(100),
        &format!("{total} runs to succeed"),
        || {
            polls += 1;
            let check_failures = polls.is_multiple_of(20);
            async move {
                if check_failures {
                    for status in ["failed", "lost", "timed_out", "canceled"] {
                        let n = api.count_runs(status).await?;
                        if n > 0 {
                            bail!("{n} run(s) ended {status}");
                        }
                    }
                }
                Ok(api.count_runs("succeeded").await? >= total)
            }
        },
    )
    .await
}

/// The medians of [`Phases`] over the `newest` runs.
async fn phases(api: &crate::harness::Api, newest: usize) -> anyhow::Result<Phases> {
    let at = |run: &serde_json::Value, field: &str| -> anyhow::Result<f64> {
        let text = run[field]
            .as_str()
            .ok_or_else(|| anyhow!("a run without {field}: {run}"))?;
        Ok(chrono::DateTime::parse_from_rfc3339(text)?.timestamp_millis() as f64)
    };
    let (mut to_start, mut to_finish) = (Vec::new(), Vec::new());
    let mut page = 1;
    while to_start.len() < newest {
        let list = api
            .get(&format!(
                "/api/v1/action-runs/?workspace={}&page_size=500&page={page}",
                crate::harness::WORKSPACE
            ))
            .await?;
        let runs = list["results"].as_array().cloned().unwrap_or_default();
        if runs.is_empty() {
            break;
        }
        for run in runs.iter().take(newest - to_start.len()) {
            let (leased, started, finished) = (
                at(run, "leased_at")?,
                at(run, "started_at")?,
                at(run, "finished_at")?,
            );
            to_start.push(started - leased);
            to_finish.push(finished - started);
        }
        page += 1;
    }
    let median = |v: &mut Vec<f64>| Summary::of_millis(v).map_or(0.0, |s| s.p50);
    Ok(Phases {
        lease_to_start: median(&mut to_start),
        start_to_finish: median(&mut to_finish),
    })
}

/// `pgbench -N` TPS on a throwaway database on the same server.
async fn pgbench(options: &Options) -> anyhow::Result<f64> {
    let db = ScratchDb::create(
        crate::database_url(&options.database_url)?,
        "muster_bench_pgbench",
    )
    .await?;
    let init = tokio::process::Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            &options.pgbench_scale.to_string(),
            &db.url,
        ])
        .kill_on_drop(true)
        .output()
        .await
        .context(
            "starting pgbench (PostgreSQL's client tools; scripts/test-env.sh installs them)",
        )?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let threads = options.clients.min(crate::cores()).max(1);
    let run = tokio::process::Command::new("pgbench")
        .args([
            "-N",
            "-c",
            &options.clients.to_string(),
            "-j",
            &threads.to_string(),
        ])
        .args(["-T", &options.pgbench_seconds.to_string(), &db.url])
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        bail!(
            "pgbench -N failed: {}{}",
            stdout,
            String::from_utf8_lossy(&run.stderr)
        );
    }
    parse_tps(&stdout).ok_or_else(|| anyhow!("pgbench printed no tps line:\n{stdout}"))
}

/// The TPS from pgbench's report (`tps = 1234.5 (without initial connection time)`).
pub fn parse_tps(report: &str) -> Option<f64> {
    report
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::parse_tps;

    #[test]
    fn reads_the_tps_of_a_pgbench_report() {
        let report = "transaction type: <builtin: simple update>\n\
            scaling factor: 1\nnumber of clients: 8\n\
            number of transactions actually processed: 41234\n\
            latency average = 3.879 ms\n\
            initial connection time = 12.345 ms\n\
            tps = 2062.412389 (without initial connection time)\n";
        assert_eq!(parse_tps(report), Some(2062.412389));
        assert_eq!(parse_tps("pgbench: error: connection refused\n"), None);
    }
}
