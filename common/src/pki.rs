//! The coordinator's private PKI: its CA, the gRPC server certificate, runner
//! client certificates issued from CSRs, and the verifier a runner uses to
//! trust the coordinator on first contact by the CA's hash (as `kubeadm join
//! --discovery-token-ca-cert-hash` does).
//!
//! Every rustls configuration is built with the `ring` provider explicitly, so
//! no process-wide default provider has to be installed.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

/// The TLS server name a runner asks for when it enrolls; the coordinator answers
/// it with server-only TLS, and the server certificate carries it.
pub const ENROLL_SERVER_NAME: &str = "enroll.muster.invalid";

/// Prefix of a runner certificate's common name; the rest is the runner id.
const RUNNER_CN_PREFIX: &str = "muster-runner:";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid PEM for {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("tls configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// The ring provider every Muster TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:<hex>` of a DER certificate: how a CA is named in `--ca-cert-hash`.
pub fn cert_hash(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| PkiError::Pem {
        what: "certificate",
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: "certificate",
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
        what: "private key",
        reason: e.to_string(),
    })
}

/// A certificate the CA issued, with what the coordinator records about it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

/// The coordinator's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("hash", &self.hash())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Muster");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = certs_from_pem(cert_pem)?.remove(0);
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem {
            what: "CA key",
            reason: e.to_string(),
        })?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The value runners pin with `--ca-cert-hash`.
    pub fn hash(&self) -> String {
        cert_hash(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issues the gRPC server's certificate for `names` (DNS names or IP
    /// addresses). Returns the chain PEM (leaf, then CA, so a runner can pin
    /// the CA on first contact) and the key PEM.
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "muster-coordinator");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }

    /// Signs a runner's CSR. Only the CSR's public key is used: the subject,
    /// names and usages are the coordinator's choice, so a runner cannot ask
    /// for a server or CA certificate.
    pub fn sign_runner_csr(
        &self,
        csr_pem: &str,
        runner_id: &str,
        valid_for: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{RUNNER_CN_PREFIX}{runner_id}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        let not_after = now + time::Duration::seconds(valid_for.as_secs() as i64);
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = not_after;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        let not_after = chrono::DateTime::from_timestamp(not_after.unix_timestamp(), 0)
            .unwrap_or_else(chrono::Utc::now);
        Ok(IssuedCert {
            pem: cert.pem(),
            serial_hex,
            not_after,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    // A positive INTEGER in minimal DER form: top bit clear, so no 0x00 is
    // prepended, and first byte non-zero, so none is stripped. Either would
    // make the serial read back from the certificate differ from this one.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A new key pair and a CSR for it, both PEM. The runner keeps the key.
pub fn generate_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    let pem = csr.pem().map_err(PkiError::Generate)?;
    Ok((pem, key.serialize_pem()))
}

/// What a verified client certificate says about the runner presenting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerCert {
    pub runner_id: String,
    pub serial_hex: String,
    pub not_before: chrono::DateTime<chrono::Utc>,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

impl RunnerCert {
    /// Whether less than a third of the certificate's validity is left at
    /// `now`: the point from which a runner asks for a new one, so a runner
    /// that is offline for a while still has time to renew.
    pub fn renewal_due(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        let whole = self.not_after - self.not_before;
        self.not_after - now < whole / 3
    }
}

/// Reads the runner id, serial and validity from a (verified) runner
/// certificate.
pub fn runner_cert_info(der: &[u8]) -> Option<RunnerCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let runner_id = cn.strip_prefix(RUNNER_CN_PREFIX)?.to_owned();
    let serial_hex = hex::encode(cert.raw_serial());
    let validity = cert.validity();
    let time = |t: x509_parser::time::ASN1Time| chrono::DateTime::from_timestamp(t.timestamp(), 0);
    Some(RunnerCert {
        runner_id,
        serial_hex,
        not_before: time(validity.not_before)?,
        not_after: time(validity.not_after)?,
    })
}

/// Whether the certificate (PEM) certifies the public key of the private key
/// (PEM): a runner checks this before it replaces its identity, so a wrong
/// answer cannot leave it with a certificate it cannot use.
pub fn cert_matches_key(cert_pem: &str, key_pem: &str) -> Result<bool, PkiError> {
    let der = certs_from_pem(cert_pem)?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Pem {
        what: "certificate",
        reason: e.to_string(),
    })?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem {
        what: "private key",
        reason: e.to_string(),
    })?;
    Ok(cert.public_key().raw == key.subject_public_key_info().as_slice())
}

/// Trusts a server whose chain contains a CA certificate with the pinned hash,
/// and whose leaf that CA signed for the name being dialled.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(ca_cert_hash: &str) -> Self {
        PinnedCaVerifier {
            pin: ca_cert_hash.trim().to_ascii_lowercase(),
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_hash(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the coordinator's CA does not match --ca-cert-hash {} (it presented {})",
                    self.pin,
                    intermediates
                        .iter()
                        .map(|c| cert_hash(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_signs_runner_csr_and_the_id_reads_back() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (csr, _key) = generate_csr("whatever-the-runner-asks").unwrap();
        let issued = ca
            .sign_runner_csr(&csr, "r-123", Duration::from_secs(3600))
            .unwrap();
        let der = certs_from_pem(&issued.pem).unwrap().remove(0);
        let info = runner_cert_info(&der).unwrap();
        assert_eq!(info.runner_id, "r-123");
        assert_eq!(info.serial_hex, issued.serial_hex);
        assert_eq!(info.not_after, issued.not_after);
    }

    #[test]
    fn renewal_is_due_in_the_last_third() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (csr, _key) = generate_csr("r").unwrap();
        let issued = ca
            .sign_runner_csr(&csr, "r", Duration::from_secs(30 * 86_400))
            .unwrap();
        let der = certs_from_pem(&issued.pem).unwrap().remove(0);
        let info = runner_cert_info(&der).unwrap();
        let now = chrono::Utc::now();
        assert!(!info.renewal_due(now), "a fresh certificate is not due");
        assert!(!info.renewal_due(now + chrono::Duration::days(19)));
        assert!(info.renewal_due(now + chrono::Duration::days(21)));
        assert!(
            info.renewal_due(now + chrono::Duration::days(31)),
            "expired"
        );
    }

    #[test]
    fn a_certificate_matches_only_its_own_key() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (csr, key) = generate_csr("r").unwrap();
        let (_, other_key) = generate_csr("r").unwrap();
        let issued = ca
            .sign_runner_csr(&csr, "r", Duration::from_secs(60))
            .unwrap();
        assert!(cert_matches_key(&issued.pem, &key).unwrap());
        assert!(!cert_matches_key(&issued.pem, &other_key).unwrap());
        assert!(cert_matches_key("not pem", &key).is_err());
        assert!(cert_matches_key(&issued.pem, "not a key").is_err());
    }

    #[test]
    fn serials_read_back_as_issued() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        // 1 in 256 random serials began with a zero byte and read back without it.
        for _ in 0..300 {
            let (csr, _key) = generate_csr("r").unwrap();
            let issued = ca
                .sign_runner_csr(&csr, "r", Duration::from_secs(60))
                .unwrap();
            let der = certs_from_pem(&issued.pem).unwrap().remove(0);
            assert_eq!(
                runner_cert_info(&der).unwrap().serial_hex,
                issued.serial_hex
            );
        }
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.hash(), again.hash());
        assert!(ca.hash().starts_with("sha256:"));
    }

    #[test]
    fn garbage_csr_is_a_clear_error() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let err = ca
            .sign_runner_csr("not a csr", "r", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            err.to_string().contains("certificate signing request"),
            "{err}"
        );
    }

    #[test]
    fn server_chain_carries_the_ca() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (chain, _) = ca
            .issue_server_cert(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let certs = certs_from_pem(&chain).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(cert_hash(&certs[1]), ca.hash());
    }
}
