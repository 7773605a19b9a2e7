//! What agents and the coordinator say to each other about endpoint checks:
//! the endpoints an agent is given (`GET /api/v1/agent/endpoints/`), the
//! results it reports (`POST /api/v1/agent/results/`) and its heartbeat
//! (`POST /api/v1/agent/health/`). Both sides use these types, so the wire
//! format has one definition; with the `openapi` feature (the
//! coordinator's) they are the schemas of its OpenAPI document too.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::condition::Measured;

/// The kinds of check an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Http,
    Tcp,
    Icmp,
    Dns,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::Icmp => "icmp",
            CheckKind::Dns => "dns",
        }
    }
}

/// A condition as configured on an endpoint: its text (see
/// [`crate::condition`]) and whether failing it makes the endpoint
/// `degraded` rather than `down`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConditionSpec {
    pub condition: String,
    #[serde(default)]
    pub degrades: bool,
}

/// HTTP(S) check options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct HttpOptions {
    /// `GET` when empty.
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    /// Follow up to 10 redirects.
    pub follow_redirects: bool,
    /// Accept certificates that do not verify (self-signed test servers);
    /// the expiry is still measured.
    pub insecure_tls: bool,
}

/// TCP check options: optionally send a line and expect a reply containing a text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct TcpOptions {
    pub send: Option<String>,
    pub expect: Option<String>,
    /// Do a TLS handshake after connecting (measures the certificate expiry).
    pub tls: bool,
}

/// ICMP echo options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct IcmpOptions {
    /// Echo requests per check.
    pub count: u32,
}

impl Default for IcmpOptions {
    fn default() -> Self {
        IcmpOptions { count: 3 }
    }
}

/// DNS query options. The target is the server (`host:port`, port 53 by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct DnsOptions {
    pub name: String,
    /// `A` when empty: `A`, `AAAA`, `CNAME`, `MX`, `TXT`, `NS`.
    pub query_type: String,
    /// An answer that must be among those returned, when set.
    pub expected: Option<String>,
}

/// An endpoint as an agent checks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointSpec {
    pub id: Uuid,
    pub name: String,
    pub kind: CheckKind,
    /// URL (http), `host:port` (tcp, dns), host or address (icmp).
    pub target: String,
    /// Seconds between checks.
    pub interval: u32,
    /// Seconds a check may take.
    pub timeout: u32,
    #[serde(default)]
    pub conditions: Vec<ConditionSpec>,
    #[serde(default)]
    pub http: HttpOptions,
    #[serde(default)]
    pub tcp: TcpOptions,
    #[serde(default)]
    pub icmp: IcmpOptions,
    #[serde(default)]
    pub dns: DnsOptions,
}

/// `GET /api/v1/agent/endpoints/`: the agent's endpoints and their version
/// (also the `ETag`; sent back as `If-None-Match`, answered 304 when unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointList {
    pub version: String,
    pub endpoints: Vec<EndpointSpec>,
}

/// How long each phase of an HTTP check took, in milliseconds, on a fresh
/// connection. Absent phases did not happen (no TLS on `http://`) or were
/// not reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Timings {
    pub dns_ms: Option<f64>,
    pub connect_ms: Option<f64>,
    pub tls_ms: Option<f64>,
    pub first_byte_ms: Option<f64>,
    pub total_ms: f64,
    /// ICMP: the fastest, average and slowest echo round trip of the check
    /// (the average is also `[RESPONSE_TIME]`). Absent for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_min_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_avg_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_max_ms: Option<f64>,
}

/// What the TLS handshake showed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TlsInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: Option<String>,
    /// When the first certificate of the chain to expire does.
    pub certificate_expires_at: Option<DateTime<Utc>>,
}

/// One condition's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConditionResult {
    pub condition: String,
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every condition held.
    Up,
    /// Only conditions marked `degrades` failed.
    Degraded,
    /// A condition failed, or the check could not be made.
    Down,
}

/// One check of one endpoint, as the agent reports it. `id` is made by the
/// agent, so a batch replayed after the coordinator was away is stored once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckResult {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub checked_at: DateTime<Utc>,
    pub verdict: Verdict,
    /// Why the check could not be made (refused, timed out, bad answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub measured: Measured,
    pub timings: Timings,
    #[serde(default)]
    pub tls: TlsInfo,
    #[serde(default)]
    pub conditions: Vec<ConditionResult>,
}

/// `POST /api/v1/agent/results/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResultBatch {
    pub results: Vec<CheckResult>,
}

/// `POST /api/v1/agent/health/`: the agent's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentHealth {
    pub version: String,
    /// The version of the endpoint list it runs.
    #[serde(default)]
    pub endpoints_version: Option<String>,
    /// Results kept on disk, not yet delivered.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(format = "uint64"))]
    pub buffered_results: u64,
    /// Checks per minute over the last minutes.
    #[serde(default)]
    pub checks_per_minute: f64,
}

/// The verdict of a check from its conditions: `Down` when one that does not
/// merely degrade failed, `Degraded` when only degrading ones did.
pub fn verdict(conditions: &[ConditionSpec], results: &[ConditionResult]) -> Verdict {
    let mut verdict = Verdict::Up;
    for (spec, result) in conditions.iter().zip(results) {
        if !result.ok {
            if spec.degrades {
                verdict = Verdict::Degraded;
            } else {
                return Verdict::Down;
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_worst_failed_condition() {
        let specs = [
            ConditionSpec {
                condition: "[STATUS] == 200".into(),
                degrades: false,
            },
            ConditionSpec {
                condition: "[RESPONSE_TIME] < 300".into(),
                degrades: true,
            },
        ];
        let result = |ok: [bool; 2]| -> Vec<ConditionResult> {
            specs
                .iter()
                .zip(ok)
                .map(|(s, ok)| ConditionResult {
                    condition: s.condition.clone(),
                    ok,
                    message: None,
                })
                .collect()
        };
        assert_eq!(verdict(&specs, &result([true, true])), Verdict::Up);
        assert_eq!(verdict(&specs, &result([true, false])), Verdict::Degraded);
        assert_eq!(verdict(&specs, &result([false, false])), Verdict::Down);
    }

    #[test]
    fn endpoint_specs_read_with_defaults() {
        let spec: EndpointSpec = serde_json::from_str(
            r#"{"id": "01a20b2a-322b-73be-b0bd-1625acfae535", "name": "web", "kind": "http",
                "target": "http://127.0.0.1:8000/", "interval": 5, "timeout": 2}"#,
        )
        .unwrap();
        assert_eq!(spec.kind, CheckKind::Http);
        assert!(spec.conditions.is_empty());
        assert_eq!(spec.icmp.count, 3);
    }
}
