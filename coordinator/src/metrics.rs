//! The coordinator's Prometheus metrics: the registry and every metric it
//! holds, the calls the rest of the coordinator makes when something worth
//! counting happens, the middleware that times HTTP requests, and
//! `GET /metrics` in the text exposition format.
//!
//! Each coordinator has a registry of its own (tests run several in one
//! process), so counters count what *this* coordinator did; a fleet's total
//! is the sum over its coordinators. What the store holds (the queue depth)
//! is read at scrape time instead, so it is right across restarts and
//! whichever coordinator queued or leased the runs.
//!
//! Labels carry only bounded values that are no secret: a run status, an
//! HTTP method, a route *template* (`/api/v1/action-runs/{id}/`, never the
//! path with the id in it) and a status code. No organization, workspace,
//! runner or run appears in a label.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::api::AppState;
use crate::store::{Run, RunStatus};

/// Queue waits: milliseconds when a runner is free, up to hours when the
/// fleet is saturated.
const DISPATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
/// Jobs: a second-long script up to a day-long playbook.
const RUN_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
    86400.0,
];
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// The route label of a request no route matched (the API's 404 fallback).
const UNMATCHED: &str = "unmatched";

/// One coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    runs_queued: IntCounter,
    runs_finished: IntCounterVec,
    run_seconds: HistogramVec,
    dispatch_seconds: Histogram,
    log_bytes: IntCounter,
    log_chunks: IntCounter,
    lease_expirations: IntCounter,
    http_seconds: HistogramVec,
    check_results: IntCounterVec,
    notifications: IntCounterVec,
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
            runs_queued: register(
                &registry,
                IntCounter::new(
                    "muster_runs_queued_total",
                    "Runs created (queued for their first attempt).",
                ),
            ),
            runs_finished: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "muster_runs_finished_total",
                        "Runs that reached a final status, by that status.",
                    ),
                    &["status"],
                ),
            ),
            run_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "muster_run_duration_seconds",
                        "Time from a run's start on its runner to its end, by final status.",
                    )
                    .buckets(RUN_BUCKETS.to_vec()),
                    &["status"],
                ),
            ),
            dispatch_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "muster_lease_dispatch_seconds",
                        "Time from a run's creation to its first lease reaching a runner's stream.",
                    )
                    .buckets(DISPATCH_BUCKETS.to_vec()),
                ),
            ),
            log_bytes: register(
                &registry,
                IntCounter::new(
                    "muster_log_ingested_bytes_total",
                    "Log bytes received from runners and stored (a chunk said again after a reconnect counts again).",
                ),
            ),
            log_chunks: register(
                &registry,
                IntCounter::new(
                    "muster_log_ingested_chunks_total",
                    "Log chunks received from runners and stored (a chunk said again after a reconnect counts again).",
                ),
            ),
            lease_expirations: register(
                &registry,
                IntCounter::new(
                    "muster_lease_expirations_total",
                    "Leases that ran out without a heartbeat, their runs taken back from their runners.",
                ),
            ),
            check_results: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "muster_check_results_total",
                        "Endpoint check results reported by monitoring agents, by what became of them: stored, duplicate (stored before, a replay) or refused.",
                    ),
                    &["outcome"],
                ),
            ),
            notifications: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "muster_notifications_total",
                        "Webhook posts of alerts and resolves, by outcome: sent, retried (to be posted again later) or given_up.",
                    ),
                    &["outcome"],
                ),
            ),
            http_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "muster_http_request_duration_seconds",
                        "Time to answer an HTTP request (until the response head; a streamed body may go on), by method, route template and status code.",
                    )
                    .buckets(HTTP_BUCKETS.to_vec()),
                    &["method", "route", "status"],
                ),
            ),
            registry,
        };
        // Every final status from the start, so a rate over a status that
        // has not happened yet is 0, not absent.
        for status in RunStatus::ALL.into_iter().filter(|s| s.is_final()) {
            metrics.runs_finished.with_label_values(&[status.as_str()]);
            metrics.run_seconds.with_label_values(&[status.as_str()]);
        }
        metrics
    }

    /// A run was created.
    pub fn run_queued(&self) {
        self.runs_queued.inc();
    }

    /// A lease reached a runner's stream. Only first attempts are timed: a
    /// run queued again keeps no record of when that was.
    pub fn run_leased(&self, run: &Run) {
        if run.attempt != 1 {
            return;
        }
        if let Some(leased_at) = run.leased_at {
            self.dispatch_seconds
                .observe(seconds_between(run.created_at, leased_at));
        }
    }

    /// A run reached its final status here (`run` as it is now).
    pub fn run_finished(&self, run: &Run) {
        if !run.status.is_final() {
            return;
        }
        self.runs_finished
            .with_label_values(&[run.status.as_str()])
            .inc();
        self.observe_run_duration(run);
    }

    fn observe_run_duration(&self, run: &Run) {
        if let (Some(started), Some(finished)) = (run.started_at, run.finished_at) {
            self.run_seconds
                .with_label_values(&[run.status.as_str()])
                .observe(seconds_between(started, finished));
        }
    }

    /// A runner's log chunk of `bytes` was stored.
    pub fn log_stored(&self, bytes: usize) {
        self.log_chunks.inc();
        self.log_bytes.inc_by(bytes as u64);
    }

    /// A lease ran out and its run was taken back.
    pub fn lease_expired(&self) {
        self.lease_expirations.inc();
    }

    /// A batch of check results was taken in.
    pub fn check_results(&self, stored: usize, duplicates: usize, refused: usize) {
        for (outcome, n) in [
            ("stored", stored),
            ("duplicate", duplicates),
            ("refused", refused),
        ] {
            self.check_results
                .with_label_values(&[outcome])
                .inc_by(n as u64);
        }
    }

    /// A webhook post ended `outcome`: `sent`, `retried` or `given_up`.
    pub fn notification(&self, outcome: &'static str) {
        self.notifications.with_label_values(&[outcome]).inc();
    }

    /// Every metric in the text exposition format, with the values read at
    /// scrape time: the queue depth (`None` when the store could not say;
    /// the metric is then absent rather than stale) and the runners
    /// connected to this coordinator, and its event bus's health and
    /// publish failures.
    pub fn render(
        &self,
        queue_depth: Option<i64>,
        runners_connected: usize,
        bus_healthy: bool,
        bus_publish_errors: u64,
    ) -> Result<String, prometheus::Error> {
        let mut families = self.registry.gather();
        let errors = IntCounter::new(
            "muster_bus_publish_errors_total",
            "Events this coordinator could not publish to the others (a lost wake-up or cancel signal costs latency, not data).",
        )?;
        errors.inc_by(bus_publish_errors);
        families.extend(errors.collect());
        families.extend(gauge(
            "muster_bus_healthy",
            "1 while events published here reach every coordinator (always without Redis); 0 while readers fall back to the store.",
            i64::from(bus_healthy),
        )?);
        families.extend(gauge(
            "muster_runners_connected",
            "Runners whose stream this coordinator holds.",
            runners_connected as i64,
        )?);
        if let Some(depth) = queue_depth {
            families.extend(gauge(
                "muster_queue_depth",
                "Runs waiting for a runner, of every organization (read from the store).",
                depth,
            )?);
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        TextEncoder::new().encode_to_string(&families)
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

fn gauge(name: &str, help: &str, value: i64) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let gauge = IntGauge::new(name, help)?;
    gauge.set(value);
    Ok(gauge.collect())
}

/// Seconds from `from` to `to`; 0 when clocks disagree about their order.
fn seconds_between(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from).to_std().unwrap_or_default().as_secs_f64()
}

/// `GET /metrics`. Open to anyone who reaches the HTTP port: nothing in it
/// names an organization or holds a secret.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    security(()),
    responses(
        (status = 200, description = "Prometheus metrics, text exposition format 0.0.4", body = String, content_type = "text/plain"),
        (status = 500, description = "the metrics could not be encoded", body = String, content_type = "text/plain"),
    ),
)]
pub async fn serve(State(state): State<AppState>) -> Response {
    let queue_depth = match state.store.queued_runs().await {
        Ok(depth) => Some(depth),
        Err(error) => {
            tracing::warn!(%error, "could not count the queued runs for /metrics");
            None
        }
    };
    let connected = state.revoker.dispatcher.connected_runners();
    let bus_healthy = *state.bus.health().borrow();
    let bus_errors = state.bus.publish_errors();
    match state
        .metrics
        .render(queue_depth, connected, bus_healthy, bus_errors)
    {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the metrics: {error}\n"),
        )
            .into_response(),
    }
}

/// Middleware timing every request by method, matched route template and
/// status. It runs inside the router (`Router::layer`), where the matched
/// route is known.
pub async fn track_http(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let began = Instant::now();
    let response = next.run(request).await;
    metrics
        .http_seconds
        .with_label_values(&[method, route.as_str(), response.status().as_str()])
        .observe(began.elapsed().as_secs_f64());
    response
}

/// The method as a label: a client may send any token as a method, so
/// those the API does not know share one value.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn run(status: RunStatus, attempt: i32) -> Run {
        let created = chrono::DateTime::from_timestamp_millis(1_000_000).expect("a valid time");
        Run {
            id: Uuid::nil(),
            org_id: Uuid::nil(),
            organization: "acme".into(),
            workspace_id: Uuid::nil(),
            workspace: "ws".into(),
            bundle_digest: String::new(),
            block: "b".into(),
            block_version: None,
            action: "a".into(),
            parameters: serde_json::Value::Null,
            reason: None,
            trigger: serde_json::Value::Null,
            plan: serde_json::Value::Null,
            runner_labels: Default::default(),
            status,
            exit_code: None,
            error: None,
            runner_id: None,
            runner_name: None,
            executor: None,
            image: None,
            image_digest: None,
            fencing_token: 1,
            attempt,
            log_acked_seq: 0,
            created_at: created,
            leased_at: Some(created + chrono::TimeDelta::milliseconds(20)),
            lease_expires_at: None,
            started_at: Some(created + chrono::TimeDelta::seconds(1)),
            finished_at: Some(created + chrono::TimeDelta::seconds(4)),
            cancel_requested_at: None,
            max_attempts: 2,
            timeout_secs: None,
            log_seq_base: 0,
            log_check: None,
        }
    }

    #[test]
    fn hooks_count_final_statuses_and_time_first_leases_only() {
        let m = Metrics::new();
        m.run_leased(&run(RunStatus::Leased, 1));
        m.run_leased(&run(RunStatus::Leased, 2));
        m.run_finished(&run(RunStatus::Failed, 1));
        m.run_finished(&run(RunStatus::Running, 1));
        assert_eq!(m.dispatch_seconds.get_sample_count(), 1);
        assert!((m.dispatch_seconds.get_sample_sum() - 0.02).abs() < 1e-9);
        assert_eq!(m.runs_finished.with_label_values(&["failed"]).get(), 1);
        assert_eq!(m.runs_finished.with_label_values(&["running"]).get(), 0);
        let failed = m.run_seconds.with_label_values(&["failed"]);
        assert_eq!(failed.get_sample_count(), 1);
        assert!((failed.get_sample_sum() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn exposition_holds_every_metric_and_the_scrape_time_gauges() {
        let m = Metrics::new();
        m.log_stored(10);
        let text = m.render(Some(4), 2, true, 3).unwrap();
        for line in [
            "muster_queue_depth 4",
            "muster_runners_connected 2",
            "muster_bus_healthy 1",
            "muster_log_ingested_bytes_total 10",
            "muster_log_ingested_chunks_total 1",
            "muster_runs_finished_total{status=\"lost\"} 0",
            "muster_bus_publish_errors_total 3",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "{line:?} in\n{text}"
            );
        }
        let without = m.render(None, 0, false, 0).unwrap();
        assert!(without.contains("muster_bus_healthy 0"), "{without}");
        assert!(!without.contains("muster_queue_depth"), "{without}");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        let odd = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&odd), "other");
    }
}
