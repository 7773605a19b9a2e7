//! The agent's one configuration: flags with matching `MUSTER_*` variables,
//! checked by [`Config::validate`] before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use muster_common::secret::{read_secret_file, Secret};
use muster_common::token::{self, TokenKind};

/// Where HTTPS checks find the CA certificates they trust, unless
/// `--ca-file` names another bundle.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The coordinator's HTTP API, `http://host:port` or `https://host:port`.
    #[arg(long, env = "MUSTER_COORDINATOR")]
    pub coordinator: String,

    /// The agent token (`agt_…`) `POST /api/v1/agents/` returned.
    #[arg(
        long,
        env = "MUSTER_AGENT_TOKEN",
        hide_env_values = true,
        conflicts_with = "agent_token_file"
    )]
    pub agent_token: Option<Secret>,

    /// File holding the agent token (mode 0600).
    #[arg(long, env = "MUSTER_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// The site this agent runs at. Informational: the coordinator knows the
    /// agent's location from its token; a different value here is logged.
    #[arg(long, env = "MUSTER_LOCATION")]
    pub location: Option<String>,

    /// Where the agent keeps results the coordinator has not taken yet, and
    /// the last endpoint list it was given.
    #[arg(long, env = "MUSTER_DATA_DIR", default_value = "./muster-agent-data")]
    pub data_dir: PathBuf,

    /// Serve Prometheus metrics at `GET /metrics` on this address
    /// (`host:port`); not served unless given.
    #[arg(long, env = "MUSTER_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// How many checks run at once; further due checks wait for a slot.
    #[arg(long, env = "MUSTER_MAX_CONCURRENT_CHECKS", default_value_t = 256)]
    pub max_concurrent_checks: u32,

    /// How long results are kept on disk while the coordinator cannot take
    /// them; older ones are dropped.
    #[arg(long, env = "MUSTER_BUFFER_HOURS", default_value_t = 24)]
    pub buffer_hours: u32,

    /// Most disk space the result buffer takes, in MiB; past it the oldest
    /// results are dropped.
    #[arg(long, env = "MUSTER_BUFFER_MAX_MIB", default_value_t = 256)]
    pub buffer_max_mib: u32,

    /// PEM bundle of the CA certificates HTTPS checks (and an `https://`
    /// coordinator) are verified against.
    #[arg(long, env = "MUSTER_CA_FILE", default_value = SYSTEM_CA_BUNDLE)]
    pub ca_file: PathBuf,

    /// Extra PEM CA certificate for an `https://` coordinator whose
    /// certificate is not signed by one in `--ca-file`.
    #[arg(long, env = "MUSTER_COORDINATOR_CA_FILE")]
    pub coordinator_ca_file: Option<PathBuf>,
}

/// Most concurrent checks accepted.
const MAX_CONCURRENT_CHECKS: u32 = 65_536;
/// Longest buffer age accepted: 30 days.
const MAX_BUFFER_HOURS: u32 = 30 * 24;

impl Config {
    /// A configuration with the defaults the flags have.
    pub fn new(coordinator: String, agent_token: String, data_dir: PathBuf) -> Config {
        Config {
            coordinator,
            agent_token: Some(Secret::new(agent_token)),
            agent_token_file: None,
            location: None,
            data_dir,
            metrics_addr: None,
            max_concurrent_checks: 256,
            buffer_hours: 24,
            buffer_max_mib: 256,
            ca_file: PathBuf::from(SYSTEM_CA_BUNDLE),
            coordinator_ca_file: None,
        }
    }

    /// Checks every value; the message names the flag and what was wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.coordinator_base()?;
        self.agent_token()?;
        if self.max_concurrent_checks == 0 || self.max_concurrent_checks > MAX_CONCURRENT_CHECKS {
            return Err(format!(
                "--max-concurrent-checks: expected 1 to {MAX_CONCURRENT_CHECKS}, found {}",
                self.max_concurrent_checks
            ));
        }
        if self.buffer_hours == 0 || self.buffer_hours > MAX_BUFFER_HOURS {
            return Err(format!(
                "--buffer-hours: expected 1 to {MAX_BUFFER_HOURS}, found {}",
                self.buffer_hours
            ));
        }
        if self.buffer_max_mib == 0 {
            return Err("--buffer-max-mib: expected at least 1, found 0".into());
        }
        if let Some(location) = &self.location {
            if location.trim().is_empty() {
                return Err("--location: expected a site name, found an empty value".into());
            }
        }
        Ok(())
    }

    /// The coordinator's URL without a trailing slash.
    pub fn coordinator_base(&self) -> Result<String, String> {
        let url = self.coordinator.trim().trim_end_matches('/');
        let uri: http::Uri = url.parse().map_err(|e| {
            format!(
                "--coordinator: expected http://host:port or https://host:port, found '{}' ({e})",
                self.coordinator
            )
        })?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(url.to_owned()),
            _ => Err(format!(
                "--coordinator: expected http://host:port or https://host:port, found '{}'",
                self.coordinator
            )),
        }
    }

    /// The agent token, from the flag or the file, checked for its format.
    pub fn agent_token(&self) -> Result<Secret, String> {
        let (token, flag) =
            match (&self.agent_token, &self.agent_token_file) {
                (Some(token), _) => (token.clone(), "--agent-token"),
                (None, Some(path)) => (
                    read_secret_file(path).map_err(|e| format!("--agent-token-file: {e}"))?,
                    "--agent-token-file",
                ),
                (None, None) => return Err(
                    "no agent token: give --agent-token, MUSTER_AGENT_TOKEN or --agent-token-file"
                        .into(),
                ),
            };
        token::validate(TokenKind::AgentToken, token.expose().trim())
            .map_err(|e| format!("{flag}: not an agent token: {e}"))?;
        Ok(Secret::new(token.expose().trim()))
    }

    pub fn buffer_max_age(&self) -> Duration {
        Duration::from_secs(u64::from(self.buffer_hours) * 3600)
    }

    pub fn buffer_max_bytes(&self) -> u64 {
        u64::from(self.buffer_max_mib) * 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(
            "http://127.0.0.1:8000/".into(),
            token::generate(TokenKind::AgentToken),
            PathBuf::from("/tmp/x"),
        )
    }

    #[test]
    fn a_good_config_passes() {
        let c = config();
        c.validate().unwrap();
        assert_eq!(c.coordinator_base().unwrap(), "http://127.0.0.1:8000");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let mut c = config();
        c.coordinator = "127.0.0.1:8000".into();
        assert!(c.validate().unwrap_err().starts_with("--coordinator"));
        let mut c = config();
        c.coordinator = "ftp://host".into();
        assert!(c.validate().unwrap_err().starts_with("--coordinator"));
        let mut c = config();
        c.agent_token = Some(Secret::new("poly_abc"));
        let error = c.validate().unwrap_err();
        assert!(
            error.starts_with("--agent-token: not an agent token"),
            "{error}"
        );
        let mut c = config();
        c.agent_token = None;
        assert!(c.validate().unwrap_err().contains("no agent token"));
        let mut c = config();
        c.max_concurrent_checks = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .starts_with("--max-concurrent-checks"));
        let mut c = config();
        c.buffer_hours = 0;
        assert!(c.validate().unwrap_err().starts_with("--buffer-hours"));
    }

    #[test]
    fn the_token_can_come_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let value = token::generate(TokenKind::AgentToken);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = config();
        c.agent_token = None;
        c.agent_token_file = Some(path.clone());
        assert_eq!(c.agent_token().unwrap().expose(), value);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(c.agent_token().unwrap_err().contains("chmod 600"));
    }
}
