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

    /// PostgreSQL URL (`postgres://user:password@host/db`). Without one, the
    /// coordinator keeps its state in `<data-dir>/muster.db` (embedded SQLite,
    /// for a single coordinator).
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

    /// Where the CA, the admin API key and (without a database URL) the
    /// embedded database live.
    #[arg(long, env = "MUSTER_DATA_DIR", default_value = "./muster-data")]
    pub data_dir: PathBuf,

    /// Extra DNS names or IP addresses runners use to reach the gRPC address
    /// (localhost, 127.0.0.1, ::1 and this host's name are always included).
    #[arg(long = "tls-san", env = "MUSTER_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,

    /// Largest workspace bundle accepted, compressed, in MiB.
    #[arg(long, env = "MUSTER_MAX_BUNDLE_MIB", default_value_t = 64)]
    pub max_bundle_mib: u64,

    /// Largest total of one run's artifacts, compressed, in MiB.
    #[arg(long, env = "MUSTER_MAX_ARTIFACTS_MIB", default_value_t = 100)]
    pub max_artifacts_mib: u64,

    /// How long a lease lasts without a heartbeat from its runner, in seconds.
    #[arg(long = "lease-ttl", env = "MUSTER_LEASE_TTL", default_value_t = 30)]
    pub lease_ttl_secs: u64,

    /// Validity of runner client certificates, in days. Runners renew theirs
    /// over their stream once less than a third of it is left.
    #[arg(long, env = "MUSTER_RUNNER_CERT_DAYS", default_value_t = 30)]
    pub runner_cert_days: u64,

    /// Overrides `runner_cert_days` to the second, for tests and embedders
    /// that need certificates to come due quickly. No flag sets it.
    #[arg(skip)]
    pub runner_cert_validity: Option<Duration>,

    /// Redis URL (`redis://[user:password@]host[:port][/db]`) of the event
    /// bus between coordinators that share a database: run wake-ups, cancels
    /// and live logs reach every coordinator. Without one, events stay in
    /// this process (one coordinator).
    #[arg(long, env = "MUSTER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// How often dispatchers and live log tails look at the store for what
    /// the event bus did not bring, while it is healthy (1 s and 2 s when
    /// unset). Tests set it long to show that the bus alone carries events.
    #[arg(skip)]
    pub healthy_poll: Option<Duration>,

    /// Most database connections this coordinator opens.
    #[arg(long, env = "MUSTER_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: usize,

    /// How long endpoint check results are kept, in days; uptime looks back
    /// 30 days at most.
    #[arg(long, env = "MUSTER_MONITORING_RETENTION_DAYS", default_value_t = 30)]
    pub monitoring_retention_days: u64,

    /// How long a monitoring agent may go without a heartbeat before it is
    /// silent: one alert, and its locations turn `unknown` (30 s when unset,
    /// three heartbeats of an agent that sends one every 10 s). No flag sets
    /// it; tests shorten it.
    #[arg(skip)]
    pub agent_silence: Option<Duration>,

    /// Address ranges webhooks may reach although they are loopback,
    /// link-local, unspecified, multicast or broadcast, comma-separated
    /// (`127.0.0.1/32,fe80::/10`). Without one, webhooks reach every other
    /// address, private networks included, and none of those.
    #[arg(
        long = "webhook-allow-network",
        env = "MUSTER_WEBHOOK_ALLOW_NETWORKS",
        value_delimiter = ','
    )]
    pub webhook_allow_networks: Vec<crate::monitoring::destination::Network>,
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone)]
pub enum Database {
    Postgres(Secret),
    Sqlite(PathBuf),
}

impl Config {
    /// A configuration for tests and embedding: loopback on ephemeral ports.
    /// `database_url` `None` is the embedded SQLite database.
    pub fn for_tests(database_url: Option<&str>, data_dir: PathBuf) -> Config {
        Config {
            http_addr: "127.0.0.1:0".parse().expect("valid address"),
            grpc_addr: "127.0.0.1:0".parse().expect("valid address"),
            database_url: database_url.map(Secret::new),
            database_url_file: None,
            data_dir,
            tls_sans: Vec::new(),
            max_bundle_mib: 64,
            max_artifacts_mib: 100,
            lease_ttl_secs: 30,
            runner_cert_days: 30,
            runner_cert_validity: None,
            redis_url: None,
            healthy_poll: None,
            database_max_connections: 8,
            monitoring_retention_days: 30,
            agent_silence: None,
            // Tests run their webhook receivers on loopback.
            webhook_allow_networks: vec!["127.0.0.0/8".parse().expect("a valid network")],
        }
    }

    /// The database to use: PostgreSQL when a URL is given (flag or file),
    /// else the embedded SQLite file in the data directory.
    pub fn database(&self) -> Result<Database, String> {
        let url = match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => url.clone(),
            (None, Some(path)) => {
                read_secret_file(path).map_err(|e| format!("--database-url-file: {e}"))?
            }
            (None, None) => return Ok(Database::Sqlite(self.data_dir.join("muster.db"))),
        };
        if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
            return Err("--database-url: expected a postgres:// URL (leave it out to use the embedded SQLite database)".to_owned());
        }
        Ok(Database::Postgres(url))
    }

    pub fn validate(&self) -> Result<(), String> {
        self.database()?;
        if self.max_bundle_mib == 0 {
            return Err("--max-bundle-mib: must be at least 1".to_owned());
        }
        if !(1..=3650).contains(&self.runner_cert_days) {
            return Err(format!(
                "--runner-cert-days: {} is out of range, expected 1 to 3650",
                self.runner_cert_days
            ));
        }
        if self
            .runner_cert_validity
            .is_some_and(|v| v < Duration::from_secs(1) || v > Duration::from_secs(3650 * 86_400))
        {
            return Err("runner certificate validity: expected 1 second to 3650 days".to_owned());
        }
        if let Some(url) = &self.redis_url {
            let url = url.expose();
            if !url.starts_with("redis://") {
                return Err(
                    "--redis-url: expected a redis:// URL (TLS to Redis is not supported yet)"
                        .to_owned(),
                );
            }
        }
        if !(1..=3650).contains(&self.monitoring_retention_days) {
            return Err(format!(
                "--monitoring-retention-days: {} is out of range, expected 1 to 3650",
                self.monitoring_retention_days
            ));
        }
        if self
            .agent_silence
            .is_some_and(|s| s < Duration::from_millis(100))
        {
            return Err("agent silence: expected at least 100 ms".to_owned());
        }
        if self.lease_ttl_secs < 5 {
            return Err(format!(
                "--lease-ttl: {} is too short, expected at least 5 seconds",
                self.lease_ttl_secs
            ));
        }
        Ok(())
    }

    /// How long a runner certificate is valid.
    pub fn runner_cert_validity(&self) -> Duration {
        self.runner_cert_validity
            .unwrap_or(Duration::from_secs(self.runner_cert_days * 24 * 3600))
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    /// The monitoring settings this configuration gives.
    pub fn monitoring(&self) -> crate::monitoring::Settings {
        crate::monitoring::Settings {
            agent_silence: self
                .agent_silence
                .unwrap_or(crate::monitoring::DEFAULT_AGENT_SILENCE),
            retention: Duration::from_secs(self.monitoring_retention_days * 24 * 3600),
            webhooks: crate::monitoring::destination::Destinations::new(
                &self.webhook_allow_networks,
            ),
        }
    }

    pub fn max_artifact_bytes(&self) -> u64 {
        self.max_artifacts_mib * 1024 * 1024
    }

    pub fn max_bundle_bytes(&self) -> u64 {
        self.max_bundle_mib * 1024 * 1024
    }
}
