//! Simulated runners: each enrolls with a join token (the runner's own
//! enrollment code) and holds a real mTLS gRPC stream to the coordinator,
//! as `muster-runner` does, but executes nothing. On a lease it notes the
//! moment it arrived, then reports the run started and succeeded with an
//! empty log, exactly as a runner whose job printed nothing would.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use muster_proto::runner::v1::runner_service_client::RunnerServiceClient;
use muster_proto::runner::v1::{
    coordinator_message, runner_message, Heartbeat, Hello, RunFinished, RunOutcome, RunRef,
    RunStarted, RunnerMessage,
};
use muster_runner::identity;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use futures_util::{StreamExt, TryStreamExt};

use crate::harness::{Coordinator, JoinToken};

/// What the simulated runners saw, in the order they saw it.
#[derive(Debug)]
pub enum Seen {
    /// A lease arrived on a runner's stream at `at`.
    Leased { run_id: String, at: Instant },
    /// The coordinator acknowledged the run's result: the runner's slot is
    /// free again.
    Done { run_id: String },
    /// The coordinator refused something the runner said about a run.
    Refused,
    /// A runner's stream ended.
    Gone { error: String },
}

const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Simulated runners connected to one coordinator.
pub struct Fleet {
    events: mpsc::UnboundedReceiver<Seen>,
    /// Refusals seen so far (see [`Fleet::next`]).
    pub refused: usize,
    /// Wall time of enrolling every runner (see [`Fleet::connect_with`]).
    pub enroll_time: Duration,
    /// Wall time of opening every runner's stream, after enrollment.
    pub connect_time: Duration,
    stop: CancellationToken,
    _dirs: Vec<tempfile::TempDir>,
}

/// Enrollments and stream openings in flight at once by default.
pub const CONNECT_CONCURRENCY: usize = 16;

/// A simulated runner enrolled but not connected yet.
struct Enrolled {
    index: usize,
    config: muster_runner::Config,
    identity: identity::Identity,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Enrolls `count` runners of capacity 1 (one multi-use join token) and
    /// opens their streams, [`CONNECT_CONCURRENCY`] at a time; returns once
    /// the coordinator holds every one.
    pub async fn connect(coordinator: &Coordinator, count: usize) -> anyhow::Result<Fleet> {
        Self::connect_with(coordinator, count, CONNECT_CONCURRENCY).await
    }

    /// Like [`Fleet::connect`], with at most `concurrency` enrollments, then
    /// at most `concurrency` stream openings, in flight at once. Every
    /// runner is enrolled before the first stream opens, so the two phases
    /// are timed apart.
    pub async fn connect_with(
        coordinator: &Coordinator,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<Fleet> {
        let concurrency = concurrency.max(1);
        let join = coordinator.api.join_token(false).await?;
        let began = Instant::now();
        let enrolled: Vec<Enrolled> = futures_util::stream::iter(0..count)
            .map(|index| enroll(coordinator, &join, index))
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        let enroll_time = began.elapsed();

        let (events, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let began = Instant::now();
        let dirs: Vec<tempfile::TempDir> = futures_util::stream::iter(enrolled)
            .map(|runner| open(runner, events.clone(), stop.clone()))
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        Ok(Fleet {
            events: rx,
            refused: 0,
            enroll_time,
            connect_time: began.elapsed(),
            stop,
            _dirs: dirs,
        })
    }

    /// The next thing a runner saw, waiting at most `within`. Refusals are
    /// counted, not returned: a heartbeat that crosses a run's result names
    /// a run that has just ended, and the coordinator refuses it as
    /// expired, as it does for `muster-runner`. A refused result would show
    /// as a run never acknowledged.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<Seen> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Seen::Refused)) => self.refused += 1,
                Ok(Some(seen)) => return Ok(seen),
                Ok(None) => bail!("every simulated runner is gone"),
                Err(_) => bail!("no simulated runner heard anything within {within:?}"),
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Enrolls simulated runner `index` through the runner's own enrollment
/// code, in a data directory of its own.
async fn enroll(
    coordinator: &Coordinator,
    join: &JoinToken,
    index: usize,
) -> anyhow::Result<Enrolled> {
    let dir = tempfile::Builder::new()
        .prefix("muster-bench-sim-")
        .tempdir()?;
    let mut config = muster_runner::Config::for_tests(
        coordinator.grpc_url(),
        join.token.clone(),
        join.ca_cert_hash.clone(),
        dir.path().to_path_buf(),
    );
    config.name = Some(format!("sim-{index}"));
    config.executor = muster_runner::ExecutorChoice::Process;
    let identity = identity::load_or_enroll(&config)
        .await
        .with_context(|| format!("enrolling simulated runner {index}"))?;
    Ok(Enrolled {
        index,
        config,
        identity,
        dir,
    })
}

/// Opens an enrolled runner's mTLS stream, says Hello, and leaves a task
/// holding the stream; returns once the coordinator has registered it.
async fn open(
    runner: Enrolled,
    events: mpsc::UnboundedSender<Seen>,
    stop: CancellationToken,
) -> anyhow::Result<tempfile::TempDir> {
    let Enrolled {
        index,
        config,
        identity,
        dir,
    } = runner;
    let tls = identity::mutual_tls(&identity)?;
    let channel = identity::channel(&config, tls, &identity::server_name(&config)?).await?;
    let mut client = RunnerServiceClient::new(channel);
    let (outbox, outgoing) = mpsc::channel(64);
    outbox
        .send(message(runner_message::Kind::Hello(Hello {
            capacity: 1,
            labels: Default::default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            executors: vec!["process".into()],
            active: Vec::new(),
        })))
        .await
        .map_err(|_| anyhow!("the stream closed before Hello"))?;
    // The answer comes once the coordinator has registered the stream
    // with its dispatcher: from here on, the runner can get leases.
    let inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .with_context(|| format!("opening the stream of simulated runner {index}"))?
        .into_inner();
    tokio::spawn(hold(inbound, outbox, events, stop));
    Ok(dir)
}

fn message(kind: runner_message::Kind) -> RunnerMessage {
    RunnerMessage { kind: Some(kind) }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// SHA-256 (hex) of the empty log, the account a runner gives of a job that
/// printed nothing.
pub fn empty_log_sha256() -> String {
    hex::encode(Sha256::digest([]))
}

/// One runner's stream: answers leases, heartbeats while it holds runs.
async fn hold(
    mut inbound: tonic::Streaming<muster_proto::runner::v1::CoordinatorMessage>,
    outbox: mpsc::Sender<RunnerMessage>,
    events: mpsc::UnboundedSender<Seen>,
    stop: CancellationToken,
) {
    let empty_sha = empty_log_sha256();
    let mut held: HashSet<(String, u64)> = HashSet::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.tick().await;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            _ = heartbeat.tick() => {
                let active = held
                    .iter()
                    .map(|(run_id, token)| RunRef { run_id: run_id.clone(), fencing_token: *token })
                    .collect();
                let _ = outbox.send(message(runner_message::Kind::Heartbeat(Heartbeat { active }))).await;
                continue;
            }
            next = inbound.message() => next,
        };
        let kind = match next {
            Ok(Some(m)) => m.kind,
            Ok(None) => {
                let _ = events.send(Seen::Gone {
                    error: "the coordinator closed the stream".into(),
                });
                return;
            }
            Err(status) => {
                let _ = events.send(Seen::Gone {
                    error: format!("{}: {}", status.code(), status.message()),
                });
                return;
            }
        };
        match kind {
            Some(coordinator_message::Kind::Lease(lease)) => {
                let at = Instant::now();
                let _ = events.send(Seen::Leased {
                    run_id: lease.run_id.clone(),
                    at,
                });
                held.insert((lease.run_id.clone(), lease.fencing_token));
                let started = RunStarted {
                    run_id: lease.run_id.clone(),
                    fencing_token: lease.fencing_token,
                    executor: "process".into(),
                    image: String::new(),
                    image_digest: String::new(),
                    started_at_ms: now_ms(),
                };
                // No output: the log is empty, so its last seq is the base the
                // lease gave and its account is 0 bytes with the empty digest.
                let finished = RunFinished {
                    run_id: lease.run_id,
                    fencing_token: lease.fencing_token,
                    outcome: RunOutcome::Succeeded as i32,
                    exit_code: Some(0),
                    error: String::new(),
                    last_seq: lease.log_seq_base,
                    finished_at_ms: now_ms(),
                    log_bytes: 0,
                    log_sha256: empty_sha.clone(),
                };
                let _ = outbox
                    .send(message(runner_message::Kind::Started(started)))
                    .await;
                let _ = outbox
                    .send(message(runner_message::Kind::Finished(finished)))
                    .await;
            }
            Some(coordinator_message::Kind::FinishedAck(ack)) => {
                held.retain(|(run_id, _)| *run_id != ack.run_id);
                let _ = events.send(Seen::Done { run_id: ack.run_id });
            }
            Some(coordinator_message::Kind::Reject(reject)) => {
                held.retain(|(run_id, _)| *run_id != reject.run_id);
                let _ = events.send(Seen::Refused);
            }
            // Log acknowledgements (there is no log), cancels (nothing runs
            // long enough to cancel) and renewals (certificates are fresh).
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_empty_log_digest_is_sha256_of_nothing() {
        assert_eq!(
            super::empty_log_sha256(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
