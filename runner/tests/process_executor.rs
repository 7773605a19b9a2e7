//! The process executor against real processes: what a job sees (output,
//! environment, files), and that stopping a job (cancel, timeout, or its main
//! process ending) leaves no process of it behind and no scratch directory.
//! No coordinator is involved: the executor writes into a `Link` whose
//! outbox is a channel the test reads.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_common::bundle::{Bundle, Entry};
use muster_common::plan::{plan, JobPlan};
use muster_common::workspace::load;
use muster_proto::runner::v1::{runner_message, LogStream, RunnerMessage};
use muster_runner::executor::{ExecError, Outcome, Stop};
use muster_runner::process::{ProcessExecutor, VARS_FILE, WORKSPACE_DIR};
use muster_runner::session::{Link, LogSink};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Short, so stopping tests are quick; the runner uses ten seconds.
const GRACE: Duration = Duration::from_secs(1);
/// What a stop may take beyond the grace on a slow, busy machine.
const SLACK: Duration = Duration::from_secs(5);

/// A bundle with `workspace.poly`, `blocks/app/block.poly`, a playbook and
/// a root inventory.
fn bundle(workspace: &str, block: &str) -> Bundle {
    let files = [
        ("workspace.poly", workspace),
        ("blocks/app/block.poly", block),
        ("blocks/app/deploy.yml", "- hosts: all\n"),
        ("inventory.yml", "all: {}\n"),
    ];
    Bundle::from_entries(files.iter().map(|(path, text)| {
        (
            path.to_string(),
            Entry::File {
                data: text.as_bytes().to_vec(),
                executable: false,
            },
        )
    }))
    .unwrap()
}

fn plan_of(bundle: &Bundle, action: &str) -> JobPlan {
    let ws = load(bundle).unwrap();
    plan(&ws, "app", action, &Map::new()).unwrap()
}

/// One executor with its data directory, and a link whose messages the
/// test reads.
struct Harness {
    data: tempfile::TempDir,
    executor: ProcessExecutor,
    link: Arc<Link>,
    messages: mpsc::Receiver<RunnerMessage>,
}

/// What a job wrote.
#[derive(Default)]
struct Log {
    stdout: String,
    stderr: String,
    chunks: usize,
}

impl Harness {
    async fn new() -> Harness {
        let data = tempfile::tempdir().unwrap();
        let executor = ProcessExecutor::new(data.path().join("work"), GRACE).unwrap();
        let link = Arc::new(Link::default());
        let (outbox, messages) = mpsc::channel(4096);
        link.attach(outbox).await;
        Harness {
            data,
            executor,
            link,
            messages,
        }
    }

    async fn run(
        &mut self,
        run_id: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        cancel: CancellationToken,
    ) -> (Result<Outcome, ExecError>, Log) {
        self.link.add_job(run_id, 1, cancel.clone()).await;
        let sink = LogSink::new(run_id, 1, self.link.clone());
        let result = self.executor.run(run_id, plan, bundle, &sink, cancel).await;
        let mut log = Log::default();
        while let Ok(message) = self.messages.try_recv() {
            let Some(runner_message::Kind::Log(chunk)) = message.kind else {
                continue;
            };
            assert_eq!(chunk.run_id, run_id);
            assert!(
                chunk.data.len() <= muster_runner::output::FLUSH_BYTES,
                "a chunk holds at most FLUSH_BYTES"
            );
            let text = String::from_utf8_lossy(&chunk.data);
            match LogStream::try_from(chunk.stream) {
                Ok(LogStream::Stdout) => log.stdout.push_str(&text),
                Ok(LogStream::Stderr) => log.stderr.push_str(&text),
                other => panic!("unexpected stream {other:?}"),
            }
            log.chunks += 1;
        }
        self.assert_no_scratch_left(run_id);
        (result, log)
    }

    fn scratch(&self, run_id: &str) -> PathBuf {
        self.executor.scratch_dir(run_id)
    }

    /// (d): whatever happened, the run's scratch directory is gone.
    fn assert_no_scratch_left(&self, run_id: &str) {
        let scratch = self.scratch(run_id);
        assert!(!scratch.exists(), "{} is left behind", scratch.display());
        let left: Vec<_> = std::fs::read_dir(self.data.path().join("work"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "the work directory holds {left:?}");
    }
}

/// Lines `prefix<rest>` of `text`, as `rest`.
fn tagged<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .collect()
}

/// Whether process `pid` is gone: no such process, or a zombie that is not
/// this process's child (init reaps it in its own time).
fn is_gone(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => true,
        _ => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => {
                let rest = &stat[stat.rfind(')').unwrap() + 1..];
                let mut fields = rest.split_whitespace();
                let state = fields.next().unwrap();
                let ppid: u32 = fields.next().unwrap().parse().unwrap();
                state == "Z" && ppid != std::process::id()
            }
        },
    }
}

/// Waits (up to ten seconds) until `path` names a process id.
async fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} names no pid after 10 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Environment names bash exports on its own.
const SHELL_NAMES: [&str; 4] = ["PWD", "SHLVL", "_", "OLDPWD"];

/// (a) A script's output arrives by stream, it sees the plan's environment
/// and nothing of the runner's, runs in the block's directory with the vars
/// file and artifacts directory in place, and its exit code comes back.
///
/// The runner's environment holds its join token: this test runs itself
/// again with `MUSTER_JOIN_TOKEN=secret` set, rather than change the
/// environment of the test process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_sees_the_plan_environment_and_nothing_of_the_runner() {
    const NAME: &str = "script_sees_the_plan_environment_and_nothing_of_the_runner";
    if std::env::var_os("MUSTER_JOIN_TOKEN").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env("MUSTER_JOIN_TOKEN", "secret")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the test with a secret in the environment failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert_eq!(std::env::var("MUSTER_JOIN_TOKEN").unwrap(), "secret");

    let block = r#"name: app
config:
  greeting: hello
actions:
  - name: show
    script:
      - echo to-stdout
      - echo to-stderr >&2
      - 'echo "value: POLYCRATE_BLOCK=$POLYCRATE_BLOCK"'
      - 'echo "value: BLOCK_CONFIG_GREETING=$BLOCK_CONFIG_GREETING"'
      - 'echo "value: MUSTER_RUN_ID=$MUSTER_RUN_ID"'
      - 'echo "value: IN_CONTAINER=$IN_CONTAINER"'
      - 'echo "value: HOME=$HOME"'
      - 'echo "value: TMPDIR=$TMPDIR"'
      - 'echo "value: PWD=$(pwd -P)"'
      - 'echo "value: MUSTER_JOIN_TOKEN=${MUSTER_JOIN_TOKEN:-unset}"'
      - 'compgen -e | sed "s/^/name: /"'
      - 'if read -r line; then echo "stdin: $line"; else echo "stdin: empty"; fi'
      - 'if [ -d "$POLYCRATE_WORKSPACE/artifacts/blocks/app" ]; then echo "check: artifacts"; fi'
      - 'if [ -f "$POLYCRATE_WORKSPACE/../vars.json" ]; then echo "check: vars"; fi'
      - 'if [ -d "$HOME" ] && [ -d "$TMPDIR" ]; then echo "check: home and tmp"; fi'
      - exit 3
"#;
    let bundle = bundle("name: acme-ws\norganization: acme\n", block);
    let plan = plan_of(&bundle, "show");
    let mut h = Harness::new().await;
    let run_id = "0190a3b0-script";
    let scratch = h.scratch(run_id);
    let (result, log) = h
        .run(run_id, &plan, &bundle, CancellationToken::new())
        .await;

    let outcome = result.unwrap();
    assert_eq!(
        outcome,
        Outcome {
            exit_code: 3,
            stopped: None
        },
        "stderr: {}",
        log.stderr
    );
    assert_eq!(log.stderr, "to-stderr\n", "stderr holds stderr alone");
    assert!(log.stdout.starts_with("to-stdout\n"), "{}", log.stdout);
    assert!(!log.stdout.contains("to-stderr"));

    let root = scratch.join(WORKSPACE_DIR);
    let values: BTreeSet<&str> = tagged(&log.stdout, "value: ").into_iter().collect();
    for expected in [
        "POLYCRATE_BLOCK=app".to_owned(),
        "BLOCK_CONFIG_GREETING=hello".to_owned(),
        format!("MUSTER_RUN_ID={run_id}"),
        "IN_CONTAINER=false".to_owned(),
        format!("HOME={}", scratch.join("home").display()),
        format!("TMPDIR={}", scratch.join("tmp").display()),
        format!("PWD={}", root.join("blocks/app").display()),
        "MUSTER_JOIN_TOKEN=unset".to_owned(),
    ] {
        assert!(
            values.contains(expected.as_str()),
            "missing {expected} in {values:?}"
        );
    }
    assert_eq!(tagged(&log.stdout, "stdin: "), ["empty"]);
    assert_eq!(
        tagged(&log.stdout, "check: "),
        ["artifacts", "vars", "home and tmp"]
    );

    // Exactly the plan's variables and the few the executor adds: nothing
    // of this process's environment (cargo's, the join token) leaks in.
    let names: BTreeSet<&str> = tagged(&log.stdout, "name: ").into_iter().collect();
    let plan_env = plan.environment(root.to_str().unwrap());
    let mut allowed: BTreeSet<&str> = plan_env.keys().map(String::as_str).collect();
    allowed.extend([
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "IN_CONTAINER",
        "MUSTER_RUN_ID",
    ]);
    allowed.extend(SHELL_NAMES);
    let leaked: Vec<_> = names.difference(&allowed).collect();
    assert!(leaked.is_empty(), "the job saw {leaked:?}");
    let missing: Vec<_> = plan_env
        .keys()
        .filter(|k| !names.contains(k.as_str()))
        .collect();
    assert!(missing.is_empty(), "the job lacks {missing:?}");
    assert!(!names.contains("MUSTER_JOIN_TOKEN"));
}

/// A playbook action gets its inventory and a vars file outside the
/// workspace (a stand-in `ansible-playbook` on the workspace's `extraenv`
/// PATH prints what it was given).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbook_gets_inventory_and_vars_file_outside_the_workspace() {
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("ansible-playbook");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"argv: $*\"\necho \"pwd: $(pwd -P)\"\nfor last; do :; done\necho ---vars---\ncat \"${last#@}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let workspace = format!(
        "name: acme-ws\norganization: acme\nextraenv: ['PATH={}:/usr/bin:/bin']\n",
        bin.path().display()
    );
    let block = "name: app\nactions:\n  - name: deploy\n    playbook: deploy.yml\n";
    let bundle = bundle(&workspace, block);
    let plan = plan_of(&bundle, "deploy");
    let mut h = Harness::new().await;
    let run_id = "0190a3b0-playbook";
    let scratch = h.scratch(run_id);
    let (result, log) = h
        .run(run_id, &plan, &bundle, CancellationToken::new())
        .await;

    assert_eq!(result.unwrap().exit_code, 0, "stderr: {}", log.stderr);
    let root = scratch.join(WORKSPACE_DIR);
    let vars = scratch.join(VARS_FILE);
    assert_eq!(
        tagged(&log.stdout, "argv: "),
        [format!(
            "-i {}/inventory.yml deploy.yml -e @{}",
            root.display(),
            vars.display()
        )]
    );
    assert!(
        !vars.starts_with(&root),
        "the vars file is outside the workspace"
    );
    assert_eq!(
        tagged(&log.stdout, "pwd: "),
        [root.join("blocks/app").display().to_string()]
    );
    let (_, json) = log.stdout.split_once("---vars---\n").unwrap();
    let json: Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["block"]["name"], "app");
    assert_eq!(
        json["block"]["artifacts"]["path"],
        root.join("artifacts/blocks/app").display().to_string()
    );
    assert_eq!(json["workspace"]["path"], root.display().to_string());
}

/// A program that is not there fails to start, with the name and a hint,
/// and still leaves no scratch directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_fails_to_start() {
    let workspace = "name: acme-ws\norganization: acme\nextraenv: ['PATH=/nonexistent']\n";
    let block = "name: app\nactions:\n  - name: deploy\n    playbook: deploy.yml\n";
    let bundle = bundle(workspace, block);
    let plan = plan_of(&bundle, "deploy");
    let mut h = Harness::new().await;
    let (result, _) = h
        .run("0190a3b0-missing", &plan, &bundle, CancellationToken::new())
        .await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.starts_with("cannot start 'ansible-playbook': "),
        "{error}"
    );
    assert!(error.contains("PATH"), "{error}");
}

/// A job that starts a grandchild ignoring SIGTERM, writes its pid to the
/// block's `pidfile`, and waits for it.
fn tree_bundle(pidfile: &Path, timeout: Option<u64>) -> Bundle {
    let timeout = timeout
        .map(|t| format!("    timeout: {t}\n"))
        .unwrap_or_default();
    let block = format!(
        r#"name: app
config:
  pidfile: {}
actions:
  - name: tree
{timeout}    script:
      - |
        bash -c 'trap "" TERM; echo $$ > "$BLOCK_CONFIG_PIDFILE"; sleep 1000' &
        echo started
        wait
"#,
        pidfile.display()
    );
    bundle("name: acme-ws\norganization: acme\n", &block)
}

/// (b) Cancel stops the whole process tree: SIGTERM, the grace, SIGKILL for
/// the grandchild that ignores SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_whole_tree() {
    let pids = tempfile::tempdir().unwrap();
    let pidfile = pids.path().join("grandchild.pid");
    let bundle = tree_bundle(&pidfile, None);
    let plan = plan_of(&bundle, "tree");
    let mut h = Harness::new().await;
    let cancel = CancellationToken::new();

    let canceler = {
        let cancel = cancel.clone();
        let pidfile = pidfile.clone();
        tokio::spawn(async move {
            let pid = read_pid(&pidfile).await;
            cancel.cancel();
            (pid, Instant::now())
        })
    };
    let (result, log) = h.run("0190a3b0-cancel", &plan, &bundle, cancel).await;
    let returned = Instant::now();
    let (pid, canceled_at) = canceler.await.unwrap();

    let outcome = result.unwrap();
    assert_eq!(outcome.stopped, Some(Stop::Canceled));
    assert_eq!(outcome.exit_code, 128 + 15, "the shell died of SIGTERM");
    assert_eq!(log.stdout, "started\n");
    let took = returned - canceled_at;
    assert!(
        took >= GRACE && took < GRACE + SLACK,
        "stopping took {took:?}; expected the grace ({GRACE:?}) and little more"
    );
    assert!(is_gone(pid), "grandchild {pid} survived the cancel");
}

/// (c) A timeout stops the whole tree the same way, as timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree() {
    let pids = tempfile::tempdir().unwrap();
    let pidfile = pids.path().join("grandchild.pid");
    let bundle = tree_bundle(&pidfile, Some(1));
    let plan = plan_of(&bundle, "tree");
    assert_eq!(plan.timeout_secs, Some(1));
    let mut h = Harness::new().await;

    let began = Instant::now();
    let (result, log) = h
        .run("0190a3b0-timeout", &plan, &bundle, CancellationToken::new())
        .await;
    let took = began.elapsed();

    let outcome = result.unwrap();
    assert_eq!(outcome.stopped, Some(Stop::TimedOut));
    assert_eq!(outcome.exit_code, 128 + 15);
    assert_eq!(log.stdout, "started\n");
    let timeout = Duration::from_secs(1);
    assert!(
        took >= timeout + GRACE && took < timeout + GRACE + SLACK,
        "the run took {took:?}; expected the timeout and the grace and little more"
    );
    let pid = read_pid(&pidfile).await;
    assert!(is_gone(pid), "grandchild {pid} survived the timeout");
}

/// What a job leaves running in its group when its main process ends is
/// stopped too, as in a container, and does not hold the run open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_finished_job_are_stopped() {
    let pids = tempfile::tempdir().unwrap();
    let pidfile = pids.path().join("leftover.pid");
    let block = format!(
        "name: app\nconfig:\n  pidfile: {}\nactions:\n  - name: bg\n    script:\n      - 'sleep 1000 &'\n      - 'echo $! > \"$BLOCK_CONFIG_PIDFILE\"'\n      - echo done\n",
        pidfile.display()
    );
    let bundle = bundle("name: acme-ws\norganization: acme\n", &block);
    let plan = plan_of(&bundle, "bg");
    let mut h = Harness::new().await;

    let began = Instant::now();
    let (result, log) = h
        .run(
            "0190a3b0-leftover",
            &plan,
            &bundle,
            CancellationToken::new(),
        )
        .await;
    let took = began.elapsed();

    assert_eq!(
        result.unwrap(),
        Outcome {
            exit_code: 0,
            stopped: None
        }
    );
    assert_eq!(log.stdout, "done\n");
    assert!(
        took < GRACE + SLACK,
        "the run took {took:?}: SIGTERM should end the leftover at once"
    );
    let pid = read_pid(&pidfile).await;
    assert!(is_gone(pid), "leftover {pid} survived its job");
}

/// Output larger than a chunk arrives whole, in order, in bounded chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_output_arrives_whole_in_bounded_chunks() {
    let block = "name: app\nactions:\n  - name: big\n    script:\n      - 'seq 1 50000'\n";
    let bundle = bundle("name: acme-ws\norganization: acme\n", block);
    let plan = plan_of(&bundle, "big");
    let mut h = Harness::new().await;
    let (result, log) = h
        .run("0190a3b0-big", &plan, &bundle, CancellationToken::new())
        .await;
    assert_eq!(result.unwrap().exit_code, 0);
    let expected: String = (1..=50000).map(|n| format!("{n}\n")).collect();
    assert_eq!(log.stdout.len(), expected.len());
    assert!(log.stdout == expected, "output is complete and in order");
    assert!(log.chunks >= expected.len() / muster_runner::output::FLUSH_BYTES);
}
