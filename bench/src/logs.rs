//! Log ingest and live tail, with a `muster-runner` process (process
//! executor):
//!
//! - **ingest**: a job prints `seq 1 N` as fast as it can; the rate is N
//!   lines over the time from the run's start to the moment the run is seen
//!   ended (which the coordinator records only after every chunk before
//!   the result is stored); then the stored log is read back and checked:
//!   every line, in order, nothing else.
//! - **tail**: a job prints a numbered line with the wall-clock time it was
//!   printed about every millisecond while a client follows the run's
//!   `text/event-stream`; the latency of a line is the time it was received
//!   minus the time it was printed (one machine, one clock). With `bus`,
//!   the client follows on a second coordinator of the same database, so
//!   the lines reach it through the Redis event bus.

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::{Api, Binaries, Coordinators, RunnerProcess, ScratchDb, StoreKind};
use crate::stats::{ms, rate, Summary, Table};

pub struct Options {
    pub store: StoreKind,
    pub lines: u64,
    pub tail_lines: u64,
    pub database_url: Option<String>,
    /// Follow the tail on a second coordinator, through the Redis bus.
    pub bus: bool,
    /// The redis-server binary for `bus`.
    pub redis_server: String,
}

/// How often the run is looked at while its log is ingested.
const POLL: Duration = Duration::from_millis(20);

struct Ingest {
    /// Start of the run (the runner's report) to the run seen ended.
    elapsed: Duration,
    /// How long the job itself ran (start to finish, as the runner reports).
    job: Duration,
    bytes: usize,
    verified: Option<bool>,
}

struct Tail {
    latency: Summary,
}

pub async fn run(bins: &Binaries, options: &Options) -> anyhow::Result<()> {
    let db = match options.store {
        StoreKind::Postgres => Some(
            ScratchDb::create(crate::database_url(&options.database_url)?, "muster_bench").await?,
        ),
        StoreKind::Sqlite => None,
    };
    let bus = options.bus.then_some(options.redis_server.as_str());
    let coordinators = Coordinators::start(bins, db.as_ref(), bus).await?;
    // The tail is followed where clients go: across the bus with `bus`.
    let (coordinator, follower) = (&coordinators.back, coordinators.clients());
    let mut runner = None;
    let result = async {
        coordinator.api.push_bench_workspace().await?;
        runner = Some(RunnerProcess::start(bins, coordinator, "bench-logs", 1).await?);
        // Warm-up: the runner fetches and caches the bundle.
        let warm = coordinator.api.trigger("noop", json!({})).await?;
        expect_success(
            &coordinator
                .api
                .wait_final(&warm, Duration::from_secs(60), POLL)
                .await?,
        )?;

        eprintln!(
            "logs: ingest of {} lines on {}",
            options.lines,
            options.store.name()
        );
        let ingest = ingest(&coordinator.api, options.lines)
            .await
            .context("log ingest")?;
        eprintln!("logs: tail of {} lines", options.tail_lines);
        let tail = tail(follower, options.tail_lines)
            .await
            .context("live tail")?;
        anyhow::Ok((ingest, tail))
    }
    .await;
    let (ingest, tail) = result.map_err(|e| {
        let runner_log = runner.as_ref().map(|r| r.log_tail()).unwrap_or_default();
        e.context(format!(
            "{}\nthe runner's log ends:\n{runner_log}",
            coordinators.log_tails()
        ))
    })?;

    let secs = ingest.elapsed.as_secs_f64();
    let mut table = Table::new(&["measure", "value"]);
    table.row(vec!["store".into(), options.store.name().into()]);
    table.row(vec![
        "tail followed on".into(),
        match coordinators.over_bus() {
            true => "another coordinator, through the Redis bus".into(),
            false => "the runner's coordinator".into(),
        },
    ]);
    table.row(vec![
        "lines printed (`seq 1 N`)".into(),
        rate(options.lines as f64),
    ]);
    table.row(vec!["bytes".into(), rate(ingest.bytes as f64)]);
    table.row(vec![
        "job ran (runner's start → finish)".into(),
        format!("{:.2} s", ingest.job.as_secs_f64()),
    ]);
    table.row(vec![
        "run start → run ended, whole log stored".into(),
        format!("{secs:.2} s"),
    ]);
    table.row(vec![
        "ingest, lines/s persisted".into(),
        rate(options.lines as f64 / secs),
    ]);
    table.row(vec![
        "ingest, MiB/s persisted".into(),
        format!("{:.1}", ingest.bytes as f64 / secs / 1024.0 / 1024.0),
    ]);
    table.row(vec![
        "stored log complete (every line, in order)".into(),
        "yes".into(), // `ingest` fails otherwise
    ]);
    table.row(vec![
        "coordinator's check against the runner's digest".into(),
        match ingest.verified {
            Some(true) => "verified".into(),
            Some(false) => "MISMATCH".into(),
            None => "not reported".into(),
        },
    ]);
    table.row(vec![
        "tail: lines (one every ~1 ms)".into(),
        tail.latency.count.to_string(),
    ]);
    table.row(vec![
        "tail: printed → received p50".into(),
        format!("{} ms", ms(tail.latency.p50)),
    ]);
    table.row(vec![
        "tail: p95".into(),
        format!("{} ms", ms(tail.latency.p95)),
    ]);
    table.row(vec![
        "tail: p99".into(),
        format!("{} ms", ms(tail.latency.p99)),
    ]);
    table.row(vec![
        "tail: max".into(),
        format!("{} ms", ms(tail.latency.max)),
    ]);
    println!("\nLog ingest and live tail\n");
    print!("{}", table.render());
    Ok(())
}

fn expect_success(run: &Value) -> anyhow::Result<()> {
    if run["status"] != "succeeded" {
        bail!("run {} ended {}: {run}", run["id"], run["status"]);
    }
    Ok(())
}

fn timestamp(run: &Value, field: &str) -> anyhow::Result<SystemTime> {
    let text = run[field]
        .as_str()
        .ok_or_else(|| anyhow!("the run has no {field}: {run}"))?;
    Ok(chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("{field} '{text}'"))?
        .with_timezone(&chrono::Utc)
        .into())
}

async fn ingest(api: &Api, lines: u64) -> anyhow::Result<Ingest> {
    let run_id = api.trigger("flood", json!({ "lines": lines })).await?;
    // A million lines take seconds; allow a generous minimum rate.
    let within = Duration::from_secs(120 + lines / 2_000);
    let run = api.wait_final(&run_id, within, POLL).await?;
    let seen_ended = SystemTime::now();
    expect_success(&run)?;
    let started = timestamp(&run, "started_at")?;
    let finished = timestamp(&run, "finished_at")?;
    let elapsed = seen_ended.duration_since(started).unwrap_or_default();
    let job = finished.duration_since(started).unwrap_or_default();

    let response = api
        .http
        .get(api.url(&format!("/api/v1/action-runs/{run_id}/logs/")))
        .bearer_auth(&api.key)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("reading the log answered {}", response.status());
    }
    let text = response.text().await?;
    check_counted(&text, lines)?;
    Ok(Ingest {
        elapsed,
        job,
        bytes: text.len(),
        verified: run["log"]["verified"].as_bool(),
    })
}

/// Checks that `log` is the lines `1` to `lines`, in order, each once, and
/// nothing else.
pub fn check_counted(log: &str, lines: u64) -> anyhow::Result<()> {
    let mut expected = 1u64;
    for (i, line) in log.lines().enumerate() {
        let n: u64 = line.parse().map_err(|_| {
            anyhow!(
                "line {} of the stored log is '{line}', expected {expected}",
                i + 1
            )
        })?;
        if n != expected {
            bail!(
                "line {} of the stored log is {n}, expected {expected}",
                i + 1
            );
        }
        expected += 1;
    }
    if expected != lines + 1 {
        bail!(
            "the stored log has {} lines, expected {lines}",
            expected - 1
        );
    }
    if !log.is_empty() && !log.ends_with('\n') {
        bail!("the stored log's last line is cut short");
    }
    Ok(())
}

/// Seconds since the epoch now, as bash's `$EPOCHREALTIME` gives them.
fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A ticker line, `<n> <seconds since the epoch>` (either decimal mark).
pub fn parse_tick(line: &str) -> Option<(u64, f64)> {
    let (n, at) = line.trim().split_once(' ')?;
    Some((n.parse().ok()?, at.replace(',', ".").parse().ok()?))
}

async fn tail(api: &Api, lines: u64) -> anyhow::Result<Tail> {
    let run_id = api.trigger("ticker", json!({ "lines": lines })).await?;
    let mut body = api.tail(&run_id).await?.bytes_stream();
    let mut parser = crate::sse::Parser::default();
    // A line may end in the next chunk: what came of it so far.
    let mut partial = String::new();
    let mut latencies = Vec::with_capacity(lines as usize);
    let mut expected = 1u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + lines / 100);
    let end = 'read: loop {
        let bytes = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| anyhow!("the tail did not end in time (at line {expected})"))?
            .ok_or_else(|| anyhow!("the tail ended without an end event"))??;
        let received = epoch_now();
        parser.push(&bytes);
        while let Some(event) = parser.next_event() {
            let data: Value = serde_json::from_str(&event.data)
                .with_context(|| format!("event data '{}'", event.data))?;
            match event.event.as_str() {
                "log" => {
                    partial.push_str(data["data"].as_str().unwrap_or_default());
                    while let Some(newline) = partial.find('\n') {
                        let line: String = partial.drain(..=newline).collect();
                        let (n, printed) = parse_tick(&line).ok_or_else(|| {
                            anyhow!("the tail sent '{}', not a ticker line", line.trim())
                        })?;
                        if n != expected {
                            bail!("the tail sent line {n}, expected {expected}");
                        }
                        expected += 1;
                        latencies.push(((received - printed) * 1000.0).max(0.0));
                    }
                }
                "end" => break 'read data,
                _ => {}
            }
        }
    };
    if end["status"] != "succeeded" {
        bail!("the ticker run ended {end}");
    }
    if expected != lines + 1 {
        bail!("the tail sent {} lines, expected {lines}", expected - 1);
    }
    Ok(Tail {
        latency: Summary::of_millis(&mut latencies).context("no lines")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_log_passes() {
        check_counted("1\n2\n3\n", 3).unwrap();
        check_counted("", 0).unwrap();
    }

    #[test]
    fn gaps_repeats_extra_lines_and_cut_lines_fail() {
        let failure = |log: &str, n| format!("{:#}", check_counted(log, n).unwrap_err());
        assert!(failure("1\n3\n", 3).contains("line 2 of the stored log is 3, expected 2"));
        assert!(failure("1\n2\n2\n3\n", 3).contains("is 2, expected 3"));
        assert!(failure("1\n2\n", 3).contains("has 2 lines, expected 3"));
        assert!(failure("1\n2\n3\n4\n", 3).contains("has 4 lines"));
        assert!(failure("1\nmuster: note\n", 1).contains("'muster: note'"));
        assert!(failure("1\n2\n3", 3).contains("cut short"));
    }

    #[test]
    fn ticker_lines_are_read_in_either_locale() {
        assert_eq!(
            parse_tick("42 1712345678.123456\n"),
            Some((42, 1712345678.123456))
        );
        assert_eq!(parse_tick("7 1712345678,5"), Some((7, 1712345678.5)));
        assert_eq!(parse_tick("garbage"), None);
    }
}
