//! Fleet scale: one coordinator holding thousands of simulated runners
//! (real enrollment, real mTLS gRPC streams from this process, see
//! [`crate::sim`]). Measured, in order:
//!
//! 1. the coordinator's resident memory before any runner (`VmRSS` of
//!    `/proc/<pid>/status`);
//! 2. the time to enroll, then to connect, every runner, a bounded number
//!    at a time;
//! 3. its memory with all of them connected, and so memory per runner;
//! 4. its CPU (`/proc/<pid>/stat`) and the database's commits while the
//!    runners only heartbeat;
//! 5. dispatch latency under that load, one run at a time as
//!    [`crate::dispatch`] measures it (trigger → lease on an idle runner);
//! 6. the same with concurrent triggers, and the runs per second they give.
//!
//! All along, the PostgreSQL connections the coordinator holds are counted
//! in `pg_stat_activity` every 100 ms; the table gives the most seen in
//! each phase.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agents::{cpu_seconds, memory_kib};
use crate::harness::{Binaries, Coordinator, ScratchDb, StoreKind};
use crate::sim::{Fleet, Seen};
use crate::stats::{ms, rate, Summary, Table};

pub struct Options {
    pub store: StoreKind,
    pub runners: usize,
    /// Enrollments (then stream openings) in flight at once.
    pub concurrency: usize,
    /// How long the coordinator's idle CPU is measured.
    pub idle_seconds: u64,
    /// Runs triggered one at a time.
    pub runs: usize,
    /// Runs triggered by `burst_clients` concurrent clients (0: skip).
    pub burst_runs: usize,
    pub burst_clients: usize,
    pub database_url: Option<String>,
}

/// Runs before the measured one-at-a-time runs, not counted.
const WARMUP: usize = 20;
/// How long one run may take before the benchmark gives up.
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// How often `pg_stat_activity` is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The phases connections are counted in.
#[derive(Clone, Copy)]
enum Phase {
    Start = 0,
    Connect = 1,
    Idle = 2,
    Dispatch = 3,
    Burst = 4,
}
const PHASES: usize = 5;

pub async fn run(bins: &Binaries, options: &Options) -> anyhow::Result<()> {
    let limit = raise_open_files(options.runners)?;
    eprintln!(
        "fleet: {} runner(s) on {}; open files allowed: {limit}",
        options.runners,
        options.store.name()
    );
    let db = match options.store {
        StoreKind::Postgres => Some(
            ScratchDb::create(crate::database_url(&options.database_url)?, "muster_bench").await?,
        ),
        StoreKind::Sqlite => None,
    };
    let coordinator = Coordinator::start(bins, db.as_ref()).await?;
    let outcome = measure(&coordinator, db.as_ref(), options).await;
    outcome.map_err(|e| {
        e.context(format!(
            "the coordinator's log ends:\n{}",
            coordinator.log_tail()
        ))
    })
}

/// Raises this process's soft limit of open files to its hard limit: each
/// simulated runner holds a connection, and the coordinator, started from
/// here, inherits the limit for its end of them. Returns the limit.
fn raise_open_files(runners: usize) -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    }
    // A connection per runner, and room for the pool, logs and listeners.
    let needed = runners as u64 + 256;
    if hard < needed {
        bail!(
            "--runners {runners}: needs about {needed} open files, but the hard limit (ulimit -Hn) is {hard}"
        );
    }
    Ok(hard)
}

async fn measure(
    coordinator: &Coordinator,
    db: Option<&ScratchDb>,
    options: &Options,
) -> anyhow::Result<()> {
    let pid = coordinator
        .pid()
        .ok_or_else(|| anyhow!("the coordinator has exited"))?;
    coordinator.api.push_bench_workspace().await?;
    let sampler = match db {
        Some(db) => {
            Some(Sampler::start(crate::database_url(&options.database_url)?, &db.name).await?)
        }
        None => None,
    };
    let phase = |p: Phase| {
        if let Some(s) = &sampler {
            s.enter(p);
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_0, _) = memory_kib(pid)?;

    phase(Phase::Connect);
    eprintln!(
        "fleet: enrolling and connecting {} runners, {} at a time",
        options.runners, options.concurrency
    );
    let mut fleet = Fleet::connect_with(coordinator, options.runners, options.concurrency)
        .await
        .context("connecting the simulated runners")?;
    eprintln!(
        "fleet: enrolled in {:.1} s, connected in {:.1} s",
        fleet.enroll_time.as_secs_f64(),
        fleet.connect_time.as_secs_f64()
    );

    phase(Phase::Idle);
    // Let the connection storm's buffers go before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_all, hwm_connect) = memory_kib(pid)?;
    eprintln!(
        "fleet: idle for {} s with every runner heartbeating",
        options.idle_seconds
    );
    let commits_0 = match db {
        Some(db) => Some(db.commits().await?),
        None => None,
    };
    let (cpu_0, idle_began) = (cpu_seconds(pid)?, Instant::now());
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    let (cpu_1, idle_secs) = (cpu_seconds(pid)?, idle_began.elapsed().as_secs_f64());
    let idle_cpu = (cpu_1 - cpu_0) / idle_secs * 100.0;
    let idle_commits = match (db, commits_0) {
        // The statistics lag by up to a second: wait for them to catch up.
        (Some(db), Some(before)) => {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            Some((db.commits().await? - before) as f64 / idle_secs)
        }
        _ => None,
    };
    let gone = drain_unexpected(&mut fleet).await?;
    if gone > 0 {
        bail!("{gone} simulated runner(s) lost their stream while idle");
    }

    phase(Phase::Dispatch);
    eprintln!(
        "fleet: {} runs one at a time after {WARMUP} warm-up runs",
        options.runs
    );
    let mut lease = Vec::with_capacity(options.runs);
    let mut accepted = Vec::with_capacity(options.runs);
    for i in 0..WARMUP + options.runs {
        let (to_lease, to_202) = crate::dispatch::one_run(&coordinator.api, &mut fleet).await?;
        if i >= WARMUP {
            lease.push(to_lease);
            accepted.push(to_202);
        }
    }
    let one = Summary::of(&lease).context("no runs measured")?;
    let one_202 = Summary::of(&accepted).context("no runs measured")?;

    let burst = if options.burst_runs > 0 {
        phase(Phase::Burst);
        eprintln!(
            "fleet: {} runs from {} concurrent clients",
            options.burst_runs, options.burst_clients
        );
        Some(burst(coordinator, &mut fleet, options).await?)
    } else {
        None
    };
    let (rss_end, hwm_end) = memory_kib(pid)?;
    let succeeded = coordinator.api.count_runs("succeeded").await?;
    let total = WARMUP + options.runs + options.burst_runs;
    if succeeded != total as u64 {
        bail!("{succeeded} of {total} runs succeeded");
    }
    let connections = match sampler {
        Some(s) => Some(s.stop().await?),
        None => None,
    };

    let n = options.runners as f64;
    let mut table = Table::new(&["measure", "value"]);
    let mut row = |what: &str, value: String| table.row(vec![what.to_owned(), value]);
    row("store", options.store.name().to_owned());
    row(
        "simulated runners (capacity 1 each)",
        options.runners.to_string(),
    );
    let timed = |d: Duration| format!("{:.1} s ({}/s)", d.as_secs_f64(), rate(n / d.as_secs_f64()));
    row(
        &format!("enroll all, {} at a time", options.concurrency),
        timed(fleet.enroll_time),
    );
    row(
        &format!("open all streams, {} at a time", options.concurrency),
        timed(fleet.connect_time),
    );
    row("coordinator RSS, no runner", mib(rss_0));
    row("coordinator RSS, all connected", mib(rss_all));
    row(
        "memory per connected runner",
        format!("{:.1} KiB", (rss_all as f64 - rss_0 as f64) / n),
    );
    row("coordinator peak RSS (VmHWM), connect", mib(hwm_connect));
    row(
        "coordinator RSS / peak, after the runs",
        format!("{} / {}", mib(rss_end), mib(hwm_end)),
    );
    row(
        &format!("coordinator CPU, idle {:.0} s", idle_secs),
        format!("{idle_cpu:.1} % of a core"),
    );
    if let Some(commits) = idle_commits {
        row("database commits/s while idle", format!("{commits:.1}"));
    }
    if let Some(c) = &connections {
        let cell = |p: Phase| {
            let (total, busy) = c[p as usize];
            format!("{total} ({busy} busy)")
        };
        row(
            "PostgreSQL connections, max: before runners",
            cell(Phase::Start),
        );
        row("  while connecting", cell(Phase::Connect));
        row("  idle", cell(Phase::Idle));
        row("  one run at a time", cell(Phase::Dispatch));
        if burst.is_some() {
            row("  concurrent triggers", cell(Phase::Burst));
        }
    }
    row(
        "one at a time: runs",
        format!("{} (after {WARMUP} warm-up)", one.count),
    );
    row("  trigger → lease p50", format!("{} ms", ms(one.p50)));
    row("  p95", format!("{} ms", ms(one.p95)));
    row("  p99", format!("{} ms", ms(one.p99)));
    row("  max", format!("{} ms", ms(one.max)));
    row(
        "  trigger → 202 p50 / p99",
        format!("{} / {} ms", ms(one_202.p50), ms(one_202.p99)),
    );
    if let Some(b) = &burst {
        row(
            &format!("concurrent: runs, {} clients", options.burst_clients),
            b.lease.count.to_string(),
        );
        row("  trigger → lease p50", format!("{} ms", ms(b.lease.p50)));
        row("  p95", format!("{} ms", ms(b.lease.p95)));
        row("  p99", format!("{} ms", ms(b.lease.p99)));
        row("  max", format!("{} ms", ms(b.lease.max)));
        row(
            "  runs/s, first trigger → last result",
            format!(
                "{} ({:.1} s)",
                rate(b.per_second()),
                b.elapsed.as_secs_f64()
            ),
        );
    }
    if fleet.refused > 0 {
        row(
            "heartbeats refused (named a run just ended)",
            fleet.refused.to_string(),
        );
    }
    println!("\nFleet scale: one coordinator, simulated runners on real mTLS streams\n");
    print!("{}", table.render());
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Events that came while nothing was asked of the runners: only refusals
/// are expected (counted by the fleet). Returns the streams that ended.
async fn drain_unexpected(fleet: &mut Fleet) -> anyhow::Result<usize> {
    let mut gone = 0;
    loop {
        match fleet.next(Duration::from_millis(10)).await {
            Ok(Seen::Gone { error }) => {
                if gone == 0 {
                    eprintln!("fleet: a simulated runner's stream ended: {error}");
                }
                gone += 1;
            }
            Ok(other) => bail!("while idle, a simulated runner saw {other:?}"),
            // Nothing within the wait: nothing more is pending.
            Err(_) => return Ok(gone),
        }
    }
}

struct Burst {
    lease: Summary,
    elapsed: Duration,
}

impl Burst {
    fn per_second(&self) -> f64 {
        self.lease.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// `burst_runs` runs triggered by `burst_clients` clients as fast as the API
/// takes them; every run is leased to an idle runner (there are more
/// runners than runs in flight). Returns trigger → lease latencies and the
/// runs per second from the first trigger to the last acknowledged result.
async fn burst(
    coordinator: &Coordinator,
    fleet: &mut Fleet,
    options: &Options,
) -> anyhow::Result<Burst> {
    let total = options.burst_runs;
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..options.burst_clients.max(1) {
        let api = coordinator.api.own_client();
        let next = next.clone();
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let at = Instant::now();
                let id = api.trigger("noop", json!({})).await?;
                sent.push((id, at));
            }
            anyhow::Ok(sent)
        }));
    }
    let mut leased: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut done = 0;
    while done < total {
        match fleet.next(RUN_DEADLINE).await? {
            Seen::Leased { run_id, at } => {
                leased.insert(run_id, at);
            }
            Seen::Done { .. } => done += 1,
            other => bail!("during the concurrent triggers, a simulated runner saw {other:?}"),
        }
    }
    let elapsed = began.elapsed();
    let mut latencies = Vec::with_capacity(total);
    for client in clients {
        for (id, sent) in client.await.context("a trigger client panicked")?? {
            let at = leased
                .get(&id)
                .ok_or_else(|| anyhow!("run {id} was triggered but never leased"))?;
            latencies.push(at.saturating_duration_since(sent));
        }
    }
    Ok(Burst {
        lease: Summary::of(&latencies).context("no runs measured")?,
        elapsed,
    })
}

/// Counts the connections to one database in `pg_stat_activity`, all and
/// busy (not `idle`), every [`SAMPLE_EVERY`], keeping the most seen per
/// phase. Its own connection is to the admin database, so not counted.
struct Sampler {
    phase: Arc<AtomicUsize>,
    max: Arc<Mutex<[(i64, i64); PHASES]>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sampler {
    async fn start(admin_url: &str, database: &str) -> anyhow::Result<Sampler> {
        let client = crate::harness::connect(admin_url).await?;
        let phase = Arc::new(AtomicUsize::new(Phase::Start as usize));
        let max = Arc::new(Mutex::new([(0, 0); PHASES]));
        let stop = CancellationToken::new();
        let task = {
            let (phase, max, stop) = (phase.clone(), max.clone(), stop.clone());
            let database = database.to_owned();
            tokio::spawn(async move {
                let query = client
                    .prepare(
                        "SELECT count(*), count(*) FILTER (WHERE state IS DISTINCT FROM 'idle') \
                         FROM pg_stat_activity WHERE datname = $1",
                    )
                    .await?;
                loop {
                    let row = client.query_one(&query, &[&database]).await?;
                    let (all, busy): (i64, i64) = (row.get(0), row.get(1));
                    {
                        let mut max = max.lock().expect("sampler lock");
                        let seen = &mut max[phase.load(Ordering::Relaxed)];
                        *seen = (seen.0.max(all), seen.1.max(busy));
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                    }
                }
            })
        };
        Ok(Sampler {
            phase,
            max,
            stop,
            task,
        })
    }

    fn enter(&self, phase: Phase) {
        self.phase.store(phase as usize, Ordering::Relaxed);
    }

    /// Stops sampling; the most connections seen per phase, all and busy.
    async fn stop(self) -> anyhow::Result<[(i64, i64); PHASES]> {
        self.stop.cancel();
        self.task
            .await
            .context("the connection sampler panicked")?
            .context("sampling pg_stat_activity")?;
        let max = *self.max.lock().expect("sampler lock");
        Ok(max)
    }
}
