//! The runner's identity: enrollment with a join token on first start, then
//! the key, certificate and CA kept in the data directory; and the TLS
//! connector both kinds of connection use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{anyhow, Context as _};
use hyper_util::rt::TokioIo;
use muster_common::pki::{self, PinnedCaVerifier, ENROLL_SERVER_NAME};
use muster_common::secret::write_private_file;
use muster_proto::runner::v1::runner_service_client::RunnerServiceClient;
use muster_proto::runner::v1::EnrollRequest;
use rustls::pki_types::ServerName;
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

/// Loads the stored identity, or enrolls with the join token.
pub async fn load_or_enroll(config: &Config) -> anyhow::Result<Identity> {
    let path = config.data_dir.join(IDENTITY_FILE);
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
