//! `muster-bench`: runs one benchmark scenario against real processes and
//! prints its table. See `BENCHMARKS.md`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use muster_bench::harness::{Binaries, StoreKind};

#[derive(Parser)]
#[command(
    name = "muster-bench",
    about = "Muster's benchmarks against the real coordinator, runners and databases (see BENCHMARKS.md)"
)]
struct Cli {
    /// PostgreSQL URL of a role that may create databases; each scenario
    /// works in a database of its own, dropped at the end.
    #[arg(
        long,
        global = true,
        env = "MUSTER_TEST_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,

    /// Directory of the built `muster-coordinator` and `muster-runner`
    /// (default: this executable's, so build them with the same profile).
    #[arg(long, global = true)]
    bin_dir: Option<std::path::PathBuf>,

    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Trigger → lease received by an idle runner, one run at a time, with
    /// simulated runners on real mTLS streams.
    Dispatch {
        /// Runs measured per configuration.
        #[arg(long, default_value_t = 10_000)]
        runs: usize,
        /// Runs before the measured ones, not counted.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// Numbers of connected runners to measure with, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,50")]
        runners: Vec<usize>,
        /// Stores to measure on, comma-separated: postgres, sqlite.
        #[arg(long, value_delimiter = ',', default_value = "postgres,sqlite")]
        store: Vec<String>,
        /// Also measure across two coordinators on one PostgreSQL database:
        /// triggers sent to one, runners connected to the other, the
        /// wake-up carried by a Redis event bus of the benchmark's own.
        #[arg(long)]
        bus: bool,
        /// The redis-server binary the bus runs on (`--bus`).
        #[arg(long, default_value = "redis-server")]
        redis_server: String,
    },
    /// Sustained no-op runs per second through the whole lifecycle with
    /// `muster-runner` processes, beside `pgbench -N` on the same PostgreSQL
    /// and the peers Celery (Redis) and procrastinate (PostgreSQL).
    Throughput {
        /// Runs to complete in the measured phase.
        #[arg(long, default_value_t = 2_000)]
        runs: usize,
        /// Concurrent HTTP clients triggering runs (and pgbench clients).
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// `muster-runner` processes.
        #[arg(long, default_value_t = 1)]
        runner_processes: usize,
        /// Capacity of each runner (default: twice the cores).
        #[arg(long)]
        capacity: Option<u32>,
        /// Where the runners' jobs get their scratch directories (each
        /// runner's `--work-dir`, a new directory under this one); by
        /// default the runner's data directory, in the system's temporary
        /// directory.
        #[arg(long, value_name = "DIR")]
        runner_work_dir: Option<std::path::PathBuf>,
        /// postgres or sqlite (pgbench runs only beside postgres).
        #[arg(long, default_value = "postgres")]
        store: String,
        /// Skip the pgbench comparison.
        #[arg(long)]
        no_pgbench: bool,
        /// How long pgbench -N runs.
        #[arg(long, default_value_t = 20)]
        pgbench_seconds: u64,
        /// pgbench's scale factor for its throwaway database.
        #[arg(long, default_value_t = 1)]
        pgbench_scale: u32,
        /// Skip the peers (Celery and procrastinate).
        #[arg(long)]
        no_peers: bool,
        /// The Python with the peers installed, as `scripts/bench-env.sh`
        /// prints it.
        #[arg(long, env = "MUSTER_BENCH_PYTHON")]
        python: Option<std::path::PathBuf>,
        /// The redis-server binary Celery's broker and result backend run on
        /// (a server of the benchmark's own, on a free port).
        #[arg(long, default_value = "redis-server")]
        redis_server: String,
    },
    /// Log ingest of `seq 1 N` (rate, completeness) and live-tail latency.
    Logs {
        /// Lines the ingest job prints.
        #[arg(long, default_value_t = 1_000_000)]
        lines: u64,
        /// Lines the tail job prints, one about every millisecond.
        #[arg(long, default_value_t = 5_000)]
        tail_lines: u64,
        /// postgres or sqlite.
        #[arg(long, default_value = "postgres")]
        store: String,
        /// Follow the tail on a second coordinator on the same PostgreSQL
        /// database, the runner on the first, the lines carried by a Redis
        /// event bus of the benchmark's own.
        #[arg(long)]
        bus: bool,
        /// The redis-server binary the bus runs on (`--bus`).
        #[arg(long, default_value = "redis-server")]
        redis_server: String,
    },
    /// The monitoring agent (`muster-agent` against a real coordinator)
    /// beside Prometheus' blackbox_exporter on the same local HTTP targets:
    /// checks per second, CPU and peak memory of each, and the agent's
    /// memory with 10,000 endpoints.
    Agents {
        /// Endpoints of the agent, each checked every second (the demand in
        /// checks per second); comma-separated to measure several.
        #[arg(long, value_delimiter = ',', default_value = "5000")]
        endpoints: Vec<usize>,
        /// Length of each measured window, in seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Endpoints of the agent's memory measurement.
        #[arg(long, default_value_t = 10_000)]
        memory_endpoints: usize,
        /// Their interval, in seconds.
        #[arg(long, default_value_t = 60)]
        memory_interval: u32,
        /// Concurrent `/probe` requests sent to blackbox_exporter.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Loopback HTTP servers the checks are spread over.
        #[arg(long, default_value_t = 4)]
        targets: usize,
        /// The blackbox_exporter binary (scripts/bench-env.sh installs it).
        #[arg(long, default_value = "prometheus-blackbox-exporter")]
        exporter: String,
        /// Measure the agent only.
        #[arg(long)]
        no_exporter: bool,
    },
    /// A one-task playbook through Muster's docker executor beside `docker
    /// run` of the same image and ansible-runner (AWX's engine) in-process.
    Overhead {
        /// Measured iterations of each.
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Iterations before the measured ones, not counted.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// postgres or sqlite.
        #[arg(long, default_value = "postgres")]
        store: String,
        /// The Python of the virtualenv scripts/bench-env.sh makes (ansible-runner).
        #[arg(long, env = "MUSTER_BENCH_PYTHON")]
        python: Option<std::path::PathBuf>,
        /// Skip ansible-runner and the host's ansible-playbook.
        #[arg(long)]
        no_ansible_runner: bool,
    },
    /// One coordinator holding many simulated runners on real mTLS streams:
    /// its memory per runner, idle CPU, PostgreSQL connections, and dispatch
    /// latency under that load.
    Fleet {
        /// Simulated runners to enroll and connect.
        #[arg(long, default_value_t = 2_000)]
        runners: usize,
        /// Enrollments (then stream openings) in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds the coordinator's CPU and the database's commits are
        /// measured with every runner connected and heartbeating (a
        /// connected runner's last-seen time is written once a minute).
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
        /// Runs triggered one at a time, after 20 warm-up runs.
        #[arg(long, default_value_t = 2_000)]
        runs: usize,
        /// Runs triggered by concurrent clients afterwards (0: skip).
        #[arg(long, default_value_t = 2_000)]
        burst_runs: usize,
        /// Concurrent clients triggering those runs.
        #[arg(long, default_value_t = 16)]
        burst_clients: usize,
        /// postgres or sqlite.
        #[arg(long, default_value = "postgres")]
        store: String,
    },
}

#[tokio::main]
async fn main() {
    // The runner code used by simulated runners logs through tracing; only
    // its warnings matter here.
    muster_common::telemetry::init_with_default("warn");
    let cli = Cli::parse();
    let outcome = tokio::select! {
        outcome = run(cli) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Dropping the scenario above killed its processes and dropped its databases.
    if let Err(error) = outcome {
        eprintln!("muster-bench: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bins = Binaries::locate(cli.bin_dir.as_deref())?;
    println!(
        "machine: {} (load average {} at the start)",
        muster_bench::machine(),
        muster_bench::load_average()
    );
    if cfg!(debug_assertions) {
        println!("build: debug — figures are not representative; run with `cargo run --release -p muster-bench`");
    }
    let stores = |names: &[String]| -> anyhow::Result<Vec<StoreKind>> {
        names.iter().map(|n| StoreKind::parse(n)).collect()
    };
    let outcome = match cli.scenario {
        Scenario::Dispatch {
            runs,
            warmup,
            runners,
            store,
            bus,
            redis_server,
        } => {
            anyhow::ensure!(runs > 0, "--runs: expected at least 1");
            anyhow::ensure!(
                runners.iter().all(|n| (1..=5000).contains(n)),
                "--runners: expected numbers from 1 to 5000"
            );
            let options = muster_bench::dispatch::Options {
                stores: stores(&store)?,
                runners,
                runs,
                warmup,
                database_url: cli.database_url,
                bus,
                redis_server,
            };
            muster_bench::dispatch::run(&bins, &options).await
        }
        Scenario::Throughput {
            runs,
            clients,
            runner_processes,
            capacity,
            runner_work_dir,
            store,
            no_pgbench,
            pgbench_seconds,
            pgbench_scale,
            no_peers,
            python,
            redis_server,
        } => {
            anyhow::ensure!(runs > 0, "--runs: expected at least 1");
            anyhow::ensure!(clients > 0, "--clients: expected at least 1");
            anyhow::ensure!(
                runner_processes > 0,
                "--runner-processes: expected at least 1"
            );
            let capacity = capacity.unwrap_or(2 * muster_bench::cores() as u32);
            anyhow::ensure!(
                (1..=1024).contains(&capacity),
                "--capacity: expected 1 to 1024"
            );
            let python = match (no_peers, python) {
                (true, _) => None,
                (false, Some(python)) => Some(python),
                (false, None) => anyhow::bail!(
                    "the throughput peers need a Python with celery and procrastinate: run \
                     scripts/bench-env.sh and export the MUSTER_BENCH_PYTHON it prints, pass \
                     --python, or skip them with --no-peers"
                ),
            };
            let options = muster_bench::throughput::Options {
                store: StoreKind::parse(&store)?,
                runs,
                clients,
                runner_processes,
                capacity,
                runner_work_dir,
                pgbench: !no_pgbench,
                pgbench_seconds,
                pgbench_scale,
                database_url: cli.database_url,
                python,
                redis_server,
            };
            muster_bench::throughput::run(&bins, &options).await
        }
        Scenario::Logs {
            lines,
            tail_lines,
            store,
            bus,
            redis_server,
        } => {
            anyhow::ensure!(
                lines > 0 && tail_lines > 0,
                "--lines, --tail-lines: expected at least 1"
            );
            let store = StoreKind::parse(&store)?;
            anyhow::ensure!(
                !bus || store == StoreKind::Postgres,
                "--bus: coordinators share a PostgreSQL database, not SQLite"
            );
            let options = muster_bench::logs::Options {
                store,
                lines,
                tail_lines,
                database_url: cli.database_url,
                bus,
                redis_server,
            };
            muster_bench::logs::run(&bins, &options)
                .await
                .context("logs scenario")
        }
        Scenario::Agents {
            endpoints,
            seconds,
            memory_endpoints,
            memory_interval,
            concurrency,
            targets,
            exporter,
            no_exporter,
        } => {
            anyhow::ensure!(
                endpoints.iter().all(|n| (1..=100_000).contains(n)),
                "--endpoints: expected numbers from 1 to 100000"
            );
            anyhow::ensure!(
                (1..=3600).contains(&seconds),
                "--seconds: expected 1 to 3600"
            );
            anyhow::ensure!(
                (1..=100_000).contains(&memory_endpoints),
                "--memory-endpoints: expected 1 to 100000"
            );
            anyhow::ensure!(
                (1..=3600).contains(&memory_interval),
                "--memory-interval: expected 1 to 3600 seconds"
            );
            anyhow::ensure!(
                (1..=4096).contains(&concurrency),
                "--concurrency: expected 1 to 4096"
            );
            anyhow::ensure!((1..=64).contains(&targets), "--targets: expected 1 to 64");
            let options = muster_bench::agents::Options {
                endpoints,
                seconds,
                memory_endpoints,
                memory_interval,
                concurrency,
                targets,
                exporter,
                no_exporter,
            };
            muster_bench::agents::run(&bins, &options)
                .await
                .context("agents scenario")
        }
        Scenario::Overhead {
            iterations,
            warmup,
            store,
            python,
            no_ansible_runner,
        } => {
            anyhow::ensure!(
                (1..=10_000).contains(&iterations),
                "--iterations: expected 1 to 10000"
            );
            anyhow::ensure!(warmup <= 1_000, "--warmup: expected 0 to 1000");
            let options = muster_bench::overhead::Options {
                store: StoreKind::parse(&store)?,
                iterations,
                warmup,
                python,
                ansible_runner: !no_ansible_runner,
                database_url: cli.database_url,
            };
            muster_bench::overhead::run(&bins, &options)
                .await
                .context("overhead scenario")
        }
        Scenario::Fleet {
            runners,
            concurrency,
            idle_seconds,
            runs,
            burst_runs,
            burst_clients,
            store,
        } => {
            within("--runners", runners, 1..=20_000)?;
            within("--concurrency", concurrency, 1..=256)?;
            within("--idle-seconds", idle_seconds as usize, 1..=3600)?;
            anyhow::ensure!(runs > 0, "--runs: expected at least 1");
            within("--burst-clients", burst_clients, 1..=1024)?;
            anyhow::ensure!(
                burst_clients <= runners,
                "--burst-clients: expected at most --runners ({runners}), so every trigger finds an idle runner"
            );
            let options = muster_bench::fleet::Options {
                store: StoreKind::parse(&store)?,
                runners,
                concurrency,
                idle_seconds,
                runs,
                burst_runs,
                burst_clients,
                database_url: cli.database_url,
            };
            muster_bench::fleet::run(&bins, &options)
                .await
                .context("fleet scenario")
        }
    };
    println!("load average at the end: {}", muster_bench::load_average());
    outcome
}

/// Checks that option `flag` is in `range`.
fn within(flag: &str, value: usize, range: std::ops::RangeInclusive<usize>) -> anyhow::Result<()> {
    anyhow::ensure!(
        range.contains(&value),
        "{flag}: expected {} to {}, found {value}",
        range.start(),
        range.end()
    );
    Ok(())
}
