//! The runner's session with the coordinator: one stream, re-established with
//! backoff whenever it breaks. Everything the runner says about a run is
//! kept until the coordinator acknowledges it, and said again after a
//! reconnect, so logs and results survive network loss; the coordinator
//! drops duplicates by sequence number and fencing token. The stream also
//! carries certificate renewals: checked at connect and every hour.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use muster_proto::runner::v1::{
    coordinator_message, runner_message, Heartbeat, Hello, LogChunk, LogStream, RunRef,
    RunnerMessage,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::identity::IdentityFile;
use crate::metrics::Metrics;

/// Unacknowledged log bytes one run keeps in memory; past this they go to
/// its spill file (when the link has a spill directory).
const MEMORY_UNACKED_BYTES: usize = 8 * 1024 * 1024;
/// Unacknowledged log bytes one run may hold in all before its output waits
/// (with a spill directory; without one, the memory bound is the bound).
const SPILLED_UNACKED_BYTES: u64 = 1024 * 1024 * 1024;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How often a connected runner checks whether its certificate is due for
/// renewal (it checks at connect, too).
const RENEWAL_CHECK_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    System,
}

struct Job {
    token: u64,
    started: Option<RunnerMessage>,
    /// Log chunks not yet acknowledged, in seq order.
    unacked: VecDeque<(u64, Kept)>,
    /// Bytes of `unacked` held in memory.
    unacked_bytes: usize,
    /// The spill file, once the memory bound was reached.
    spill: Option<Spill>,
    finished: Option<RunnerMessage>,
    cancel: CancellationToken,
}

/// Where an unacknowledged chunk is kept.
enum Kept {
    Memory(RunnerMessage),
    /// Encoded in the spill file at this offset and length.
    Disk {
        offset: u64,
        len: usize,
        data_len: usize,
    },
}

/// A run's spill file: encoded messages appended past the memory bound,
/// read back to resend them; removed when the run is forgotten.
struct Spill {
    path: PathBuf,
    file: std::fs::File,
    end: u64,
    /// Data bytes of the chunks still unacknowledged in the file.
    pending: u64,
}

impl Spill {
    fn open(dir: &Path, run_id: &str) -> std::io::Result<Spill> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{run_id}.spill"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(Spill {
            path,
            file,
            end: 0,
            pending: 0,
        })
    }

    fn append(&mut self, message: &RunnerMessage, data_len: usize) -> std::io::Result<Kept> {
        use std::io::{Seek, SeekFrom, Write};
        let bytes = message.encode_to_vec();
        self.file.seek(SeekFrom::Start(self.end))?;
        self.file.write_all(&bytes)?;
        let kept = Kept::Disk {
            offset: self.end,
            len: bytes.len(),
            data_len,
        };
        self.end += bytes.len() as u64;
        self.pending += data_len as u64;
        Ok(kept)
    }

    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<RunnerMessage> {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = vec![0; len];
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(&mut bytes)?;
        RunnerMessage::decode(bytes.as_slice())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the runner has said and not yet had acknowledged, and the current
/// stream to say it on. One async lock orders every send, so a resend after
/// a reconnect always precedes newer messages.
#[derive(Default)]
pub struct Link {
    state: Mutex<LinkState>,
    acked: Notify,
    /// Where runs spill unacknowledged log chunks past the memory bound.
    spill_dir: Option<PathBuf>,
    /// The memory bound per run (tests make it small).
    memory_bound: Option<usize>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct LinkState {
    outbox: Option<mpsc::Sender<RunnerMessage>>,
    jobs: HashMap<String, Job>,
}

impl Link {
    /// A link whose runs spill unacknowledged log chunks to files in `dir`
    /// once they hold `memory_bound` bytes (default 8 MiB) in memory, so a
    /// long disconnection costs disk, not memory, up to 1 GiB a run.
    pub fn with_spill_dir(dir: PathBuf, memory_bound: Option<usize>) -> Link {
        // Spill files of a runner that crashed are of runs it no longer has.
        let _ = std::fs::remove_dir_all(&dir);
        Link {
            spill_dir: Some(dir),
            memory_bound,
            ..Link::default()
        }
    }

    /// The runner's metrics, which the link and the jobs on it keep.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn memory_bound(&self) -> usize {
        self.memory_bound.unwrap_or(MEMORY_UNACKED_BYTES)
    }

    pub async fn add_job(&self, run_id: &str, token: u64, cancel: CancellationToken) {
        let mut state = self.state.lock().await;
        state.jobs.insert(
            run_id.to_owned(),
            Job {
                token,
                started: None,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                spill: None,
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

    /// Sends a message that is not kept (heartbeats, drain notices).
    pub(crate) async fn send_unkept(&self, message: RunnerMessage) {
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
                let spilled = job.spill.as_ref().map_or(0, |s| s.pending);
                let fits_memory = job.unacked_bytes + size <= self.memory_bound();
                let fits_disk =
                    self.spill_dir.is_some() && spilled + size as u64 <= SPILLED_UNACKED_BYTES;
                if seq.is_none() || fits_memory || fits_disk || job.unacked.is_empty() {
                    match (&message.kind, seq) {
                        (Some(runner_message::Kind::Started(_)), _) => {
                            job.started = Some(message.clone())
                        }
                        (Some(runner_message::Kind::Finished(_)), _) => {
                            job.finished = Some(message.clone())
                        }
                        (_, Some(seq)) => {
                            let kept = if fits_memory || !fits_disk {
                                None
                            } else {
                                self.spill(run_id, job, &message, size)
                            };
                            match kept {
                                Some(kept) => job.unacked.push_back((seq, kept)),
                                None => {
                                    job.unacked.push_back((seq, Kept::Memory(message.clone())));
                                    job.unacked_bytes += size;
                                }
                            }
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

    /// Appends a chunk to the run's spill file; `None` keeps it in memory
    /// (no spill directory, or the file cannot be written: memory is the
    /// fallback, and the bound then holds the output back).
    fn spill(
        &self,
        run_id: &str,
        job: &mut Job,
        message: &RunnerMessage,
        size: usize,
    ) -> Option<Kept> {
        let dir = self.spill_dir.as_ref()?;
        if job.spill.is_none() {
            match Spill::open(dir, run_id) {
                Ok(spill) => job.spill = Some(spill),
                Err(error) => {
                    tracing::warn!(run_id, %error, "cannot spill unacknowledged log to disk");
                    return None;
                }
            }
        }
        let spill = job.spill.as_mut()?;
        match spill.append(message, size) {
            Ok(kept) => {
                self.metrics.log_spilled(size);
                Some(kept)
            }
            Err(error) => {
                tracing::warn!(run_id, %error, "cannot spill unacknowledged log to disk");
                None
            }
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
                match job.unacked.pop_front() {
                    Some((_, Kept::Memory(m))) => {
                        if let Some(runner_message::Kind::Log(chunk)) = m.kind {
                            job.unacked_bytes -= chunk.data.len();
                        }
                    }
                    Some((_, Kept::Disk { data_len, .. })) => {
                        if let Some(spill) = &mut job.spill {
                            spill.pending -= data_len as u64;
                        }
                    }
                    None => {}
                }
            }
            // Everything spilled is acknowledged: the file goes.
            if job.spill.as_ref().is_some_and(|s| s.pending == 0) {
                job.spill = None;
            }
        }
        drop(state);
        self.acked.notify_waiters();
    }

    pub(crate) async fn forget(&self, run_id: &str) {
        self.state.lock().await.jobs.remove(run_id);
        self.acked.notify_waiters();
    }

    async fn cancel(&self, run_id: &str, token: u64) {
        let state = self.state.lock().await;
        if let Some(job) = state.jobs.get(run_id).filter(|j| j.token == token) {
            job.cancel.cancel();
        }
    }

    /// Waits until the coordinator has acknowledged everything said about
    /// every run (each run's finish acknowledged, and so forgotten), for at
    /// most `within`. Returns whether it has.
    pub async fn wait_settled(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Created before the check, so an acknowledgement in between is
            // not missed.
            let notified = self.acked.notified();
            if self.state.lock().await.jobs.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Runs the coordinator has not yet acknowledged as finished.
    pub async fn unsettled(&self) -> usize {
        self.state.lock().await.jobs.len()
    }

    /// Makes `outbox` the current stream and says again everything not
    /// acknowledged, in order. The session calls it on each new stream; an
    /// embedder or a test can attach a channel of its own to see what the
    /// runner says.
    pub async fn attach(&self, outbox: mpsc::Sender<RunnerMessage>) {
        let mut state = self.state.lock().await;
        state.outbox = Some(outbox);
        self.metrics.stream_opened();
        let mut resend = Vec::new();
        for (run_id, job) in state.jobs.iter_mut() {
            resend.extend(job.started.clone());
            for (_, kept) in &job.unacked {
                match kept {
                    Kept::Memory(m) => resend.push(m.clone()),
                    Kept::Disk { offset, len, .. } => {
                        match job.spill.as_mut().map(|s| s.read(*offset, *len)) {
                            Some(Ok(m)) => resend.push(m),
                            Some(Err(error)) => {
                                tracing::error!(run_id, %error, "a spilled log chunk cannot be read back; the coordinator will find the log incomplete")
                            }
                            None => {}
                        }
                    }
                }
            }
            resend.extend(job.finished.clone());
        }
        for message in resend {
            Self::send_locked(&mut state, message).await;
        }
    }

    async fn detach(&self) {
        self.state.lock().await.outbox = None;
        self.metrics.stream_closed();
    }
}

/// Where a job writes its output: sequenced chunks on the link.
pub struct LogSink {
    run_id: String,
    token: u64,
    written: std::sync::Mutex<Written>,
    link: Arc<Link>,
}

/// What a sink has numbered so far; seq and digest move together, so the
/// digest is over the chunks in seq order.
struct Written {
    seq: u64,
    bytes: u64,
    digest: Sha256,
}

impl LogSink {
    pub fn new(run_id: &str, token: u64, link: Arc<Link>) -> Self {
        Self::continuing(run_id, token, 0, link)
    }

    /// A sink whose first chunk is `after_seq + 1`: a further attempt of a
    /// run continues the log its earlier attempts wrote.
    pub fn continuing(run_id: &str, token: u64, after_seq: u64, link: Arc<Link>) -> Self {
        LogSink {
            run_id: run_id.to_owned(),
            token,
            written: std::sync::Mutex::new(Written {
                seq: after_seq,
                bytes: 0,
                digest: Sha256::new(),
            }),
            link,
        }
    }

    pub async fn write(&self, stream: Stream, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let seq = {
            let mut written = self.written.lock().expect("sink lock");
            written.seq += 1;
            written.bytes += data.len() as u64;
            written.digest.update(&data);
            written.seq
        };
        let size = data.len();
        self.link.metrics.log_sent(size);
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
        self.written.lock().expect("sink lock").seq
    }

    /// Bytes written and their SHA-256 (hex), in seq order.
    pub fn digest(&self) -> (u64, String) {
        let written = self.written.lock().expect("sink lock");
        (
            written.bytes,
            hex::encode(written.digest.clone().finalize()),
        )
    }
}

/// Asks the coordinator for a new certificate once the current one has less
/// than a third of its validity left. An answer that never comes costs
/// nothing: the runner asks again at its next connection or check.
async fn ask_for_renewal_if_due(identity: &IdentityFile, link: &Link) {
    if !identity.renewal_due(chrono::Utc::now()) {
        return;
    }
    match identity.renewal_request() {
        Ok(request) => {
            tracing::info!("asking the coordinator to renew the runner certificate");
            link.send_unkept(RunnerMessage {
                kind: Some(runner_message::Kind::RenewCertificate(request)),
            })
            .await;
        }
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "could not make a certificate signing request")
        }
    }
}

/// What the session asks the runner to do.
pub enum Command {
    Lease(muster_proto::runner::v1::Lease),
}

/// Holds one stream until it breaks or `stop` fires. Returns when the
/// stream ends.
pub async fn hold_stream(
    client: &mut muster_proto::runner::v1::runner_service_client::RunnerServiceClient<
        tonic::transport::Channel,
    >,
    hello: Hello,
    link: &Arc<Link>,
    commands: &mpsc::Sender<Command>,
    identity: &Arc<IdentityFile>,
    stop: &CancellationToken,
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

    // The first tick is at once: the check at connect.
    let mut renewal_check = tokio::time::interval(RENEWAL_CHECK_EVERY);
    renewal_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = renewal_check.tick() => {
                ask_for_renewal_if_due(identity, link).await;
                continue;
            }
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
            Some(coordinator_message::Kind::CertificateRenewed(answer)) => {
                let identity = identity.clone();
                match tokio::task::spawn_blocking(move || identity.renewed(&answer)).await {
                    Ok(Ok(())) => {
                        tracing::info!("runner certificate renewed; the next connection uses it")
                    }
                    Ok(Err(error)) => tracing::warn!(
                        error = %format!("{error:#}"),
                        "kept the current certificate: the renewed one is unusable"
                    ),
                    Err(error) => tracing::warn!(%error, "storing the renewed certificate failed"),
                }
            }
            Some(coordinator_message::Kind::Reject(reject)) => {
                tracing::warn!(run_id = %reject.run_id, reason = %reject.reason, "coordinator refused a message about a run; stopping it");
                link.metrics.lease_rejected();
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

#[cfg(test)]
mod spill_tests {
    use super::*;

    fn chunk_data(seq: u64) -> Vec<u8> {
        format!("{seq:05} {}\n", "x".repeat(1000)).into_bytes()
    }

    fn logged(messages: &[RunnerMessage]) -> Vec<(u64, Vec<u8>)> {
        messages
            .iter()
            .filter_map(|m| match &m.kind {
                Some(runner_message::Kind::Log(c)) => Some((c.seq, c.data.clone())),
                _ => None,
            })
            .collect()
    }

    /// Disconnected, a run's log goes to disk past the memory bound; on
    /// reconnect every chunk is said again, in order and intact; once all
    /// is acknowledged the spill file is gone.
    #[tokio::test]
    async fn unacknowledged_log_spills_to_disk_and_is_resent_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spill_dir = dir.path().join("spill");
        let link = Arc::new(Link::with_spill_dir(spill_dir.clone(), Some(10 * 1024)));
        link.add_job("run-1", 7, CancellationToken::new()).await;
        let sink = LogSink::new("run-1", 7, link.clone());
        for seq in 1..=100 {
            sink.write(Stream::Stdout, chunk_data(seq)).await;
        }
        {
            let state = link.state.lock().await;
            let job = &state.jobs["run-1"];
            assert!(job.unacked_bytes <= 10 * 1024, "memory stays bounded");
            assert_eq!(job.unacked.len(), 100);
        }
        let file = spill_dir.join("run-1.spill");
        assert!(
            file.metadata().unwrap().len() > 80 * 1000,
            "the rest is on disk"
        );
        let metrics = link.metrics().render().unwrap();
        for line in [
            "muster_runner_log_sent_bytes_total 100700",
            "muster_runner_log_spilled_bytes_total 90630",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }

        let (tx, mut rx) = mpsc::channel(1000);
        link.attach(tx).await;
        let mut resent = Vec::new();
        while let Ok(m) = rx.try_recv() {
            resent.push(m);
        }
        let expected: Vec<(u64, Vec<u8>)> = (1..=100).map(|s| (s, chunk_data(s))).collect();
        assert_eq!(logged(&resent), expected);

        link.on_log_ack("run-1", 50).await;
        assert!(file.exists(), "chunks 51-100 still need the file");
        link.on_log_ack("run-1", 100).await;
        assert!(!file.exists(), "all acknowledged: the spill file is gone");
    }

    #[test]
    fn a_restarted_runner_clears_spill_files_of_runs_it_no_longer_has() {
        let dir = tempfile::tempdir().unwrap();
        let spill_dir = dir.path().join("spill");
        std::fs::create_dir_all(&spill_dir).unwrap();
        std::fs::write(spill_dir.join("old.spill"), b"stale").unwrap();
        let _link = Link::with_spill_dir(spill_dir.clone(), None);
        assert!(!spill_dir.join("old.spill").exists());
    }
}
