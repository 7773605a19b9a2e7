//! Muster's benchmarks. Every scenario starts the real processes — the
//! built `muster-coordinator` and `muster-runner` binaries, a throwaway
//! PostgreSQL database or the embedded SQLite file — measures, prints a
//! Markdown table, and cleans up after itself. `BENCHMARKS.md` holds the
//! latest figures and the commands that reproduce them.
//!
//! - [`dispatch`]: trigger → lease latency with simulated runners ([`sim`]);
//! - [`throughput`]: runs per second through the whole lifecycle beside
//!   `pgbench -N` on the same PostgreSQL and the [`peers`], Celery and
//!   procrastinate;
//! - [`logs`]: log ingest rate and completeness, and live-tail latency;
//! - [`agents`]: the monitoring agent's checks per second, CPU and memory
//!   beside Prometheus' blackbox_exporter on the same local HTTP targets;
//! - [`overhead`]: a trivial playbook through the docker executor beside
//!   `docker run` and ansible-runner;
//! - [`fleet`]: one coordinator holding thousands of simulated runners:
//!   memory per runner, idle CPU, PostgreSQL connections, dispatch latency.

pub mod agents;
pub mod dispatch;
pub mod fleet;
pub mod harness;
pub mod logs;
pub mod overhead;
pub mod peers;
pub mod sim;
pub mod sse;
pub mod stats;
pub mod throughput;

use anyhow::anyhow;

/// The PostgreSQL URL new databases are created through: `--database-url`,
/// else `MUSTER_TEST_DATABASE_URL` (what `scripts/test-env.sh --print-env`
/// sets).
pub fn database_url(given: &Option<String>) -> anyhow::Result<&str> {
    given.as_deref().ok_or_else(|| {
        anyhow!(
            "no PostgreSQL to use: pass --database-url postgres://user:password@host/db (a role that may create databases), \
             or run `eval \"$(scripts/test-env.sh --print-env)\"` first"
        )
    })
}

/// One line about the machine, for the tables' context: CPU, cores,
/// memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {memory_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// The load average over the last minute: what else the machine was doing.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// The number of cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
