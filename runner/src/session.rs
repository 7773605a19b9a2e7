//! The runner's session with the coordinator: one stream, re-established with
//! backoff whenever it breaks. Everything the runner says about a run is
//! kept until the coordinator acknowledges it, and said again after a
//! reconnect, so logs and results survive network loss; the coordinator
//! drops duplicates by sequence number and fencing token.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use muster_proto::runner::v1::{
    coordinator_message, runner_message, Heartbeat, Hello, LogChunk, LogStream, RunRef,
    RunnerMessage,
};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;

/// Unacknowledged log bytes one run may hold before its output waits.
const MAX_UNACKED_BYTES: usize = 16 * 1024 * 1024;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    System,
}

struct Job {
    token: u64,
    started: Option<RunnerMessage>,
    unacked: VecDeque<(u64, RunnerMessage)>,
    unacked_bytes: usize,
    finished: Option<RunnerMessage>,
    cancel: CancellationToken,
}

/// What the runner has said and not yet had acknowledged, and the current
/// stream to say it on. One async lock orders every send, so a resend after
/// a reconnect always precedes newer messages.
#[derive(Default)]
pub struct Link {
    state: Mutex<LinkState>,
    acked: Notify,
}

#[derive(Default)]
struct LinkState {
    outbox: Option<mpsc::Sender<RunnerMessage>>,
    jobs: HashMap<String, Job>,
}

impl Link {
    pub async fn add_job(&self, run_id: &str, token: u64, cancel: CancellationToken) {
        let mut state = self.state.lock().await;
        state.jobs.insert(
            run_id.to_owned(),
            Job {
                token,
                started: None,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                finished: None,
                cancel,
            },
        );
    }

    pub async fn active(&self) -> Vec<RunRef> {
        let state = self.state.lock().await;
        state
            .jobs
            .iter()
            .map(|(id, job)| RunRef {
                run_id: id.clone(),
                fencing_token: job.token,
            })
            .collect()
    }

    pub async fn running_jobs(&self) -> usize {
        self.state
            .lock()
            .await
            .jobs
            .values()
            .filter(|j| j.finished.is_none())
            .count()
    }

    async fn send_locked(state: &mut LinkState, message: RunnerMessage) {
        if let Some(outbox) = &state.outbox {
            if outbox.send(message).await.is_err() {
                state.outbox = None;
            }
        }
    }

    /// Sends a message that is not kept (heartbeats).
    async fn send_unkept(&self, message: RunnerMessage) {
        let mut state = self.state.lock().await;
        Self::send_locked(&mut state, message).await;
    }

    async fn record(&self, run_id: &str, message: RunnerMessage, size: usize, seq: Option<u64>) {
        // Backpressure: a run whose unacknowledged log is at the bound waits
        // for acknowledgements instead of growing memory without limit.
        loop {
            let notified = self.acked.notified();
            {
                let mut state = self.state.lock().await;
                let Some(job) = state.jobs.get_mut(run_id) else {
                    return;
                };
                if seq.is_none()
                    || job.unacked_bytes + size <= MAX_UNACKED_BYTES
                    || job.unacked.is_empty()
                {
                    match (&message.kind, seq) {
                        (Some(runner_message::Kind::Started(_)), _) => {
                            job.started = Some(message.clone())
                        }
                        (Some(runner_message::Kind::Finished(_)), _) => {
                            job.finished = Some(message.clone())
                        }
                        (_, Some(seq)) => {
                            job.unacked.push_back((seq, message.clone()));
                            job.unacked_bytes += size;
                        }
                        _ => {}
                    }
                    Self::send_locked(&mut state, message).await;
                    return;
                }
            }
            notified.await;
        }
    }

    pub async fn send_started(&self, run_id: &str, message: RunnerMessage) {
        self.record(run_id, message, 0, None).await;
    }

    pub async fn send_finished(&self, run_id: &str, message: RunnerMessage) {
        self.record(run_id, message, 0, None).await;
    }

    async fn on_log_ack(&self, run_id: &str, acked: u64) {
        let mut state = self.state.lock().await;
        if let Some(job) = state.jobs.get_mut(run_id) {
            while job.unacked.front().is_some_and(|(seq, _)| *seq <= acked) {
                if let Some((_, m)) = job.unacked.pop_front() {
                    if let Some(runner_message::Kind::Log(chunk)) = m.kind {
                        job.unacked_bytes -= chunk.data.len();
                    }
                }
            }
        }
        drop(state);
        self.acked.notify_waiters();
    }

    async fn forget(&self, run_id: &str) {
        self.state.lock().await.jobs.remove(run_id);
        self.acked.notify_waiters();
    }

    async fn cancel(&self, run_id: &str, token: u64) {
        let state = self.state.lock().await;
        if let Some(job) = state.jobs.get(run_id).filter(|j| j.token == token) {
            job.cancel.cancel();
        }
    }

    /// Makes `outbox` the current stream and says again everything not
    /// acknowledged, in order.
    async fn attach(&self, outbox: mpsc::Sender<RunnerMessage>) {
        let mut state = self.state.lock().await;
        state.outbox = Some(outbox);
        let mut resend = Vec::new();
        for job in state.jobs.values() {
            resend.extend(job.started.clone());
            resend.extend(job.unacked.iter().map(|(_, m)| m.clone()));
            resend.extend(job.finished.clone());
        }
        for message in resend {
            Self::send_locked(&mut state, message).await;
        }
    }

    async fn detach(&self) {
        self.state.lock().await.outbox = None;
    }
}

/// Where a job writes its output: sequenced chunks on the link.
pub struct LogSink {
    run_id: String,
    token: u64,
    seq: AtomicU64,
    link: Arc<Link>,
}

impl LogSink {
    pub fn new(run_id: &str, token: u64, link: Arc<Link>) -> Self {
        LogSink {
            run_id: run_id.to_owned(),
            token,
            seq: AtomicU64::new(0),
            link,
        }
    }

    pub async fn write(&self, stream: Stream, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let size = data.len();
        let chunk = LogChunk {
            run_id: self.run_id.clone(),
            fencing_token: self.token,
            seq,
            stream: match stream {
                Stream::Stdout => LogStream::Stdout,
                Stream::Stderr => LogStream::Stderr,
                Stream::System => LogStream::System,
            } as i32,
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            data,
        };
        let message = RunnerMessage {
            kind: Some(runner_message::Kind::Log(chunk)),
        };
        self.link
            .record(&self.run_id, message, size, Some(seq))
            .await;
    }

    pub fn last_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }
}

/// What the session asks the runner to do.
pub enum Command {
    Lease(muster_proto::runner::v1::Lease),
}

/// Holds one stream until it breaks. Returns when the stream ends.
pub async fn hold_stream(
    client: &mut muster_proto::runner::v1::runner_service_client::RunnerServiceClient<
        tonic::transport::Channel,
    >,
    hello: Hello,
    link: &Arc<Link>,
    commands: &mpsc::Sender<Command>,
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let (outbox, rx) = mpsc::channel(1024);
    outbox
        .send(RunnerMessage {
            kind: Some(runner_message::Kind::Hello(hello)),
        })
        .await
        .map_err(|_| tonic::Status::internal("stream closed before Hello"))?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    link.attach(outbox).await;
    tracing::info!("connected to the coordinator");

    let heartbeat_link = link.clone();
    let heartbeat_stop = CancellationToken::new();
    let heartbeat_guard = heartbeat_stop.clone().drop_guard();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = heartbeat_stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            }
            let active = heartbeat_link.active().await;
            heartbeat_link
                .send_unkept(RunnerMessage {
                    kind: Some(runner_message::Kind::Heartbeat(Heartbeat { active })),
                })
                .await;
        }
    });

    let result = loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            m = inbound.message() => m,
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        match message.kind {
            Some(coordinator_message::Kind::Lease(lease)) => {
                // The job spawner is gone only when the runner stops.
                let spawned = commands.send(Command::Lease(lease)).await;
                if spawned.is_err() {
                    break Ok(());
                }
            }
            Some(coordinator_message::Kind::LogAck(ack)) => {
                link.on_log_ack(&ack.run_id, ack.acked_seq).await
            }
            Some(coordinator_message::Kind::FinishedAck(ack)) => link.forget(&ack.run_id).await,
            Some(coordinator_message::Kind::Cancel(cancel)) => {
                link.cancel(&cancel.run_id, cancel.fencing_token).await
            }
            Some(coordinator_message::Kind::Reject(reject)) => {
                tracing::warn!(run_id = %reject.run_id, reason = %reject.reason, "coordinator refused a message about a run; stopping it");
                link.cancel(&reject.run_id, reject.fencing_token).await;
                link.forget(&reject.run_id).await;
            }
            None => {}
        }
    };
    link.detach().await;
    drop(heartbeat_guard);
    result
}
