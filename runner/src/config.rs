//! The runner's one configuration: flags with matching `MUSTER_*` variables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use muster_common::secret::{read_secret_file, Secret};

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The coordinator's runner endpoint, `https://host:port` (its --grpc-addr).
    #[arg(long, env = "MUSTER_COORDINATOR")]
    pub coordinator: String,

    /// One-time join token from `POST /api/v1/runners/join-tokens/`; needed only
    /// for the first start (later starts reuse the stored certificate).
    #[arg(
        long,
        env = "MUSTER_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<Secret>,

    /// File holding the join token (mode 0600).
    #[arg(long, env = "MUSTER_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// `sha256:…` of the coordinator's CA certificate, as the join-token answer gives it.
    #[arg(long, env = "MUSTER_CA_CERT_HASH")]
    pub ca_cert_hash: Option<String>,

    /// Where the runner keeps its key, certificate and bundle cache.
    #[arg(long, env = "MUSTER_DATA_DIR", default_value = "./muster-runner-data")]
    pub data_dir: PathBuf,

    /// Where the process executor makes each run's scratch directory
    /// (default: `work/` in the data directory). The runner owns it: it
    /// removes what a previous runner process left there at start, so it
    /// must be a directory of its own, made for it or empty when first
    /// given. On a tmpfs, short jobs skip the disk; jobs that write much
    /// want a disk.
    #[arg(long, env = "MUSTER_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// How many runs this runner executes at once.
    #[arg(long, env = "MUSTER_CAPACITY", default_value_t = 1)]
    pub capacity: u32,

    /// Labels that runs can require, `key=value,key=value`.
    #[arg(long, env = "MUSTER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Image for workspaces that name none in `config.image`.
    #[arg(
        long,
        env = "MUSTER_DEFAULT_IMAGE",
        default_value = "muster/ansible:bookworm"
    )]
    pub default_image: String,

    /// The name this runner enrolls under (default: the host name).
    #[arg(long, env = "MUSTER_RUNNER_NAME")]
    pub name: Option<String>,

    /// How jobs run: `docker` (a container each), `process` (a child process
    /// in a scratch directory, for hosts without Docker), or `auto` (docker
    /// when the daemon answers at start, else process).
    #[arg(long, env = "MUSTER_EXECUTOR", value_enum, default_value_t = ExecutorChoice::Auto)]
    pub executor: ExecutorChoice,

    /// On SIGTERM or Ctrl-C, how long running jobs may take to finish
    /// before they are canceled; no new run starts meanwhile.
    #[arg(
        long,
        env = "MUSTER_DRAIN_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 60
    )]
    pub drain_timeout: u64,

    /// Serve Prometheus metrics at `GET /metrics` on this address
    /// (`host:port`); not served unless given.
    #[arg(long, env = "MUSTER_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The `--executor` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorChoice {
    Auto,
    Docker,
    Process,
}

/// Longest `--drain-timeout`: a day.
const MAX_DRAIN_TIMEOUT: u64 = 24 * 3600;

impl Config {
    pub fn for_tests(
        coordinator: String,
        join_token: String,
        ca_cert_hash: String,
        data_dir: PathBuf,
    ) -> Config {
        Config {
            coordinator,
            join_token: Some(Secret::new(join_token)),
            join_token_file: None,
            ca_cert_hash: Some(ca_cert_hash),
            data_dir,
            work_dir: None,
            capacity: 1,
            labels: Vec::new(),
            default_image: "muster/ansible:bookworm".into(),
            name: None,
            executor: ExecutorChoice::Auto,
            drain_timeout: 5,
            metrics_addr: None,
        }
    }

    /// The scratch directories' parent, and whether the runner made it (the
    /// default inside the data directory) rather than being given it.
    pub fn work_dir(&self) -> (PathBuf, bool) {
        match &self.work_dir {
            Some(dir) => (dir.clone(), false),
            None => (self.data_dir.join("work"), true),
        }
    }

    /// How long running jobs may take to finish once shutdown begins.
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.drain_timeout)
    }

    pub fn labels(&self) -> Result<BTreeMap<String, String>, String> {
        self.labels
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| format!("--labels: '{l}' is not key=value"))?;
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() {
                    return Err(format!("--labels: '{l}' has an empty key"));
                }
                Ok((k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    pub fn join_token(&self) -> Result<Option<Secret>, String> {
        match (&self.join_token, &self.join_token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(path)) => read_secret_file(path)
                .map(Some)
                .map_err(|e| format!("--join-token-file: {e}")),
            (None, None) => Ok(None),
        }
    }

    /// `(host, port)` of the coordinator.
    pub fn endpoint(&self) -> Result<(String, u16), String> {
        let rest = self.coordinator.strip_prefix("https://").ok_or_else(|| {
            format!(
                "--coordinator: expected https://host:port, found '{}'",
                self.coordinator
            )
        })?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("--coordinator: '{}' has no port", self.coordinator))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("--coordinator: port '{port}' is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("--coordinator: '{}' has no host", self.coordinator));
        }
        Ok((host.to_owned(), port))
    }

    pub fn validate(&self) -> Result<(), String> {
        self.endpoint()?;
        self.labels()?;
        if self.capacity == 0 || self.capacity > 1024 {
            return Err(format!(
                "--capacity: {} is out of range, expected 1 to 1024",
                self.capacity
            ));
        }
        if self.drain_timeout > MAX_DRAIN_TIMEOUT {
            return Err(format!(
                "--drain-timeout: {} is out of range, expected 0 to {MAX_DRAIN_TIMEOUT} seconds",
                self.drain_timeout
            ));
        }
        if let Some(hash) = &self.ca_cert_hash {
            let hex = hash.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "--ca-cert-hash: expected sha256:<64 hex digits>, found '{hash}'"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(coordinator: &str) -> Config {
        Config::for_tests(
            coordinator.into(),
            "t".into(),
            format!("sha256:{}", "a".repeat(64)),
            "/tmp".into(),
        )
    }

    #[test]
    fn endpoints_parse_and_bad_ones_name_the_flag() {
        assert_eq!(
            config("https://127.0.0.1:8443").endpoint().unwrap(),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(
            config("https://[::1]:8443/").endpoint().unwrap(),
            ("::1".into(), 8443)
        );
        assert!(config("http://x:1")
            .endpoint()
            .unwrap_err()
            .contains("--coordinator"));
        assert!(config("https://x")
            .endpoint()
            .unwrap_err()
            .contains("no port"));
    }

    /// Parses flags as the binary does, with the flags that every runner
    /// needs given.
    fn parse(flags: &[&str]) -> Result<Config, String> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: Config,
        }
        let args = ["muster-runner", "--coordinator", "https://h:1"]
            .iter()
            .chain(flags);
        Cli::try_parse_from(args)
            .map(|cli| cli.config)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn executor_flag_parses_and_bad_values_are_named() {
        // Set in the environment, the variable would stand in for the flag.
        if std::env::var_os("MUSTER_EXECUTOR").is_none() {
            assert_eq!(parse(&[]).unwrap().executor, ExecutorChoice::Auto);
        }
        for (value, expected) in [
            ("auto", ExecutorChoice::Auto),
            ("docker", ExecutorChoice::Docker),
            ("process", ExecutorChoice::Process),
        ] {
            assert_eq!(parse(&["--executor", value]).unwrap().executor, expected);
        }
        let err = parse(&["--executor", "podman"]).unwrap_err();
        assert!(err.contains("--executor"), "{err}");
        assert!(err.contains("'podman'"), "{err}");
        assert!(err.contains("auto, docker, process"), "{err}");
    }

    #[test]
    fn drain_timeout_parses_and_bad_values_are_named() {
        if std::env::var_os("MUSTER_DRAIN_TIMEOUT").is_none() {
            assert_eq!(parse(&[]).unwrap().drain_timeout, 60);
        }
        let config = parse(&["--drain-timeout", "0"]).unwrap();
        assert_eq!(config.drain_timeout(), std::time::Duration::ZERO);
        let err = parse(&["--drain-timeout", "1m"]).unwrap_err();
        assert!(err.contains("--drain-timeout"), "{err}");
        assert!(err.contains("'1m'"), "{err}");
        let mut config = config;
        config.drain_timeout = MAX_DRAIN_TIMEOUT + 1;
        let err = config.validate().unwrap_err();
        assert!(
            err.starts_with("--drain-timeout: 86401 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn metrics_addr_is_off_by_default_and_bad_values_are_named() {
        if std::env::var_os("MUSTER_METRICS_ADDR").is_none() {
            assert_eq!(parse(&[]).unwrap().metrics_addr, None);
        }
        let config = parse(&["--metrics-addr", "127.0.0.1:9464"]).unwrap();
        assert_eq!(config.metrics_addr, Some(([127, 0, 0, 1], 9464).into()));
        let err = parse(&["--metrics-addr", "localhost"]).unwrap_err();
        assert!(err.contains("--metrics-addr"), "{err}");
        assert!(err.contains("'localhost'"), "{err}");
    }

    #[test]
    fn labels_parse() {
        let mut c = config("https://h:1");
        c.labels = vec!["site=fra".into(), "os = linux".into()];
        assert_eq!(
            c.labels().unwrap().get("os").map(String::as_str),
            Some("linux")
        );
        c.labels = vec!["broken".into()];
        assert!(c.labels().unwrap_err().contains("key=value"));
    }
}
