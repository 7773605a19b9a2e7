//! Following a run to its end: the log live from the coordinator's event
//! stream (`log`, `status` and `end` events), resumed with `Last-Event-ID`
//! where it broke; progress on stderr; and what an interrupt does meanwhile.
//!
//! On Ctrl-C (SIGINT) or SIGTERM while following, muster either cancels the
//! remote run and keeps following until it has ended (`--cancel-on-interrupt`,
//! or a "y" to the question it asks on a terminal), or detaches: it says how
//! to follow again and exits, and the run goes on. Without a terminal and
//! without the flag it detaches, so a CI job that is stopped never cancels
//! a run nobody asked to cancel. A second interrupt while canceling detaches
//! at once.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::api::{Api, ApiError};
use crate::exit;

/// Where the run's log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    /// Keeps stdout for a machine-readable answer (`--output json`).
    Stderr,
}

/// What an interrupt while following does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Cancel the remote run without asking, then keep following.
    Cancel,
    /// Ask on the terminal whether to cancel; detach without one.
    AskOrDetach,
}

/// How a run ended, as its `end` event says.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub status: String,
    pub exit_code: Option<i64>,
}

impl Ended {
    pub fn exit_code(&self) -> i32 {
        exit::for_run(&self.status, self.exit_code)
    }
}

pub enum Outcome {
    Ended(Ended),
    /// Muster stopped following; the run goes on. The exit code to use.
    Detached(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM (what CI systems send a job they stop).
    Term,
}

/// SIGINT and SIGTERM, caught. Installed before a run is triggered, so an
/// interrupt that comes while the trigger is on its way is not lost.
pub struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    pub fn install() -> anyhow::Result<Interrupts> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> Interrupt {
        tokio::select! {
            Some(()) = self.int.recv() => Interrupt::Int,
            Some(()) = self.term.recv() => Interrupt::Term,
            else => std::future::pending().await,
        }
    }
}

/// Follows run `id` to its end, handling interrupts as `on_interrupt` says.
pub async fn follow(
    api: &Api,
    id: &str,
    sink: Sink,
    on_interrupt: OnInterrupt,
    interrupts: &mut Interrupts,
) -> anyhow::Result<Outcome> {
    let tail = tail(api, id, sink);
    tokio::pin!(tail);
    let mut canceling = false;
    loop {
        tokio::select! {
            ended = &mut tail => return Ok(Outcome::Ended(ended?)),
            interrupt = interrupts.next() => {
                if canceling {
                    return Ok(detach(id, interrupt, canceling));
                }
                // The tail is not polled while we ask: the log waits.
                let cancel = match (on_interrupt, interrupt) {
                    (OnInterrupt::Cancel, _) => true,
                    (OnInterrupt::AskOrDetach, Interrupt::Int) if interactive() => {
                        ask(id, interrupts).await
                    }
                    (OnInterrupt::AskOrDetach, _) => false,
                };
                if !cancel {
                    return Ok(detach(id, interrupt, canceling));
                }
                request_cancel(api, id).await?;
                canceling = true;
            }
        }
    }
}

/// Someone is at a terminal to answer.
fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks on the terminal whether to cancel the run; no, an empty answer, an
/// end of input or another interrupt mean no.
async fn ask(id: &str, interrupts: &mut Interrupts) -> bool {
    eprint!("\nmuster: cancel the remote run {id}? [y/N] ");
    let _ = std::io::stderr().flush();
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    tokio::select! {
        answer = answer => matches!(
            answer.ok().and_then(Result::ok).map(|l| l.trim().to_ascii_lowercase()).as_deref(),
            Some("y" | "yes")
        ),
        _ = interrupts.next() => {
            eprintln!();
            false
        }
    }
}

fn detach(id: &str, interrupt: Interrupt, canceling: bool) -> Outcome {
    if canceling {
        eprintln!("muster: detached; run {id} is being canceled. Follow it with: muster runs logs -f {id}");
    } else {
        eprintln!(
            "muster: detached; run {id} goes on. Follow it again with: muster runs logs -f {id}"
        );
    }
    Outcome::Detached(match interrupt {
        Interrupt::Int => exit::INTERRUPTED,
        Interrupt::Term => exit::TERMINATED,
    })
}

/// Asks the coordinator to cancel run `id`. One that has already ended
/// (409) is no error: following it shows how it ended.
async fn request_cancel(api: &Api, id: &str) -> anyhow::Result<()> {
    let path = format!("/api/v1/action-runs/{id}/cancel/");
    match api.json(api.request(reqwest::Method::POST, &path)?).await {
        Ok(run) if run["status"] == "canceled" => {
            eprintln!("muster: canceled run {id}");
            Ok(())
        }
        Ok(_) => {
            eprintln!("muster: canceling run {id}: its runner stops it");
            Ok(())
        }
        Err(error)
            if error
                .downcast_ref::<ApiError>()
                .is_some_and(|e| e.status == Some(409)) =>
        {
            eprintln!("muster: run {id} has already ended");
            Ok(())
        }
        Err(error) => Err(error.context(format!("could not cancel run {id}; it goes on"))),
    }
}

/// Prints run `id`'s log to `sink` live and progress to stderr until the
/// run ends. A broken stream is resumed where it broke (`Last-Event-ID`),
/// so the log is printed whole and once, across network blips and
/// coordinator restarts.
pub async fn tail(api: &Api, id: &str, sink: Sink) -> anyhow::Result<Ended> {
    let path = format!("/api/v1/action-runs/{id}/logs/");
    let mut progress = Progress::default();
    let mut last: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let mut req = api
            .request(reqwest::Method::GET, &path)?
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(seq) = &last {
            req = req.header("Last-Event-ID", seq.as_str());
        }
        let blip = match req.send().await {
            Ok(response) if response.status().is_success() => {
                failures = 0;
                let mut parser = SseParser::default();
                let mut body = response.bytes_stream();
                while let Some(Ok(bytes)) = body.next().await {
                    parser.push(&bytes);
                    while let Some(event) = parser.next_event() {
                        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                            continue;
                        };
                        match event.event.as_str() {
                            "log" => {
                                write_log(sink, data["data"].as_str().unwrap_or_default())?;
                                if event.id.is_some() {
                                    last = event.id;
                                }
                            }
                            "status" => progress.status(&data),
                            "end" => {
                                let ended = Ended {
                                    status: data["status"].as_str().unwrap_or_default().to_owned(),
                                    exit_code: data["exit_code"].as_i64(),
                                };
                                eprintln!("muster: {}", describe_end(id, &ended));
                                return Ok(ended);
                            }
                            // Events a newer coordinator sends.
                            _ => {}
                        }
                    }
                }
                // The stream ended without the run's end: resume where it broke.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Ok(response) if response.status().is_server_error() => response.status().to_string(),
            Ok(response) => {
                // The API answered, and not for a passing reason.
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                return Err(ApiError::answered(status, &body).into());
            }
            Err(error) => error.to_string(),
        };
        failures += 1;
        if failures > 30 {
            return Err(ApiError::unavailable(format!(
                "cannot reach the coordinator at {}: {blip}",
                api.base
            ))
            .into());
        }
        eprintln!("muster: lost the coordinator ({blip}); reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn write_log(sink: Sink, text: &str) -> std::io::Result<()> {
    match sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()
        }
        Sink::Stderr => {
            let mut out = std::io::stderr().lock();
            out.write_all(text.as_bytes())?;
            out.flush()
        }
    }
}

pub fn describe_end(id: &str, ended: &Ended) -> String {
    match (ended.status.as_str(), ended.exit_code) {
        ("failed", Some(code)) => format!("run {id} failed with exit code {code}"),
        ("timed_out", _) => format!("run {id} timed out"),
        (status, _) => format!("run {id} {status}"),
    }
}

/// The progress lines, each said once (a resumed stream repeats the status).
#[derive(Default)]
struct Progress {
    told: Option<(String, Option<String>)>,
}

impl Progress {
    fn status(&mut self, data: &Value) {
        let now = (
            data["status"].as_str().unwrap_or_default().to_owned(),
            data["runner"].as_str().map(str::to_owned),
        );
        if self.told.as_ref() == Some(&now) {
            return;
        }
        let runner = now.1.as_deref().unwrap_or("?");
        let attempt = match data["attempt"].as_i64() {
            Some(n) if n > 1 => format!(" (attempt {n})"),
            _ => String::new(),
        };
        match now.0.as_str() {
            "queued" => eprintln!("muster: waiting for a runner"),
            "leased" => eprintln!("muster: leased to runner {runner}{attempt}"),
            "running" => eprintln!("muster: running on {runner}{attempt}"),
            // A final status: the `end` event says it.
            _ => {}
        }
        self.told = Some(now);
    }
}

/// One server-sent event.
#[derive(Debug, PartialEq)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
}

/// Splits a server-sent event stream into events, however its bytes were cut.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event; comments (keep-alives) and events without
    /// data are skipped.
    fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut event = SseEvent {
                event: "message".into(),
                id: None,
                data: String::new(),
            };
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event.event = value.to_owned(),
                    "id" => event.id = Some(value.to_owned()),
                    "data" => data.push(value),
                    _ => {} // a comment (empty field) or a field we do not use
                }
            }
            if !data.is_empty() {
                event.data = data.join("\n");
                return Some(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed_however_the_bytes_are_cut() {
        let stream = ": keep-alive\n\nevent: status\ndata: {\"status\":\"running\"}\n\n\
                      id: 7\nevent: log\ndata: {\"seq\":7,\"data\":\"a: b\\n\"}\n\n\
                      event: end\ndata: {\"status\":\"failed\",\"exit_code\":3}\n\n";
        for cut in 0..stream.len() {
            let mut parser = SseParser::default();
            let mut events = Vec::new();
            for part in [&stream.as_bytes()[..cut], &stream.as_bytes()[cut..]] {
                parser.push(part);
                while let Some(event) = parser.next_event() {
                    events.push(event);
                }
            }
            assert_eq!(events.len(), 3, "cut at {cut}: {events:?}");
            assert_eq!(events[0].event, "status");
            assert_eq!(events[1].id.as_deref(), Some("7"));
            assert_eq!(events[1].data, r#"{"seq":7,"data":"a: b\n"}"#);
            assert_eq!(events[2].event, "end");
        }
    }

    #[test]
    fn run_ends_are_described_for_people() {
        let ended = |status: &str, exit_code| Ended {
            status: status.into(),
            exit_code,
        };
        assert_eq!(
            describe_end("r", &ended("failed", Some(3))),
            "run r failed with exit code 3"
        );
        assert_eq!(
            describe_end("r", &ended("succeeded", Some(0))),
            "run r succeeded"
        );
        assert_eq!(
            describe_end("r", &ended("timed_out", None)),
            "run r timed out"
        );
    }
}
