//! The runner's identity: enrollment with a join token on first start, then
//! the key, certificate and CA kept in the data directory, renewed over the
//! stream before the certificate expires; and the TLS connector both kinds
//! of connection use.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use anyhow::{anyhow, bail, Context as _};
use hyper_util::rt::TokioIo;
use muster_common::pki::{self, PinnedCaVerifier, ENROLL_SERVER_NAME};
use muster_common::secret::write_private_file;
use muster_proto::runner::v1::runner_service_client::RunnerServiceClient;
use muster_proto::runner::v1::{CertificateRenewed, EnrollRequest, RenewCertificate};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub runner_id: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

const IDENTITY_FILE: &str = "identity.json";

/// Where the runner keeps its identity.
pub fn identity_path(config: &Config) -> PathBuf {
    config.data_dir.join(IDENTITY_FILE)
}

/// Loads the stored identity, or enrolls with the join token.
pub async fn load_or_enroll(config: &Config) -> anyhow::Result<Identity> {
    let path = identity_path(config);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let identity: Identity = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a runner identity", path.display()))?;
        tracing::info!(runner_id = %identity.runner_id, "using the stored runner identity");
        return Ok(identity);
    }
    let token = config
        .join_token()
        .map_err(anyhow::Error::msg)?
        .ok_or_else(|| anyhow!("this runner is not enrolled yet: pass --join-token (or --join-token-file) and --ca-cert-hash"))?;
    let pin = config
        .ca_cert_hash
        .as_deref()
        .ok_or_else(|| anyhow!("--ca-cert-hash is required to enroll: it is how the runner knows it talks to your coordinator"))?;
    let identity = enroll(config, token.expose(), pin).await?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    write_private_file(&path, serde_json::to_string_pretty(&identity)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(runner_id = %identity.runner_id, "enrolled with the coordinator");
    Ok(identity)
}

async fn enroll(config: &Config, token: &str, pin: &str) -> anyhow::Result<Identity> {
    let name = config.name.clone().unwrap_or_else(hostname);
    let (csr_pem, key_pem) = pki::generate_csr(&name)?;
    let mut tls = ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let channel = channel(config, Arc::new(tls), ENROLL_SERVER_NAME).await?;
    let response = RunnerServiceClient::new(channel)
        .enroll(EnrollRequest {
            join_token: token.to_owned(),
            csr_pem,
            name,
            labels: config
                .labels()
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .collect(),
            capacity: config.capacity,
        })
        .await
        .map_err(|status| anyhow!("enrollment refused: {}", status.message()))?
        .into_inner();
    Ok(Identity {
        runner_id: response.runner_id,
        cert_pem: response.certificate_pem,
        key_pem,
        ca_pem: response.ca_certificate_pem,
    })
}

/// The identity in use and the file it is kept in. A renewal replaces both:
/// the file atomically (a new file renamed over the old, mode 0600), so a
/// crash leaves the old identity or the new one, never half of each.
pub struct IdentityFile {
    path: PathBuf,
    current: Mutex<Identity>,
    /// The key of the renewal asked for last, until its certificate comes.
    pending_key: Mutex<Option<String>>,
}

impl IdentityFile {
    pub fn new(path: PathBuf, identity: Identity) -> Self {
        IdentityFile {
            path,
            current: Mutex::new(identity),
            pending_key: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Identity {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the current certificate has less than a third of its validity
    /// left (or cannot be read, which a new one cures).
    pub fn renewal_due(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        let identity = self.current();
        pki::certs_from_pem(&identity.cert_pem)
            .ok()
            .and_then(|certs| pki::runner_cert_info(&certs[0]))
            .is_none_or(|cert| cert.renewal_due(now))
    }

    /// A renewal request for a new key, which is kept until the answer comes.
    pub fn renewal_request(&self) -> anyhow::Result<RenewCertificate> {
        let name = format!("muster-runner:{}", self.current().runner_id);
        let (csr_pem, key_pem) = pki::generate_csr(&name)?;
        *self
            .pending_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(key_pem);
        Ok(RenewCertificate { csr_pem })
    }

    /// Checks the coordinator's answer to the last renewal request and makes
    /// the new certificate the identity, on disk and for the next connection.
    /// Blocks on the file system.
    pub fn renewed(&self, answer: &CertificateRenewed) -> anyhow::Result<()> {
        let key_pem = self
            .pending_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                anyhow!("a renewed certificate came that this runner did not ask for")
            })?;
        let mut identity = self.current();
        if !pki::cert_matches_key(&answer.cert_pem, &key_pem)? {
            bail!("the renewed certificate is not for the key this runner sent");
        }
        let leaf = pki::certs_from_pem(&answer.cert_pem)?.remove(0);
        let info = pki::runner_cert_info(&leaf)
            .ok_or_else(|| anyhow!("the renewed certificate is not a runner certificate"))?;
        if info.runner_id != identity.runner_id {
            bail!(
                "the renewed certificate is for runner {}, expected {}",
                info.runner_id,
                identity.runner_id
            );
        }
        // Signed by the CA this runner trusts, and valid now: a certificate
        // the coordinator would refuse must not replace one it accepts.
        let mut roots = RootCertStore::empty();
        for cert in pki::certs_from_pem(&identity.ca_pem)? {
            roots.add(cert)?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), pki::provider())
            .build()?
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .context("the renewed certificate does not verify against the coordinator's CA")?;
        identity.cert_pem = answer.cert_pem.clone();
        identity.key_pem = key_pem;
        write_private_file(
            &self.path,
            serde_json::to_string_pretty(&identity)?.as_bytes(),
        )
        .with_context(|| format!("writing {}", self.path.display()))?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = identity;
        Ok(())
    }
}

/// Whether an error is the coordinator refusing this runner's certificate as
/// revoked (the TLS `certificate_revoked` alert), wherever in the chain of
/// causes it sits. The alert reaches the runner through hyper and tonic as an
/// I/O error that keeps only rustls's message, so the message is what is
/// compared.
pub fn refused_as_revoked(error: &(dyn std::error::Error + 'static)) -> bool {
    let alert =
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked).to_string();
    let mut next = Some(error);
    // The chain is short; the bound only guards against a cyclic one.
    for _ in 0..32 {
        let Some(e) = next else { return false };
        if e.to_string().contains(&alert) {
            return true;
        }
        next = e.source();
    }
    false
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "runner".to_owned())
}

/// mTLS client configuration from the stored identity.
pub fn mutual_tls(identity: &Identity) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in pki::certs_from_pem(&identity.ca_pem)? {
        roots.add(cert)?;
    }
    let mut tls = ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pki::certs_from_pem(&identity.cert_pem)?,
            pki::key_from_pem(&identity.key_pem)?,
        )?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// A gRPC channel over our own TLS (the name we verify may differ from the
/// address we dial: enrollment asks for `ENROLL_SERVER_NAME`).
pub async fn channel(
    config: &Config,
    tls: Arc<ClientConfig>,
    server_name: &str,
) -> anyhow::Result<Channel> {
    let (host, port) = config.endpoint().map_err(anyhow::Error::msg)?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| anyhow!("invalid server name {server_name}: {e}"))?;
    let connector = TlsConnector {
        tls,
        name,
        addr: format!("{host}:{port}"),
    };
    let endpoint = Endpoint::from_shared(format!("http://{}", connector.addr))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to the coordinator at {}", config.coordinator))
}

/// The host name a runner verifies on its mTLS connection.
pub fn server_name(config: &Config) -> anyhow::Result<String> {
    Ok(config.endpoint().map_err(anyhow::Error::msg)?.0)
}

#[derive(Clone)]
struct TlsConnector {
    tls: Arc<ClientConfig>,
    name: ServerName<'static>,
    addr: String,
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(this.tls)
                .connect(this.name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use muster_common::pki::CertificateAuthority;

    use super::*;

    /// An enrolled identity in a temporary directory, and the CA behind it.
    fn enrolled(dir: &Path, runner_id: &str) -> (IdentityFile, CertificateAuthority) {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (csr, key_pem) = pki::generate_csr("r").unwrap();
        let issued = ca
            .sign_runner_csr(&csr, runner_id, Duration::from_secs(3600))
            .unwrap();
        let identity = Identity {
            runner_id: runner_id.into(),
            cert_pem: issued.pem,
            key_pem,
            ca_pem: ca.cert_pem().to_owned(),
        };
        let path = dir.join(IDENTITY_FILE);
        write_private_file(&path, serde_json::to_string(&identity).unwrap().as_bytes()).unwrap();
        (IdentityFile::new(path, identity), ca)
    }

    fn on_disk(file: &IdentityFile) -> Identity {
        serde_json::from_str(&std::fs::read_to_string(file.path()).unwrap()).unwrap()
    }

    fn answer(ca: &CertificateAuthority, csr_pem: &str, runner_id: &str) -> CertificateRenewed {
        let issued = ca
            .sign_runner_csr(csr_pem, runner_id, Duration::from_secs(3600))
            .unwrap();
        CertificateRenewed {
            cert_pem: issued.pem,
            not_after_ms: issued.not_after.timestamp_millis(),
        }
    }

    #[test]
    fn a_renewal_replaces_the_identity_on_disk_and_in_use() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (file, ca) = enrolled(dir.path(), "r-1");
        let before = file.current();
        assert!(!file.renewal_due(chrono::Utc::now()));
        assert!(file.renewal_due(chrono::Utc::now() + chrono::Duration::minutes(50)));

        let request = file.renewal_request().unwrap();
        file.renewed(&answer(&ca, &request.csr_pem, "r-1")).unwrap();
        let after = file.current();
        assert_eq!(after.runner_id, "r-1");
        assert_ne!(after.cert_pem, before.cert_pem);
        assert_ne!(after.key_pem, before.key_pem);
        assert!(pki::cert_matches_key(&after.cert_pem, &after.key_pem).unwrap());
        let stored = on_disk(&file);
        assert_eq!(
            (stored.cert_pem, stored.key_pem),
            (after.cert_pem, after.key_pem)
        );
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        mutual_tls(&file.current()).unwrap();
    }

    #[test]
    fn a_wrong_answer_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (file, ca) = enrolled(dir.path(), "r-1");
        let before = file.current();
        let refused = |answer: CertificateRenewed, expected: &str| {
            let error = format!("{:#}", file.renewed(&answer).unwrap_err());
            assert!(error.contains(expected), "{error}");
            assert_eq!(file.current().cert_pem, before.cert_pem);
            assert_eq!(on_disk(&file).cert_pem, before.cert_pem);
        };

        let (stray_csr, _) = pki::generate_csr("r").unwrap();
        refused(answer(&ca, &stray_csr, "r-1"), "did not ask for");

        file.renewal_request().unwrap();
        refused(answer(&ca, &stray_csr, "r-1"), "not for the key");

        let request = file.renewal_request().unwrap();
        refused(answer(&ca, &request.csr_pem, "r-2"), "for runner r-2");

        let request = file.renewal_request().unwrap();
        let other_ca = CertificateAuthority::generate("another CA").unwrap();
        refused(
            answer(&other_ca, &request.csr_pem, "r-1"),
            "does not verify",
        );

        file.renewal_request().unwrap();
        refused(
            CertificateRenewed {
                cert_pem: "garbage".into(),
                not_after_ms: 0,
            },
            "certificate",
        );
    }

    #[test]
    fn a_revoked_alert_is_recognised_through_its_wrappers() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked);
        let revoked = Wrapper(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            alert.to_string(),
        ));
        assert!(refused_as_revoked(&revoked));
        let other = Wrapper(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA).to_string(),
        ));
        assert!(!refused_as_revoked(&other));
        assert!(!refused_as_revoked(&std::io::Error::other(
            "connection refused"
        )));
    }
}
