//! The live log tail as CI follows it: `Accept: text/event-stream` streams
//! the log as it is written, then an `end` event with the status; a client
//! that reconnects with `Last-Event-ID` gets the rest, nothing twice.

use std::time::{Duration, Instant};

use muster_tests::{LogTail, SseEvent as Sse, TestCoordinator, TestDb};
use serde_json::{json, Value};

const LINES: usize = 40;

/// Reads events until `end`, noting when each came.
async fn read_events(
    c: &TestCoordinator,
    run_id: &str,
    last_event_id: Option<&str>,
) -> anyhow::Result<Vec<(Instant, Sse)>> {
    let mut tail = LogTail::resume(c, run_id, last_event_id).await?;
    let mut events = Vec::new();
    while let Some(event) = tail.next(Duration::from_secs(30)).await? {
        let done = event.event == "end";
        events.push((Instant::now(), event));
        if done {
            return Ok(events);
        }
    }
    anyhow::bail!("the stream ended without an end event: {events:?}")
}

fn text_of(events: &[(Instant, Sse)]) -> String {
    events
        .iter()
        .filter(|(_, e)| e.event == "log")
        .map(|(_, e)| e.data["data"].as_str().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_streams_live_and_resumes_from_last_event_id() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let ws = tempfile::tempdir()?;
    std::fs::create_dir_all(ws.path().join("blocks/jobs"))?;
    std::fs::write(
        ws.path().join("workspace.poly"),
        "name: live\norganization: acme\n",
    )?;
    std::fs::write(
        ws.path().join("blocks/jobs/block.poly"),
        format!("name: jobs\nactions:\n  - name: count\n    script:\n      - for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; done\n      - exit 3\n"),
    )?;
    let (status, answer) = c.push_dir(&c.admin_key, ws.path()).await?;
    assert_eq!(status, 201, "{answer}");
    let runner = c
        .start_runner_configured(|r| {
            r.executor = muster_runner::ExecutorChoice::Process;
            r.name = Some("live-runner".into());
        })
        .await?;
    let run_id = c
        .trigger("live", json!({"block": "jobs", "action": "count"}))
        .await?;

    let expected: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    let events = read_events(&c, &run_id, None).await?;
    let (end_at, end) = events.last().expect("an end event");
    assert_eq!(end.event, "end");
    assert_eq!(end.data, json!({"status": "failed", "exit_code": 3}));
    assert_eq!(text_of(&events), expected, "every line once, in order");
    let first_at = events[0].0;
    assert!(
        end_at.duration_since(first_at) > Duration::from_millis(500),
        "chunks arrived while the job ran, not all at the end"
    );
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|(_, e)| e.id.as_ref()?.parse().ok())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // `status` events (no id) come first and on each change; the one for
    // `running` names the runner, and it comes before the log it writes.
    let statuses: Vec<&Value> = events
        .iter()
        .filter(|(_, e)| e.event == "status")
        .map(|(_, e)| &e.data)
        .collect();
    assert_eq!(events[0].1.event, "status", "{events:?}");
    assert!(
        events
            .iter()
            .all(|(_, e)| e.event != "status" || e.id.is_none()),
        "status events carry no id, so Last-Event-ID stays a log seq"
    );
    let running = statuses
        .iter()
        .position(|s| s["status"] == "running")
        .unwrap_or_else(|| panic!("no running status: {statuses:?}"));
    assert_eq!(statuses[running]["runner"], "live-runner", "{statuses:?}");
    let running_at = events
        .iter()
        .position(|(_, e)| e.event == "status" && e.data["status"] == "running");
    let first_log_at = events.iter().position(|(_, e)| e.event == "log");
    assert!(running_at < first_log_at, "{events:?}");

    // Reconnecting after the third log event resumes after it.
    let logs: Vec<&Sse> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e.event == "log")
        .collect();
    let third = logs[2].id.clone().expect("log events have ids");
    let rest = read_events(&c, &run_id, Some(&third)).await?;
    let before: String = logs[..3]
        .iter()
        .map(|e| e.data["data"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        format!("{before}{}", text_of(&rest)),
        expected,
        "no loss, no duplicate"
    );
    assert_eq!(rest.last().map(|(_, e)| e.event.as_str()), Some("end"));

    let (code, _) = c
        .call(
            &c.admin_key,
            reqwest::Method::GET,
            "/api/v1/action-runs/00000000-0000-0000-0000-000000000000/logs/",
            None,
        )
        .await?;
    assert_eq!(code, 404);

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
