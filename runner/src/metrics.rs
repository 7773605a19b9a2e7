//! The runner's Prometheus metrics and the small HTTP server that serves
//! them at `GET /metrics` on `--metrics-addr` (off unless given).
//!
//! Each runner has a registry of its own (an embedder such as `muster dev`,
//! or a test, may run several in one process). Labels carry only a job's
//! outcome: no run, workspace or organization appears in one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::runner::v1::RunOutcome;
use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every outcome a job can end with, as its label value.
const OUTCOMES: [RunOutcome; 4] = [
    RunOutcome::Succeeded,
    RunOutcome::Failed,
    RunOutcome::Canceled,
    RunOutcome::TimedOut,
];

fn outcome_label(outcome: RunOutcome) -> &'static str {
    match outcome {
        RunOutcome::Succeeded => "succeeded",
        RunOutcome::Failed | RunOutcome::Unspecified => "failed",
        RunOutcome::Canceled => "canceled",
        RunOutcome::TimedOut => "timed_out",
    }
}

/// One runner's metrics.
pub struct Metrics {
    registry: Registry,
    jobs_finished: IntCounterVec,
    jobs_running: IntGauge,
    connected: IntGauge,
    reconnects: IntCounter,
    /// Whether a stream was ever opened: the next one is a reconnect.
    ever_connected: AtomicBool,
    log_sent_bytes: IntCounter,
    log_spilled_bytes: IntCounter,
    lease_rejections: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let metrics = Metrics {
            jobs_finished: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "muster_runner_jobs_finished_total",
                        "Jobs this runner finished, by outcome.",
                    ),
                    &["outcome"],
                ),
            ),
            jobs_running: register(
                &registry,
                IntGauge::new(
                    "muster_runner_jobs_running",
                    "Jobs this runner is executing.",
                ),
            ),
            connected: register(
                &registry,
                IntGauge::new(
                    "muster_runner_connected",
                    "1 while the runner holds a stream to the coordinator, else 0.",
                ),
            ),
            reconnects: register(
                &registry,
                IntCounter::new(
                    "muster_runner_reconnects_total",
                    "Streams to the coordinator opened after the first one.",
                ),
            ),
            ever_connected: AtomicBool::new(false),
            log_sent_bytes: register(
                &registry,
                IntCounter::new(
                    "muster_runner_log_sent_bytes_total",
                    "Log bytes jobs wrote, each sent to the coordinator (or kept to send once connected); resends after a reconnect are not counted.",
                ),
            ),
            log_spilled_bytes: register(
                &registry,
                IntCounter::new(
                    "muster_runner_log_spilled_bytes_total",
                    "Unacknowledged log bytes written to spill files on disk because a run's memory bound was reached.",
                ),
            ),
            lease_rejections: register(
                &registry,
                IntCounter::new(
                    "muster_runner_lease_rejections_total",
                    "Messages about a run the coordinator refused because this runner's lease on it was no longer valid (the run is then stopped).",
                ),
            ),
            registry,
        };
        // Every outcome from the start, so a rate over one that has not
        // happened yet is 0, not absent.
        for outcome in OUTCOMES {
            metrics
                .jobs_finished
                .with_label_values(&[outcome_label(outcome)]);
        }
        metrics
    }

    /// A job started; it counts as running until the guard is dropped.
    pub fn job_started(&self) -> RunningJob {
        self.jobs_running.inc();
        RunningJob(self.jobs_running.clone())
    }

    pub fn job_finished(&self, outcome: RunOutcome) {
        self.jobs_finished
            .with_label_values(&[outcome_label(outcome)])
            .inc();
    }

    pub fn stream_opened(&self) {
        self.connected.set(1);
        if self.ever_connected.swap(true, Ordering::Relaxed) {
            self.reconnects.inc();
        }
    }

    pub fn stream_closed(&self) {
        self.connected.set(0);
    }

    pub fn log_sent(&self, bytes: usize) {
        self.log_sent_bytes.inc_by(bytes as u64);
    }

    pub fn log_spilled(&self, bytes: usize) {
        self.log_spilled_bytes.inc_by(bytes as u64);
    }

    pub fn lease_rejected(&self) {
        self.lease_rejections.inc();
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

/// Keeps a job counted as running while it lives.
pub struct RunningJob(IntGauge);

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<C, prometheus::Error>,
) -> C {
    // The definitions above are constants: an error here is a bug in them.
    let metric = metric.expect("a valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

/// Listens on `--metrics-addr`, if given: at start, so an address that
/// cannot be had stops the runner with a message naming the flag.
pub async fn bind(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr: cannot listen on {addr}"))?;
    Ok(Some(listener))
}

/// Serves `GET /metrics` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(exposition))
        .with_state(metrics);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "the metrics server failed");
    }
}

async fn exposition(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the metrics: {error}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_jobs_reconnects_and_outcomes() {
        let m = Metrics::new();
        let first = m.job_started();
        let second = m.job_started();
        assert_eq!(m.jobs_running.get(), 2);
        drop(first);
        m.job_finished(RunOutcome::TimedOut);
        assert_eq!(m.jobs_running.get(), 1);
        drop(second);
        assert_eq!(m.jobs_running.get(), 0);
        assert_eq!(m.jobs_finished.with_label_values(&["timed_out"]).get(), 1);

        m.stream_opened();
        assert_eq!((m.connected.get(), m.reconnects.get()), (1, 0));
        m.stream_closed();
        m.stream_opened();
        assert_eq!((m.connected.get(), m.reconnects.get()), (1, 1));

        let text = m.render().unwrap();
        assert!(
            text.contains("muster_runner_jobs_finished_total{outcome=\"canceled\"} 0"),
            "{text}"
        );
    }
}
