//! Who may talk to the coordinator: runners only with a certificate its CA
//! signed, enrollment only with a live join token, API callers only with a
//! valid key and only within their organization.

use std::sync::Arc;
use std::time::Duration;

use muster_common::pki::{self, CertificateAuthority};
use muster_tests::{example_workspace, TestCoordinator, TestDb};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects to the gRPC port with `client_cert` (or none) and reports whether
/// the server accepted the TLS session: an accepted HTTP/2 server speaks
/// first (its SETTINGS frame); a refused one sends an alert.
pub(crate) async fn tls_session_accepted(
    c: &TestCoordinator,
    client_cert: Option<(String, String)>,
) -> anyhow::Result<Result<(), String>> {
    let ca_pem = std::fs::read_to_string(c.data_dir.path().join("ca.pem"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki::certs_from_pem(&ca_pem)? {
        roots.add(cert)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((cert, key)) => {
            builder.with_client_auth_cert(pki::certs_from_pem(&cert)?, pki::key_from_pem(&key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(c.coordinator.grpc_addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = match connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Ok(Err(e.to_string())),
    };
    // The HTTP/2 client preface, so an accepting server answers.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(Ok(())),
        Ok(Ok(_)) => Ok(Err("closed without a word".into())),
        Ok(Err(e)) => Ok(Err(e.to_string())),
        Err(_) => Ok(Err("no answer".into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_without_valid_certificate_is_refused_at_handshake() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;

    // No certificate at all.
    let refused = tls_session_accepted(&c, None).await?.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");

    // A runner certificate from another CA.
    let foreign = CertificateAuthority::generate("someone else's CA")?;
    let (csr, key) = pki::generate_csr("intruder")?;
    let cert = foreign.sign_runner_csr(
        &csr,
        "0192a0c2-0000-7000-8000-000000000000",
        Duration::from_secs(3600),
    )?;
    let refused = tls_session_accepted(&c, Some((cert.pem, key)))
        .await?
        .unwrap_err();
    assert!(
        refused.to_lowercase().contains("certificate") || refused.contains("UnknownCA"),
        "{refused}"
    );

    // Control: a runner enrolled through the front door is accepted.
    let runner = c.start_runner(1).await?;
    let identity: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        runner.data_dir.path().join("identity.json"),
    )?)?;
    let own = (
        identity["cert_pem"].as_str().unwrap().to_owned(),
        identity["key_pem"].as_str().unwrap().to_owned(),
    );
    assert_eq!(tls_session_accepted(&c, Some(own)).await?, Ok(()));

    runner.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_or_expired_join_tokens_are_refused() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let token = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/runners/join-tokens/",
            Some(json!({})),
        )
        .await?;
    assert_eq!(token["single_use"], true);
    let enroll = |t: &serde_json::Value| {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = muster_runner::Config::for_tests(
            c.grpc_url(),
            t["token"].as_str().unwrap().to_owned(),
            t["ca_cert_hash"].as_str().unwrap().to_owned(),
            dir.path().to_path_buf(),
        );
        async move {
            let result = muster_runner::identity::load_or_enroll(&config).await;
            drop(dir);
            result
        }
    };
    enroll(&token).await?;
    let err = enroll(&token).await.unwrap_err();
    assert!(format!("{err:#}").contains("already used"), "{err:#}");

    // A pinned hash that is not the coordinator's CA: refused before any token is sent.
    let mut wrong = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/runners/join-tokens/",
            Some(json!({})),
        )
        .await?;
    wrong["ca_cert_hash"] = json!(format!("sha256:{}", "0".repeat(64)));
    let err = enroll(&wrong).await.unwrap_err();
    assert!(format!("{err:#}").contains("--ca-cert-hash"), "{err:#}");

    let expired = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/runners/join-tokens/",
            Some(json!({"single_use": false})),
        )
        .await?;
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE join_tokens SET expires_at = now() - interval '1 second' WHERE NOT single_use",
            &[],
        )
        .await?;
    let err = enroll(&expired).await.unwrap_err();
    assert!(format!("{err:#}").contains("expired"), "{err:#}");

    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_cannot_see_each_other() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    c.push_dir(&c.admin_key, &example_workspace()).await?;
    let run_id = c
        .trigger(
            "acme-corp-automation",
            json!({"block": "linux-patch", "action": "hello"}),
        )
        .await?;

    c.admin(
        reqwest::Method::POST,
        "/api/v1/organizations/",
        Some(json!({"name": "beta"})),
    )
    .await?;
    let key = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/api-keys/",
            Some(json!({"name": "beta ci", "identity": "beta-ci", "role": "org_admin", "organization": "beta"})),
        )
        .await?;
    let beta = key["key"].as_str().unwrap().to_owned();
    assert_eq!(key["organization"], "beta");

    let get = |path: &'static str| c.call(&beta, reqwest::Method::GET, path, None);
    assert_eq!(
        get("/api/v1/workspaces/acme-corp-automation/").await?.0,
        404
    );
    let (status, body) = c
        .call(
            &beta,
            reqwest::Method::POST,
            "/api/v1/workspaces/acme-corp-automation/actions",
            Some(json!({"block": "linux-patch", "action": "hello"})),
        )
        .await?;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["detail"], "workspace 'acme-corp-automation' not found");
    assert_eq!(
        c.call(
            &beta,
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/"),
            None
        )
        .await?
        .0,
        404
    );
    assert_eq!(
        c.call(
            &beta,
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/logs/"),
            None
        )
        .await?
        .0,
        404
    );
    assert_eq!(get("/api/v1/action-runs/").await?.1["count"], 0);
    assert_eq!(get("/api/v1/workspaces/").await?.1["count"], 0);
    // And it cannot push into acme either.
    let (status, body) = c.push_dir(&beta, &example_workspace()).await?;
    assert_eq!(status, 422, "{body}");
    // The admin still sees the run.
    assert_eq!(
        c.call(
            &c.admin_key,
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run_id}/"),
            None
        )
        .await?
        .0,
        200
    );

    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_checked_and_revocation_is_immediate() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let no_auth = c.http.get(c.url("/api/v1/workspaces/")).send().await?;
    assert_eq!(no_auth.status().as_u16(), 401);
    assert_eq!(
        c.call(
            "poly_notarealkey",
            reqwest::Method::GET,
            "/api/v1/workspaces/",
            None
        )
        .await?
        .0,
        401
    );
    let forged = muster_common::token::generate(muster_common::token::TokenKind::ApiKey);
    assert_eq!(
        c.call(&forged, reqwest::Method::GET, "/api/v1/workspaces/", None)
            .await?
            .0,
        401
    );

    let created = c
        .admin(
            reqwest::Method::POST,
            "/api/v1/api-keys/",
            Some(json!({"name": "ci"})),
        )
        .await?;
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("poly_"));
    assert_eq!(
        c.call(&key, reqwest::Method::GET, "/api/v1/workspaces/", None)
            .await?
            .0,
        200
    );
    // Listed without the secret, with its last use recorded.
    let list = c
        .admin(reqwest::Method::GET, "/api/v1/api-keys/", None)
        .await?;
    let listed = list["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == created["id"])
        .unwrap()
        .clone();
    assert!(listed.get("key").is_none());
    assert!(listed["last_used_at"].is_string());
    assert!(!list.to_string().contains(&key));

    let id = created["id"].as_str().unwrap();
    assert_eq!(
        c.call(
            &c.admin_key,
            reqwest::Method::DELETE,
            &format!("/api/v1/api-keys/{id}/"),
            None
        )
        .await?
        .0,
        204
    );
    assert_eq!(
        c.call(&key, reqwest::Method::GET, "/api/v1/workspaces/", None)
            .await?
            .0,
        401
    );

    c.stop().await;
    db.drop_db().await;
    Ok(())
}
