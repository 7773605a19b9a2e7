//! The coordinator's CA and the gRPC port's TLS: the CA is created in the data
//! directory at first start (or supplied there by the operator as `ca.pem` and
//! `ca-key.pem`), and a fresh server certificate is issued from it at every
//! start.
//!
//! One port serves two kinds of connection, told apart by the server name the
//! client asks for: enrollment (`ENROLL_SERVER_NAME`; server-authenticated
//! TLS, only the `Enroll` call) and everything else, where a client
//! certificate signed by the CA, of a runner that was not revoked, is
//! required by the handshake itself.

use std::path::Path;
use std::sync::Arc;

use muster_common::pki::{self, CertificateAuthority, RunnerCert};
use muster_common::secret::write_private_file;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::revocation::{RevocationCheckingVerifier, Revocations};

/// The TLS server name a runner asks for when it enrolls.
pub use muster_common::pki::ENROLL_SERVER_NAME;

pub fn load_or_create_ca(data_dir: &Path) -> anyhow::Result<CertificateAuthority> {
    use anyhow::Context;
    let cert_path = data_dir.join("ca.pem");
    let key_path = data_dir.join("ca-key.pem");
    if cert_path.exists() {
        let cert = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        return CertificateAuthority::from_pem(&cert, &key)
            .with_context(|| format!("loading the CA from {}", data_dir.display()));
    }
    let ca = CertificateAuthority::generate("Muster coordinator CA")?;
    write_private_file(&key_path, ca.key_pem().as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    std::fs::write(&cert_path, ca.cert_pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(path = %cert_path.display(), hash = %ca.hash(), "created the coordinator CA");
    Ok(ca)
}

/// The two server configurations of the gRPC port.
pub struct ServerTls {
    pub enroll: Arc<ServerConfig>,
    pub mutual: Arc<ServerConfig>,
}

pub fn server_tls(
    ca: &CertificateAuthority,
    names: &[String],
    revocations: Arc<Revocations>,
) -> anyhow::Result<ServerTls> {
    let (chain_pem, key_pem) = ca.issue_server_cert(names)?;
    let chain = pki::certs_from_pem(&chain_pem)?;
    let provider = pki::provider();

    let mut enroll = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), pki::key_from_pem(&key_pem)?)?;
    enroll.alpn_protocols = vec![b"h2".to_vec()];

    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der())?;
    let verifier = Arc::new(RevocationCheckingVerifier::new(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?,
        revocations,
    ));
    let mut mutual = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, pki::key_from_pem(&key_pem)?)?;
    mutual.alpn_protocols = vec![b"h2".to_vec()];

    Ok(ServerTls {
        enroll: Arc::new(enroll),
        mutual: Arc::new(mutual),
    })
}

/// The names the server certificate covers.
pub fn server_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        ENROLL_SERVER_NAME.to_owned(),
    ];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_owned());
        }
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// What a connection to the gRPC port proved about its peer.
#[derive(Debug, Clone)]
pub enum Peer {
    /// Server-authenticated only: may call `Enroll`, nothing else.
    Enrolling,
    /// Presented a client certificate the CA signed.
    Runner(RunnerCert),
}
