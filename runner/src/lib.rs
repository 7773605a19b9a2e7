//! Muster's runner: enrolls once, holds a mutually authenticated stream to
//! the coordinator, executes leased runs in containers or as local
//! processes, and streams their logs back.
//!
//! The runner never opens a database connection and never parses `.poly`
//! files: a lease carries the plan the coordinator resolved, and the bundle
//! is fetched by digest and cached.
//!
//! Shutdown drains: once the `shutdown` token given to [`run`] fires, no new
//! run starts, the stream stays open while running jobs finish (up to
//! [`Config::drain_timeout`]), what is still running then is canceled, and
//! [`run`] returns once the coordinator has acknowledged every result (or a
//! few seconds have passed).

pub mod config;
pub mod docker;
pub mod executor;
pub mod identity;
pub mod metrics;
pub mod output;
pub mod process;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use muster_common::bundle::{Bundle, Limits};
use muster_common::plan::JobPlan;
use muster_proto::runner::v1::runner_service_client::RunnerServiceClient;
use muster_proto::runner::v1::{
    runner_message, ArtifactChunk, ArtifactsStored, Draining, FetchBundleRequest, Hello, Lease,
    ReleaseLease, RunFinished, RunOutcome, RunStarted, RunnerMessage,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

pub use config::{Config, ExecutorChoice};
pub use executor::Executor;
use executor::{Outcome, Stop};
use session::{Command, Link, LogSink, Stream};

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// After the drain, how long the runner waits for the coordinator to
/// acknowledge what it said about its runs.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Beyond the stop grace, how long canceled jobs may take to end (container
/// removal, output still arriving).
const STOP_SLACK: Duration = Duration::from_secs(10);

struct Context_ {
    executor: Executor,
    link: Arc<Link>,
    bundle_dir: PathBuf,
    channel: std::sync::Mutex<Option<Channel>>,
    /// Parent of every job's cancel token: fired when the drain timeout
    /// passes, so a job tells that cancel from one the coordinator sent.
    stop_jobs: CancellationToken,
}

/// Runs the runner until `shutdown` fires, then drains (see the crate
/// documentation) and returns. The future is `Send`, so an embedder can
/// spawn it.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let metrics_listener = metrics::bind(config.metrics_addr).await?;
    let (work_dir, made_by_runner) = config.work_dir();
    // Held until the runner returns: no other runner process removes
    // this one's scratch directories.
    let _work_lock = {
        let work_dir = work_dir.clone();
        tokio::task::spawn_blocking(move || process::claim_work_dir(&work_dir, made_by_runner))
            .await?
            .map_err(anyhow::Error::msg)?
    };
    let leftovers = {
        let work_dir = work_dir.clone();
        tokio::task::spawn_blocking(move || process::remove_leftovers(&work_dir)).await?
    };
    match leftovers {
        Ok(0) => {}
        Ok(removed) => tracing::info!(
            removed,
            "removed scratch directories a previous runner process left"
        ),
        Err(error) => {
            tracing::warn!(%error, dir = %work_dir.display(), "could not remove old scratch directories")
        }
    }
    // Before enrolling, so a host that cannot run jobs does not use up a
    // join token.
    let executor = Executor::select(config.executor, &config.default_image, &work_dir).await?;
    let identity = identity::load_or_enroll(&config).await?;
    // Fails here, at start, for a stored identity that cannot be used.
    identity::mutual_tls(&identity)?;
    let runner_id = identity.runner_id.clone();
    let identity = Arc::new(identity::IdentityFile::new(
        identity::identity_path(&config),
        identity,
    ));
    let server_name = identity::server_name(&config)?;
    let bundle_dir = config.data_dir.join("bundles");
    std::fs::create_dir_all(&bundle_dir)
        .with_context(|| format!("creating {}", bundle_dir.display()))?;
    let labels = config.labels().map_err(anyhow::Error::msg)?;

    let ctx = Arc::new(Context_ {
        executor,
        link: Arc::new(Link::with_spill_dir(config.data_dir.join("spill"), None)),
        bundle_dir,
        channel: std::sync::Mutex::new(None),
        stop_jobs: CancellationToken::new(),
    });
    let metrics_stop = CancellationToken::new();
    let _stop_metrics = metrics_stop.clone().drop_guard();
    if let Some(listener) = metrics_listener {
        let metrics = ctx.link.metrics().clone();
        tokio::spawn(metrics::serve(listener, metrics, metrics_stop));
    }
    let jobs = Arc::new(Jobs::default());
    let (commands, mut command_rx) = mpsc::channel::<Command>(64);
    let spawner = {
        let ctx = ctx.clone();
        let jobs = jobs.clone();
        tokio::spawn(async move {
            while let Some(Command::Lease(lease)) = command_rx.recv().await {
                jobs.start(&ctx, lease);
            }
        })
    };

    tracing::info!(
        runner_id = %runner_id,
        coordinator = %config.coordinator,
        capacity = config.capacity,
        executors = %ctx.executor.kinds().join(","),
        "runner started"
    );
    let stream_stop = CancellationToken::new();
    let session = {
        let ctx = ctx.clone();
        let stop = stream_stop.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            while !stop.is_cancelled() {
                let began = tokio::time::Instant::now();
                let attempt = async {
                    // Built anew each time: a renewal replaces the certificate.
                    let channel = match identity::mutual_tls(&identity.current()) {
                        Ok(tls) => identity::channel(&config, tls, &server_name).await,
                        Err(error) => Err(error),
                    };
                    match channel {
                        Ok(channel) => {
                            *ctx.channel.lock().expect("channel lock") = Some(channel.clone());
                            let mut client = RunnerServiceClient::new(channel);
                            let hello = Hello {
                                capacity: config.capacity,
                                labels: labels.clone().into_iter().collect(),
                                version: env!("CARGO_PKG_VERSION").to_owned(),
                                executors: ctx.executor.kinds(),
                                active: ctx.link.active().await,
                            };
                            match session::hold_stream(
                                &mut client,
                                hello,
                                &ctx.link,
                                &commands,
                                &identity,
                                &stop,
                            )
                            .await
                            {
                                Ok(()) => tracing::info!("stream to the coordinator ended"),
                                Err(status) if identity::refused_as_revoked(&status) => {
                                    warn_revoked()
                                }
                                Err(status) => {
                                    tracing::warn!(code = ?status.code(), error = %status.message(), "stream to the coordinator failed")
                                }
                            }
                        }
                        Err(error) if identity::refused_as_revoked(error.as_ref()) => {
                            warn_revoked()
                        }
                        Err(error) => {
                            tracing::warn!(error = %format!("{error:#}"), "cannot reach the coordinator")
                        }
                    }
                };
                // Connecting can take a while; once the drain is over
                // there is nothing left to say.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    () = attempt => {}
                }
                if began.elapsed() > MAX_BACKOFF {
                    backoff = Duration::from_millis(250);
                }
                let jitter =
                    Duration::from_millis(u64::from(began.elapsed().subsec_millis() % 250));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    };

    shutdown.cancelled().await;
    jobs.drain(&ctx, config.drain_timeout(), ACK_WAIT).await;
    stream_stop.cancel();
    if let Err(error) = session.await {
        tracing::warn!(%error, "the session task failed");
    }
    spawner.abort();
    tracing::info!("runner stopped");
    Ok(())
}

/// The runner keeps trying (an administrator who revoked it by mistake cannot
/// undo that, but the log says what to do), with the usual backoff.
fn warn_revoked() {
    tracing::warn!(
        "the coordinator refused this runner's certificate: the runner was revoked; \
         to bring it back, remove identity.json from its data directory and enroll it \
         again with a new join token"
    );
}

/// The runs this runner executes, and whether it still starts new ones.
struct Jobs {
    tracker: TaskTracker,
    /// Whether leases still start jobs. Jobs are spawned under this lock,
    /// so once the drain has set it to false, every job is in `tracker`.
    accepting: std::sync::Mutex<bool>,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            tracker: TaskTracker::new(),
            accepting: std::sync::Mutex::new(true),
        }
    }
}

impl Jobs {
    /// Starts executing `lease`, unless the runner drains. Returns whether
    /// it started.
    fn start(&self, ctx: &Arc<Context_>, lease: Lease) -> bool {
        let accepting = self.accepting.lock().expect("jobs lock");
        if *accepting {
            self.tracker.spawn(execute(ctx.clone(), lease));
            return true;
        }
        // Given back at once, so the run goes to another runner instead of
        // waiting for this lease to expire.
        tracing::info!(
            run_id = %lease.run_id,
            token = lease.fencing_token,
            "lease arrived while the runner drains; giving it back"
        );
        let link = ctx.link.clone();
        tokio::spawn(async move {
            let release = ReleaseLease {
                run_id: lease.run_id,
                fencing_token: lease.fencing_token,
            };
            link.send_unkept(RunnerMessage {
                kind: Some(runner_message::Kind::Release(release)),
            })
            .await;
        });
        false
    }

    /// Stops starting runs, lets running jobs finish for up to
    /// `drain_timeout`, cancels the rest, and waits up to `ack_wait` for the
    /// coordinator to acknowledge their results. The caller holds the
    /// stream meanwhile.
    async fn drain(&self, ctx: &Context_, drain_timeout: Duration, ack_wait: Duration) {
        *self.accepting.lock().expect("jobs lock") = false;
        ctx.link
            .send_unkept(RunnerMessage {
                kind: Some(runner_message::Kind::Draining(Draining {})),
            })
            .await;
        let jobs = &self.tracker;
        jobs.close();
        if !jobs.is_empty() {
            tracing::info!(
                running = jobs.len(),
                drain_timeout_secs = drain_timeout.as_secs(),
                "shutting down: no new runs; waiting for the running ones to finish"
            );
        }
        if tokio::time::timeout(drain_timeout, jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = jobs.len(),
                "drain timeout passed; canceling the runs still in flight"
            );
            ctx.stop_jobs.cancel();
            let bound = ctx.executor.stop_grace() + STOP_SLACK;
            if tokio::time::timeout(bound, jobs.wait()).await.is_err() {
                tracing::warn!(
                    running = jobs.len(),
                    "canceled runs did not end in time; the coordinator will record them as lost"
                );
            }
        }
        if !ctx.link.wait_settled(ack_wait).await {
            let runs = ctx.link.unsettled().await;
            tracing::warn!(
                runs,
                "the coordinator did not acknowledge every result before shutdown"
            );
        }
    }
}

#[tracing::instrument(skip_all, fields(run_id = %lease.run_id))]
async fn execute(ctx: Arc<Context_>, lease: Lease) {
    let run_id = lease.run_id.clone();
    let token = lease.fencing_token;
    let cancel = ctx.stop_jobs.child_token();
    let _running = ctx.link.metrics().job_started();
    ctx.link.add_job(&run_id, token, cancel.clone()).await;
    let sink = LogSink::continuing(&run_id, token, lease.log_seq_base, ctx.link.clone());
    tracing::info!(token, attempt = lease.attempt, "lease received");
    if lease.attempt > 1 {
        let note = format!(
            "muster: attempt {} of this run; the runner of the previous attempt was lost\n",
            lease.attempt
        );
        sink.write(Stream::System, note.into_bytes()).await;
    }

    // `None`: canceled before the job started.
    let mut timeout_secs = None;
    // Run once the result is sent.
    let mut cleanup = None;
    let result: Result<Option<Outcome>, String> = async {
        let plan: JobPlan = serde_json::from_str(&lease.plan_json)
            .map_err(|e| format!("the lease's plan is unreadable: {e}"))?;
        timeout_secs = plan.timeout_secs;
        let bundle = fetch_bundle(&ctx, &lease).await?;
        let prepared = ctx
            .executor
            .prepare(&plan)
            .await
            .map_err(|e| e.to_string())?;
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let started = RunStarted {
            run_id: run_id.clone(),
            fencing_token: token,
            executor: prepared.executor.into(),
            image: prepared.image.clone(),
            image_digest: prepared.image_digest.clone(),
            started_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        ctx.link
            .send_started(
                &run_id,
                RunnerMessage {
                    kind: Some(runner_message::Kind::Started(started)),
                },
            )
            .await;
        if let Some(note) = &prepared.note {
            tracing::warn!(%note, "executor fallback");
            sink.write(Stream::System, format!("muster: {note}\n").into_bytes())
                .await;
        }
        let (outcome, collected, tidy) = ctx
            .executor
            .run(&run_id, &prepared, &plan, &bundle, &sink, cancel.clone())
            .await
            .map_err(|e| e.to_string())?;
        cleanup = Some(tidy);
        let note = match collected {
            Ok(None) => None,
            Ok(Some(artifacts)) => Some(
                match upload_artifacts(&ctx, &run_id, token, &artifacts).await {
                    Ok(stored) => format!(
                        "uploaded {} artifact file(s), {} bytes",
                        stored.files, stored.bytes
                    ),
                    Err(error) => format!("artifacts not uploaded: {error}"),
                },
            ),
            Err(error) => Some(format!("artifacts not collected: {error}")),
        };
        if let Some(note) = note {
            sink.write(Stream::System, format!("muster: {note}\n").into_bytes())
                .await;
        }
        Ok(Some(outcome))
    }
    .await;

    if let Err(error) = &result {
        tracing::warn!(%error, "run could not be executed");
    }
    let end = conclude(result, timeout_secs, ctx.stop_jobs.is_cancelled());
    if let Some(note) = &end.note {
        sink.write(Stream::System, format!("muster: {note}\n").into_bytes())
            .await;
    }
    let (outcome, exit_code, error) = (end.outcome, end.exit_code, end.error);
    let (log_bytes, log_sha256) = sink.digest();
    let finished = RunFinished {
        run_id: run_id.clone(),
        fencing_token: token,
        outcome: outcome as i32,
        exit_code,
        error,
        last_seq: sink.last_seq(),
        log_bytes,
        log_sha256,
        finished_at_ms: chrono::Utc::now().timestamp_millis(),
    };
    tracing::info!(outcome = ?outcome, exit_code = ?exit_code, "run finished");
    ctx.link.metrics().job_finished(outcome);
    ctx.link
        .send_finished(
            &run_id,
            RunnerMessage {
                kind: Some(runner_message::Kind::Finished(finished)),
            },
        )
        .await;
    if let Some(cleanup) = cleanup {
        cleanup.run().await;
    }
}

/// How a run ends, as the coordinator is told.
#[derive(Debug, PartialEq)]
struct Conclusion {
    outcome: RunOutcome,
    exit_code: Option<i32>,
    /// Why the run could not be executed; empty when it ran.
    error: String,
    /// A last line for the run's log, from the runner itself.
    note: Option<String>,
}

/// Turns what the executor reported (`None`: canceled before the job
/// started) into the run's end. `by_drain` says the runner's drain timeout
/// canceled it, not the coordinator.
fn conclude(
    result: Result<Option<Outcome>, String>,
    timeout_secs: Option<u64>,
    by_drain: bool,
) -> Conclusion {
    let end = |outcome, exit_code, note: Option<String>| Conclusion {
        outcome,
        exit_code,
        error: String::new(),
        note,
    };
    match result {
        Ok(None) => end(
            RunOutcome::Canceled,
            None,
            Some("canceled before the job started".into()),
        ),
        Ok(Some(done)) => {
            let code = Some(i32::try_from(done.exit_code).unwrap_or(-1));
            match done.stopped {
                Some(Stop::Canceled) => end(
                    RunOutcome::Canceled,
                    code,
                    by_drain.then(|| {
                        "canceled: the runner shut down and its drain timeout passed".into()
                    }),
                ),
                Some(Stop::TimedOut) => end(
                    RunOutcome::TimedOut,
                    code,
                    Some(format!(
                        "timed out after {} s",
                        timeout_secs.unwrap_or_default()
                    )),
                ),
                None if done.exit_code == 0 => end(RunOutcome::Succeeded, code, None),
                None => end(RunOutcome::Failed, code, None),
            }
        }
        Err(error) => Conclusion {
            outcome: RunOutcome::Failed,
            exit_code: None,
            note: Some(error.clone()),
            error,
        },
    }
}

/// Uploads a job's artifacts (a canonical tar.gz in 1 MiB chunks) while the
/// lease still holds; the coordinator refuses them past its size limit.
async fn upload_artifacts(
    ctx: &Context_,
    run_id: &str,
    token: u64,
    artifacts: &Bundle,
) -> Result<ArtifactsStored, String> {
    let channel = ctx
        .channel
        .lock()
        .expect("channel lock")
        .clone()
        .ok_or("not connected to the coordinator")?;
    let archive = artifacts.to_tar_gz();
    let chunks: Vec<ArtifactChunk> = archive
        .chunks(1 << 20)
        .map(|data| ArtifactChunk {
            run_id: run_id.to_owned(),
            fencing_token: token,
            data: data.to_vec(),
        })
        .collect();
    RunnerServiceClient::new(channel)
        .upload_artifacts(tokio_stream::iter(chunks))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| s.message().to_owned())
}

/// The lease's bundle, from the cache or the coordinator, checked against
/// its digest either way.
async fn fetch_bundle(ctx: &Context_, lease: &Lease) -> Result<Bundle, String> {
    let hex = lease
        .bundle_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("bundle digest '{}' is malformed", lease.bundle_digest))?;
    let path = ctx.bundle_dir.join(format!("{hex}.tar.gz"));
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let channel = ctx
                .channel
                .lock()
                .expect("channel lock")
                .clone()
                .ok_or("not connected to the coordinator")?;
            let mut stream = RunnerServiceClient::new(channel)
                .fetch_bundle(FetchBundleRequest {
                    digest: lease.bundle_digest.clone(),
                    run_id: lease.run_id.clone(),
                })
                .await
                .map_err(|s| format!("fetching the bundle: {}", s.message()))?
                .into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| format!("fetching the bundle: {}", s.message()))?
            {
                bytes.extend_from_slice(&chunk.data);
            }
            bytes
        }
    };
    let expected = lease.bundle_digest.clone();
    let (bundle, bytes) = tokio::task::spawn_blocking(move || {
        let bundle = Bundle::from_tar_gz(&bytes, &Limits::default())
            .map_err(|e| format!("bundle is unreadable: {e}"))?;
        if bundle.digest() != expected {
            return Err(format!(
                "bundle digest mismatch: expected {expected}, got {}",
                bundle.digest()
            ));
        }
        Ok((bundle, bytes))
    })
    .await
    .map_err(|e| e.to_string())??;
    if !path.exists() {
        let tmp = path.with_extension("part");
        if tokio::fs::write(&tmp, &bytes).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &path).await;
        }
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use muster_common::bundle::Entry;
    use muster_proto::runner::v1::LogStream;

    use super::*;
    use crate::process::ProcessExecutor;

    #[test]
    fn run_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let config = Config::for_tests(
            "https://127.0.0.1:1".into(),
            "t".into(),
            format!("sha256:{}", "a".repeat(64)),
            "/nonexistent".into(),
        );
        // Built, never polled: only its type is checked.
        assert_send(&run(config, CancellationToken::new()));
    }

    #[test]
    fn conclusions() {
        let ran = |exit_code, stopped| Ok(Some(Outcome { exit_code, stopped }));
        let c = conclude(ran(0, None), None, false);
        assert_eq!(
            (c.outcome, c.exit_code, c.note),
            (RunOutcome::Succeeded, Some(0), None)
        );
        let c = conclude(ran(2, None), None, false);
        assert_eq!(
            (c.outcome, c.exit_code, c.note),
            (RunOutcome::Failed, Some(2), None)
        );
        let c = conclude(ran(143, Some(Stop::TimedOut)), Some(30), false);
        assert_eq!(
            (c.outcome, c.exit_code, c.note.as_deref()),
            (
                RunOutcome::TimedOut,
                Some(143),
                Some("timed out after 30 s")
            )
        );
        let c = conclude(ran(143, Some(Stop::Canceled)), None, false);
        assert_eq!((c.outcome, c.note), (RunOutcome::Canceled, None));
        let c = conclude(ran(143, Some(Stop::Canceled)), None, true);
        assert_eq!(c.outcome, RunOutcome::Canceled);
        assert!(c.note.unwrap().contains("drain timeout"));
        let c = conclude(Ok(None), None, false);
        assert_eq!((c.outcome, c.exit_code), (RunOutcome::Canceled, None));
        let c = conclude(Err("image gone".into()), None, false);
        assert_eq!(
            (c.outcome, c.exit_code, c.error.as_str(), c.note.as_deref()),
            (RunOutcome::Failed, None, "image gone", Some("image gone"))
        );
    }

    /// What a stand-in coordinator heard: each run's log and its end.
    #[derive(Default)]
    struct Heard {
        logs: std::collections::HashMap<String, Vec<(LogStream, Vec<u8>)>>,
        finished: std::collections::HashMap<String, RunFinished>,
    }

    impl Heard {
        fn log_text(&self, run_id: &str) -> String {
            self.logs
                .get(run_id)
                .into_iter()
                .flatten()
                .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
                .collect()
        }
    }

    /// A runner's insides with the process executor and a bundle already
    /// cached, and a stand-in coordinator that records what it hears and,
    /// when `acks`, acknowledges each finished run.
    async fn runner(
        data: &std::path::Path,
        acks: bool,
    ) -> (Arc<Context_>, Bundle, Arc<std::sync::Mutex<Heard>>) {
        let block = "name: app\nactions:\n  - name: short\n    script: ['sleep 0.3', 'echo short-done']\n  - name: long\n    script: ['echo long-started', 'sleep 1000']\n";
        let files = [
            ("workspace.poly", "name: acme-ws\norganization: acme\n"),
            ("blocks/app/block.poly", block),
        ];
        let bundle = Bundle::from_entries(files.iter().map(|(p, t)| {
            (
                p.to_string(),
                Entry::File {
                    data: t.as_bytes().to_vec(),
                    executable: false,
                },
            )
        }))
        .unwrap();
        let bundle_dir = data.join("bundles");
        std::fs::create_dir_all(&bundle_dir).unwrap();
        let hex = bundle.digest().trim_start_matches("sha256:").to_owned();
        std::fs::write(bundle_dir.join(format!("{hex}.tar.gz")), bundle.to_tar_gz()).unwrap();
        let executor = ProcessExecutor::new(data.join("work"), Duration::from_secs(1)).unwrap();
        let ctx = Arc::new(Context_ {
            executor: Executor::Process(executor),
            link: Arc::new(Link::default()),
            bundle_dir,
            channel: std::sync::Mutex::new(None),
            stop_jobs: CancellationToken::new(),
        });
        let (outbox, mut messages) = mpsc::channel::<RunnerMessage>(1024);
        ctx.link.attach(outbox).await;
        let heard = Arc::new(std::sync::Mutex::new(Heard::default()));
        {
            let heard = heard.clone();
            let link = ctx.link.clone();
            tokio::spawn(async move {
                while let Some(message) = messages.recv().await {
                    match message.kind {
                        Some(runner_message::Kind::Log(chunk)) => heard
                            .lock()
                            .unwrap()
                            .logs
                            .entry(chunk.run_id)
                            .or_default()
                            .push((LogStream::try_from(chunk.stream).unwrap(), chunk.data)),
                        Some(runner_message::Kind::Finished(finished)) => {
                            let run_id = finished.run_id.clone();
                            heard
                                .lock()
                                .unwrap()
                                .finished
                                .insert(run_id.clone(), finished);
                            if acks {
                                link.forget(&run_id).await;
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
        (ctx, bundle, heard)
    }

    fn lease(bundle: &Bundle, run_id: &str, action: &str) -> Lease {
        let ws = muster_common::workspace::load(bundle).unwrap();
        let plan = muster_common::plan::plan(&ws, "app", action, &Default::default()).unwrap();
        Lease {
            run_id: run_id.into(),
            fencing_token: 7,
            bundle_digest: bundle.digest(),
            plan_json: serde_json::to_string(&plan).unwrap(),
            expires_at_ms: 0,
            attempt: 1,
            log_seq_base: 0,
        }
    }

    async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_lets_runs_finish_then_cancels_the_rest_and_starts_none() {
        let data = tempfile::tempdir().unwrap();
        let (ctx, bundle, heard) = runner(data.path(), true).await;
        let jobs = Jobs::default();
        assert!(jobs.start(&ctx, lease(&bundle, "run-short", "short")));
        assert!(jobs.start(&ctx, lease(&bundle, "run-long", "long")));
        wait_for("output of the long run", || {
            heard
                .lock()
                .unwrap()
                .log_text("run-long")
                .contains("long-started")
        })
        .await;

        let drain_timeout = Duration::from_secs(2);
        let began = tokio::time::Instant::now();
        jobs.drain(&ctx, drain_timeout, Duration::from_secs(5))
            .await;
        let took = began.elapsed();
        assert!(
            took >= drain_timeout && took < drain_timeout + Duration::from_secs(6),
            "the drain took {took:?}"
        );
        assert!(
            !jobs.start(&ctx, lease(&bundle, "run-late", "short")),
            "a lease after the drain began starts nothing"
        );

        {
            let heard = heard.lock().unwrap();
            let short = &heard.finished["run-short"];
            assert_eq!(short.outcome, RunOutcome::Succeeded as i32);
            assert_eq!(heard.log_text("run-short"), "short-done\n");
            let long = &heard.finished["run-long"];
            assert_eq!(long.outcome, RunOutcome::Canceled as i32);
            assert_eq!(
                heard.log_text("run-long"),
                "long-started\nmuster: canceled: the runner shut down and its drain timeout passed\n",
                "the log so far, then why"
            );
            assert!(!heard.logs.contains_key("run-late"));
            assert!(!heard.finished.contains_key("run-late"));
        }
        assert_eq!(ctx.link.unsettled().await, 0, "every result acknowledged");
        assert_eq!(
            std::fs::read_dir(data.path().join("work")).unwrap().count(),
            0,
            "no scratch directory left"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_waits_for_acknowledgements_only_so_long() {
        let data = tempfile::tempdir().unwrap();
        let (ctx, bundle, heard) = runner(data.path(), false).await;
        let jobs = Jobs::default();
        assert!(jobs.start(&ctx, lease(&bundle, "run-short", "short")));
        let began = tokio::time::Instant::now();
        jobs.drain(&ctx, Duration::from_secs(30), Duration::from_millis(300))
            .await;
        assert!(began.elapsed() < Duration::from_secs(10));
        assert!(heard.lock().unwrap().finished.contains_key("run-short"));
        assert_eq!(
            ctx.link.unsettled().await,
            1,
            "never acknowledged, still kept for a resend"
        );
    }
}
