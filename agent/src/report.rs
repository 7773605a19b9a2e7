//! Getting results to the coordinator: in batches, every second or as soon
//! as 500 are ready; through the disk buffer whenever it cannot take them.
//!
//! While the coordinator takes batches, results go straight from memory to
//! it. When a batch fails because the coordinator is unreachable or answers
//! 5xx, that batch and every result after it go to the [`Spool`], and
//! deliveries pause (1 s, doubling up to 30 s). Once a delivery from the
//! spool succeeds, the spool is replayed oldest first, results keeping the
//! time they were checked at, and only when it is empty do results go
//! straight again: the coordinator receives them in the order they were
//! made. A result leaves the spool only after a 2xx for its batch.
//!
//! A 401 or 403 is fatal: the token is wrong or revoked, and retrying would
//! only hide that. The reporter stops with [`ApiError::Refused`], the agent
//! exits with that message, and what is buffered stays on disk for the
//! next start. A 413 halves the batch size; any other 4xx means the
//! coordinator will never take that batch: it is dropped, logged and
//! counted, so one bad batch cannot block everything after it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_common::monitor::{CheckResult, ResultBatch};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiError, Coordinator};
use crate::metrics::{DropReason, Metrics};
use crate::spool::{Dropped, Spool};

/// Results that make a batch worth sending before the second is up.
pub const READY: usize = 500;
/// The most results in one batch (the coordinator's limit).
pub const MAX_BATCH: usize = 1000;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one round may spend replaying the spool before it looks at new
/// results again.
const REPLAY_ROUND: Duration = Duration::from_secs(2);
/// At shutdown, how long the last delivery may take before what is left
/// goes to disk.
const FINAL_DELIVERY: Duration = Duration::from_secs(5);

pub struct Reporter {
    coordinator: Arc<Coordinator>,
    spool: Arc<Mutex<Spool>>,
    metrics: Arc<Metrics>,
    /// Results in memory, oldest first, not yet sent.
    pending: Vec<CheckResult>,
    batch_limit: usize,
    /// No delivery before this, after a failure.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Whether the coordinator's last answer was a failure (for logging
    /// the change only).
    failing: bool,
}

impl Reporter {
    pub fn new(
        coordinator: Arc<Coordinator>,
        spool: Arc<Mutex<Spool>>,
        metrics: Arc<Metrics>,
    ) -> Reporter {
        let reporter = Reporter {
            coordinator,
            spool,
            metrics,
            pending: Vec::new(),
            batch_limit: MAX_BATCH,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            failing: false,
        };
        reporter.update_buffered();
        reporter
    }

    /// Runs until `stop` fires (or every sender is gone), then delivers or
    /// buffers what it holds. Ends early only when the coordinator refuses
    /// the token.
    pub async fn run(
        mut self,
        mut results: mpsc::Receiver<CheckResult>,
        stop: CancellationToken,
    ) -> Result<(), ApiError> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                received = results.recv() => match received {
                    Some(result) => {
                        self.pending.push(result);
                        if self.pending.len() < READY {
                            continue;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {}
            }
            self.round().await?;
        }
        while let Ok(result) = results.try_recv() {
            self.pending.push(result);
        }
        self.finish().await
    }

    /// Delivers what can be delivered now; buffers the rest.
    async fn round(&mut self) -> Result<(), ApiError> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            self.spill().await;
            return Ok(());
        }
        if self.buffered() > 0 {
            // Order: what is on disk is older than what is in memory.
            self.spill().await;
            return self.replay(Instant::now() + REPLAY_ROUND).await;
        }
        while !self.pending.is_empty() {
            let n = self.pending.len().min(self.batch_limit);
            let batch = ResultBatch {
                results: self.pending[..n].to_vec(),
            };
            match self.send(&batch).await {
                Sent::Taken | Sent::Dropped => {
                    self.pending.drain(..n);
                }
                Sent::Smaller => {}
                Sent::Later => {
                    self.spill().await;
                    return Ok(());
                }
                Sent::Fatal(error) => return Err(error),
            }
        }
        // An idle spool still ages.
        self.expire().await;
        Ok(())
    }

    /// Sends spooled batches, oldest first, until the spool is empty, a
    /// delivery fails, or `until` passes.
    async fn replay(&mut self, until: Instant) -> Result<(), ApiError> {
        while Instant::now() < until {
            let limit = self.batch_limit;
            let peeked = self.with_spool(move |spool| spool.peek(limit)).await;
            let batch = match peeked {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(%error, "cannot read the result buffer");
                    self.pause();
                    return Ok(());
                }
            };
            self.metrics.dropped(DropReason::Expired, batch.expired);
            if batch.results.is_empty() && batch.expired == 0 {
                return Ok(());
            }
            let outcome = if batch.results.is_empty() {
                Sent::Dropped
            } else {
                let results = ResultBatch {
                    results: batch.results.clone(),
                };
                self.send(&results).await
            };
            match outcome {
                Sent::Taken | Sent::Dropped => {
                    let committed = self.with_spool(move |spool| spool.commit(&batch)).await;
                    if let Err(error) = committed {
                        // The batch will be sent again; the coordinator keeps
                        // results once by id.
                        tracing::error!(%error, "cannot record a delivery in the result buffer");
                        self.pause();
                        return Ok(());
                    }
                    self.update_buffered();
                    if self.buffered() == 0 {
                        tracing::info!("the buffered results are delivered");
                        return Ok(());
                    }
                }
                Sent::Smaller => {}
                Sent::Later => return Ok(()),
                Sent::Fatal(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// One delivery attempt, with what its answer means.
    async fn send(&mut self, batch: &ResultBatch) -> Sent {
        match self.coordinator.results(batch).await {
            Ok(accepted) => {
                self.metrics
                    .results_reported
                    .inc_by(batch.results.len() as u64);
                self.metrics.coordinator_up.set(1);
                tracing::debug!(sent = batch.results.len(), accepted, "results delivered");
                if self.failing {
                    tracing::info!("the coordinator takes results again");
                    self.failing = false;
                }
                self.retry_at = None;
                self.backoff = FIRST_BACKOFF;
                Sent::Taken
            }
            Err(error @ ApiError::Refused { .. }) => Sent::Fatal(error),
            Err(ApiError::Rejected { status: 413, .. }) if batch.results.len() > 1 => {
                self.batch_limit = (batch.results.len() / 2).max(1);
                tracing::warn!(
                    batch_limit = self.batch_limit,
                    "the coordinator found a result batch too large; sending smaller ones"
                );
                Sent::Smaller
            }
            Err(error) if error.is_transient() => {
                self.metrics.report_failed();
                self.metrics.coordinator_up.set(0);
                if !self.failing {
                    tracing::warn!(%error, "cannot deliver results; keeping them on disk until the coordinator takes them");
                    self.failing = true;
                }
                self.pause();
                Sent::Later
            }
            Err(error) => {
                self.metrics.report_failed();
                self.metrics
                    .dropped(DropReason::Rejected, batch.results.len() as u64);
                tracing::error!(%error, dropped = batch.results.len(), "the coordinator rejected a result batch; dropping it");
                Sent::Dropped
            }
        }
    }

    fn pause(&mut self) {
        // Jitter, so agents that lost the coordinator together do not
        // return in step.
        let jitter = crate::jitter(Duration::from_millis(250));
        self.retry_at = Some(Instant::now() + self.backoff + jitter);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Moves the results in memory to the spool.
    async fn spill(&mut self) {
        if self.pending.is_empty() {
            self.expire().await;
            return;
        }
        let results = std::mem::take(&mut self.pending);
        let count = results.len() as u64;
        match self.with_spool(move |spool| spool.append(&results)).await {
            Ok(dropped) => self.count_dropped(dropped),
            Err(error) => {
                self.metrics.dropped(DropReason::DiskError, count);
                tracing::error!(%error, dropped = count, "cannot write results to the buffer; they are lost");
            }
        }
        self.update_buffered();
    }

    async fn expire(&mut self) {
        if self.buffered() == 0 {
            return;
        }
        match self.with_spool(|spool| spool.expire()).await {
            Ok(expired) => self.metrics.dropped(DropReason::Expired, expired),
            Err(error) => tracing::warn!(%error, "cannot drop old results from the buffer"),
        }
        self.update_buffered();
    }

    fn count_dropped(&self, dropped: Dropped) {
        self.metrics.dropped(DropReason::Expired, dropped.expired);
        self.metrics
            .dropped(DropReason::BufferFull, dropped.over_size);
        if dropped.over_size > 0 {
            tracing::warn!(
                dropped = dropped.over_size,
                "the result buffer is full; dropped its oldest results"
            );
        }
    }

    /// At shutdown: one last delivery, if the coordinator is not known to
    /// be away; what is left goes to disk.
    async fn finish(mut self) -> Result<(), ApiError> {
        if !self.pending.is_empty() && self.retry_at.is_none() && self.buffered() == 0 {
            let deadline = Instant::now() + FINAL_DELIVERY;
            while !self.pending.is_empty() && Instant::now() < deadline {
                let n = self.pending.len().min(self.batch_limit);
                let batch = ResultBatch {
                    results: self.pending[..n].to_vec(),
                };
                let sent = tokio::time::timeout_at(deadline, self.send(&batch)).await;
                match sent {
                    Ok(Sent::Taken | Sent::Dropped) => {
                        self.pending.drain(..n);
                    }
                    Ok(Sent::Smaller) => {}
                    Ok(Sent::Later) | Err(_) => break,
                    Ok(Sent::Fatal(error)) => {
                        self.spill().await;
                        return Err(error);
                    }
                }
            }
        }
        self.spill().await;
        let left = self.buffered();
        if left > 0 {
            tracing::info!(buffered = left, "results kept on disk for the next start");
        }
        Ok(())
    }

    fn buffered(&self) -> u64 {
        self.metrics.results_buffered.get().max(0) as u64
    }

    fn update_buffered(&self) {
        let pending = self.spool.lock().map(|s| s.pending()).unwrap_or(0);
        self.metrics.results_buffered.set(pending as i64);
    }

    /// Runs `f` on the spool on a blocking thread: it does file I/O.
    async fn with_spool<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Spool) -> T + Send + 'static,
    ) -> T {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || {
            let mut spool = spool
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut spool)
        })
        .await
        .expect("spool operations do not panic")
    }
}

/// What became of a batch.
enum Sent {
    /// The coordinator has it.
    Taken,
    /// It will never take it (or there was nothing to send): forget it.
    Dropped,
    /// Too large: try again, smaller.
    Smaller,
    /// Not now: keep it and pause.
    Later,
    Fatal(ApiError),
}
