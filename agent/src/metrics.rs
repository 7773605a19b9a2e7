//! The agent's Prometheus metrics and the small HTTP server that serves them
//! at `GET /metrics` on `--metrics-addr` (off unless given).
//!
//! Labels carry only a check's kind and verdict, or a reason: no endpoint,
//! target or organization appears in one, so the series stay few however
//! many endpoints an agent checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_common::monitor::{CheckKind, Verdict};
use prometheus::core::Collector;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const KINDS: [CheckKind; 4] = [
    CheckKind::Http,
    CheckKind::Tcp,
    CheckKind::Icmp,
    CheckKind::Dns,
];
const VERDICTS: [Verdict; 3] = [Verdict::Up, Verdict::Degraded, Verdict::Down];

fn verdict_label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Up => "up",
        Verdict::Degraded => "degraded",
        Verdict::Down => "down",
    }
}

/// Why results were not delivered, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Older than `--buffer-hours`.
    Expired,
    /// The buffer reached `--buffer-max-mib`.
    BufferFull,
    /// The coordinator refused the batch as invalid (a 4xx other than 401/403).
    Rejected,
    /// The buffer could not be written.
    DiskError,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::Expired,
        DropReason::BufferFull,
        DropReason::Rejected,
        DropReason::DiskError,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::Expired => "expired",
            DropReason::BufferFull => "buffer_full",
            DropReason::Rejected => "rejected",
            DropReason::DiskError => "disk_error",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    checks: IntCounterVec,
    check_seconds: HistogramVec,
    pub checks_running: IntGauge,
    pub checks_skipped: IntCounter,
    pub check_slot_waits: IntCounter,
    pub endpoints: IntGauge,
    pub results_buffered: IntGauge,
    pub results_reported: IntCounter,
    report_failures: IntCounter,
    dropped: IntCounterVec,
    pub coordinator_up: IntGauge,
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
            checks: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "muster_agent_checks_total",
                        "Checks made, by kind and verdict.",
                    ),
                    &["kind", "verdict"],
                ),
            ),
            check_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "muster_agent_check_duration_seconds",
                        "How long checks took, by kind.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ]),
                    &["kind"],
                ),
            ),
            checks_running: register(
                &registry,
                IntGauge::new("muster_agent_checks_running", "Checks under way."),
            ),
            checks_skipped: register(
                &registry,
                IntCounter::new(
                    "muster_agent_checks_skipped_total",
                    "Checks not started because the endpoint's previous check was still running.",
                ),
            ),
            check_slot_waits: register(
                &registry,
                IntCounter::new(
                    "muster_agent_check_slot_waits_total",
                    "Due checks that had to wait because --max-concurrent-checks were running.",
                ),
            ),
            endpoints: register(
                &registry,
                IntGauge::new("muster_agent_endpoints", "Endpoints this agent checks."),
            ),
            results_buffered: register(
                &registry,
                IntGauge::new(
                    "muster_agent_results_buffered",
                    "Results kept on disk, not yet taken by the coordinator.",
                ),
            ),
            results_reported: register(
                &registry,
                IntCounter::new(
                    "muster_agent_results_reported_total",
                    "Results the coordinator accepted.",
                ),
            ),
            report_failures: register(
                &registry,
                IntCounter::new(
                    "muster_agent_report_failures_total",
                    "Result batches the coordinator did not take (unreachable, 5xx or refused).",
                ),
            ),
            dropped: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "muster_agent_results_dropped_total",
                        "Results never delivered, by reason.",
                    ),
                    &["reason"],
                ),
            ),
            coordinator_up: register(
                &registry,
                IntGauge::new(
                    "muster_agent_coordinator_up",
                    "1 when the last request to the coordinator succeeded, else 0.",
                ),
            ),
            registry,
        };
        // Every label value from the start, so a rate of something that has
        // not happened yet is 0, not absent.
        for kind in KINDS {
            for verdict in VERDICTS {
                metrics
                    .checks
                    .with_label_values(&[kind.as_str(), verdict_label(verdict)]);
            }
            metrics.check_seconds.with_label_values(&[kind.as_str()]);
        }
        for reason in DropReason::ALL {
            metrics.dropped.with_label_values(&[reason.label()]);
        }
        metrics
    }

    pub fn checked(&self, kind: CheckKind, verdict: Verdict, took: Duration) {
        self.checks
            .with_label_values(&[kind.as_str(), verdict_label(verdict)])
            .inc();
        self.check_seconds
            .with_label_values(&[kind.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Checks made so far, of every kind.
    pub fn checks_made(&self) -> u64 {
        let mut total = 0;
        for kind in KINDS {
            for verdict in VERDICTS {
                total += self
                    .checks
                    .with_label_values(&[kind.as_str(), verdict_label(verdict)])
                    .get();
            }
        }
        total
    }

    pub fn checks_of(&self, kind: CheckKind, verdict: Verdict) -> u64 {
        self.checks
            .with_label_values(&[kind.as_str(), verdict_label(verdict)])
            .get()
    }

    pub fn report_failed(&self) {
        self.report_failures.inc();
    }

    pub fn dropped(&self, reason: DropReason, count: u64) {
        if count > 0 {
            self.dropped
                .with_label_values(&[reason.label()])
                .inc_by(count);
        }
    }

    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped.with_label_values(&[reason.label()]).get()
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
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
/// cannot be had stops the agent with a message naming the flag.
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
    fn every_series_exists_from_the_start() {
        let m = Metrics::new();
        m.checked(CheckKind::Http, Verdict::Down, Duration::from_millis(20));
        m.dropped(DropReason::Expired, 3);
        assert_eq!(m.checks_made(), 1);
        let text = m.render().unwrap();
        for line in [
            "muster_agent_checks_total{kind=\"http\",verdict=\"down\"} 1",
            "muster_agent_checks_total{kind=\"icmp\",verdict=\"up\"} 0",
            "muster_agent_results_dropped_total{reason=\"expired\"} 3",
            "muster_agent_results_dropped_total{reason=\"buffer_full\"} 0",
            "muster_agent_check_duration_seconds_count{kind=\"http\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
