//! The monitoring agent beside Prometheus' blackbox_exporter, on the same
//! local HTTP targets, in one run:
//!
//! 1. HTTP targets on loopback, served by this process: each connection
//!    gets `200 ok` and is closed (both tools open a fresh connection per
//!    check).
//! 2. The built `muster-agent` against a real `muster-coordinator` (SQLite,
//!    throwaway data directory): an agent and N HTTP endpoints created over
//!    the API, every one checked each second, so the demand is N checks per
//!    second. Checks made come from the agent's `/metrics`
//!    (`muster_agent_checks_total`); CPU time from `/proc/<pid>/stat`, peak
//!    memory from `VmHWM` in `/proc/<pid>/status`.
//! 3. `prometheus-blackbox-exporter` with an `http_2xx` module, driven the
//!    way Prometheus drives it, by `GET /probe?module=http_2xx&target=…`,
//!    here from a closed loop of concurrent clients, so it runs as fast as
//!    it can. Probes that answered `probe_success 1` are counted.
//! 4. The agent's memory with 10,000 endpoints (one check a minute each)
//!    once every endpoint has been checked at least once.
//!
//! The measured windows start after a warm-up; figures are rates over the
//! window, CPU is user + system time of the tool's process only (the
//! targets, the coordinator and this process's clients run beside it on
//! the same cores).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{wait_for, Api, Binaries, Coordinator};
use crate::stats::Table;

/// What the scenario measures with.
#[derive(Debug, Clone)]
pub struct Options {
    /// Endpoints (each checked every second) of each agent run.
    pub endpoints: Vec<usize>,
    /// Length of each measured window.
    pub seconds: u64,
    /// Endpoints of the memory measurement.
    pub memory_endpoints: usize,
    /// Their interval, in seconds.
    pub memory_interval: u32,
    /// Concurrent `/probe` requests sent to blackbox_exporter.
    pub concurrency: usize,
    /// Loopback HTTP servers the checks are spread over.
    pub targets: usize,
    /// The blackbox_exporter binary.
    pub exporter: String,
    /// Skip blackbox_exporter (when it is not installed).
    pub no_exporter: bool,
}

/// Warm-up before each measured window.
const WARMUP: Duration = Duration::from_secs(3);
/// Endpoints created over the API at once.
const CREATE_CONCURRENCY: usize = 16;

/// One tool's figures over a measured window.
#[derive(Debug, Clone)]
pub struct Measured {
    pub tool: String,
    /// Checks (probes) per second the tool was asked for; `None`: as many
    /// as it can.
    pub demand: Option<f64>,
    pub checks: f64,
    /// Checks that did not succeed (down or degraded; failed probes).
    pub failed: f64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

impl Measured {
    pub fn per_second(&self) -> f64 {
        self.checks / self.seconds
    }

    /// CPU seconds per 1000 checks; `None` when nothing was checked.
    pub fn cpu_per_1000(&self) -> Option<f64> {
        (self.checks > 0.0).then(|| self.cpu_seconds / self.checks * 1000.0)
    }

    /// Share of one core, in percent.
    pub fn cpu_percent(&self) -> f64 {
        self.cpu_seconds / self.seconds * 100.0
    }
}

pub async fn run(bins: &Binaries, options: &Options) -> anyhow::Result<()> {
    let agent_bin = bins
        .coordinator
        .parent()
        .map(|dir| dir.join("muster-agent"))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "muster-agent is missing beside {}: build it with `cargo build --release -p muster-agent` \
                 (the same profile as this benchmark)",
                bins.coordinator.display()
            )
        })?;
    let targets = Targets::start(options.targets).await?;
    println!(
        "targets: {} HTTP servers on loopback ({})",
        options.targets,
        targets.urls.join(", ")
    );
    let mut measured = Vec::new();

    if options.no_exporter {
        println!("blackbox_exporter: skipped (--no-exporter)");
    } else {
        println!(
            "blackbox_exporter: {} closed-loop clients for {} s…",
            options.concurrency, options.seconds
        );
        let m = exporter(options, &targets)
            .await
            .context("blackbox_exporter")?;
        println!(
            "  {:.0} probes/s, {:.0} % of a core",
            m.per_second(),
            m.cpu_percent()
        );
        measured.push(m);
    }

    let coordinator = Coordinator::start(bins, None).await?;
    for (i, &n) in options.endpoints.iter().enumerate() {
        println!(
            "muster-agent: {n} endpoints every 1 s, {} s…",
            options.seconds
        );
        let location = format!("rate-{i}");
        let token = agent_with_endpoints(&coordinator.api, &location, n, 1, 1, &targets).await?;
        let mut agent = AgentProcess::start(&agent_bin, &coordinator, &token).await?;
        let m = agent.measure(n, options.seconds).await.with_context(|| {
            format!(
                "muster-agent with {n} endpoints; its log ends:\n{}",
                agent.log_tail()
            )
        })?;
        println!(
            "  {:.0} checks/s of {n} asked, {:.0} % of a core",
            m.per_second(),
            m.cpu_percent()
        );
        measured.push(m);
    }

    println!(
        "muster-agent: {} endpoints every {} s, memory after every one was checked…",
        options.memory_endpoints, options.memory_interval
    );
    let token = agent_with_endpoints(
        &coordinator.api,
        "memory",
        options.memory_endpoints,
        options.memory_interval,
        5.min(options.memory_interval),
        &targets,
    )
    .await?;
    let mut agent = AgentProcess::start(&agent_bin, &coordinator, &token).await?;
    let memory = agent
        .memory_after_one_interval(options.memory_endpoints, options.memory_interval)
        .await
        .with_context(|| format!("muster-agent's memory; its log ends:\n{}", agent.log_tail()))?;
    drop(agent);
    drop(coordinator);

    println!();
    let mut table = Table::new(&[
        "tool",
        "asked/s",
        "checks/s",
        "failed",
        "CPU (% of a core)",
        "CPU s per 1000 checks",
        "peak RSS (MiB)",
    ]);
    for m in &measured {
        table.row(vec![
            m.tool.clone(),
            m.demand
                .map_or_else(|| "max".to_owned(), |d| format!("{d:.0}")),
            format!("{:.0}", m.per_second()),
            format!("{:.0}", m.failed),
            format!("{:.0}", m.cpu_percent()),
            m.cpu_per_1000()
                .map_or_else(|| "-".into(), |c| format!("{c:.3}")),
            format!("{:.1}", m.peak_rss_kib as f64 / 1024.0),
        ]);
    }
    println!("{}", table.render());
    println!();
    let mut table = Table::new(&[
        "muster-agent memory",
        "checks made",
        "RSS (MiB)",
        "peak RSS (MiB)",
    ]);
    table.row(vec![
        format!(
            "{} endpoints, every {} s",
            options.memory_endpoints, options.memory_interval
        ),
        format!("{:.0}", memory.checks),
        format!("{:.1}", memory.rss_kib as f64 / 1024.0),
        format!("{:.1}", memory.peak_rss_kib as f64 / 1024.0),
    ]);
    println!("{}", table.render());
    Ok(())
}

// ---- the targets ----------------------------------------------------------

/// HTTP servers on loopback answering every request `200 ok` and closing
/// the connection; stopped when dropped.
pub struct Targets {
    pub urls: Vec<String>,
    pub served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

impl Targets {
    pub async fn start(count: usize) -> anyhow::Result<Targets> {
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut urls = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..count {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.push(format!("http://{}/", listener.local_addr()?));
            let (served, stop) = (served.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let served = served.clone();
                    tokio::spawn(async move {
                        if answer(&mut conn).await.is_ok() {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }));
        }
        Ok(Targets {
            urls,
            served,
            stop,
            tasks,
        })
    }

    /// The `i`th target URL, spread over the servers; the query makes each
    /// endpoint's URL its own.
    pub fn url(&self, i: usize) -> String {
        format!("{}?n={i}", self.urls[i % self.urls.len()])
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Reads one request head and answers it.
async fn answer(conn: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    conn.write_all(RESPONSE).await?;
    conn.shutdown().await
}

// ---- the process figures -------------------------------------------------

/// Current and peak resident memory of `pid`, in KiB.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_memory(&status).ok_or_else(|| anyhow!("{path} has no VmRSS or VmHWM"))
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text, in KiB.
pub fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// User plus system CPU time of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("{path}: no utime/stime"))?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks. The command
/// name in parentheses may hold spaces, so fields are counted after its
/// closing parenthesis: utime and stime are the 14th and 15th fields of the
/// line, the 12th and 13th after the name.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux architecture this runs on.
    100.0
}

/// Sum of the samples of `metric` (every label set) in a Prometheus text
/// exposition, with `keep` deciding on each sample's line.
pub fn metric_sum(text: &str, metric: &str, keep: impl Fn(&str) -> bool) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| keep(l))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

// ---- blackbox_exporter ---------------------------------------------------

/// A process killed when dropped.
struct Child(tokio::process::Child);

impl Child {
    fn pid(&self) -> anyhow::Result<u32> {
        self.0.id().ok_or_else(|| anyhow!("the process has exited"))
    }
}

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

async fn exporter(options: &Options, targets: &Targets) -> anyhow::Result<Measured> {
    let dir = tempfile::Builder::new()
        .prefix("muster-bench-blackbox-")
        .tempdir()?;
    let config = dir.path().join("blackbox.yml");
    std::fs::write(
        &config,
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n      valid_status_codes: [200]\n",
    )?;
    let addr = free_addr()?;
    let log_path = dir.path().join("exporter.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = tokio::process::Command::new(&options.exporter)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow!(
                "cannot start {}: {e}; install it with scripts/bench-env.sh, name it with --exporter, \
                 or skip it with --no-exporter",
                options.exporter
            )
        })?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .timeout(Duration::from_secs(10))
        .build()?;
    let ready = wait_for(
        Duration::from_secs(15),
        Duration::from_millis(50),
        "blackbox_exporter to answer /-/healthy",
        || {
            let request = client.get(format!("http://{addr}/-/healthy")).send();
            let exited = child.try_wait();
            async move {
                if let Some(status) = exited? {
                    bail!("it exited with {status}");
                }
                Ok(request.await.is_ok_and(|r| r.status().is_success()))
            }
        },
    )
    .await;
    if let Err(error) = ready {
        bail!("{error:#}; its log ends:\n{}", tail(&log_path));
    }
    let child = Child(child);
    let pid = child.pid()?;

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let probe_url = format!("http://{addr}/probe");
    let mut clients = Vec::new();
    for c in 0..options.concurrency {
        let (client, probe_url, ok, failed, stop) = (
            client.clone(),
            probe_url.clone(),
            ok.clone(),
            failed.clone(),
            stop.clone(),
        );
        let urls: Vec<String> = (0..64).map(|i| targets.url(c * 64 + i)).collect();
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let target = &urls[i % urls.len()];
                let answer = async {
                    client
                        .get(&probe_url)
                        .query(&[("module", "http_2xx"), ("target", target)])
                        .send()
                        .await?
                        .error_for_status()?
                        .text()
                        .await
                }
                .await;
                let success =
                    answer.is_ok_and(|text| metric_sum(&text, "probe_success", |_| true) == 1.0);
                if success { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    let (ok0, failed0, cpu0, started) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        cpu_seconds(pid)?,
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    let (ok1, failed1, cpu1, seconds) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        cpu_seconds(pid)?,
        started.elapsed().as_secs_f64(),
    );
    let (_, peak) = memory_kib(pid)?;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.abort();
    }
    if ok1 == ok0 {
        bail!(
            "no probe succeeded ({} failed); its log ends:\n{}",
            failed1 - failed0,
            tail(&log_path)
        );
    }
    Ok(Measured {
        tool: format!("blackbox_exporter, {} clients", options.concurrency),
        demand: None,
        checks: (ok1 - ok0) as f64,
        failed: (failed1 - failed0) as f64,
        seconds,
        cpu_seconds: cpu1 - cpu0,
        peak_rss_kib: peak,
    })
}

// ---- muster-agent --------------------------------------------------------

/// Creates an agent at `location` and `n` HTTP endpoints there; returns the
/// agent's token.
async fn agent_with_endpoints(
    api: &Api,
    location: &str,
    n: usize,
    interval: u32,
    timeout: u32,
    targets: &Targets,
) -> anyhow::Result<String> {
    let agent = api
        .post(
            "/api/v1/agents/",
            json!({ "name": format!("bench-{location}"), "location": location }),
        )
        .await?;
    let token = agent["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the agent answer has no token: {agent}"))?
        .to_owned();
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let body = json!({
                "name": format!("{location}-{i}"), "kind": "http", "target": targets.url(i),
                "interval": interval, "timeout": timeout, "locations": [location],
                "min_failing_locations": 1, "failure_threshold": 3, "success_threshold": 1,
                "conditions": ["[STATUS] == 200"],
            });
            async move { api.post("/api/v1/endpoints/", body).await }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await
        .with_context(|| format!("creating {n} endpoints at {location}"))?;
    println!(
        "  created {n} endpoints over the API in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(token)
}

/// A `muster-agent` process with a data directory and a `/metrics` address
/// of its own; killed when dropped.
struct AgentProcess {
    child: Child,
    metrics: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

/// The agent's memory once all its endpoints were checked.
pub struct Memory {
    pub checks: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl AgentProcess {
    async fn start(
        bin: &std::path::Path,
        coordinator: &Coordinator,
        token: &str,
    ) -> anyhow::Result<AgentProcess> {
        let dir = tempfile::Builder::new()
            .prefix("muster-bench-agent-")
            .tempdir()?;
        let metrics_addr = free_addr()?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = tokio::process::Command::new(bin)
            .args(["--coordinator", &coordinator.api.base])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--metrics-addr", &metrics_addr.to_string()])
            // From the environment, so the token is on no command line.
            .env("MUSTER_AGENT_TOKEN", token)
            .env_remove("MUSTER_AGENT_TOKEN_FILE")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(AgentProcess {
            child: Child(child),
            metrics: format!("http://{metrics_addr}/metrics"),
            http: reqwest::Client::new(),
            dir,
        })
    }

    fn log_tail(&self) -> String {
        tail(&self.dir.path().join("agent.log"))
    }

    async fn scrape(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(&self.metrics)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Checks made so far, and those of them that were not up.
    async fn checks(&self) -> anyhow::Result<(f64, f64)> {
        let text = self.scrape().await?;
        Ok((
            metric_sum(&text, "muster_agent_checks_total", |_| true),
            metric_sum(&text, "muster_agent_checks_total", |l| {
                !l.contains("verdict=\"up\"")
            }),
        ))
    }

    /// Waits until the agent has fetched its `n` endpoints.
    async fn wait_endpoints(&mut self, n: usize) -> anyhow::Result<()> {
        let exited = &mut self.child.0;
        let (http, metrics) = (&self.http, &self.metrics);
        wait_for(
            Duration::from_secs(120),
            Duration::from_millis(200),
            &format!("the agent to fetch its {n} endpoints"),
            || {
                let status = exited.try_wait();
                let request = http.get(metrics).send();
                async move {
                    if let Some(status) = status? {
                        bail!("muster-agent exited with {status}");
                    }
                    let Ok(response) = request.await else {
                        return Ok(false);
                    };
                    let text = response.text().await.unwrap_or_default();
                    Ok(metric_sum(&text, "muster_agent_endpoints", |_| true) as usize == n)
                }
            },
        )
        .await
    }

    async fn measure(&mut self, n: usize, seconds: u64) -> anyhow::Result<Measured> {
        self.wait_endpoints(n).await?;
        let pid = self.child.pid()?;
        // Every endpoint's first check falls within its first interval (1 s).
        tokio::time::sleep(WARMUP).await;
        let (checks0, failed0) = self.checks().await?;
        let (cpu0, started) = (cpu_seconds(pid)?, Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (checks1, failed1) = self.checks().await?;
        let (cpu1, elapsed) = (cpu_seconds(pid)?, started.elapsed().as_secs_f64());
        let (_, peak) = memory_kib(pid)?;
        let text = self.scrape().await?;
        let skipped = metric_sum(&text, "muster_agent_checks_skipped_total", |_| true);
        let buffered = metric_sum(&text, "muster_agent_results_buffered", |_| true);
        let reported = metric_sum(&text, "muster_agent_results_reported_total", |_| true);
        println!(
            "  skipped (previous check still running) {skipped:.0}, reported to the coordinator {reported:.0}, buffered on disk {buffered:.0}"
        );
        Ok(Measured {
            tool: format!("muster-agent, {n} endpoints"),
            demand: Some(n as f64),
            checks: checks1 - checks0,
            failed: failed1 - failed0,
            seconds: elapsed,
            cpu_seconds: cpu1 - cpu0,
            peak_rss_kib: peak,
        })
    }

    async fn memory_after_one_interval(
        &mut self,
        n: usize,
        interval: u32,
    ) -> anyhow::Result<Memory> {
        self.wait_endpoints(n).await?;
        let pid = self.child.pid()?;
        let deadline = Instant::now() + Duration::from_secs(u64::from(interval) * 2 + 30);
        // Every endpoint's first check falls within its first interval.
        tokio::time::sleep(Duration::from_secs(u64::from(interval))).await;
        loop {
            let (checks, _) = self.checks().await?;
            if checks >= n as f64 {
                let (rss, peak) = memory_kib(pid)?;
                return Ok(Memory {
                    checks,
                    rss_kib: rss,
                    peak_rss_kib: peak,
                });
            }
            if Instant::now() > deadline {
                bail!("only {checks} of {n} endpoints were checked within two intervals");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat =
            "4242 (muster agent) S 1 4242 4242 0 -1 4194560 1204 0 0 0 250 37 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(287));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn memory_fields_are_read_in_kib() {
        let status = "Name:\tmuster-agent\nVmHWM:\t   40960 kB\nVmRSS:\t   30720 kB\n";
        assert_eq!(parse_memory(status), Some((30720, 40960)));
        assert_eq!(parse_memory("Name:\tx\n"), None);
    }

    #[test]
    fn metric_sums_cover_every_label_set_and_only_that_metric() {
        let text = "# HELP muster_agent_checks_total Checks.\n\
                    muster_agent_checks_total{kind=\"http\",verdict=\"up\"} 90\n\
                    muster_agent_checks_total{kind=\"http\",verdict=\"down\"} 10\n\
                    muster_agent_checks_total_extra 5\n\
                    probe_success 1\n";
        assert_eq!(
            metric_sum(text, "muster_agent_checks_total", |_| true),
            100.0
        );
        assert_eq!(
            metric_sum(text, "muster_agent_checks_total", |l| !l.contains("\"up\"")),
            10.0
        );
        assert_eq!(metric_sum(text, "probe_success", |_| true), 1.0);
    }

    #[tokio::test]
    async fn targets_answer_200_and_count() -> anyhow::Result<()> {
        let targets = Targets::start(2).await?;
        let client = reqwest::Client::new();
        for i in 0..4 {
            let response = client.get(targets.url(i)).send().await?;
            assert_eq!(response.status(), 200);
            assert_eq!(response.text().await?, "ok");
        }
        // Counted once the answer is written and the connection shut.
        for _ in 0..100 {
            if targets.served.load(Ordering::Relaxed) == 4 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(targets.served.load(Ordering::Relaxed), 4);
        Ok(())
    }
}
