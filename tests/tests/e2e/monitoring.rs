//! Monitoring, the coordinator's side, end to end: agents speak the real
//! agent protocol over HTTP with their tokens (`muster_common::monitor`'s
//! types), the coordinator evaluates, and a webhook receiver on loopback
//! gets the alerts. (The `muster-agent` binary's own checks are tested with
//! the agent.)

use std::time::Duration;

use chrono::Utc;
use muster_common::monitor::Verdict::{Down, Up};
use muster_tests::monitoring::{check_result, WebhookReceiver};
use muster_tests::{TestCoordinator, TestDb};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

fn http_endpoint(
    name: &str,
    locations: &[&str],
    min_failing_locations: u32,
    failure_threshold: u32,
    success_threshold: u32,
) -> Value {
    json!({
        "name": name, "kind": "http", "target": "http://127.0.0.1:8000/",
        "interval": 5, "timeout": 2, "locations": locations,
        "min_failing_locations": min_failing_locations,
        "failure_threshold": failure_threshold,
        "success_threshold": success_threshold,
        "conditions": ["[STATUS] == 200"]
    })
}

/// A new identity's API key in `organization` (the caller's when `None`).
async fn key_for(
    c: &TestCoordinator,
    identity: &str,
    role: &str,
    organization: Option<&str>,
) -> anyhow::Result<String> {
    let mut body = json!({ "name": identity, "identity": identity, "role": role });
    if let Some(org) = organization {
        body["organization"] = json!(org);
    }
    let key = c
        .admin(Method::POST, "/api/v1/api-keys/", Some(body))
        .await?;
    Ok(key["key"].as_str().unwrap_or_default().to_owned())
}

/// The outbox is read every second: a message sent twice would show
/// within this time. (Waiting for something not to happen takes a wait.)
async fn give_a_duplicate_time_to_arrive() {
    tokio::time::sleep(Duration::from_millis(2500)).await;
}

fn agent_listed<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list["results"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_tokens_open_only_the_agent_routes_and_their_own_endpoints() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let a = c.create_agent("berlin", "site-a").await?;
    let b = c.create_agent("paris", "site-b").await?;
    let web = c
        .create_endpoint(http_endpoint("web", &["site-a"], 1, 3, 2))
        .await?;
    let store = c
        .create_endpoint(http_endpoint("store", &["site-b"], 1, 3, 2))
        .await?;
    // Another organization, with an agent and an endpoint at site-a too.
    c.admin(
        Method::POST,
        "/api/v1/organizations/",
        Some(json!({ "name": "globex" })),
    )
    .await?;
    let globex = key_for(&c, "globex-admin", "org_admin", Some("globex")).await?;
    let theirs_agent = c.create_agent_with(&globex, "berlin", "site-a").await?;
    let (status, theirs) = c
        .call(
            &globex,
            Method::POST,
            "/api/v1/endpoints/",
            Some(http_endpoint("web", &["site-a"], 1, 3, 2)),
        )
        .await?;
    assert_eq!(status, 201, "{theirs}");
    let theirs = theirs["id"].as_str().unwrap_or_default().to_owned();

    // Every other route answers the agent token 403, and changes nothing.
    let routes = [
        (Method::GET, "/api/v1/organizations/".to_owned()),
        (Method::POST, "/api/v1/organizations/".to_owned()),
        (Method::GET, "/api/v1/api-keys/".to_owned()),
        (Method::POST, "/api/v1/api-keys/".to_owned()),
        (Method::GET, "/api/v1/workspaces/".to_owned()),
        (Method::POST, "/api/v1/workspaces/".to_owned()),
        (Method::GET, "/api/v1/workspaces/infra/".to_owned()),
        (Method::POST, "/api/v1/workspaces/infra/actions".to_owned()),
        (Method::GET, "/api/v1/action-runs/".to_owned()),
        (Method::GET, format!("/api/v1/action-runs/{}/", Uuid::nil())),
        (Method::GET, "/api/v1/runners/".to_owned()),
        (Method::POST, "/api/v1/runners/join-tokens/".to_owned()),
        (Method::GET, "/api/v1/agents/".to_owned()),
        (Method::POST, "/api/v1/agents/".to_owned()),
        (Method::DELETE, format!("/api/v1/agents/{}/", b.id)),
        (Method::GET, "/api/v1/endpoints/".to_owned()),
        (Method::POST, "/api/v1/endpoints/".to_owned()),
        (Method::GET, format!("/api/v1/endpoints/{web}/")),
        (Method::PUT, format!("/api/v1/endpoints/{web}/")),
        (Method::DELETE, format!("/api/v1/endpoints/{store}/")),
        (Method::GET, format!("/api/v1/endpoints/{web}/results/")),
        (Method::GET, "/api/v1/notifiers/".to_owned()),
        (Method::POST, "/api/v1/notifiers/".to_owned()),
        (Method::GET, "/api/v1/maintenance-windows/".to_owned()),
        (Method::POST, "/api/v1/maintenance-windows/".to_owned()),
    ];
    for (method, path) in &routes {
        let body = (*method == Method::POST || *method == Method::PUT).then(|| json!({}));
        let (status, answer) = c.call(&a.token, method.clone(), path, body).await?;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(
            answer["detail"]
                .as_str()
                .is_some_and(|d| d.contains("agent routes")),
            "{method} {path}: {answer}"
        );
    }
    assert!(b.heartbeat().await?.0 == 200, "agent b was revoked by a");
    c.endpoint(&store).await?;

    // An API key is no agent: 403 on the agent routes.
    for (method, path) in [
        (Method::POST, "/api/v1/agent/health/"),
        (Method::GET, "/api/v1/agent/endpoints/"),
        (Method::POST, "/api/v1/agent/results/"),
    ] {
        let (status, answer) = c
            .call(&c.admin_key, method.clone(), path, Some(json!({})))
            .await?;
        assert_eq!(status, 403, "{method} {path} with an API key: {answer}");
    }
    let forged = format!("agt_{}", "x".repeat(38));
    let (status, _) = c
        .call(&forged, Method::GET, "/api/v1/agent/endpoints/", None)
        .await?;
    assert_eq!(status, 401, "a forged agent token");

    // Each agent reads its organization's endpoints at its location only.
    let ids = |list: &muster_common::monitor::EndpointList| -> Vec<String> {
        list.endpoints.iter().map(|e| e.id.to_string()).collect()
    };
    let (status, etag, list) = a.endpoints(None).await?;
    assert_eq!(status, 200);
    let list = list.expect("a list");
    assert_eq!(ids(&list), [web.as_str()]);
    assert_eq!(list.endpoints[0].conditions[0].condition, "[STATUS] == 200");
    assert_eq!(
        etag.as_deref(),
        Some(format!("\"{}\"", list.version).as_str())
    );
    assert_eq!(
        ids(&b.endpoints(None).await?.2.expect("a list")),
        [store.as_str()]
    );
    assert_eq!(
        ids(&theirs_agent.endpoints(None).await?.2.expect("a list")),
        [theirs.as_str()]
    );
    // Unchanged: 304. Changed: the new list.
    let (status, _, body) = a.endpoints(etag.as_deref()).await?;
    assert_eq!((status, body.is_none()), (304, true));
    let mut changed = http_endpoint("web", &["site-a"], 1, 3, 2);
    changed["interval"] = json!(10);
    c.admin(
        Method::PUT,
        &format!("/api/v1/endpoints/{web}/"),
        Some(changed),
    )
    .await?;
    let (status, new_etag, list) = a.endpoints(etag.as_deref()).await?;
    assert_eq!(status, 200);
    assert_ne!(new_etag, etag);
    assert_eq!(list.expect("a list").endpoints[0].interval, 10);

    // Results for endpoints not assigned to it are refused, each by name.
    let (status, answer) = a
        .report(vec![
            check_result(Uuid::parse_str(&store)?, Utc::now(), Down),
            check_result(Uuid::parse_str(&theirs)?, Utc::now(), Down),
            check_result(Uuid::parse_str(&web)?, Utc::now(), Up),
        ])
        .await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1, "{answer}");
    let refused: Vec<&str> = answer["refused"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["endpoint_id"].as_str())
        .collect();
    assert_eq!(refused, [store.as_str(), theirs.as_str()], "{answer}");
    assert!(
        answer["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not") || r.contains("assigned")),
        "{answer}"
    );
    let history = c
        .admin(
            Method::GET,
            &format!("/api/v1/endpoints/{store}/results/"),
            None,
        )
        .await?;
    assert_eq!(history["count"], 0, "{history}");
    let (status, _) = c
        .call(
            &globex,
            Method::GET,
            &format!("/api/v1/endpoints/{theirs}/results/"),
            None,
        )
        .await?;
    assert_eq!(status, 200);
    // Nor does another organization see ours.
    let (status, _) = c
        .call(
            &globex,
            Method::GET,
            &format!("/api/v1/endpoints/{web}/"),
            None,
        )
        .await?;
    assert_eq!(status, 404);

    // The heartbeat names the agent; the list shows its health.
    let (status, hello) = a.heartbeat().await?;
    assert_eq!(status, 200, "{hello}");
    assert_eq!(
        hello,
        json!({ "agent_id": a.id, "name": "berlin", "location": "site-a" })
    );
    // The bootstrap admin is a super admin: it sees globex's agent too.
    let agents = c.admin(Method::GET, "/api/v1/agents/", None).await?;
    assert_eq!(agents["count"], 3, "{agents}");
    let (_, ours) = c
        .call(
            &key_for(&c, "olga", "org_admin", None).await?,
            Method::GET,
            "/api/v1/agents/",
            None,
        )
        .await?;
    assert_eq!(ours["count"], 2, "{ours}");
    let listed = agent_listed(&agents, &a.id).expect("agent a listed");
    assert_eq!(listed["status"], "online", "{listed}");
    assert_eq!(listed["version"], "test-agent/1");
    assert_eq!(listed["endpoint_count"], 1);
    assert_eq!(listed["checks_per_minute"], 6.0);
    assert!(listed["last_report_at"].is_string(), "{listed}");
    assert!(listed.get("token").is_none(), "a listing shows the token");

    // Roles: viewers read, workspace admins write endpoints, org admins agents.
    let viewer = key_for(&c, "vera", "viewer", None).await?;
    let (status, _) = c
        .call(&viewer, Method::GET, "/api/v1/endpoints/", None)
        .await?;
    assert_eq!(status, 200);
    let (status, _) = c
        .call(
            &viewer,
            Method::POST,
            "/api/v1/endpoints/",
            Some(http_endpoint("x", &["site-a"], 1, 1, 1)),
        )
        .await?;
    assert_eq!(status, 403);
    let ws_admin = key_for(&c, "wanda", "workspace_admin", None).await?;
    let (status, _) = c
        .call(
            &ws_admin,
            Method::POST,
            "/api/v1/endpoints/",
            Some(http_endpoint("x", &["site-a"], 1, 1, 1)),
        )
        .await?;
    assert_eq!(status, 201);
    let (status, _) = c
        .call(
            &ws_admin,
            Method::POST,
            "/api/v1/agents/",
            Some(json!({"name": "x", "location": "site-a"})),
        )
        .await?;
    assert_eq!(status, 403);

    // A revoked agent is shut out at once.
    let (status, _) = c
        .call(
            &globex,
            Method::DELETE,
            &format!("/api/v1/agents/{}/", b.id),
            None,
        )
        .await?;
    assert_eq!(status, 404, "revoked from another organization");
    c.admin(Method::DELETE, &format!("/api/v1/agents/{}/", b.id), None)
        .await?;
    assert_eq!(b.heartbeat().await?.0, 401);
    assert_eq!(b.endpoints(None).await?.0, 401);

    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_checks_alert_once_and_recovery_resolves_once() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    // The first post fails: the alert is retried, still delivered once.
    let receiver = WebhookReceiver::start(1).await?;
    receiver.register(&c, &c.admin_key).await?;
    let agent = c.create_agent("berlin", "site-a").await?;
    assert_eq!(agent.heartbeat().await?.0, 200);
    let web = c
        .create_endpoint(http_endpoint("web", &["site-a"], 1, 3, 2))
        .await?;
    assert_eq!(c.endpoint(&web).await?["status"], "unknown");

    agent.report_all(&web, &[Up, Up]).await?;
    c.wait_status(&web, "up").await?;
    agent.report_all(&web, &[Down, Down]).await?;
    let below = c.endpoint(&web).await?;
    assert_eq!(
        below["status"], "up",
        "two failures, threshold three: {below}"
    );
    assert_eq!(below["location_states"][0]["consecutive_failures"], 2);
    agent.report_all(&web, &[Down]).await?;
    let down = c.wait_status(&web, "down").await?;
    let at_a = &down["location_states"][0];
    assert_eq!(at_a["location"], "site-a");
    assert_eq!(at_a["state"], "down");
    assert_eq!(at_a["agent_id"], agent.id.as_str());
    assert_eq!(at_a["last_result"]["timings"]["connect_ms"], 0.9, "{at_a}");
    assert_eq!(at_a["last_result"]["timings"]["first_byte_ms"], 8.1);
    assert_eq!(at_a["last_result"]["tls"]["version"], "TLSv1.3");
    assert!(at_a["certificate_expires_at"].is_string(), "{at_a}");
    // 2 up of 5 checks.
    assert_eq!(down["uptime"]["24h"], 40.0, "{down}");
    assert!(down["incident"]["id"].is_string(), "{down}");

    receiver.wait_for("endpoint_down", 1).await?;
    assert!(
        receiver.posts() >= 2,
        "the refused first post was not retried"
    );
    // Still down: nothing more to say.
    agent.report_all(&web, &[Down, Down, Down]).await?;
    agent.report_all(&web, &[Up]).await?;
    assert_eq!(
        c.endpoint(&web).await?["status"],
        "down",
        "one success, recovery threshold two"
    );
    agent.report_all(&web, &[Up]).await?;
    let up = c.wait_status(&web, "up").await?;
    assert!(up["incident"].is_null(), "{up}");
    receiver.wait_for("endpoint_resolved", 1).await?;
    give_a_duplicate_time_to_arrive().await;

    let received = receiver.received();
    let events: Vec<&str> = received
        .iter()
        .filter_map(|m| m["event"].as_str())
        .collect();
    assert_eq!(
        events,
        ["endpoint_down", "endpoint_resolved"],
        "{received:?}"
    );
    let (alert, resolve) = (&received[0], &received[1]);
    assert_eq!(alert["incident_id"], resolve["incident_id"]);
    assert_eq!(alert["endpoint"]["id"], web.as_str());
    assert_eq!(alert["endpoint"]["status"], "down");
    assert!(
        alert["summary"]
            .as_str()
            .is_some_and(|s| s.contains("[STATUS] is 503")),
        "{alert}"
    );
    assert_eq!(resolve["endpoint"]["status"], "up");
    assert!(resolve["resolved_at"].is_string(), "{resolve}");

    // The history holds every check, newest first.
    let history = c
        .admin(
            Method::GET,
            &format!("/api/v1/endpoints/{web}/results/?location=site-a"),
            None,
        )
        .await?;
    assert_eq!(history["count"], 10, "{history}");
    assert_eq!(history["results"][0]["verdict"], "up");
    assert_eq!(history["results"][0]["location"], "site-a");

    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_two_locations_degrades_with_one_and_goes_down_with_both() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let receiver = WebhookReceiver::start(0).await?;
    receiver.register(&c, &c.admin_key).await?;
    let a = c.create_agent("berlin", "site-a").await?;
    let b = c.create_agent("paris", "site-b").await?;
    let web = c
        .create_endpoint(http_endpoint("web", &["site-a", "site-b"], 2, 1, 1))
        .await?;
    a.report_all(&web, &[Up]).await?;
    b.report_all(&web, &[Up]).await?;
    c.wait_status(&web, "up").await?;

    a.report_all(&web, &[Down]).await?;
    let degraded = c.wait_status(&web, "degraded").await?;
    let states: Vec<(&str, &str)> = degraded["location_states"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["location"].as_str()?, s["state"].as_str()?)))
        .collect();
    assert_eq!(states, [("site-a", "down"), ("site-b", "up")]);
    assert!(degraded["incident"].is_null(), "{degraded}");

    b.report_all(&web, &[Down]).await?;
    c.wait_status(&web, "down").await?;
    receiver.wait_for("endpoint_down", 1).await?;
    // The first message is the down alert: `degraded` sent nothing.
    assert_eq!(receiver.received().len(), 1, "{:?}", receiver.received());

    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_sharing_a_database_alert_once_for_an_endpoint_and_a_silent_agent(
) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let silence = |config: &mut muster_coordinator::Config| {
        config.agent_silence = Some(Duration::from_secs(2));
    };
    let c1 = TestCoordinator::start_with(&db, silence).await?;
    let c2 = TestCoordinator::start_another_with(&db, &c1, silence).await?;
    let receiver = WebhookReceiver::start(0).await?;
    receiver.register(&c1, &c1.admin_key).await?;
    // Two agents at two locations, each talking to its own coordinator.
    let a = c1.create_agent("berlin", "site-a").await?;
    let b = c1.create_agent("paris", "site-b").await?.via(&c2);
    assert_eq!(a.heartbeat().await?.0, 200);
    assert_eq!(b.heartbeat().await?.0, 200);
    let web = c1
        .create_endpoint(http_endpoint("web", &["site-a", "site-b"], 1, 1, 1))
        .await?;

    // Both report failures at once: each coordinator evaluates the same
    // endpoint, and one incident opens, with one alert.
    let endpoint = Uuid::parse_str(&web)?;
    for _ in 0..4 {
        let reports: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|agent| {
                tokio::spawn(async move {
                    let result = check_result(endpoint, agent.next_time(), Down);
                    agent.report(vec![result]).await
                })
            })
            .collect();
        for report in reports {
            let (status, body) = report.await??;
            assert_eq!(status, 202, "{body}");
            assert_eq!(body["accepted"], 1, "{body}");
        }
    }
    let down = c2.wait_status(&web, "down").await?;
    receiver.wait_for("endpoint_down", 1).await?;

    // The agents stop: one alert each, from whichever coordinator noticed
    // first; their locations' checks are unknown, not down.
    receiver.wait_for("agent_silent", 2).await?;
    let unknown = c2.wait_status(&web, "unknown").await?;
    assert_eq!(unknown["location_states"][0]["state"], "unknown");
    assert_eq!(unknown["location_states"][1]["state"], "unknown");
    assert_eq!(
        unknown["incident"], down["incident"],
        "silence is no recovery"
    );
    let agents = c2.admin(Method::GET, "/api/v1/agents/", None).await?;
    let listed = agent_listed(&agents, &a.id).expect("the agent listed");
    assert_eq!(listed["status"], "offline", "{listed}");
    assert!(listed["silent_since"].is_string(), "{listed}");
    let mut silent: Vec<String> = receiver
        .received()
        .iter()
        .filter(|m| m["event"] == "agent_silent")
        .map(|m| m["agent"]["location"].as_str().unwrap_or("").to_owned())
        .collect();
    silent.sort();
    assert_eq!(silent, ["site-a", "site-b"]);

    // One comes back: one resolve.
    assert_eq!(a.via(&c2).heartbeat().await?.0, 200);
    receiver.wait_for("agent_resolved", 1).await?;
    // What came before the resolve (the agent, still at a 2 s silence,
    // may fall silent again after it).
    let received = receiver.received();
    let before: Vec<&str> = received
        .iter()
        .filter_map(|m| m["event"].as_str())
        .take_while(|e| *e != "agent_resolved")
        .collect();
    let count = |event: &str| before.iter().filter(|e| **e == event).count();
    assert_eq!(
        (
            count("endpoint_down"),
            count("agent_silent"),
            count("endpoint_resolved")
        ),
        (1, 2, 0),
        "{received:?}"
    );

    c2.coordinator.shutdown(Duration::from_secs(5)).await;
    c1.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_mutes_the_alerts_of_its_endpoints() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let receiver = WebhookReceiver::start(0).await?;
    receiver.register(&c, &c.admin_key).await?;
    let agent = c.create_agent("berlin", "site-a").await?;
    let web = c
        .create_endpoint(http_endpoint("web", &["site-a"], 1, 1, 1))
        .await?;
    let api = c
        .create_endpoint(http_endpoint("api", &["site-a"], 1, 1, 1))
        .await?;
    let now = Utc::now();
    let window = json!({
        "start": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "end": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "endpoint_ids": [web],
        "reason": "database upgrade",
    });
    // Bad windows are refused by field.
    let mut backwards = window.clone();
    backwards["end"] = json!((now - chrono::Duration::hours(1)).to_rfc3339());
    let (status, answer) = c
        .call(
            &c.admin_key,
            Method::POST,
            "/api/v1/maintenance-windows/",
            Some(backwards),
        )
        .await?;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("end:")),
        "{answer}"
    );
    let mut unknown = window.clone();
    unknown["endpoint_ids"] = json!([Uuid::now_v7()]);
    let (status, answer) = c
        .call(
            &c.admin_key,
            Method::POST,
            "/api/v1/maintenance-windows/",
            Some(unknown),
        )
        .await?;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("endpoint_ids[0]")),
        "{answer}"
    );
    let created = c
        .admin(Method::POST, "/api/v1/maintenance-windows/", Some(window))
        .await?;
    assert_eq!(created["endpoint_ids"], json!([web]));
    let windows = c
        .admin(Method::GET, "/api/v1/maintenance-windows/", None)
        .await?;
    assert_eq!(windows["count"], 1);

    // Both fail; only the one outside the window alerts.
    agent.report_all(&web, &[Down]).await?;
    agent.report_all(&api, &[Down]).await?;
    let muted = c.wait_status(&web, "down").await?;
    assert_eq!(muted["incident"]["muted"], true, "{muted}");
    receiver.wait_for("endpoint_down", 1).await?;
    agent.report_all(&web, &[Up]).await?;
    agent.report_all(&api, &[Up]).await?;
    c.wait_status(&web, "up").await?;
    receiver.wait_for("endpoint_resolved", 1).await?;
    give_a_duplicate_time_to_arrive().await;
    let received = receiver.received();
    let names: Vec<(String, String)> = received
        .iter()
        .map(|m| {
            (
                m["event"].as_str().unwrap_or("").to_owned(),
                m["endpoint"]["name"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("endpoint_down".to_owned(), "api".to_owned()),
            ("endpoint_resolved".to_owned(), "api".to_owned())
        ],
        "{received:?}"
    );

    let id = created["id"].as_str().unwrap_or_default();
    c.admin(
        Method::DELETE,
        &format!("/api/v1/maintenance-windows/{id}/"),
        None,
    )
    .await?;
    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_and_batches_are_refused_with_what_was_wrong() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let post = |body: Value| c.call(&c.admin_key, Method::POST, "/api/v1/endpoints/", Some(body));

    let mut bad = http_endpoint("web", &["site-a"], 1, 3, 2);
    bad["conditions"] = json!(["[STATUS] == 200", "[RESPONSE_TIME] < 30x"]);
    let (status, answer) = post(bad).await?;
    assert_eq!(status, 422, "{answer}");
    let detail = answer["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("conditions[1]: column 19:"), "{detail}");

    let mut tcp = http_endpoint("db", &["site-a"], 1, 3, 2);
    tcp["kind"] = json!("tcp");
    tcp["target"] = json!("127.0.0.1:5432");
    let (status, answer) = post(tcp.clone()).await?;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.contains("conditions[0]: [STATUS] is not measured by tcp checks")),
        "{answer}"
    );
    tcp["conditions"] = json!(["[CONNECTED] == true"]);
    assert_eq!(post(tcp).await?.0, 201);

    let mut quorum = http_endpoint("web", &["site-a"], 2, 3, 2);
    let (status, answer) = post(quorum.clone()).await?;
    assert_eq!(status, 422);
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("min_failing_locations:")),
        "{answer}"
    );
    quorum["min_failing_locations"] = json!(1);
    quorum["locations"] = json!("site-a");
    assert_eq!(post(quorum).await?.0, 422);
    let (status, answer) = c
        .call(&c.admin_key, Method::POST, "/api/v1/endpoints/", None)
        .await?;
    assert!(status == 400 || status == 415, "{status} {answer}");

    // Batches: at most 1000 results; malformed JSON is a 400; results from
    // the future are refused one by one.
    let agent = c.create_agent("berlin", "site-a").await?;
    let web = c
        .create_endpoint(http_endpoint("web", &["site-a"], 1, 3, 2))
        .await?;
    let endpoint = Uuid::parse_str(&web)?;
    let (status, answer) = agent
        .report(
            (0..1001)
                .map(|_| check_result(endpoint, Utc::now(), Up))
                .collect(),
        )
        .await?;
    assert_eq!(status, 413, "{answer}");
    let response = reqwest::Client::new()
        .post(agent.url("/api/v1/agent/results/"))
        .bearer_auth(&agent.token)
        .header("Content-Type", "application/json")
        .body("{\"results\": [")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    let (status, answer) = agent
        .report(vec![check_result(
            endpoint,
            Utc::now() + chrono::Duration::hours(1),
            Up,
        )])
        .await?;
    assert_eq!(status, 202);
    assert_eq!(answer["accepted"], 0);
    assert!(
        answer["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("in the future")),
        "{answer}"
    );
    // Text PostgreSQL cannot store refuses its result alone, not the batch
    // (which it once failed whole).
    let mut nul = check_result(endpoint, agent.next_time(), Up);
    nul.measured.body = Some("a\u{0}b".into());
    let (status, answer) = agent
        .report(vec![nul, check_result(endpoint, agent.next_time(), Up)])
        .await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (&answer["stored"], &answer["accepted"]),
        (&json!(1), &json!(1))
    );
    assert!(
        answer["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("measured.body: contains a NUL")),
        "{answer}"
    );
    // An object written as an array of its fields (serde would read it).
    let mut batch = json!({"results": [check_result(endpoint, agent.next_time(), Up)]});
    batch["results"][0]["tls"] = json!([null, null]);
    let response = reqwest::Client::new()
        .post(agent.url("/api/v1/agent/results/"))
        .bearer_auth(&agent.token)
        .json(&batch)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 422);
    let answer: Value = response.json().await?;
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.contains("results[0].tls: expected an object")),
        "{answer}"
    );

    // A window from before PostgreSQL's earliest time (4713 BC), which
    // serde reads from an extended year: once a 500.
    let (status, answer) = c
        .call(
            &c.admin_key,
            Method::POST,
            "/api/v1/maintenance-windows/",
            Some(json!({"start": "-5000-01-01T00:00:00Z", "end": "2999-01-01T00:00:00Z"})),
        )
        .await?;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("start: expected a time from year 0")),
        "{answer}"
    );

    // Notifiers: webhooks only, with a URL.
    for (body, field) in [
        (json!({"kind": "email", "url": "http://x/"}), "kind:"),
        (json!({"kind": "webhook", "url": "ftp://x/"}), "url:"),
    ] {
        let (status, answer) = c
            .call(&c.admin_key, Method::POST, "/api/v1/notifiers/", Some(body))
            .await?;
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(field)),
            "{answer}"
        );
    }

    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_reach_only_the_addresses_the_operator_allows() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    // Of the host's loopback, only 127.0.0.2 is open to webhooks.
    let c = TestCoordinator::start_with(&db, |config| {
        config.webhook_allow_networks = vec!["127.0.0.2/32".parse().expect("a network")];
    })
    .await?;
    for (url, expected) in [
        (
            "http://127.0.0.1:9/hook",
            "url: 127.0.0.1 is a loopback address",
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            "url: 169.254.169.254 is a link-local address",
        ),
        ("http://[::ffff:127.0.0.1]/hook", "loopback address"),
        ("http://[::1]:9/hook", "url: ::1 is a loopback address"),
        ("http://0.0.0.0:9/hook", "unspecified address"),
    ] {
        let (status, answer) = c
            .call(
                &c.admin_key,
                Method::POST,
                "/api/v1/notifiers/",
                Some(json!({"kind": "webhook", "url": url})),
            )
            .await?;
        assert_eq!(status, 422, "{url}: {answer}");
        let detail = answer["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(expected), "{url}: {answer}");
        assert!(
            detail.contains("--webhook-allow-network"),
            "{url}: {answer}"
        );
    }

    let allowed = WebhookReceiver::start_on("127.0.0.2".parse()?, 0).await?;
    allowed.register(&c, &c.admin_key).await?;
    // A name is taken at creation; where it leads is looked at each post.
    let behind_a_name = WebhookReceiver::start(0).await?;
    let (status, answer) = c
        .call(
            &c.admin_key,
            Method::POST,
            "/api/v1/notifiers/",
            Some(json!({"kind": "webhook", "url": behind_a_name.url.replace("127.0.0.1", "localhost")})),
        )
        .await?;
    assert_eq!(status, 201, "{answer}");

    let agent = c.create_agent("berlin", "site-a").await?;
    let web = c
        .create_endpoint(http_endpoint("web", &["site-a"], 1, 1, 1))
        .await?;
    agent.report_all(&web, &[Up]).await?;
    c.wait_status(&web, "up").await?;
    agent.report_all(&web, &[Down]).await?;
    c.wait_status(&web, "down").await?;
    allowed.wait_for("endpoint_down", 1).await?;
    // Both notifiers' messages were sent at once; the refused one is not
    // retried into a post later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(behind_a_name.posts(), 0, "{:?}", behind_a_name.received());

    c.coordinator.shutdown(Duration::from_secs(5)).await;
    db.drop_db().await;
    Ok(())
}
