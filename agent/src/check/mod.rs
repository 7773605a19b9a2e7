//! Running one check of one endpoint: the kind-specific probe (`http`,
//! `tcp`, `icmp`, `dns`), bounded by the endpoint's timeout, then its
//! conditions, into the [`CheckResult`] the agent reports.
//!
//! A probe fills an [`Outcome`] as it goes, so a check that times out still
//! reports the phases it finished and says which one it was in. A check
//! that could not be made (refused, timed out, a bad answer) is `down` with
//! its `error`, whatever its conditions say.

pub mod dns;
pub mod http;
pub mod icmp;
pub mod tcp;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use muster_common::condition::{Condition, Measured, Placeholder};
use muster_common::monitor::{
    self, CheckKind, CheckResult, ConditionResult, EndpointSpec, Timings, TlsInfo, Verdict,
};
use tokio::net::TcpStream;
use uuid::Uuid;

pub use icmp::IcmpSockets;
pub use tls::TlsConfigs;

/// What checks share: TLS configurations and how ICMP sockets are opened.
pub struct Checker {
    pub tls: TlsConfigs,
    pub icmp: IcmpSockets,
}

impl Checker {
    pub fn new(tls: TlsConfigs) -> Checker {
        Checker {
            tls,
            icmp: IcmpSockets::UnprivilegedThenRaw,
        }
    }
}

/// An endpoint ready to be checked: its spec and its conditions, parsed once
/// when the endpoint list arrives.
#[derive(Debug)]
pub struct Prepared {
    pub spec: EndpointSpec,
    conditions: Vec<Result<Condition, String>>,
    /// Whether a condition reads the body (only then is it kept).
    wants_body: bool,
}

impl Prepared {
    pub fn new(spec: EndpointSpec) -> Prepared {
        let conditions: Vec<Result<Condition, String>> = spec
            .conditions
            .iter()
            .map(|c| {
                Condition::parse(&c.condition)
                    .map_err(|e| format!("the condition does not parse: {e}"))
            })
            .collect();
        let wants_body = conditions
            .iter()
            .any(|c| matches!(c, Ok(c) if c.placeholder == Placeholder::Body));
        Prepared {
            spec,
            conditions,
            wants_body,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.spec.timeout.max(1)))
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.spec.interval.max(1)))
    }
}

/// What a probe found so far.
#[derive(Debug, Default)]
pub struct Outcome {
    pub measured: Measured,
    pub timings: Timings,
    pub tls: TlsInfo,
    /// The phase the probe is in, for a timeout's message.
    pub phase: &'static str,
}

/// Runs one check of `endpoint` and judges it.
pub async fn run(checker: &Checker, endpoint: &Prepared) -> CheckResult {
    let checked_at = Utc::now();
    let started = Instant::now();
    let mut out = Outcome {
        phase: "starting",
        ..Outcome::default()
    };
    let timeout = endpoint.timeout();
    let probe = async {
        match endpoint.spec.kind {
            CheckKind::Http => http::check(checker, endpoint, &mut out).await,
            CheckKind::Tcp => tcp::check(checker, endpoint, &mut out).await,
            CheckKind::Icmp => icmp::check(checker, endpoint, &mut out).await,
            CheckKind::Dns => dns::check(endpoint, &mut out).await,
        }
    };
    // The probe borrows `out`; the borrow ends with this statement.
    let finished = tokio::time::timeout(timeout, probe).await;
    let error = match finished {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(_) => Some(format!(
            "timed out after {}s while {}",
            timeout.as_secs(),
            out.phase
        )),
    };
    out.timings.total_ms = ms(started.elapsed());
    judge(endpoint, checked_at, out, error)
}

/// The result from what the probe found: conditions evaluated, verdict set.
fn judge(
    endpoint: &Prepared,
    checked_at: chrono::DateTime<Utc>,
    mut out: Outcome,
    error: Option<String>,
) -> CheckResult {
    let conditions: Vec<ConditionResult> = endpoint
        .spec
        .conditions
        .iter()
        .zip(&endpoint.conditions)
        .map(|(spec, parsed)| {
            let outcome = match parsed {
                Ok(condition) => condition.check(&out.measured).map_err(|f| f.0),
                Err(e) => Err(e.clone()),
            };
            ConditionResult {
                condition: spec.condition.clone(),
                ok: outcome.is_ok(),
                message: outcome.err(),
            }
        })
        .collect();
    let verdict = if error.is_some() {
        Verdict::Down
    } else {
        monitor::verdict(&endpoint.spec.conditions, &conditions)
    };
    // The body served the conditions; it is not reported.
    out.measured.body = None;
    CheckResult {
        id: Uuid::now_v7(),
        endpoint_id: endpoint.spec.id,
        checked_at,
        verdict,
        error,
        measured: out.measured,
        timings: out.timings,
        tls: out.tls,
        conditions,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `host:port`, `[v6]:port`, or (with a default port) `host`, `v6`.
pub fn split_host_port(target: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let target = target.trim();
    if target.is_empty() {
        return Err("the target is empty".into());
    }
    if let Some(rest) = target.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{target:?}: '[' without ']'"))?;
        return match after.strip_prefix(':') {
            Some(port) => Ok((host.to_owned(), parse_port(target, port)?)),
            None if after.is_empty() => default_port
                .map(|p| (host.to_owned(), p))
                .ok_or_else(|| format!("{target:?}: expected host:port")),
            None => Err(format!("{target:?}: unexpected text after ']'")),
        };
    }
    if target.parse::<IpAddr>().is_ok() {
        return default_port
            .map(|p| (target.to_owned(), p))
            .ok_or_else(|| format!("{target:?}: expected host:port"));
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Ok((host.to_owned(), parse_port(target, port)?))
        }
        Some(_) => Err(format!("{target:?}: expected host:port")),
        None => default_port
            .map(|p| (target.to_owned(), p))
            .ok_or_else(|| format!("{target:?}: expected host:port")),
    }
}

fn parse_port(target: &str, port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{target:?}: {port:?} is not a port number")),
    }
}

/// The addresses of `host`: an IP literal as it is, a name through the
/// system resolver (timed as the DNS phase).
pub async fn resolve(host: &str, port: u16, out: &mut Outcome) -> Result<Vec<SocketAddr>, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    out.phase = "resolving the host name";
    let started = Instant::now();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("cannot resolve {bare:?}: {e}"))?
        .collect();
    out.timings.dns_ms = Some(ms(started.elapsed()));
    if addrs.is_empty() {
        return Err(format!("{bare:?} has no address"));
    }
    Ok(addrs)
}

/// A TCP connection to the first of `addrs` that accepts one, timed as the
/// connect phase; records the address in `[IP]` and `[CONNECTED]`.
pub async fn connect(addrs: &[SocketAddr], out: &mut Outcome) -> Result<TcpStream, String> {
    out.phase = "connecting";
    let started = Instant::now();
    let mut last = None;
    for addr in addrs {
        out.measured.ip = Some(addr.ip().to_string());
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                out.timings.connect_ms = Some(ms(started.elapsed()));
                out.measured.connected = true;
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(format!("cannot connect to {addr}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| "no address to connect to".into()))
}

/// Shared handle to the checker for spawned checks.
pub type SharedChecker = Arc<Checker>;

#[cfg(test)]
mod tests {
    use super::*;
    use muster_common::monitor::ConditionSpec;

    #[test]
    fn targets_split_into_host_and_port() {
        assert_eq!(
            split_host_port("example.test:53", None).unwrap(),
            ("example.test".into(), 53)
        );
        assert_eq!(
            split_host_port("[::1]:8053", None).unwrap(),
            ("::1".into(), 8053)
        );
        assert_eq!(
            split_host_port("::1", Some(53)).unwrap(),
            ("::1".into(), 53)
        );
        assert_eq!(
            split_host_port("10.0.0.1", Some(53)).unwrap(),
            ("10.0.0.1".into(), 53)
        );
        assert!(split_host_port("host", None)
            .unwrap_err()
            .contains("host:port"));
        assert!(split_host_port("host:0", None).is_err());
        assert!(split_host_port("host:http", None).is_err());
        assert!(split_host_port("[::1", None).is_err());
        assert!(split_host_port("", Some(1)).is_err());
    }

    fn endpoint(conditions: &[(&str, bool)]) -> Prepared {
        let spec: EndpointSpec = serde_json::from_value(serde_json::json!({
            "id": Uuid::now_v7(), "name": "x", "kind": "http",
            "target": "http://127.0.0.1:1/", "interval": 5, "timeout": 1,
        }))
        .unwrap();
        Prepared::new(EndpointSpec {
            conditions: conditions
                .iter()
                .map(|(c, degrades)| ConditionSpec {
                    condition: (*c).into(),
                    degrades: *degrades,
                })
                .collect(),
            ..spec
        })
    }

    #[test]
    fn conditions_decide_unless_the_check_failed() {
        let e = endpoint(&[
            ("[STATUS] == 200", false),
            ("[RESPONSE_TIME] < 100", true),
            ("[BODY].status == UP", false),
        ]);
        assert!(e.wants_body);
        let outcome = |status, ms| Outcome {
            measured: Measured {
                status: Some(status),
                response_time_ms: Some(ms),
                body: Some(r#"{"status": "UP"}"#.into()),
                connected: true,
                ..Measured::default()
            },
            ..Outcome::default()
        };
        let r = judge(&e, Utc::now(), outcome(200, 5.0), None);
        assert_eq!(r.verdict, Verdict::Up);
        assert!(r.measured.body.is_none(), "the body is not reported");
        let r = judge(&e, Utc::now(), outcome(200, 500.0), None);
        assert_eq!(r.verdict, Verdict::Degraded);
        assert!(!r.conditions[1].ok);
        assert!(r.conditions[1].message.as_deref().unwrap().contains("500"));
        let r = judge(&e, Utc::now(), outcome(503, 5.0), None);
        assert_eq!(r.verdict, Verdict::Down);
        let r = judge(&e, Utc::now(), outcome(200, 5.0), Some("refused".into()));
        assert_eq!(r.verdict, Verdict::Down);
        assert_eq!(r.error.as_deref(), Some("refused"));
    }

    #[test]
    fn a_condition_that_does_not_parse_fails_with_its_column() {
        let e = endpoint(&[("[STATUS] = 200", false)]);
        let r = judge(&e, Utc::now(), Outcome::default(), None);
        assert_eq!(r.verdict, Verdict::Down);
        let message = r.conditions[0].message.as_deref().unwrap();
        assert!(message.contains("column 10"), "{message}");
    }
}
