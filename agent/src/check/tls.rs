//! TLS for checks: the two client configurations (verifying against the CA
//! bundle, and accepting any certificate for `insecure_tls`), the handshake,
//! and what it showed (protocol version, earliest certificate expiry).
//!
//! There is no built-in root store: servers are verified against the PEM
//! bundle `--ca-file` names, by default the system's
//! `/etc/ssl/certs/ca-certificates.crt`, so the agent trusts what the host
//! trusts and an operator adds a private CA the way they do for every other
//! program. Without that file every verified handshake fails, and the
//! check's error says why.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use muster_common::monitor::TlsInfo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;

/// Both client configurations, made once at start.
pub struct TlsConfigs {
    pub verified: Arc<ClientConfig>,
    pub insecure: Arc<ClientConfig>,
    /// How many CA certificates the verified one trusts (0: none could be
    /// loaded, and the error message says so).
    pub roots: usize,
    pub ca_file: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA certificates of a PEM bundle. A missing file is an empty store
/// (logged), not an error: checks that do not verify still work.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = match CertificateDer::pem_file_iter(path) {
        Ok(certs) => certs,
        Err(rustls::pki_types::pem::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(ca_file = %path.display(), "no CA bundle: HTTPS checks that verify certificates will fail");
            return Ok(roots);
        }
        Err(e) => return Err(format!("--ca-file: cannot read {}: {e}", path.display())),
    };
    let certs: Vec<CertificateDer<'static>> = certs
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--ca-file: {} is not a PEM bundle: {e}", path.display()))?;
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if ignored > 0 {
        tracing::debug!(added, ignored, ca_file = %path.display(), "some CA certificates could not be used");
    }
    Ok(roots)
}

impl TlsConfigs {
    pub fn new(ca_file: &Path) -> Result<TlsConfigs, String> {
        let roots = load_roots(ca_file)?;
        let count = roots.len();
        let verified = client_config(roots)?;
        let insecure = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
            .with_no_client_auth();
        Ok(TlsConfigs {
            verified: Arc::new(verified),
            insecure: Arc::new(insecure),
            roots: count,
            ca_file: ca_file.display().to_string(),
        })
    }
}

/// A client configuration that verifies servers against `roots`.
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, String> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Handshakes over `stream` and records the version and expiry in `info`.
pub async fn handshake<S>(
    stream: S,
    host: &str,
    config: Arc<ClientConfig>,
    configs: &TlsConfigs,
    info: &mut TlsInfo,
) -> Result<TlsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?
        .to_owned();
    let verifies = Arc::ptr_eq(&config, &configs.verified);
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| {
            if verifies && configs.roots == 0 {
                format!(
                    "TLS handshake failed: {e} (no CA certificates were loaded from {})",
                    configs.ca_file
                )
            } else {
                format!("TLS handshake failed: {e}")
            }
        })?;
    let (_, connection) = stream.get_ref();
    info.version = connection.protocol_version().map(version_name);
    info.certificate_expires_at = connection.peer_certificates().and_then(earliest_expiry);
    Ok(stream)
}

fn version_name(version: rustls::ProtocolVersion) -> String {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    }
}

/// When the first certificate of `chain` to expire does; certificates that
/// do not parse are passed over.
pub fn earliest_expiry(chain: &[CertificateDer<'_>]) -> Option<DateTime<Utc>> {
    chain
        .iter()
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
            DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        })
        .min()
}

/// For `insecure_tls`: any certificate is accepted, but the handshake
/// signatures are still checked, so the server holds the certificate's key.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
