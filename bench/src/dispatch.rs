//! Dispatch latency: from just before the HTTP trigger is sent to the lease
//! arriving on an idle runner's stream, one run at a time, with 1 or more
//! simulated runners connected (see [`crate::sim`]), on PostgreSQL and on
//! SQLite. Each run ends `succeeded` before the next is triggered, so every
//! trigger finds idle runners and an empty queue. With `bus`, also across
//! two coordinators on one PostgreSQL database: the trigger goes to one, the
//! runners hold their streams to the other, and the wake-up between them
//! crosses the event bus, a `redis-server` of the benchmark's own.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::harness::{Api, Binaries, Coordinators, ScratchDb, StoreKind};
use crate::sim::{Fleet, Seen};
use crate::stats::{ms, Summary, Table};

pub struct Options {
    pub stores: Vec<StoreKind>,
    pub runners: Vec<usize>,
    pub runs: usize,
    pub warmup: usize,
    pub database_url: Option<String>,
    /// Also measure across two coordinators and the Redis event bus.
    pub bus: bool,
    /// The redis-server binary for `bus`.
    pub redis_server: String,
}

/// Where a configuration triggers and where its runners are.
#[derive(Clone, Copy)]
enum Setup {
    /// One coordinator on `store` takes the triggers and holds the runners.
    One(StoreKind),
    /// Two coordinators on one PostgreSQL database and a Redis bus.
    TwoOverRedis,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::One(store) => store.name(),
            Setup::TwoOverRedis => "PostgreSQL, 2 coordinators, Redis bus",
        }
    }
}

/// How long one run may take before the benchmark gives up.
const RUN_DEADLINE: Duration = Duration::from_secs(30);

/// What one configuration measured.
struct Measured {
    lease: Summary,
    accepted: Summary,
    elapsed: Duration,
}

pub async fn run(bins: &Binaries, options: &Options) -> anyhow::Result<()> {
    let mut table = Table::new(&[
        "store",
        "runners",
        "runs",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "mean ms",
        "202 p50 ms",
        "202 p99 ms",
    ]);
    let mut setups: Vec<Setup> = options.stores.iter().map(|&s| Setup::One(s)).collect();
    if options.bus {
        setups.push(Setup::TwoOverRedis);
    }
    for setup in setups {
        for &runners in &options.runners {
            eprintln!(
                "dispatch: {}, {runners} runner(s): {} runs after {} warm-up runs",
                setup.name(),
                options.runs,
                options.warmup
            );
            let m = measure(bins, options, setup, runners)
                .await
                .with_context(|| {
                    format!("dispatch on {} with {runners} runner(s)", setup.name())
                })?;
            eprintln!(
                "dispatch: {}, {runners} runner(s): done in {:.1} s",
                setup.name(),
                m.elapsed.as_secs_f64()
            );
            table.row(vec![
                setup.name().into(),
                runners.to_string(),
                m.lease.count.to_string(),
                ms(m.lease.p50),
                ms(m.lease.p95),
                ms(m.lease.p99),
                ms(m.lease.max),
                ms(m.lease.mean),
                ms(m.accepted.p50),
                ms(m.accepted.p99),
            ]);
        }
    }
    println!("\nDispatch latency: HTTP trigger sent → lease received by an idle runner (202: trigger sent → answer received)\n");
    print!("{}", table.render());
    Ok(())
}

async fn measure(
    bins: &Binaries,
    options: &Options,
    setup: Setup,
    runners: usize,
) -> anyhow::Result<Measured> {
    let db = match setup {
        Setup::One(StoreKind::Postgres) | Setup::TwoOverRedis => Some(
            ScratchDb::create(crate::database_url(&options.database_url)?, "muster_bench").await?,
        ),
        Setup::One(StoreKind::Sqlite) => None,
    };
    let bus = matches!(setup, Setup::TwoOverRedis).then_some(options.redis_server.as_str());
    let coordinators = Coordinators::start(bins, db.as_ref(), bus).await?;
    let (coordinator, triggers) = (&coordinators.back, coordinators.clients());
    let result = async {
        coordinator.api.push_bench_workspace().await?;
        let mut fleet = Fleet::connect(coordinator, runners).await?;
        let began = Instant::now();
        let mut lease = Vec::with_capacity(options.runs);
        let mut accepted = Vec::with_capacity(options.runs);
        let total = options.warmup + options.runs;
        for i in 0..total {
            let (to_lease, to_202) = one_run(triggers, &mut fleet).await?;
            if i >= options.warmup {
                lease.push(to_lease);
                accepted.push(to_202);
            }
            if (i + 1) % 2000 == 0 {
                eprintln!("dispatch:   {}/{total}", i + 1);
            }
        }
        let elapsed = began.elapsed();
        if fleet.refused > 0 {
            eprintln!(
                "dispatch:   the coordinator refused {} heartbeat(s) naming a run that had just ended",
                fleet.refused
            );
        }
        let succeeded = coordinator.api.count_runs("succeeded").await?;
        if succeeded != total as u64 {
            bail!("{succeeded} of {total} runs succeeded");
        }
        Ok(Measured {
            lease: Summary::of(&lease).context("no runs measured")?,
            accepted: Summary::of(&accepted).context("no runs measured")?,
            elapsed,
        })
    }
    .await;
    result.map_err(|e| e.context(coordinators.log_tails()))
}

/// Triggers one run and waits for its lease and for its result to be
/// acknowledged; returns trigger → lease and trigger → 202.
pub async fn one_run(api: &Api, fleet: &mut Fleet) -> anyhow::Result<(Duration, Duration)> {
    let sent = Instant::now();
    let trigger = async {
        let id = api.trigger("noop", json!({})).await?;
        anyhow::Ok((id, sent.elapsed()))
    };
    // The lease often arrives before the HTTP answer: wait for both at once.
    let leased = async {
        match fleet.next(RUN_DEADLINE).await? {
            Seen::Leased { run_id, at } => anyhow::Ok((run_id, at)),
            other => bail!("expected a lease, a simulated runner saw {other:?}"),
        }
    };
    let ((run_id, to_202), (leased_id, at)) = tokio::try_join!(trigger, leased)?;
    if leased_id != run_id {
        bail!("triggered run {run_id}, but run {leased_id} was leased");
    }
    match fleet.next(RUN_DEADLINE).await? {
        Seen::Done { run_id: done } if done == run_id => {}
        other => {
            bail!("expected run {run_id} to be acknowledged, a simulated runner saw {other:?}")
        }
    }
    Ok((at.duration_since(sent), to_202))
}
