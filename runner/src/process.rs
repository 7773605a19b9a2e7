//! The process executor, for hosts without Docker: the docker executor's
//! contract kept with a child process instead of a container.
//!
//! Each run gets a scratch directory `<work_dir>/<run_id>/` holding the
//! unpacked bundle as the workspace root (`workspace/`), the vars file
//! beside it (outside the workspace, as in the container), and the job's
//! `home/` and `tmp/`. The job gets a clean environment, not the runner's
//! (which may hold its join token): `PATH`, `LANG` and `LC_ALL` from the
//! runner, `HOME` and `TMPDIR` in the scratch directory (so one run leaves
//! nothing for the next, as a fresh container would), then the plan's
//! variables (the workspace's `extraenv` may override any of those), and
//! last `IN_CONTAINER=false` and `MUSTER_RUN_ID`.
//!
//! The job runs in a process group of its own. Stopping it (cancel or
//! timeout) sends SIGTERM to the whole group, then SIGKILL after the grace;
//! when the job's main process ends by itself, whatever it left running in
//! its group is stopped the same way, as a container's processes end with
//! its main process. The executor returns only once the group is gone, and
//! removes the scratch directory whatever happened.
//!
//! What it does not give: isolation. The job runs as the runner's user with
//! that user's view of the host, and a process that leaves its group
//! (`setsid`, a daemon that double-forks) escapes the stop; only a
//! container or a cgroup could hold it. Its output is read for at most two
//! seconds once the group is gone.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use muster_common::bundle::Bundle;
use muster_common::plan::JobPlan;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::executor::{
    artifacts_from, stop_requested, timeout_of, Cleanup, Collected, ExecError, Outcome, Ran,
};
use crate::session::{LogSink, Stream};

/// The workspace root inside a run's scratch directory.
pub const WORKSPACE_DIR: &str = "workspace";
/// The vars file inside a run's scratch directory.
pub const VARS_FILE: &str = "vars.json";
/// The job's process group id, in its scratch directory, so a runner
/// restarted after a crash can stop what the crashed one left running.
const PGID_FILE: &str = "job.pgid";
const HOME_DIR: &str = "home";
const TMP_DIR: &str = "tmp";
/// `PATH` for the job when the runner has none.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often the executor looks whether a stopped group is gone.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long a group may take to vanish after SIGKILL (a process stuck in
/// uninterruptible sleep) before the executor stops waiting for it.
const KILL_WAIT: Duration = Duration::from_secs(30);
/// After the group is gone, how long output is still read from pipes that a
/// process which left the group (`setsid`) keeps open.
const OUTPUT_LINGER: Duration = Duration::from_secs(2);
const READ_BUFFER: usize = 16 * 1024;

/// Runs jobs as child processes in scratch directories below `work_dir`.
pub struct ProcessExecutor {
    work_dir: PathBuf,
    grace: Duration,
}

impl ProcessExecutor {
    /// An executor keeping its scratch directories below `work_dir` (created
    /// if absent, mode 0700: the vars files hold the run's configuration). A
    /// stopped job's group gets `grace` between SIGTERM and SIGKILL.
    pub fn new(work_dir: PathBuf, grace: Duration) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work_dir)?;
        // Jobs see their paths (POLYCRATE_WORKSPACE, vars) absolute, whatever
        // the runner's --data-dir was.
        let work_dir = std::path::absolute(&work_dir)?;
        Ok(ProcessExecutor { work_dir, grace })
    }

    pub fn stop_grace(&self) -> Duration {
        self.grace
    }

    /// The scratch directory of run `run_id` (it exists only while the run
    /// executes).
    pub fn scratch_dir(&self, run_id: &str) -> PathBuf {
        self.work_dir.join(run_id)
    }

    /// Runs the job to its end, streaming its output into `sink`; stops its
    /// process group when `cancel` fires or the plan's timeout passes.
    pub async fn run(
        &self,
        run_id: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Outcome, ExecError> {
        let (outcome, _, cleanup) = self
            .run_collecting(run_id, plan, bundle, sink, cancel)
            .await?;
        cleanup.run().await;
        Ok(outcome)
    }

    /// [`ProcessExecutor::run`], also collecting the job's artifacts, and
    /// leaving the scratch directory's removal to the caller.
    pub async fn run_collecting(
        &self,
        run_id: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Ran, ExecError> {
        let valid_id = !run_id.is_empty()
            && run_id.len() <= 128
            && run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_id {
            return Err(ExecError::Prepare(format!(
                "run id '{run_id}' cannot name a directory: expected letters, digits, '-' and '_'"
            )));
        }
        let scratch = Scratch::create(self.scratch_dir(run_id)).await?;
        let result = self
            .run_in(scratch.path(), run_id, plan, bundle, sink, cancel)
            .await;
        match result {
            Ok(outcome) => {
                let collected = collect(scratch.path(), plan, bundle).await;
                Ok((outcome, collected, Cleanup::new(scratch.remove())))
            }
            Err(error) => {
                scratch.remove().await;
                Err(error)
            }
        }
    }

    async fn run_in(
        &self,
        scratch: &Path,
        run_id: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Outcome, ExecError> {
        for (what, rel) in [("workdir", &plan.workdir), ("block", &plan.block)] {
            if !is_relative_inside(rel) {
                return Err(ExecError::Prepare(format!(
                    "the plan's {what} '{rel}' is not a relative path inside the workspace"
                )));
            }
        }
        let root = scratch.join(WORKSPACE_DIR);
        let vars_file = scratch.join(VARS_FILE);
        let (Some(root_str), Some(vars_str)) = (root.to_str(), vars_file.to_str()) else {
            return Err(ExecError::Prepare(format!(
                "the runner's work directory {} is not valid UTF-8",
                scratch.display()
            )));
        };
        let vars = serde_json::to_vec_pretty(&plan.vars_for(root_str))
            .map_err(|e| ExecError::Prepare(format!("writing the vars file: {e}")))?;
        let artifacts = root.join("artifacts/blocks").join(&plan.block);
        {
            let bundle = bundle.clone();
            let (scratch, root) = (scratch.to_path_buf(), root.clone());
            let vars_file = vars_file.clone();
            tokio::task::spawn_blocking(move || {
                lay_out(&scratch, &root, &bundle, &vars_file, &vars, &artifacts)
            })
            .await
            .map_err(|e| ExecError::Prepare(e.to_string()))??;
        }

        let mut env = base_environment(scratch);
        env.extend(
            plan.environment(root_str)
                .into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        env.insert("IN_CONTAINER".into(), "false".into());
        env.insert("MUSTER_RUN_ID".into(), run_id.into());

        let argv = plan.argv(root_str, vars_str);
        let Some((program, args)) = argv.split_first() else {
            return Err(ExecError::Prepare("the plan has an empty command".into()));
        };
        let working_dir = PathBuf::from(plan.working_dir(root_str));
        // Found here rather than by the child: given a path, the standard
        // library starts the job with posix_spawn (a vfork), not a fork that
        // copies the runner's page tables and then tries every PATH entry.
        let executable = find_on_path(program, env.get(OsStr::new("PATH")), &working_dir);
        let mut command = tokio::process::Command::new(executable);
        command
            .arg0(program)
            .args(args)
            .current_dir(&working_dir)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so the job and everything it starts can be
            // signalled together, and a Ctrl-C at the runner's terminal
            // reaches the runner only, which then drains.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| ExecError::Spawn {
            program: program.clone(),
            source,
        })?;
        let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            return Err(ExecError::Prepare(
                "the job's process has no id right after it started".into(),
            ));
        };
        let mut group = Group {
            pgid: Pid::from_raw(pid),
            gone: false,
        };
        if let Err(error) = tokio::fs::write(scratch.join(PGID_FILE), pid.to_string()).await {
            tracing::warn!(run_id, %error, "could not record the job's process group");
        }

        let (tx, rx) = mpsc::channel::<(Stream, Bytes)>(16);
        let mut readers: Vec<JoinHandle<()>> = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_pipe(stdout, Stream::Stdout, tx.clone())));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(read_pipe(stderr, Stream::Stderr, tx)));
        }

        let pump = crate::output::forward(tokio_stream::wrappers::ReceiverStream::new(rx), sink);
        let supervise = async {
            let result = self
                .supervise(&mut child, &mut group, &cancel, timeout_of(plan))
                .await;
            // The readers end at EOF, once every process holding the pipes
            // is gone; one that left the group may hold them for ever.
            let linger = tokio::time::timeout(OUTPUT_LINGER, async {
                for reader in &mut readers {
                    let _ = reader.await;
                }
            })
            .await;
            if linger.is_err() {
                tracing::warn!(
                    run_id,
                    "a process that left the job's process group still holds its output; not reading it further"
                );
                for reader in &readers {
                    reader.abort();
                }
            }
            result
        };
        let ((), result) = tokio::join!(pump, supervise);
        let (status, stopped) = result?;
        Ok(Outcome {
            exit_code: exit_code(status),
            stopped,
        })
    }

    /// Waits for the job's main process, stopping the group if `cancel`
    /// fires or `timeout` passes, then makes sure the rest of the group is
    /// gone too.
    async fn supervise(
        &self,
        child: &mut Child,
        group: &mut Group,
        cancel: &CancellationToken,
        timeout: Option<Duration>,
    ) -> Result<(ExitStatus, Option<crate::executor::Stop>), ExecError> {
        let mut stopped = None;
        let exited = tokio::select! {
            status = child.wait() => Some(status.map_err(ExecError::Wait)?),
            reason = stop_requested(cancel, timeout) => {
                stopped = Some(reason);
                None
            }
        };
        // Either way the rest of the group goes: all of it when stopped,
        // what the main process left behind when it ended by itself.
        self.terminate(group, child).await;
        let status = match exited {
            Some(status) => status,
            // Reaped already unless it survived SIGKILL; then do not hang.
            None => tokio::time::timeout(KILL_WAIT, child.wait())
                .await
                .map_err(|_| {
                    ExecError::Wait(io::Error::other("the job's process survives SIGKILL"))
                })?
                .map_err(ExecError::Wait)?,
        };
        Ok((status, stopped))
    }

    /// SIGTERM to the group, the grace, SIGKILL; returns once the group is
    /// gone (or [`KILL_WAIT`] after SIGKILL).
    async fn terminate(&self, group: &mut Group, child: &mut Child) {
        if group.wait_gone(child, Duration::ZERO).await {
            return;
        }
        group.signal(Signal::SIGTERM);
        if group.wait_gone(child, self.grace).await {
            return;
        }
        group.signal(Signal::SIGKILL);
        if !group.wait_gone(child, KILL_WAIT).await {
            tracing::warn!(
                pgid = group.pgid.as_raw(),
                "processes of the job survive SIGKILL; leaving them"
            );
        }
    }
}

/// The job's process group. Killed with SIGKILL if dropped while it may
/// still exist (the run's task was aborted), so no job outlives its run.
struct Group {
    pgid: Pid,
    gone: bool,
}

impl Group {
    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => tracing::warn!(
                pgid = self.pgid.as_raw(),
                signal = signal.as_str(),
                %error,
                "signalling the job's process group failed"
            ),
        }
    }

    /// Whether the group is gone, looking until `within` has passed. Reaps
    /// the main process when it has exited, so it does not linger as our
    /// zombie.
    async fn wait_gone(&mut self, child: &mut Child, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let _ = child.try_wait();
            let pgid = self.pgid;
            let alive = tokio::task::spawn_blocking(move || group_alive(pgid))
                .await
                .unwrap_or(true);
            if !alive {
                self.gone = true;
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.gone {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Whether process group `pgid` has a member that is not a zombie. `kill`
/// counts zombies, and a killed job's orphans are zombies until init reaps
/// them, so on Linux the members' states are read from /proc.
fn group_alive(pgid: Pid) -> bool {
    // Any other answer (EPERM: a member this user may not signal) means a
    // member exists.
    if let Err(Errno::ESRCH) = killpg(pgid, None) {
        return false;
    }
    live_members(pgid).is_none_or(|members| !members.is_empty())
}

/// The members of process group `pgid` that are not zombies, from /proc;
/// `None` where /proc cannot tell.
fn live_members(pgid: Pid) -> Option<Vec<i32>> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let mut seen_any = false;
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        seen_any = true;
        if let Some((state, pgrp)) = state_and_group(&stat) {
            if pgrp == pgid.as_raw() && state != 'Z' && state != 'X' {
                members.push(pid);
            }
        }
    }
    // A /proc that lists nothing readable is not a proof of absence.
    seen_any.then_some(members)
}

/// Whether the environment process `pid` started with holds `entry`.
fn started_with_env(pid: i32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()))
        .unwrap_or(false)
}

/// Stops, with SIGKILL, the job a crashed runner process left running from
/// `scratch` (the run is lost already). The group id is trusted only while
/// one of its members still carries the run's `MUSTER_RUN_ID`: after a
/// reboot or a long time the id may belong to someone else.
fn stop_leftover_job(scratch: &Path, run_id: &str) {
    let Some(pgid) = std::fs::read_to_string(scratch.join(PGID_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|pgid| *pgid > 1)
        .map(Pid::from_raw)
    else {
        return;
    };
    let marker = format!("MUSTER_RUN_ID={run_id}");
    let ours = live_members(pgid)
        .unwrap_or_default()
        .into_iter()
        .any(|pid| started_with_env(pid, &marker));
    if !ours {
        return;
    }
    tracing::warn!(
        run_id,
        pgid = pgid.as_raw(),
        "stopping the processes of a run a previous runner process left running"
    );
    let _ = killpg(pgid, Signal::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while group_alive(pgid) && std::time::Instant::now() < deadline {
        std::thread::sleep(POLL_EVERY);
    }
}

/// The state letter and the process group of a `/proc/<pid>/stat` line:
/// `pid (comm) state ppid pgrp …`, where comm may hold spaces and ')'.
fn state_and_group(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

async fn read_pipe(
    mut pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tx: mpsc::Sender<(Stream, Bytes)>,
) {
    let mut buffer = vec![0u8; READ_BUFFER];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) => return,
            Ok(n) => {
                if tx
                    .send((stream, Bytes::copy_from_slice(&buffer[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(%error, "reading the job's output failed");
                return;
            }
        }
    }
}

/// Where `execvp` would find `program`: itself when it names a path, else
/// the first executable file of that name in a `PATH` entry (relative
/// entries taken from `cwd`, the job's directory). Unfound, the bare name,
/// so that starting it fails with "not found" as it would have.
fn find_on_path(program: &str, path: Option<&OsString>, cwd: &Path) -> PathBuf {
    if program.contains('/') || program.is_empty() {
        return PathBuf::from(program);
    }
    let Some(path) = path else {
        return PathBuf::from(program);
    };
    for dir in std::env::split_paths(path) {
        let candidate = cwd.join(dir).join(program);
        let executable = candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            return candidate;
        }
    }
    PathBuf::from(program)
}

/// The exit code, or 128 + the signal, as a shell and Docker report it.
fn exit_code(status: ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(signal)) => 128 + i64::from(signal),
        (None, None) => -1,
    }
}

/// What the job starts from: nothing of the runner's environment but
/// `PATH`, `LANG` and `LC_ALL`; `HOME` and `TMPDIR` in the scratch directory.
fn base_environment(scratch: &Path) -> BTreeMap<OsString, OsString> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".into(),
        std::env::var_os("PATH")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| FALLBACK_PATH.into()),
    );
    env.insert(
        "LANG".into(),
        std::env::var_os("LANG")
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "C.UTF-8".into()),
    );
    if let Some(all) = std::env::var_os("LC_ALL").filter(|l| !l.is_empty()) {
        env.insert("LC_ALL".into(), all);
    }
    env.insert("HOME".into(), scratch.join(HOME_DIR).into_os_string());
    env.insert("TMPDIR".into(), scratch.join(TMP_DIR).into_os_string());
    env
}

/// Unpacks the bundle and writes what the job expects around it.
fn lay_out(
    scratch: &Path,
    root: &Path,
    bundle: &Bundle,
    vars_file: &Path,
    vars: &[u8],
    artifacts: &Path,
) -> Result<(), ExecError> {
    let io_err = |what: &Path| {
        let what = what.display().to_string();
        move |e: io::Error| ExecError::Prepare(format!("{what}: {e}"))
    };
    for dir in [root, &scratch.join(HOME_DIR), &scratch.join(TMP_DIR)] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    bundle
        .unpack_into(root)
        .map_err(|e| ExecError::Prepare(format!("unpacking the bundle: {e}")))?;
    std::fs::create_dir_all(artifacts).map_err(io_err(artifacts))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(vars_file)
        .map_err(io_err(vars_file))?;
    io::Write::write_all(&mut file, vars).map_err(io_err(vars_file))?;
    Ok(())
}

/// A path the plan names below the workspace root: relative, and never
/// climbing out with `..`.
fn is_relative_inside(path: &str) -> bool {
    !path.starts_with('/') && !path.split('/').any(|c| c == "..")
}

/// A run's scratch directory, removed by [`Scratch::remove`], or on drop if
/// the run's task was aborted before.
struct Scratch {
    path: PathBuf,
    removed: bool,
}

impl Scratch {
    async fn create(path: PathBuf) -> Result<Scratch, ExecError> {
        let at = path.clone();
        tokio::task::spawn_blocking(move || {
            // A directory of the same run left by a runner that died is
            // stale: start clean rather than mix the two.
            if at.symlink_metadata().is_ok() {
                remove_all(&at)?;
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&at)
        })
        .await
        .map_err(|e| ExecError::Prepare(e.to_string()))?
        .map_err(|e| ExecError::Prepare(format!("{}: {e}", path.display())))?;
        Ok(Scratch {
            path,
            removed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    async fn remove(mut self) {
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || remove_all(&path)).await;
        self.removed = true;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                path = %self.path.display(),
                %error,
                "could not remove the run's scratch directory"
            ),
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "could not remove the run's scratch directory")
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.removed {
            let _ = remove_all(&self.path);
        }
    }
}

/// Removes `path` and everything below it, even directories the job made
/// read-only.
fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
    }
}

fn make_writable(path: &Path) {
    let Ok(meta) = path.symlink_metadata() else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

/// The file that marks a directory as a runner's work directory; held
/// locked while the runner runs.
pub const WORK_MARKER: &str = ".muster-work";

/// Takes `work_dir` for this runner process: makes it if needed, refuses a
/// directory it was given that holds files no runner put there (its
/// contents are removed at start, so `--work-dir /tmp` must not be taken),
/// and locks its marker so that a second runner process given the same
/// directory fails at start instead of removing the first one's runs. The
/// lock lasts as long as the returned file is open. `made_by_runner`: the
/// default inside the data directory, the runner's own whatever it holds.
pub fn claim_work_dir(work_dir: &Path, made_by_runner: bool) -> Result<std::fs::File, String> {
    let shown = work_dir.display();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(work_dir)
        .map_err(|e| format!("work directory {shown}: {e}"))?;
    let marker = work_dir.join(WORK_MARKER);
    if !made_by_runner && !marker.exists() {
        let mut entries =
            std::fs::read_dir(work_dir).map_err(|e| format!("work directory {shown}: {e}"))?;
        if let Some(entry) = entries.next() {
            let name = entry
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(format!(
                "--work-dir {shown} holds '{name}', which no runner put there; the runner removes \
                 what it finds in its work directory at start, so give it a directory of its own \
                 (new or empty), such as {}",
                work_dir.join("muster-work").display()
            ));
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&marker)
        .map_err(|e| format!("work directory {shown}: {}: {e}", marker.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "work directory {shown} is in use by another runner process; give each runner a \
             work directory of its own"
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!(
            "work directory {shown}: locking {}: {e}",
            marker.display()
        )),
    }
}

/// Removes the scratch directories below `work_dir` that a previous runner
/// process left when it stopped without cleaning up (those runs are over:
/// the coordinator records them as lost), after killing the jobs still
/// running from them. They may hold vars files with the runs'
/// configuration, so they are not kept. Blocks for up to a few seconds.
pub fn remove_leftovers(work_dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        if path.file_name() == Some(OsStr::new(WORK_MARKER)) {
            continue;
        }
        if path.symlink_metadata()?.is_dir() {
            if let Some(run_id) = path.file_name().and_then(|n| n.to_str()) {
                stop_leftover_job(&path, run_id);
            }
            remove_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        removed += 1;
    }
    Ok(removed)
}

/// The files the job left in its block's artifacts directory.
async fn collect(scratch: &Path, plan: &JobPlan, bundle: &Bundle) -> Collected {
    let dir = scratch
        .join(WORKSPACE_DIR)
        .join("artifacts/blocks")
        .join(&plan.block);
    if !dir.is_dir() {
        return Ok(None);
    }
    let bundle = bundle.clone();
    let block = plan.block.clone();
    tokio::task::spawn_blocking(move || {
        let found =
            Bundle::from_dir(&dir).map_err(|e| format!("reading the artifacts directory: {e}"))?;
        let files: Vec<_> = found
            .files()
            .map(|(path, entry)| (path.to_owned(), entry.clone()))
            .collect();
        artifacts_from(files, &bundle, &block)
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        assert_eq!(state_and_group("42 (bash) S 1 42 42 0 -1"), Some(('S', 42)));
        assert_eq!(state_and_group("7 (a) b) (c) Z 1 99 99 0"), Some(('Z', 99)));
        assert_eq!(state_and_group("garbage"), None);
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn programs_are_found_on_the_jobs_path_as_execvp_would() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second, job) = (
            dir.path().join("first"),
            dir.path().join("second"),
            dir.path().join("job"),
        );
        for d in [&first, &second, &job.join("bin")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let write = |path: &Path, mode: u32| {
            std::fs::write(path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // Not executable in the first entry: skipped, as execvp skips it.
        write(&first.join("tool"), 0o644);
        write(&second.join("tool"), 0o755);
        write(&job.join("bin/local"), 0o755);
        std::fs::create_dir(first.join("dir")).unwrap();
        let path =
            std::env::join_paths([first.as_path(), second.as_path(), Path::new("bin")]).unwrap();
        let find = |program: &str| find_on_path(program, Some(&path), &job);
        assert_eq!(find("tool"), second.join("tool"));
        // A relative entry is taken from the job's directory.
        assert_eq!(find("local"), job.join("bin/local"));
        // A directory is no program; the unfound keep their bare name.
        assert_eq!(find("dir"), PathBuf::from("dir"));
        assert_eq!(find("missing"), PathBuf::from("missing"));
        // A path is used as given, and without PATH nothing is looked up.
        assert_eq!(find("./tool"), PathBuf::from("./tool"));
        assert_eq!(find_on_path("tool", None, &job), PathBuf::from("tool"));
    }

    #[test]
    fn plan_paths_must_stay_inside() {
        assert!(is_relative_inside("blocks/app"));
        assert!(is_relative_inside("app"));
        assert!(!is_relative_inside("/etc"));
        assert!(!is_relative_inside("blocks/../../etc"));
    }

    #[test]
    fn jobs_a_crashed_runner_left_are_killed_and_others_spared() {
        let dir = tempfile::tempdir().unwrap();
        let spawn = |run_id: &str| {
            let scratch = dir.path().join(run_id);
            std::fs::create_dir_all(&scratch).unwrap();
            let child = std::process::Command::new("sleep")
                .arg("1000")
                .env("MUSTER_RUN_ID", run_id)
                .process_group(0)
                .spawn()
                .unwrap();
            std::fs::write(scratch.join(PGID_FILE), child.id().to_string()).unwrap();
            child
        };
        let mut ours = spawn("run-left");
        // A pgid file naming a group that is not that run's job.
        let mut other = spawn("run-other");
        std::fs::write(
            dir.path().join("run-other").join(PGID_FILE),
            ours.id().to_string(),
        )
        .unwrap();
        let mut stranger = std::process::Command::new("sleep")
            .arg("1000")
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("run-stranger")).unwrap();
        std::fs::write(
            dir.path().join("run-stranger").join(PGID_FILE),
            stranger.id().to_string(),
        )
        .unwrap();

        assert_eq!(remove_leftovers(dir.path()).unwrap(), 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let status = ours.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "the left job is killed");
        assert_eq!(
            other.try_wait().unwrap(),
            None,
            "run-other's job was not named"
        );
        assert_eq!(stranger.try_wait().unwrap(), None, "a stranger is spared");
        for mut child in [other, stranger] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    #[test]
    fn a_given_work_dir_must_be_the_runners_own_and_one_runners_at_a_time() {
        let parent = tempfile::tempdir().unwrap();
        std::fs::write(parent.path().join("someone-elses"), b"x").unwrap();
        let error = claim_work_dir(parent.path(), false).unwrap_err();
        assert!(error.contains("'someone-elses'"), "{error}");
        assert!(error.contains("--work-dir"), "{error}");
        assert!(
            parent.path().join("someone-elses").exists(),
            "nothing removed"
        );

        let dir = parent.path().join("work");
        let held = claim_work_dir(&dir, false).expect("a new directory is taken");
        let error = claim_work_dir(&dir, false).unwrap_err();
        assert!(error.contains("in use by another runner"), "{error}");
        drop(held);

        // Taken before, so a previous runner's leftovers do not bar it; they
        // are removed, the marker stays.
        std::fs::create_dir(dir.join("run-1")).unwrap();
        let _held = claim_work_dir(&dir, false).expect("the marker makes it the runner's");
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [OsString::from(WORK_MARKER)]);
    }

    #[test]
    fn the_default_work_dir_is_taken_whatever_it_holds() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("work");
        std::fs::create_dir_all(dir.join("run-from-an-older-runner")).unwrap();
        let _held = claim_work_dir(&dir, true).unwrap();
        assert!(dir.join(WORK_MARKER).exists());
    }

    #[test]
    fn read_only_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run-1");
        std::fs::create_dir_all(run.join("locked/inner")).unwrap();
        std::fs::write(run.join("locked/inner/file"), b"x").unwrap();
        std::fs::set_permissions(run.join("locked"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
        std::fs::write(dir.path().join("stray"), b"x").unwrap();
        assert_eq!(remove_leftovers(dir.path()).unwrap(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
