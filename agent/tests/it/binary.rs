//! The `muster-agent` binary as a process: configuration errors, and an
//! agent whose coordinator is away, which checks the endpoint list it kept,
//! buffers the results on disk and stops cleanly on SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use muster_agent::spool::Spool;
use muster_agent::EndpointCache;
use muster_common::monitor::{EndpointList, Verdict};
use muster_common::secret::Secret;
use muster_common::token::{self, TokenKind};
use serde_json::json;

use crate::support::{closed_port, http_server, spec};

const AGENT: &str = env!("CARGO_BIN_EXE_muster-agent");

fn agent(args: &[&str]) -> Command {
    let mut command = Command::new(AGENT);
    command
        .args(args)
        .env_remove("MUSTER_COORDINATOR")
        .env_remove("MUSTER_AGENT_TOKEN")
        .env_remove("MUSTER_AGENT_TOKEN_FILE")
        .env_remove("MUSTER_DATA_DIR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Waits for `child` to exit; kills it (and fails) past `deadline`.
fn wait_with_deadline(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the agent to its end (at most 20 s): exit status and stderr.
fn run_to_exit(command: &mut Command) -> (std::process::ExitStatus, String) {
    let mut child = command.spawn().unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn bad_configuration_exits_2_with_a_message_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--coordinator", "http://127.0.0.1:1", "--data-dir", data],
            "no agent token",
        ),
        (
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--agent-token",
                "agt_short",
                "--data-dir",
                data,
            ],
            "--agent-token: not an agent token",
        ),
        (
            &[
                "--coordinator",
                "localhost",
                "--agent-token",
                "x",
                "--data-dir",
                data,
            ],
            "--coordinator: expected http://host:port",
        ),
        (
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--agent-token-file",
                "/nonexistent/token",
                "--data-dir",
                data,
            ],
            "--agent-token-file: cannot read /nonexistent/token",
        ),
    ];
    for (args, words) in cases {
        let (status, stderr) = run_to_exit(&mut agent(args));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
}

async fn metrics_text(addr: &str) -> Option<String> {
    let response = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
    response.text().await.ok()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_coordinator_the_kept_list_is_checked_and_results_buffered() {
    let server = http_server().await;
    let dir = tempfile::tempdir().unwrap();
    let token = token::generate(TokenKind::AgentToken);
    let endpoints: Vec<_> = (0..3)
        .map(|_| {
            spec(
                "http",
                &format!("http://{server}/"),
                json!({"interval": 1, "timeout": 1, "conditions": [{"condition": "[STATUS] == 200"}]}),
            )
        })
        .collect();
    let ids: Vec<_> = endpoints.iter().map(|e| e.id).collect();
    EndpointCache::new(dir.path(), &Secret::new(token.clone()))
        .store(
            &EndpointList {
                version: "v1".into(),
                endpoints,
            },
            "\"v1\"",
        )
        .await;
    let coordinator = format!("http://127.0.0.1:{}", closed_port().await);
    let metrics_addr = format!("127.0.0.1:{}", closed_port().await);
    let data = dir.path().to_str().unwrap().to_owned();
    let mut child = agent(&[
        "--coordinator",
        &coordinator,
        "--data-dir",
        &data,
        "--metrics-addr",
        &metrics_addr,
        "--location",
        "site-a",
    ])
    .env("MUSTER_AGENT_TOKEN", &token)
    .spawn()
    .unwrap();

    // Checks happen, the coordinator is down, results wait on disk.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut second_tried = false;
    loop {
        if !second_tried && metrics_text(&metrics_addr).await.is_some() {
            // Serving metrics, so its data directory is taken: a second
            // agent on it is refused.
            let (status, stderr) = run_to_exit(
                agent(&["--coordinator", &coordinator, "--data-dir", &data])
                    .env("MUSTER_AGENT_TOKEN", &token),
            );
            assert_eq!(status.code(), Some(2), "{stderr}");
            assert!(
                stderr.contains("in use by another muster-agent"),
                "{stderr}"
            );
            second_tried = true;
        }
        if let Some(text) = metrics_text(&metrics_addr).await {
            let up = metric(
                &text,
                "muster_agent_checks_total{kind=\"http\",verdict=\"up\"}",
            );
            let buffered = metric(&text, "muster_agent_results_buffered");
            if second_tried && up >= 6.0 && buffered >= 3.0 {
                assert_eq!(metric(&text, "muster_agent_endpoints"), 3.0);
                assert_eq!(metric(&text, "muster_agent_coordinator_up"), 0.0);
                assert!(metric(&text, "muster_agent_report_failures_total") >= 1.0);
                break;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no buffered results in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("agt_"), "the token never reaches the log");

    // Everything it made is on disk, in the order it was made.
    let mut spool = Spool::open(
        &muster_agent::spool_dir(dir.path()),
        Duration::from_secs(3600),
        1 << 30,
    )
    .unwrap();
    let batch = spool.peek(10_000).unwrap();
    assert!(batch.results.len() >= 6, "{}", batch.results.len());
    for r in &batch.results {
        assert!(ids.contains(&r.endpoint_id));
        assert_eq!(r.verdict, Verdict::Up, "{r:?}");
    }
    for id in &ids {
        let times: Vec<_> = batch
            .results
            .iter()
            .filter(|r| r.endpoint_id == *id)
            .map(|r| r.checked_at)
            .collect();
        assert!(times.len() >= 2, "{id}: {times:?}");
        // One interval apart, give or take scheduling on a busy machine.
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).num_milliseconds();
            assert!((500..=1500).contains(&gap), "{id}: {gap} ms");
        }
    }
}
