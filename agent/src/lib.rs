//! Muster's monitoring agent: checks endpoints from the site it runs at and
//! reports the results to the coordinator with its agent token.
//!
//! Four parts run side by side until shutdown:
//!
//! - the *control loop* sends a heartbeat every 10 s and asks for the
//!   endpoint list every 30 s (`If-None-Match`, so an unchanged list costs a
//!   304); a new list goes to the scheduler and to `<data-dir>/endpoints.json`,
//!   from which a restarted agent resumes checking even while the
//!   coordinator is away;
//! - the *scheduler* ([`schedule`]) starts each endpoint's checks on its
//!   interval, at most `--max-concurrent-checks` at once;
//! - the *checks* ([`check`]) probe and judge, one short-lived task each;
//! - the *reporter* ([`report`]) sends results in batches and keeps them on
//!   disk ([`spool`]) while the coordinator cannot take them.
//!
//! A 401 or 403 from the coordinator ends the agent with a message saying
//! the token is wrong or revoked (exit code 2); nothing else does. On
//! shutdown, checks under way may finish (up to 15 s), then the reporter
//! makes one last delivery and writes what is left to disk.

pub mod check;
pub mod client;
pub mod config;
pub mod dns;
pub mod metrics;
pub mod report;
pub mod schedule;
pub mod spool;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use muster_common::monitor::{AgentHealth, EndpointList};
use muster_common::secret::Secret;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use check::{Checker, TlsConfigs};
use client::{ApiError, Coordinator, Endpoints};
use metrics::Metrics;
use report::Reporter;
use spool::Spool;

const HEARTBEAT: Duration = Duration::from_secs(10);
/// The endpoint list is asked for every this many heartbeats (and at each
/// one until a first list arrived).
const FETCH_EVERY: u64 = 3;
/// How long checks under way may take to finish at shutdown.
const CHECK_DRAIN: Duration = Duration::from_secs(15);
/// Results between the checks and the reporter; a full queue holds checks
/// back rather than growing.
const RESULT_QUEUE: usize = 4096;

/// The runtime the agent binary runs on. Blocking threads (name lookups,
/// the result buffer's file I/O) are capped well below tokio's default, so
/// a burst of lookups cannot grow the agent by hundreds of thread stacks.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .thread_name("muster-agent")
        .build()
}

/// Runs the agent until `shutdown` fires or the coordinator refuses the
/// token. Errors are meant for the operator: bad configuration, a data
/// directory in use, a refused token.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let token = config.agent_token().map_err(anyhow::Error::msg)?;
    let base = config.coordinator_base().map_err(anyhow::Error::msg)?;
    let tls = TlsConfigs::new(&config.ca_file).map_err(anyhow::Error::msg)?;
    let coordinator_tls = coordinator_tls(&config).map_err(anyhow::Error::msg)?;
    let coordinator = Arc::new(
        Coordinator::new(base.clone(), token.clone(), coordinator_tls)
            .map_err(anyhow::Error::msg)?,
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("--data-dir: cannot create {}", config.data_dir.display()))?;
    let spool = {
        let dir = spool_dir(&config.data_dir);
        let (max_age, max_bytes) = (config.buffer_max_age(), config.buffer_max_bytes());
        tokio::task::spawn_blocking(move || Spool::open(&dir, max_age, max_bytes))
            .await?
            .context("--data-dir: cannot open the result buffer")?
    };
    let buffered = spool.pending();
    let spool = Arc::new(Mutex::new(spool));
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = metrics::bind(config.metrics_addr).await?;
    let metrics_stop = CancellationToken::new();
    let _stop_metrics = metrics_stop.clone().drop_guard();
    if let Some(listener) = metrics_listener {
        tokio::spawn(metrics::serve(listener, metrics.clone(), metrics_stop));
    }

    let cache = EndpointCache::new(&config.data_dir, &token);
    let cached = cache.load();
    let (lists, lists_rx) = watch::channel(None);
    let mut etag = None;
    if let Some((list, tag)) = cached {
        tracing::info!(endpoints = list.endpoints.len(), version = %list.version, "checking the endpoint list kept from the last run until the coordinator answers");
        lists.send_replace(Some(Arc::new(list)));
        etag = Some(tag);
    }
    tracing::info!(
        coordinator = %base,
        data_dir = %config.data_dir.display(),
        buffered,
        max_concurrent_checks = config.max_concurrent_checks,
        "agent started"
    );

    let stop = CancellationToken::new();
    let (results, results_rx) = mpsc::channel(RESULT_QUEUE);
    let checks = TaskTracker::new();
    let scheduler = tokio::spawn(schedule::run(
        lists_rx,
        schedule::Runner {
            checker: Arc::new(Checker::new(tls)),
            metrics: metrics.clone(),
            slots: Arc::new(Semaphore::new(config.max_concurrent_checks as usize)),
            results,
            tasks: checks.clone(),
        },
        stop.clone(),
    ));
    let reporter_stop = CancellationToken::new();
    let mut reporter = tokio::spawn(
        Reporter::new(coordinator.clone(), spool, metrics.clone())
            .run(results_rx, reporter_stop.clone()),
    );
    let mut control = tokio::spawn(
        Control {
            coordinator,
            lists,
            cache,
            etag,
            metrics: metrics.clone(),
            location: config.location.clone(),
        }
        .run(stop.clone()),
    );

    let mut reporter_done = None;
    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        ended = &mut control => ended.ok().and_then(Result::err),
        ended = &mut reporter => {
            let ended = ended.unwrap_or(Ok(()));
            reporter_done = Some(());
            ended.err()
        }
    };
    if shutdown.is_cancelled() {
        tracing::info!("shutting down: letting the checks under way finish");
    }
    stop.cancel();
    let _ = scheduler.await;
    checks.close();
    if tokio::time::timeout(CHECK_DRAIN, checks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = checks.len(),
            "checks still running at shutdown are abandoned"
        );
    }
    reporter_stop.cancel();
    let mut fatal = fatal;
    if reporter_done.is_none() {
        if let Ok(Err(error)) = reporter.await {
            fatal.get_or_insert(error);
        }
    }
    if !control.is_finished() {
        control.abort();
    }
    match fatal {
        Some(error) => Err(anyhow::Error::new(error)),
        None => Ok(()),
    }
}

/// The TLS client configuration for an `https://` coordinator: the CA
/// bundle, and `--coordinator-ca-file` when given.
fn coordinator_tls(config: &Config) -> Result<rustls::ClientConfig, String> {
    let mut roots = check::tls::load_roots(&config.ca_file)?;
    if let Some(path) = &config.coordinator_ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("--coordinator-ca-file: cannot read {}: {e}", path.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "--coordinator-ca-file: {} holds no usable CA certificate",
                path.display()
            ));
        }
    }
    check::tls::client_config(roots)
}

/// The heartbeat and the endpoint list.
struct Control {
    coordinator: Arc<Coordinator>,
    lists: watch::Sender<Option<Arc<EndpointList>>>,
    cache: EndpointCache,
    etag: Option<String>,
    metrics: Arc<Metrics>,
    location: Option<String>,
}

impl Control {
    async fn run(mut self, stop: CancellationToken) -> Result<(), ApiError> {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut registered = false;
        let mut fetched = false;
        let mut failing: Option<String> = None;
        for round in 0u64.. {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            samples.push_back((Instant::now(), self.metrics.checks_made()));
            while samples.len() > 7 {
                samples.pop_front();
            }
            let health = AgentHealth {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                endpoints_version: self.lists.borrow().as_ref().map(|l| l.version.clone()),
                buffered_results: self.metrics.results_buffered.get().max(0) as u64,
                checks_per_minute: per_minute(&samples),
            };
            let mut outcome = match self.coordinator.health(&health).await {
                Ok(registration) => {
                    if !registered {
                        self.registered(&registration);
                        registered = true;
                    }
                    Ok(())
                }
                Err(error) => Err(error),
            };
            if outcome.is_ok() && (!fetched || round % FETCH_EVERY == 0) {
                outcome = match self.coordinator.endpoints(self.etag.as_deref()).await {
                    Ok(Endpoints::Changed { list, etag }) => {
                        fetched = true;
                        self.cache.store(&list, &etag).await;
                        self.etag = Some(etag);
                        self.lists.send_replace(Some(Arc::new(list)));
                        Ok(())
                    }
                    Ok(Endpoints::Unchanged) => {
                        fetched = true;
                        Ok(())
                    }
                    Err(error) => Err(error),
                };
            }
            match outcome {
                Ok(()) => {
                    self.metrics.coordinator_up.set(1);
                    if failing.take().is_some() {
                        tracing::info!("the coordinator answers again");
                    }
                }
                Err(error @ ApiError::Refused { .. }) => return Err(error),
                Err(error) => {
                    self.metrics.coordinator_up.set(0);
                    let text = error.to_string();
                    if failing.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "the coordinator does not answer as it should; checks go on and results are kept");
                        failing = Some(text);
                    }
                }
            }
        }
        Ok(())
    }

    fn registered(&self, registration: &client::Registration) {
        tracing::info!(
            agent_id = %registration.agent_id,
            name = registration.name.as_deref().unwrap_or(""),
            location = registration.location.as_deref().unwrap_or(""),
            "the coordinator knows this agent"
        );
        if let (Some(ours), Some(theirs)) = (&self.location, &registration.location) {
            if ours != theirs {
                tracing::warn!(
                    configured = %ours,
                    coordinator = %theirs,
                    "--location differs from the location the coordinator has for this agent; the coordinator's counts"
                );
            }
        }
    }
}

/// Checks per minute over the samples (time, checks made so far).
fn per_minute(samples: &VecDeque<(Instant, u64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
            (n1 - n0) as f64 * 60.0 / t1.duration_since(*t0).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// The last endpoint list the coordinator gave, kept in the data directory
/// with a hash of the token it was given to, so an agent started with
/// another token never checks a list that is not its own.
pub struct EndpointCache {
    path: PathBuf,
    token_hash: String,
}

#[derive(Serialize, Deserialize)]
struct CachedList {
    token_hash: String,
    etag: String,
    list: EndpointList,
}

impl EndpointCache {
    /// The cache of an agent with data directory `data_dir` and `token`.
    pub fn new(data_dir: &Path, token: &Secret) -> EndpointCache {
        EndpointCache {
            path: data_dir.join("endpoints.json"),
            token_hash: muster_common::token::hash(token.expose()),
        }
    }

    /// The kept list and its `ETag`, if there is one for this token.
    pub fn load(&self) -> Option<(EndpointList, String)> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot read the kept endpoint list");
                return None;
            }
        };
        match serde_json::from_slice::<CachedList>(&bytes) {
            Ok(cached) if cached.token_hash == self.token_hash => Some((cached.list, cached.etag)),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "the kept endpoint list is unreadable; waiting for the coordinator's");
                None
            }
        }
    }

    /// Keeps `list` (best effort: a failure is logged).
    pub async fn store(&self, list: &EndpointList, etag: &str) {
        let cached = CachedList {
            token_hash: self.token_hash.clone(),
            etag: etag.to_owned(),
            list: list.clone(),
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&cached).map_err(std::io::Error::other)?;
            muster_common::secret::write_private_file(&path, &bytes)
        })
        .await;
        if let Ok(Err(error)) = written {
            tracing::warn!(path = %self.path.display(), %error, "cannot keep the endpoint list on disk");
        }
    }
}

/// A number in [0, 1).
pub(crate) fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// A random duration up to `max`.
pub(crate) fn jitter(max: Duration) -> Duration {
    max.mul_f64(random_fraction())
}

/// Where the result buffer of an agent with data directory `data_dir` is.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}
