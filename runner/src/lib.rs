//! Muster's runner: enrolls once, holds a mutually authenticated stream to
//! the coordinator, executes leased runs in containers, and streams their
//! logs back.
//!
//! The runner never opens a database connection and never parses `.poly`
//! files: a lease carries the plan the coordinator resolved, and the bundle
//! is fetched by digest and cached.

pub mod config;
pub mod docker;
pub mod identity;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use muster_common::bundle::{Bundle, Limits};
use muster_common::plan::JobPlan;
use muster_proto::runner::v1::runner_service_client::RunnerServiceClient;
use muster_proto::runner::v1::{
    runner_message, FetchBundleRequest, Hello, Lease, RunFinished, RunOutcome, RunStarted,
    RunnerMessage,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

pub use config::Config;
use docker::DockerExecutor;
use session::{Command, Link, LogSink, Stream};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Context_ {
    executor: DockerExecutor,
    link: Arc<Link>,
    bundle_dir: PathBuf,
    channel: std::sync::Mutex<Option<Channel>>,
}

/// Runs the runner until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let identity = identity::load_or_enroll(&config).await?;
    let tls = identity::mutual_tls(&identity)?;
    let server_name = identity::server_name(&config)?;
    let executor = DockerExecutor::connect(config.default_image.clone())
        .await
        .context(
            "connecting to the Docker daemon (is it running, and may this user use its socket?)",
        )?;
    let bundle_dir = config.data_dir.join("bundles");
    std::fs::create_dir_all(&bundle_dir)
        .with_context(|| format!("creating {}", bundle_dir.display()))?;
    let labels = config.labels().map_err(anyhow::Error::msg)?;

    let ctx = Arc::new(Context_ {
        executor,
        link: Arc::new(Link::default()),
        bundle_dir,
        channel: std::sync::Mutex::new(None),
    });
    let jobs = TaskTracker::new();
    let (commands, mut command_rx) = mpsc::channel::<Command>(64);
    let spawner = {
        let ctx = ctx.clone();
        let jobs = jobs.clone();
        tokio::spawn(async move {
            while let Some(Command::Lease(lease)) = command_rx.recv().await {
                jobs.spawn(execute(ctx.clone(), lease));
            }
        })
    };

    tracing::info!(runner_id = %identity.runner_id, coordinator = %config.coordinator, capacity = config.capacity, "runner started");
    let mut backoff = Duration::from_millis(250);
    while !shutdown.is_cancelled() {
        let began = tokio::time::Instant::now();
        match identity::channel(&config, tls.clone(), &server_name).await {
            Ok(channel) => {
                *ctx.channel.lock().expect("channel lock") = Some(channel.clone());
                let mut client = RunnerServiceClient::new(channel);
                let hello = Hello {
                    capacity: config.capacity,
                    labels: labels.clone().into_iter().collect(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    executors: vec!["docker".to_owned()],
                    active: ctx.link.active().await,
                };
                match session::hold_stream(&mut client, hello, &ctx.link, &commands, &shutdown)
                    .await
                {
                    Ok(()) => tracing::info!("stream to the coordinator ended"),
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), error = %status.message(), "stream to the coordinator failed")
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot reach the coordinator")
            }
        }
        if began.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(250);
        }
        let jitter = Duration::from_millis(u64::from(began.elapsed().subsec_millis() % 250));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    spawner.abort();
    jobs.close();
    let running = ctx.link.running_jobs().await;
    if running > 0 {
        tracing::warn!(
            running,
            "runner stopping with runs in flight; the coordinator will record them as lost"
        );
    }
    Ok(())
}

async fn execute(ctx: Arc<Context_>, lease: Lease) {
    let run_id = lease.run_id.clone();
    let token = lease.fencing_token;
    let cancel = CancellationToken::new();
    ctx.link.add_job(&run_id, token, cancel.clone()).await;
    let sink = LogSink::new(&run_id, token, ctx.link.clone());
    tracing::info!(run_id = %run_id, token, "lease received");

    let result: Result<docker::Outcome, String> = async {
        let plan: JobPlan = serde_json::from_str(&lease.plan_json)
            .map_err(|e| format!("the lease's plan is unreadable: {e}"))?;
        let bundle = fetch_bundle(&ctx, &lease).await?;
        let image = ctx.executor.image_for(&plan);
        let prepared = ctx
            .executor
            .prepare(&image)
            .await
            .map_err(|e| e.to_string())?;
        let started = RunStarted {
            run_id: run_id.clone(),
            fencing_token: token,
            executor: "docker".into(),
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
        ctx.executor
            .run(&run_id, &prepared.image, &plan, &bundle, &sink, cancel)
            .await
            .map_err(|e| e.to_string())
    }
    .await;

    let (outcome, exit_code, error) = match result {
        Ok(done) if done.canceled => (
            RunOutcome::Canceled,
            Some(done.exit_code as i32),
            String::new(),
        ),
        Ok(done) if done.exit_code == 0 => (RunOutcome::Succeeded, Some(0), String::new()),
        Ok(done) => (
            RunOutcome::Failed,
            Some(done.exit_code as i32),
            String::new(),
        ),
        Err(error) => {
            tracing::warn!(run_id = %run_id, %error, "run could not be executed");
            sink.write(Stream::System, format!("muster: {error}\n").into_bytes())
                .await;
            (RunOutcome::Failed, None, error)
        }
    };
    let finished = RunFinished {
        run_id: run_id.clone(),
        fencing_token: token,
        outcome: outcome as i32,
        exit_code,
        error,
        last_seq: sink.last_seq(),
        finished_at_ms: chrono::Utc::now().timestamp_millis(),
    };
    tracing::info!(run_id = %run_id, outcome = ?outcome, exit_code = ?exit_code, "run finished");
    ctx.link
        .send_finished(
            &run_id,
            RunnerMessage {
                kind: Some(runner_message::Kind::Finished(finished)),
            },
        )
        .await;
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
