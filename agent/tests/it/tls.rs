//! HTTPS and TLS details against a real TLS server on loopback whose
//! certificate expires in two days (signed by a CA the test makes).

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::Utc;
use hyper_util::rt::TokioIo;
use muster_agent::check::{self, tls::earliest_expiry};
use muster_common::monitor::Verdict;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use time::{Duration, OffsetDateTime};

use crate::support::{checker, checker_trusting, endpoint};

pub struct TestPki {
    pub ca_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// A CA valid for `ca_days` and a certificate for localhost and 127.0.0.1
/// valid for `leaf_days`, signed by it.
pub fn pki(ca_days: i64, leaf_days: i64) -> TestPki {
    let now = OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(ca_days);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "muster test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf.not_before = now - Duration::hours(1);
    leaf.not_after = now + Duration::days(leaf_days);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        chain: vec![leaf_cert.der().clone(), ca.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

/// An HTTPS server on 127.0.0.1 presenting `pki`'s chain; answers "secure".
/// With `http` false it only handshakes and then writes "hello\n" (for TCP
/// checks with TLS).
pub async fn tls_server(pki: &TestPki, http: bool) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(pki.chain.clone(), pki.key.clone_key())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Handshakes the checks abort are no concern here.
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if http {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"secure")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                } else {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.write_all(b"hello\n").await;
                    let _ = tls.flush().await;
                }
            });
        }
    });
    addr
}

fn about_two_days_left(ms: f64) -> bool {
    let two_days = 2.0 * 86_400_000.0;
    (ms - two_days).abs() < 3_600_000.0
}

#[tokio::test]
async fn insecure_tls_measures_version_and_expiry() {
    let pki = pki(3650, 2);
    let addr = tls_server(&pki, true).await;
    let e = endpoint(
        "http",
        &format!("https://localhost:{}/", addr.port()),
        json!({
            "http": {"insecure_tls": true},
            "conditions": [
                {"condition": "[STATUS] == 200"},
                {"condition": "[BODY] == secure"},
                {"condition": "[CERTIFICATE_EXPIRATION] > 24h"},
            ],
        }),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert_eq!(r.tls.version.as_deref(), Some("TLSv1.3"));
    let expires = r.tls.certificate_expires_at.expect("an expiry");
    let left = (expires - Utc::now()).num_milliseconds() as f64;
    assert!(about_two_days_left(left), "{expires}");
    assert!(about_two_days_left(
        r.measured.certificate_expiration_ms.unwrap()
    ));
    let t = &r.timings;
    let tls = t.tls_ms.expect("a TLS phase");
    assert!(t.dns_ms.is_some() && t.connect_ms.is_some() && t.first_byte_ms.is_some());
    assert!(tls > 0.0 && tls < t.total_ms, "{t:?}");

    // The same server fails a condition wanting three days.
    let e = endpoint(
        "http",
        &format!("https://127.0.0.1:{}/", addr.port()),
        json!({
            "http": {"insecure_tls": true},
            "conditions": [{"condition": "[CERTIFICATE_EXPIRATION] > 72h"}],
        }),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Down);
    assert!(r.error.is_none());
}

#[tokio::test]
async fn certificates_are_verified_against_the_ca_file() {
    let pki = pki(3650, 2);
    let addr = tls_server(&pki, true).await;
    let target = format!("https://localhost:{}/", addr.port());

    // The system's CA bundle does not know the test CA.
    let r = check::run(&checker(), &endpoint("http", &target, json!({}))).await;
    assert_eq!(r.verdict, Verdict::Down);
    let error = r.error.unwrap();
    assert!(error.starts_with("TLS handshake failed"), "{error}");
    assert!(error.contains("UnknownIssuer"), "{error}");

    // A CA file with the test CA in it does.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let trusting = checker_trusting(&ca_file);
    let r = check::run(&trusting, &endpoint("http", &target, json!({}))).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert!(r.tls.certificate_expires_at.is_some());

    // Verified by name: 127.0.0.1 is in the certificate too; another name is not.
    let by_ip = format!("https://127.0.0.1:{}/", addr.port());
    let r = check::run(&trusting, &endpoint("http", &by_ip, json!({}))).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");

    // Without any CA file the error says so.
    let none = checker_trusting(&dir.path().join("missing.pem"));
    let r = check::run(&none, &endpoint("http", &target, json!({}))).await;
    let error = r.error.unwrap();
    assert!(
        error.contains("no CA certificates were loaded from"),
        "{error}"
    );
}

#[tokio::test]
async fn the_earliest_expiry_of_the_chain_counts() {
    // A CA that expires before the certificate it signed.
    let pki = pki(1, 2);
    let expiry = earliest_expiry(&pki.chain).unwrap();
    let left = (expiry - Utc::now()).num_hours();
    assert!((23..=24).contains(&left), "{left}");
    let addr = tls_server(&pki, true).await;
    let e = endpoint(
        "http",
        &format!("https://127.0.0.1:{}/", addr.port()),
        json!({"http": {"insecure_tls": true}}),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.tls.certificate_expires_at, Some(expiry));
}

#[tokio::test]
async fn a_tcp_check_can_handshake_for_the_expiry() {
    let pki = pki(3650, 2);
    let addr = tls_server(&pki, false).await;
    let e = endpoint(
        "tcp",
        &addr.to_string(),
        json!({
            "tcp": {"tls": true, "expect": "hello"},
            "conditions": [{"condition": "[CERTIFICATE_EXPIRATION] > 1d"}],
        }),
    );
    let r = check::run(&checker(), &e).await;
    assert_eq!(r.verdict, Verdict::Up, "{r:#?}");
    assert!(about_two_days_left(
        r.measured.certificate_expiration_ms.unwrap()
    ));
    assert!(r.timings.tls_ms.is_some() && r.timings.first_byte_ms.is_some());
    assert_eq!(r.tls.version.as_deref(), Some("TLSv1.3"));
}
