//! The coordinator's one configuration: flags with matching `MUSTER_*`
//! environment variables, validated before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use muster_common::secret::{read_secret_file, Secret};

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the HTTP API, dashboard and metrics.
    #[arg(long, env = "MUSTER_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Address of the gRPC runner service (mTLS).
    #[arg(long, env = "MUSTER_GRPC_ADDR", default_value = "127.0.0.1:8443")]
    pub grpc_addr: SocketAddr,

    /// PostgreSQL URL (`postgres://user:password@host/db`).
    #[arg(
        long,
        env = "MUSTER_DATABASE_URL",
        hide_env_values = true,
        conflicts_with = "database_url_file"
    )]
    pub database_url: Option<Secret>,

    /// File holding the PostgreSQL URL (mode 0600).
    #[arg(long, env = "MUSTER_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// Where the CA, the server certificate and the admin API key live.
    #[arg(long, env = "MUSTER_DATA_DIR", default_value = "./muster-data")]
    pub data_dir: PathBuf,

    /// Extra DNS names or IP addresses runners use to reach the gRPC address
    /// (localhost, 127.0.0.1, ::1 and this host's name are always included).
    #[arg(long = "tls-san", env = "MUSTER_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,

    /// Largest workspace bundle accepted, compressed, in MiB.
    #[arg(long, env = "MUSTER_MAX_BUNDLE_MIB", default_value_t = 64)]
    pub max_bundle_mib: u64,

    /// How long a lease lasts without a heartbeat from its runner, in seconds.
    #[arg(long, env = "MUSTER_LEASE_TTL", default_value_t = 30)]
    pub lease_ttl_secs: u64,

    /// Validity of runner client certificates, in days.
    #[arg(long, env = "MUSTER_RUNNER_CERT_DAYS", default_value_t = 30)]
    pub runner_cert_days: u64,

    /// Most database connections this coordinator opens.
    #[arg(long, env = "MUSTER_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: usize,
}

impl Config {
    /// A configuration for tests and embedding: loopback on ephemeral ports.
    pub fn for_tests(database_url: &str, data_dir: PathBuf) -> Config {
        Config {
            http_addr: "127.0.0.1:0".parse().expect("valid address"),
            grpc_addr: "127.0.0.1:0".parse().expect("valid address"),
            database_url: Some(Secret::new(database_url)),
            database_url_file: None,
            data_dir,
            tls_sans: Vec::new(),
            max_bundle_mib: 64,
            lease_ttl_secs: 30,
            runner_cert_days: 30,
            database_max_connections: 8,
        }
    }

    /// The database URL, from the flag or the file; checked at start.
    pub fn database_url(&self) -> Result<Secret, String> {
        match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(path)) => {
                read_secret_file(path).map_err(|e| format!("--database-url-file: {e}"))
            }
            (None, None) => Err(
                "no database configured: pass --database-url (or MUSTER_DATABASE_URL) with a \
                 postgres:// URL; the embedded SQLite default is not available in this version"
                    .to_owned(),
            ),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let url = self.database_url()?;
        if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
            return Err("--database-url: expected a postgres:// URL".to_owned());
        }
        if self.max_bundle_mib == 0 {
            return Err("--max-bundle-mib: must be at least 1".to_owned());
        }
        if self.lease_ttl_secs < 5 {
            return Err(format!(
                "--lease-ttl: {} is too short, expected at least 5 seconds",
                self.lease_ttl_secs
            ));
        }
        Ok(())
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    pub fn max_bundle_bytes(&self) -> u64 {
        self.max_bundle_mib * 1024 * 1024
    }
}
