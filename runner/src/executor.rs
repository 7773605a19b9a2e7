//! What runs a job: the [`Executor`] this runner chose at start, docker or
//! process, behind one interface, and what the two share: the errors, the
//! outcome, and when a job must be stopped (canceled, or its timeout passed).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use muster_common::bundle::{Bundle, Entry};
use muster_common::plan::JobPlan;
use tokio_util::sync::CancellationToken;

use crate::config::ExecutorChoice;
use crate::docker::DockerExecutor;
use crate::process::ProcessExecutor;
use crate::session::LogSink;

/// How long a stopped job gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the runner waits for the Docker daemon to answer at start.
const DOCKER_PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("image {image} is not on this host and could not be pulled: {reason}")]
    ImageUnavailable { image: String, reason: String },
    #[error("preparing the job: {0}")]
    Prepare(String),
    #[error("cannot start '{program}': {source}{}", spawn_hint(.source))]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for the job's process: {0}")]
    Wait(std::io::Error),
}

fn spawn_hint(error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::NotFound {
        " (is it installed and on the runner's PATH?)"
    } else {
        ""
    }
}

/// Why a job was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The coordinator canceled the run, or the runner's drain timeout passed.
    Canceled,
    /// The action's `timeout:` passed.
    TimedOut,
}

/// How a job that ran ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code, or 128 + the signal that ended the job.
    pub exit_code: i64,
    /// Set when the runner stopped the job.
    pub stopped: Option<Stop>,
}

/// Files a job left in its block's artifacts directory, collected before its
/// scratch directory or container is removed: `None` when there are none,
/// `Err` with the reason when they could not be read (the run's result
/// stands either way).
pub type Collected = Result<Option<Bundle>, String>;

/// Most bytes of artifacts a runner collects from one job; the coordinator
/// applies its own, usually smaller, limit.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// The artifacts among `found` (paths relative to the block's artifacts
/// directory): everything except files the workspace itself ships there
/// unchanged (an inventory, say).
pub fn artifacts_from(
    found: impl IntoIterator<Item = (String, Entry)>,
    bundle: &Bundle,
    block: &str,
) -> Collected {
    let shipped = format!("artifacts/blocks/{block}/");
    let mut bytes = 0u64;
    let mut kept = Vec::new();
    for (path, entry) in found {
        if bundle.get(&format!("{shipped}{path}")) == Some(&entry) {
            continue;
        }
        if let Entry::File { data, .. } = &entry {
            bytes += data.len() as u64;
        }
        if bytes > MAX_ARTIFACT_BYTES {
            return Err(format!(
                "the job's artifacts exceed {} MiB",
                MAX_ARTIFACT_BYTES >> 20
            ));
        }
        kept.push((path, entry));
    }
    if kept.is_empty() {
        return Ok(None);
    }
    Bundle::from_entries(kept)
        .map(Some)
        .map_err(|e| format!("the job's artifacts cannot be archived: {e}"))
}

/// What is left to tidy once a job's result is known: its scratch directory
/// or its container. The runner reports the result first and tidies after,
/// so neither the coordinator nor the next run waits for a directory tree or
/// a container to be removed. Dropped without [`Cleanup::run`] (the run's
/// task aborted), a scratch directory is still removed, synchronously.
#[must_use = "a job's scratch directory or container stays until its cleanup runs"]
pub struct Cleanup(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);

impl Cleanup {
    pub fn new(tidy: impl std::future::Future<Output = ()> + Send + 'static) -> Cleanup {
        Cleanup(Box::pin(tidy))
    }

    pub async fn run(self) {
        self.0.await;
    }
}

/// A job's end as an executor reports it: how it ended, its artifacts, and
/// what is left to tidy.
pub type Ran = (Outcome, Collected, Cleanup);

/// What the executor resolved before starting: which executor runs the job,
/// the image and its digest (empty for the process executor, which runs on
/// the host as it is), and a note for the run's log when the choice needs
/// explaining.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub executor: &'static str,
    pub image: String,
    pub image_digest: String,
    pub note: Option<String>,
}

/// The executor of this runner, chosen once at start.
pub enum Executor {
    Docker(DockerExecutor),
    Process(ProcessExecutor),
    /// `--executor auto` where the daemon answers: docker, and a local
    /// process for a job whose image is not on this host and cannot be
    /// pulled (a fresh machine that has Docker but not Muster's images).
    Auto(DockerExecutor, ProcessExecutor),
}

impl Executor {
    /// Picks the executor `choice` asks for. `auto` is docker when the
    /// daemon answers and process otherwise; `docker` fails when it does not
    /// answer, so a misconfigured host stops at start instead of failing runs.
    pub async fn select(
        choice: ExecutorChoice,
        default_image: &str,
        work_dir: &Path,
    ) -> anyhow::Result<Executor> {
        let process = || {
            ProcessExecutor::new(work_dir.to_path_buf(), STOP_GRACE)
                .with_context(|| format!("creating {}", work_dir.display()))
        };
        match choice {
            ExecutorChoice::Process => process().map(Executor::Process),
            ExecutorChoice::Docker => connect_docker(default_image)
                .await
                .map(Executor::Docker)
                .context("--executor docker: the Docker daemon does not answer (is it running, and may this user use its socket?)"),
            ExecutorChoice::Auto => match connect_docker(default_image).await {
                Ok(docker) => Ok(Executor::Auto(docker, process()?)),
                Err(error) => {
                    // A warning: jobs now run on this host itself, which
                    // whoever chose `auto` may not have expected
                    // (`--executor process` says it on purpose).
                    tracing::warn!(
                        error = %format!("{error:#}"),
                        "docker daemon not reachable; running jobs as local processes"
                    );
                    process().map(Executor::Process)
                }
            },
        }
    }

    /// The executors this runner runs jobs with, as the runner announces them.
    pub fn kinds(&self) -> Vec<String> {
        match self {
            Executor::Docker(_) => vec!["docker".into()],
            Executor::Process(_) => vec!["process".into()],
            Executor::Auto(..) => vec!["docker".into(), "process".into()],
        }
    }

    /// How long a stopped job gets between SIGTERM and SIGKILL.
    pub fn stop_grace(&self) -> Duration {
        match self {
            Executor::Docker(docker) | Executor::Auto(docker, _) => docker.stop_grace(),
            Executor::Process(process) => process.stop_grace(),
        }
    }

    /// Readies what the job needs before it starts (the docker executor
    /// pulls its image) and says which executor will run it.
    pub async fn prepare(&self, plan: &JobPlan) -> Result<Prepared, ExecError> {
        let process = Prepared {
            executor: "process",
            ..Prepared::default()
        };
        match self {
            Executor::Docker(docker) => docker.prepare(&docker.image_for(plan)).await,
            Executor::Process(_) => Ok(process),
            Executor::Auto(docker, _) => match docker.prepare(&docker.image_for(plan)).await {
                Err(error @ ExecError::ImageUnavailable { .. }) => Ok(Prepared {
                    note: Some(format!(
                        "{error}; running the job as a local process instead (--executor auto)"
                    )),
                    ..process
                }),
                other => other,
            },
        }
    }

    /// Runs the job to its end, streaming its output into `sink`; stops it
    /// when `cancel` fires or the plan's timeout passes.
    pub async fn run(
        &self,
        run_id: &str,
        prepared: &Prepared,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Ran, ExecError> {
        match (self, prepared.executor) {
            (Executor::Docker(docker), _) | (Executor::Auto(docker, _), "docker") => {
                docker
                    .run_collecting(run_id, &prepared.image, plan, bundle, sink, cancel)
                    .await
            }
            (Executor::Process(process), _) | (Executor::Auto(_, process), _) => {
                process
                    .run_collecting(run_id, plan, bundle, sink, cancel)
                    .await
            }
        }
    }
}

async fn connect_docker(default_image: &str) -> anyhow::Result<DockerExecutor> {
    // A DOCKER_HOST that drops packets would otherwise hold the start for
    // the client's own two-minute timeout.
    tokio::time::timeout(
        DOCKER_PING_TIMEOUT,
        DockerExecutor::connect(default_image.to_owned(), STOP_GRACE),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer within {} s", DOCKER_PING_TIMEOUT.as_secs()))?
    .map_err(anyhow::Error::from)
}

/// The action's timeout, if it has one.
pub fn timeout_of(plan: &JobPlan) -> Option<Duration> {
    plan.timeout_secs.map(Duration::from_secs)
}

/// Resolves when a running job must stop: `cancel` fired, or `timeout`
/// (counted from the call) passed. A cancel wins over a timeout that comes
/// at the same moment.
pub async fn stop_requested(cancel: &CancellationToken, timeout: Option<Duration>) -> Stop {
    let expiry = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Stop::Canceled,
        _ = expiry => Stop::TimedOut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_timeout_stops_and_a_cancel_wins() {
        let cancel = CancellationToken::new();
        let began = tokio::time::Instant::now();
        let stop = stop_requested(&cancel, Some(Duration::from_secs(30))).await;
        assert_eq!(stop, Stop::TimedOut);
        assert_eq!(began.elapsed(), Duration::from_secs(30));

        cancel.cancel();
        assert_eq!(
            stop_requested(&cancel, Some(Duration::ZERO)).await,
            Stop::Canceled
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_only_a_cancel_stops() {
        let cancel = CancellationToken::new();
        let canceler = {
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3600 * 24 * 365)).await;
                cancel.cancel();
            }
        };
        let (stop, ()) = tokio::join!(stop_requested(&cancel, None), canceler);
        assert_eq!(stop, Stop::Canceled);
    }

    #[test]
    fn a_missing_program_gets_a_hint() {
        let error = ExecError::Spawn {
            program: "ansible-playbook".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let text = error.to_string();
        assert!(
            text.starts_with("cannot start 'ansible-playbook': "),
            "{text}"
        );
        assert!(
            text.ends_with("(is it installed and on the runner's PATH?)"),
            "{text}"
        );
    }
}
