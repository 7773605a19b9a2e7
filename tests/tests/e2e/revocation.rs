//! Revoking a runner and renewing runner certificates, with real runners
//! over real mTLS: a revoked runner is cut off at once and refused at every
//! later handshake, by every coordinator sharing the database; a certificate
//! coming due is renewed over the runner's own stream.

use std::time::{Duration, Instant};

use muster_common::pki;
use muster_tests::{wait_until, TestCoordinator, TestDb};
use serde_json::{json, Value};

use crate::cancel::push_slow_workspace;
use crate::security::tls_session_accepted;
use muster_tests::containers_of_run as containers_of;

/// A new identity of `role` in `organization`; returns its API key.
async fn key_for(
    c: &TestCoordinator,
    identity: &str,
    role: &str,
    organization: &str,
) -> anyhow::Result<String> {
    let created = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/api-keys/",
            Some(json!({"name": identity, "identity": identity, "role": role, "organization": organization})),
        )
        .await?;
    Ok(created["key"].as_str().unwrap_or_default().to_owned())
}

fn cert_and_key(identity: &Value) -> (String, String) {
    (
        identity["cert_pem"].as_str().unwrap_or_default().to_owned(),
        identity["key_pem"].as_str().unwrap_or_default().to_owned(),
    )
}

fn serial_of(cert_pem: &str) -> anyhow::Result<String> {
    let der = pki::certs_from_pem(cert_pem)?.remove(0);
    Ok(pki::runner_cert_info(&der)
        .ok_or_else(|| anyhow::anyhow!("not a runner certificate"))?
        .serial_hex)
}

async fn delete_runner(c: &TestCoordinator, key: &str, id: &str) -> anyhow::Result<(u16, Value)> {
    c.call(
        key,
        reqwest::Method::DELETE,
        &format!("/api/v1/runners/{id}/"),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_runner_is_refused_at_the_handshake_and_its_stream_closed() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    push_slow_workspace(&c).await?;
    c.admin(
        reqwest::Method::POST,
        "/api/v1/organizations/",
        Some(json!({"name": "beta"})),
    )
    .await?;
    // The workspace's organization, acme, was created by the push.
    let org_admin = key_for(&c, "ops-lead", "org_admin", "acme").await?;
    let user = key_for(&c, "ci", "user", "acme").await?;
    let viewer = key_for(&c, "auditor", "viewer", "acme").await?;
    let beta_admin = key_for(&c, "beta-lead", "org_admin", "beta").await?;

    let runner = c.start_runner_of("acme", 1).await?;
    let id = runner.runner_id()?;
    let identity = runner.identity()?;
    let run = c
        .trigger("slow-ws", json!({"block": "slow", "action": "sleep"}))
        .await?;
    wait_until(Duration::from_secs(60), "the job to start", || async {
        Ok(c.log(&run).await?.contains("started"))
    })
    .await?;

    // Who may not: another organization sees no such runner; a user or a
    // viewer of its own organization lacks the role. Nothing changes.
    let (code, body) = delete_runner(&c, &beta_admin, &id).await?;
    assert_eq!(code, 404, "{body}");
    for key in [&user, &viewer] {
        let (code, body) = delete_runner(&c, key, &id).await?;
        assert_eq!(code, 403, "{body}");
    }
    let (code, body) = delete_runner(&c, &org_admin, "not-a-uuid").await?;
    assert_eq!(code, 404, "{body}");
    assert!(c.runner_online(&id).await?, "the runner is still online");

    // Its organization's admin revokes it.
    let revoked_at = Instant::now();
    let (code, body) = delete_runner(&c, &org_admin, &id).await?;
    assert_eq!(code, 204, "{body}");
    wait_until(
        Duration::from_secs(5),
        "the runner to go offline",
        || async {
            Ok(c.runner_listed(&id)
                .await?
                .is_some_and(|r| r["connected"] == false && r["status"] == "revoked"))
        },
    )
    .await?;
    println!(
        "revoked runner offline {:?} after the DELETE",
        revoked_at.elapsed()
    );
    let listed = c.runner_listed(&id).await?.unwrap_or_default();
    assert!(listed["revoked_at"].is_string(), "{listed}");

    // The coordinator's record of the run wins: lost, with the reason.
    let ended = c.wait_final(&run, Duration::from_secs(10)).await?;
    assert_eq!(ended["status"], "lost", "{ended}");
    assert_eq!(ended["error"], "the runner was revoked", "{ended}");
    // The runner was told to stop the job before its stream closed.
    wait_until(
        Duration::from_secs(30),
        "the job's container to go",
        || async { Ok(containers_of(&run)?.is_empty()) },
    )
    .await?;

    // Its certificate gets no further than the handshake, with the reason.
    let refused = tls_session_accepted(&c, Some(cert_and_key(&identity)))
        .await?
        .unwrap_err();
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    // The runner keeps trying (and logs why it fails); it stays offline.
    assert!(!runner.task.is_finished(), "the runner process gave up");
    assert!(!c.runner_online(&id).await?);

    // Revoking again changes nothing.
    let (code, body) = delete_runner(&c, &org_admin, &id).await?;
    assert_eq!(code, 204, "{body}");

    // A runner serving every organization: only a super admin revokes it.
    let (config, _dir) = c.runner_config(json!({})).await?;
    let shared = muster_runner::identity::load_or_enroll(&config).await?;
    let (code, body) = delete_runner(&c, &org_admin, &shared.runner_id).await?;
    assert_eq!(code, 403, "{body}");
    let (code, body) = delete_runner(&c, &c.admin_key, &shared.runner_id).await?;
    assert_eq!(code, 204, "{body}");

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_a_runner_another_coordinator_holds() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let holding = TestCoordinator::start(&db).await?;
    let other = TestCoordinator::start_another(&db, &holding).await?;
    let runner = holding.start_runner(1).await?;
    let id = runner.runner_id()?;

    let revoked_at = Instant::now();
    let (code, body) = delete_runner(&other, &other.admin_key, &id).await?;
    assert_eq!(code, 204, "{body}");
    // The holding coordinator reads revocations every 10 s.
    wait_until(
        Duration::from_secs(20),
        "the runner to go offline",
        || async {
            Ok(holding
                .runner_listed(&id)
                .await?
                .is_some_and(|r| r["connected"] == false))
        },
    )
    .await?;
    println!(
        "a runner held by another coordinator offline {:?} after the DELETE",
        revoked_at.elapsed()
    );
    let refused = tls_session_accepted(&holding, Some(cert_and_key(&runner.identity()?)))
        .await?
        .unwrap_err();
    assert!(refused.contains("CertificateRevoked"), "{refused}");

    runner.stop().await;
    other.stop().await;
    holding.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_certificate_is_renewed_over_the_stream() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    // So short that a certificate is due for renewal as soon as it is issued.
    let c = TestCoordinator::start_with(&db, |config| {
        config.runner_cert_validity = Some(Duration::from_secs(90));
    })
    .await?;
    push_slow_workspace(&c).await?;
    let store = c.coordinator.store.clone();

    let started = Instant::now();
    let runner = c.start_runner(1).await?;
    let id: uuid::Uuid = runner.runner_id()?.parse()?;
    // The renewal comes right after connecting, so it may be done by now;
    // the file changes after the store has recorded the new serial.
    wait_until(
        Duration::from_secs(15),
        "the certificate to be renewed",
        || async {
            let record = store.runner(id).await?.expect("the runner is stored");
            let cert = runner.identity()?["cert_pem"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            Ok(record.previous_cert_serial.is_some() && serial_of(&cert)? == record.cert_serial)
        },
    )
    .await?;
    println!(
        "certificate renewed {:?} after the runner started",
        started.elapsed()
    );
    let renewed = runner.identity()?;
    let (renewed_cert, renewed_key) = cert_and_key(&renewed);
    assert_eq!(renewed["runner_id"], json!(id.to_string()));
    assert!(
        pki::cert_matches_key(&renewed_cert, &renewed_key)?,
        "a new key with its certificate"
    );
    let record = store.runner(id).await?.expect("the runner is stored");
    assert_eq!(record.cert_serial, serial_of(&renewed_cert)?);
    // The enrolled certificate, which the runner presented to renew, stays
    // usable until the new one is used.
    let enrolled_serial = record.previous_cert_serial.expect("a previous serial");
    assert_ne!(enrolled_serial, record.cert_serial, "identity.json changed");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(runner.data_dir.path().join("identity.json"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "identity.json is private");
    }

    // The next connection uses the renewed certificate (and, this one being
    // due at once too, renews it again from there).
    let runner = c.restart_runner(runner).await?;
    wait_until(Duration::from_secs(15), "the second renewal", || async {
        Ok(runner.identity()?["cert_pem"] != renewed["cert_pem"])
    })
    .await?;
    let latest = runner.identity()?;
    let record = store.runner(id).await?.expect("the runner is stored");
    assert_eq!(
        record.cert_serial,
        serial_of(latest["cert_pem"].as_str().unwrap_or_default())?
    );
    assert_eq!(
        record.previous_cert_serial,
        Some(serial_of(&renewed_cert)?),
        "the renewal was asked for over a connection made with the renewed certificate"
    );

    // And it still runs jobs.
    let run = c
        .trigger("slow-ws", json!({"block": "slow", "action": "quick"}))
        .await?;
    let ended = c.wait_final(&run, Duration::from_secs(60)).await?;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(ended["runner_id"], json!(id), "{ended}");
    assert!(c.log(&run).await?.contains("hello"));

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
