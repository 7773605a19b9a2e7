//! The coordinator's CA and the gRPC port's TLS: the CA is created at the
//! first start of the first coordinator on a database and kept in it (or
//! supplied by the operator as `ca.pem` and `ca-key.pem` in the data
//! directory of that first start), and a fresh server certificate is issued
//! from it at every start.
//!
//! One port serves two kinds of connection, told apart by the server name the
//! client asks for: enrollment (`ENROLL_SERVER_NAME`; server-authenticated
//! TLS, only the `Enroll` call) and everything else, where a client
//! certificate signed by the CA, of a runner that was not revoked, is
//! required by the handshake itself.

use std::path::Path;
use std::sync::Arc;

use muster_common::pki::{self, CertificateAuthority, RunnerCert};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::revocation::{RevocationCheckingVerifier, Revocations};
use crate::store::Store;

/// The TLS server name a runner asks for when it enrolls.
pub use muster_common::pki::ENROLL_SERVER_NAME;

/// The cluster's CA, shared by every coordinator on the database: the first
/// to start stores it, the others use that one, so a runner enrolled through
/// any coordinator is accepted by all. The first start takes the operator's
/// CA from `<data-dir>/ca.pem` and `ca-key.pem` when both are there, else
/// generates one. The certificate (public) is written to `<data-dir>/ca.pem`
/// at every start, for operators to hand out.
pub async fn load_or_create_ca(
    store: &dyn Store,
    data_dir: &Path,
) -> anyhow::Result<CertificateAuthority> {
    use anyhow::Context;
    let cert_path = data_dir.join("ca.pem");
    let key_path = data_dir.join("ca-key.pem");
    let supplied = if key_path.exists() {
        let cert = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        Some(
            CertificateAuthority::from_pem(&cert, &key)
                .with_context(|| format!("loading the CA from {}", data_dir.display()))?,
        )
    } else {
        None
    };
    let generated = supplied.is_none();
    let candidate = match &supplied {
        Some(ca) => StoredCa::of(ca),
        None => StoredCa::of(&CertificateAuthority::generate("Muster coordinator CA")?),
    };
    let stored = store
        .claim_setting(CA_SETTING, &serde_json::to_string(&candidate)?)
        .await
        .context("storing the CA in the database")?;
    let stored: StoredCa =
        serde_json::from_str(&stored).context("the CA stored in the database is unreadable")?;
    let ca = CertificateAuthority::from_pem(&stored.cert, &stored.key)
        .context("loading the CA stored in the database")?;
    if let Some(supplied) = supplied {
        if supplied.hash() != ca.hash() {
            anyhow::bail!(
                "{} holds a CA ({}) other than the one this database's coordinators use ({}); \
                 remove ca.pem and ca-key.pem from the data directory to use the database's",
                data_dir.display(),
                supplied.hash(),
                ca.hash()
            );
        }
    }
    if stored == candidate {
        let origin = if generated {
            "created"
        } else {
            "stored the operator's"
        };
        tracing::info!(hash = %ca.hash(), "{origin} CA for this database's coordinators");
    }
    std::fs::write(&cert_path, ca.cert_pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(ca)
}

const CA_SETTING: &str = "ca";

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct StoredCa {
    cert: String,
    key: String,
}

impl StoredCa {
    fn of(ca: &CertificateAuthority) -> StoredCa {
        StoredCa {
            cert: ca.cert_pem().to_owned(),
            key: ca.key_pem(),
        }
    }
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
