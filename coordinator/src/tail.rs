//! The live tail of a run's log as server-sent events: the stored log from
//! a point (the start, or `Last-Event-ID`), then chunks as they are stored,
//! then one `end` event with the run's status and exit code.
//!
//! A `status` event (`{status, runner, attempt}`, no id) comes first and
//! again whenever the run's status or runner changes, so a client can say
//! "waiting for a runner" and "running on X" as it happens. It carries no
//! id, so `Last-Event-ID` stays a log seq; clients that know only `log` and
//! `end` ignore it.
//!
//! The bus subscription is taken before the stored log is read, so nothing
//! falls between the two; chunks are sent in seq order exactly once (the
//! event id is the seq). Whatever the bus drops or never carries (a lagging
//! reader, a chunk stored by another coordinator) is read from the store:
//! after a lag, and every `POLL_EVERY` without news.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event as SseEvent;
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use crate::bus::{Bus, Event, Topic};
use crate::store::{LogChunk, Run, RunStatus, Scope, Store, StoreError};

/// How long the tail waits for news before it looks at the store itself,
/// while the bus is healthy (see [`crate::bus::poll_interval`]).
pub const POLL_EVERY: Duration = Duration::from_secs(2);
const PAGE: i64 = 1000;

pub type Events = tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>;

/// Streams run `run_id`'s log after seq `after`; the run must exist.
pub fn tail(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    poll: Duration,
    run_id: Uuid,
    after: i64,
) -> Events {
    let (tx, rx) = mpsc::channel(64);
    let subscription = bus.subscribe(Topic::Run(run_id));
    let health = bus.health();
    tokio::spawn(async move {
        // Ends when the run has ended, the client left, or the store failed (logged).
        let _ = follow(&*store, subscription, health, poll, run_id, after, &tx).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The send failed: the client went away.
struct Gone;

impl From<StoreError> for Gone {
    fn from(error: StoreError) -> Gone {
        tracing::warn!(%error, "live log tail cannot read the store");
        Gone
    }
}

async fn follow(
    store: &dyn Store,
    mut bus: broadcast::Receiver<Event>,
    mut health: watch::Receiver<bool>,
    poll: Duration,
    run_id: Uuid,
    mut last: i64,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> Result<(), Gone> {
    // The status and runner last told to the client.
    let mut told: Option<(RunStatus, Option<String>)> = None;
    {
        loop {
            // The status first: a run seen final has its whole log stored.
            let run = store.run(Scope::All, run_id).await?;
            if let Some(run) = &run {
                let now = (run.status, run.runner_name.clone());
                if told.as_ref() != Some(&now) {
                    send(tx, status_event(run)).await?;
                    told = Some(now);
                }
            }
            catch_up(store, run_id, &mut last, tx).await?;
            if let Some(run) = run.filter(|r| r.status.is_final()) {
                let end = json!({ "status": run.status.as_str(), "exit_code": run.exit_code });
                send(tx, SseEvent::default().event("end").data(end.to_string())).await?;
                return Ok(());
            }
            // Live chunks until the run ends, news stops, or the bus lags.
            loop {
                let wait = crate::bus::poll_interval(poll, &health);
                let news = tokio::select! {
                    news = tokio::time::timeout(wait, bus.recv()) => news,
                    // The bus failed or came back: what it missed is in the store.
                    Ok(()) = health.changed() => break,
                };
                match news {
                    Ok(Ok(Event::Log { chunk, .. })) if chunk.seq == last + 1 => {
                        last = chunk.seq;
                        send(tx, log_event(&chunk)).await?;
                    }
                    // Older (already sent) or out of order: the store has it.
                    Ok(Ok(Event::Log { chunk, .. })) if chunk.seq <= last => {}
                    Ok(Ok(Event::Log { .. })) => break,
                    Ok(Ok(Event::Finished { .. } | Event::StatusChanged { .. })) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        // The hub dropped the channel after a final status.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                    Err(_quiet) => break,
                }
            }
        }
    }
}

/// Sends the stored chunks after `last`.
async fn catch_up(
    store: &dyn Store,
    run_id: Uuid,
    last: &mut i64,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> Result<(), Gone> {
    loop {
        let chunks = store.logs(run_id, *last, PAGE).await?;
        for chunk in &chunks {
            *last = chunk.seq;
            send(tx, log_event(chunk)).await?;
        }
        if (chunks.len() as i64) < PAGE {
            return Ok(());
        }
    }
}

fn status_event(run: &Run) -> SseEvent {
    let data = json!({
        "status": run.status.as_str(),
        "runner": run.runner_name,
        "attempt": run.attempt,
    });
    SseEvent::default().event("status").data(data.to_string())
}

fn log_event(chunk: &LogChunk) -> SseEvent {
    let stream = match chunk.stream {
        2 => "stderr",
        3 => "system",
        _ => "stdout",
    };
    let data = json!({
        "seq": chunk.seq,
        "stream": stream,
        "data": String::from_utf8_lossy(&chunk.data),
    });
    SseEvent::default()
        .id(chunk.seq.to_string())
        .event("log")
        .data(data.to_string())
}

async fn send(
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
    event: SseEvent,
) -> Result<(), Gone> {
    tx.send(Ok(event)).await.map_err(|_| Gone)
}
