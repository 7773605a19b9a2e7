//! Measures the agent's footprint: starts the `muster-agent` binary with N
//! HTTP endpoints that all point at a local HTTP server run by this
//! program, and prints checks per second, CPU time and memory (RSS) of the
//! agent process.
//!
//! The agent gets its endpoints the way a restarted agent does while its
//! coordinator is away: from the list kept in its data directory. Its
//! coordinator URL points at a closed port, so every result also goes
//! through the disk buffer, the agent's most expensive path.
//!
//! ```text
//! cargo build --release -p muster-agent --bins --examples
//! target/release/examples/footprint [endpoints=10000] [interval_s=60] [seconds=120]
//! ```

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use muster_agent::EndpointCache;
use muster_common::monitor::{EndpointList, EndpointSpec};
use muster_common::secret::Secret;
use muster_common::token::{self, TokenKind};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("usage: footprint [endpoints] [interval_s] [seconds]"))?;
    let endpoints = args.first().copied().unwrap_or(10_000) as usize;
    let interval = args.get(1).copied().unwrap_or(60) as u32;
    let seconds = args.get(2).copied().unwrap_or(120);

    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let token = token::generate(TokenKind::AgentToken);
    let specs: Vec<EndpointSpec> = (0..endpoints)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "id": uuid::Uuid::now_v7(), "name": format!("web-{i}"), "kind": "http",
                "target": format!("http://{server}/?n={i}"), "interval": interval, "timeout": 5,
                "conditions": [{"condition": "[STATUS] == 200"}, {"condition": "[RESPONSE_TIME] < 1000", "degrades": true}],
            }))
        })
        .collect::<Result<_, _>>()?;
    EndpointCache::new(dir.path(), &Secret::new(token.clone()))
        .store(
            &EndpointList {
                version: "footprint".into(),
                endpoints: specs,
            },
            "footprint",
        )
        .await;

    let agent = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("muster-agent"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("build the agent first: cargo build -p muster-agent --bins --examples")
        })?;
    let metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let mut child = Command::new(&agent)
        .args(["--coordinator", &format!("http://{closed}")])
        .args(["--data-dir", &dir.path().display().to_string()])
        .args(["--metrics-addr", &metrics_addr.to_string()])
        .env("MUSTER_AGENT_TOKEN", &token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    println!(
        "agent {} (pid {pid}): {endpoints} HTTP endpoints every {interval} s, {seconds} s",
        agent.display()
    );

    let started = Instant::now();
    let mut peak_rss = 0;
    let mut window: Option<(Instant, f64, f64)> = None;
    let mut printed = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, hwm) = memory(pid)?;
        peak_rss = peak_rss.max(hwm);
        let checks = checks_made(&metrics_addr.to_string()).await.unwrap_or(0.0);
        // Steady state: from one interval in (every endpoint has started).
        if started.elapsed() >= Duration::from_secs(u64::from(interval)) && window.is_none() {
            window = Some((Instant::now(), checks, cpu_seconds(pid)?));
        }
        let bucket = started.elapsed().as_secs() / 10;
        if bucket != printed {
            printed = bucket;
            println!(
                "  {:>4} s: {checks:>8} checks, RSS {} KiB (peak {hwm} KiB)",
                started.elapsed().as_secs(),
                rss
            );
        }
    }
    let checks = checks_made(&metrics_addr.to_string()).await.unwrap_or(0.0);
    let cpu = cpu_seconds(pid)?;
    let (rss, hwm) = memory(pid)?;
    peak_rss = peak_rss.max(hwm);
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await?
        .text()
        .await?;
    println!("\nendpoints          {endpoints}");
    println!("checks             {checks}");
    if let Some((at, checks_then, cpu_then)) = window {
        let secs = at.elapsed().as_secs_f64();
        println!(
            "checks per second  {:.1} (steady state, expected {:.1})",
            (checks - checks_then) / secs,
            endpoints as f64 / f64::from(interval)
        );
        println!(
            "CPU                {:.1} % of one core (steady state)",
            (cpu - cpu_then) / secs * 100.0
        );
    }
    println!("CPU total          {cpu:.2} s");
    println!("RSS now            {:.1} MiB", rss as f64 / 1024.0);
    println!("RSS peak (VmHWM)   {:.1} MiB", peak_rss as f64 / 1024.0);
    for line in text.lines().filter(|l| {
        l.starts_with("muster_agent_checks_total")
            || l.starts_with("muster_agent_results_buffered")
            || l.starts_with("muster_agent_checks_skipped_total")
            || l.starts_with("muster_agent_check_slot_waits_total")
    }) {
        if !line.ends_with(" 0") {
            println!("  {line}");
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    Ok(())
}

/// Current and peak resident memory of `pid`, in KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status")))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the line, in clock ticks (100 per second on Linux).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(ticks as f64 / 100.0)
}

async fn checks_made(addr: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("muster_agent_checks_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum(),
    )
}
