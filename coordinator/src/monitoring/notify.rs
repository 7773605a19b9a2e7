//! Notifications: the webhook message (its JSON is this module's [`Alert`];
//! the webhook is an API boundary like the HTTP API), and the task that
//! delivers queued messages.
//!
//! Messages are queued in the store's outbox in the transaction that changed
//! the state they report, one row per notifier, so a coordinator that stops
//! right after loses nothing. Every coordinator runs [`deliver`]: it claims
//! due rows with a lease (one claimant per row), posts them, and records the
//! outcome; a failed post is retried with exponential backoff, a row whose
//! lease ran out (its coordinator died mid-post) is claimed again. Delivery
//! is therefore at least once: a receiver that must not see a message twice
//! dedupes on `event_id`. One subject's messages (an endpoint's, an agent's)
//! go to a notifier in the order they were queued: a resolve never overtakes
//! its alert.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::destination::Destinations;
use super::{Agent, Delivery, Endpoint, Incident, LocationState, Notification, Status};
use crate::metrics::Metrics;
use crate::store::Store;

/// How long a claimed message is ours to deliver before others may take it.
const LEASE: Duration = Duration::from_secs(60);
/// Time allowed for one post.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages claimed at a time, and posted at once.
const BATCH: i64 = 32;
const CONCURRENT_POSTS: usize = 8;
/// How often the outbox is read when nothing woke the task.
const POLL: Duration = Duration::from_secs(1);
/// Attempts before a message is given up (about two hours of backoff).
pub const MAX_ATTEMPTS: i32 = 15;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertEvent {
    EndpointDown,
    EndpointResolved,
    AgentSilent,
    AgentResolved,
}

impl AlertEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertEvent::EndpointDown => "endpoint_down",
            AlertEvent::EndpointResolved => "endpoint_resolved",
            AlertEvent::AgentSilent => "agent_silent",
            AlertEvent::AgentResolved => "agent_resolved",
        }
    }
}

/// The JSON a webhook receives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Unique per message (the same for every notifier it goes to).
    pub event_id: Uuid,
    pub event: AlertEvent,
    /// The incident it opens or ends: an alert and its resolve share it.
    pub incident_id: Uuid,
    pub organization_id: Uuid,
    /// When the state changed.
    pub at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// One line for people.
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<AlertEndpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AlertAgent>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEndpoint {
    pub id: Uuid,
    pub name: String,
    pub kind: &'static str,
    pub target: String,
    pub status: Status,
    pub locations: Vec<AlertLocation>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertLocation {
    pub location: String,
    pub state: Status,
    /// Why its last check failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertAgent {
    pub id: Uuid,
    pub name: String,
    pub location: String,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
}

impl Alert {
    /// Whose messages these are: one subject's go out in order.
    pub fn subject_id(&self) -> Uuid {
        match (&self.endpoint, &self.agent) {
            (Some(e), _) => e.id,
            (None, Some(a)) => a.id,
            (None, None) => self.incident_id,
        }
    }

    pub fn endpoint_down(
        endpoint: &Endpoint,
        states: &[LocationState],
        incident: &Incident,
        now: DateTime<Utc>,
    ) -> Alert {
        let failing: Vec<String> = states
            .iter()
            .filter(|s| s.state == Status::Down)
            .map(|s| match reason(s) {
                Some(reason) => format!("{} ({reason})", s.location),
                None => s.location.clone(),
            })
            .collect();
        let summary = format!(
            "{} is down: failing at {} of {} location(s): {}",
            endpoint.config.name,
            failing.len(),
            states.len(),
            failing.join("; ")
        );
        Alert::about_endpoint(
            AlertEvent::EndpointDown,
            endpoint,
            states,
            incident,
            now,
            summary,
        )
    }

    pub fn endpoint_resolved(
        endpoint: &Endpoint,
        states: &[LocationState],
        incident: &Incident,
        now: DateTime<Utc>,
    ) -> Alert {
        let summary = format!(
            "{} is {} again after {}",
            endpoint.config.name,
            endpoint.status.as_str(),
            lasted(incident.started_at, now)
        );
        Alert::about_endpoint(
            AlertEvent::EndpointResolved,
            endpoint,
            states,
            incident,
            now,
            summary,
        )
    }

    fn about_endpoint(
        event: AlertEvent,
        endpoint: &Endpoint,
        states: &[LocationState],
        incident: &Incident,
        now: DateTime<Utc>,
        summary: String,
    ) -> Alert {
        Alert {
            event_id: Uuid::now_v7(),
            event,
            incident_id: incident.id,
            organization_id: endpoint.org_id,
            at: now,
            started_at: incident.started_at,
            resolved_at: (event == AlertEvent::EndpointResolved).then_some(now),
            summary,
            endpoint: Some(AlertEndpoint {
                id: endpoint.id,
                name: endpoint.config.name.clone(),
                kind: endpoint.config.kind.as_str(),
                target: endpoint.config.target.clone(),
                status: endpoint.status,
                locations: states
                    .iter()
                    .map(|s| AlertLocation {
                        location: s.location.clone(),
                        state: s.state,
                        reason: (s.state == Status::Down).then(|| reason(s)).flatten(),
                    })
                    .collect(),
            }),
            agent: None,
        }
    }

    pub fn agent_silent(agent: &Agent, incident_id: Uuid, now: DateTime<Utc>) -> Alert {
        let since = agent
            .last_heartbeat_at
            .map(|t| format!("for {}", lasted(t, now)))
            .unwrap_or_default();
        Alert::about_agent(
            AlertEvent::AgentSilent,
            agent,
            incident_id,
            now,
            now,
            format!(
                "monitoring agent {} at {} sent no heartbeat {since}; its checks there are unknown",
                agent.name, agent.location
            ),
        )
    }

    pub fn agent_resolved(
        agent: &Agent,
        incident_id: Uuid,
        silent_since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Alert {
        Alert::about_agent(
            AlertEvent::AgentResolved,
            agent,
            incident_id,
            silent_since,
            now,
            format!(
                "monitoring agent {} at {} is reporting again after {}",
                agent.name,
                agent.location,
                lasted(silent_since, now)
            ),
        )
    }

    fn about_agent(
        event: AlertEvent,
        agent: &Agent,
        incident_id: Uuid,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
        summary: String,
    ) -> Alert {
        Alert {
            event_id: Uuid::now_v7(),
            event,
            incident_id,
            organization_id: agent.org_id,
            at: now,
            started_at,
            resolved_at: (event == AlertEvent::AgentResolved).then_some(now),
            summary,
            endpoint: None,
            agent: Some(AlertAgent {
                id: agent.id,
                name: agent.name.clone(),
                location: agent.location.clone(),
                last_heartbeat_at: agent.last_heartbeat_at,
            }),
        }
    }

    pub fn payload(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Why a location's last check failed: the check's error, else the first
/// failed condition.
fn reason(state: &LocationState) -> Option<String> {
    let result = state.last_result.as_ref()?;
    result.error.clone().or_else(|| {
        result
            .conditions
            .iter()
            .find(|c| !c.ok)
            .map(|c| c.message.clone().unwrap_or_else(|| c.condition.clone()))
    })
}

fn lasted(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let secs = (to - from).num_seconds().max(0);
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

/// The HTTP client webhooks are posted with; it connects only to the
/// addresses `destinations` lets webhooks reach.
pub fn client(destinations: Destinations) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .dns_resolver(Arc::new(destinations))
        // A proxy would connect on our behalf, past the resolver.
        .no_proxy()
        .timeout(POST_TIMEOUT)
        .user_agent(concat!("muster-coordinator/", env!("CARGO_PKG_VERSION")))
        // A webhook answers; it does not send us elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The wait before attempt `attempts + 1`: 1 s, 2 s, 4 s, … up to 30 min.
pub fn backoff(attempts: i32) -> Duration {
    let doublings = attempts.clamp(1, 32) as u32 - 1;
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(LONGEST_RETRY)
}

/// Delivers the outbox until `shutdown`: claims due messages, posts them a
/// few at a time, records each outcome.
pub async fn deliver(
    store: Arc<dyn Store>,
    client: reqwest::Client,
    destinations: Destinations,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    // Leases name their holder, so an outcome recorded after our lease ran
    // out and another coordinator took the message over changes nothing.
    let owner = Uuid::now_v7();
    let lease = chrono::Duration::from_std(LEASE).unwrap_or(chrono::Duration::MAX);
    loop {
        let now = Utc::now();
        let claimed = match store
            .claim_notifications(owner, now, now + lease, BATCH)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "reading the notification outbox failed");
                Vec::new()
            }
        };
        let full = claimed.len() as i64 == BATCH;
        futures_util::stream::iter(claimed)
            .for_each_concurrent(CONCURRENT_POSTS, |message| {
                let (store, client) = (store.clone(), client.clone());
                let (destinations, metrics) = (&destinations, &metrics);
                async move {
                    let outcome = post(&client, destinations, &message).await;
                    metrics.notification(match outcome {
                        Delivery::Sent => "sent",
                        Delivery::Retry { .. } => "retried",
                        Delivery::GaveUp { .. } => "given_up",
                    });
                    if let Err(error) = store
                        .settle_notification(message.id, owner, &outcome, Utc::now())
                        .await
                    {
                        // The lease runs out and the message is sent again.
                        tracing::warn!(%error, notification_id = %message.id, "recording a notification's delivery failed");
                    }
                }
            })
            .await;
        if full {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn post(
    client: &reqwest::Client,
    destinations: &Destinations,
    message: &Notification,
) -> Delivery {
    let event = message.payload["event"].as_str().unwrap_or("").to_owned();
    // A URL whose host is an address does not pass the resolver; one made
    // before the operator narrowed the destinations is refused here.
    if let Err(why) = destinations.check_url(&message.url) {
        tracing::error!(notification_id = %message.id, notifier_id = %message.notifier_id, %event, error = %why, "notification given up");
        return Delivery::GaveUp { error: why };
    }
    let failure = match client
        .post(&message.url)
        .header("X-Muster-Event", &event)
        .json(&message.payload)
        .send()
        .await
    {
        Ok(response) if response.status().is_success() => {
            tracing::info!(notification_id = %message.id, notifier_id = %message.notifier_id, %event, attempts = message.attempts, "notification delivered");
            return Delivery::Sent;
        }
        Ok(response) => format!("the webhook answered {}", response.status()),
        Err(error) => format!("posting to the webhook failed: {error}"),
    };
    if message.attempts >= MAX_ATTEMPTS {
        tracing::error!(notification_id = %message.id, notifier_id = %message.notifier_id, %event, attempts = message.attempts, error = %failure, "notification given up");
        return Delivery::GaveUp { error: failure };
    }
    let wait =
        chrono::Duration::from_std(backoff(message.attempts)).unwrap_or(chrono::Duration::MAX);
    tracing::warn!(notification_id = %message.id, notifier_id = %message.notifier_id, %event, attempts = message.attempts, error = %failure, "notification failed; will retry");
    Delivery::Retry {
        at: Utc::now() + wait,
        error: failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(20), LONGEST_RETRY);
        assert_eq!(backoff(i32::MAX), LONGEST_RETRY);
        assert_eq!(backoff(0), Duration::from_secs(1));
    }

    #[test]
    fn durations_read_well() {
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(lasted(t, t + chrono::Duration::seconds(42)), "42 s");
        assert_eq!(lasted(t, t + chrono::Duration::seconds(600)), "10 min");
        assert_eq!(lasted(t, t + chrono::Duration::seconds(36_000)), "10 h");
    }
}
