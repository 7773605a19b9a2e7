//! The event bus: run-queued wake-ups, cancel signals and live log fan-out.
//!
//! Everything on the bus is a hint about state the store already holds, so a
//! lost event costs latency, never data: dispatchers also tick, and live-log
//! readers that fall behind (or were not subscribed) read the stored log.
//!
//! Delivery to this process's subscribers goes through a [`Hub`] of
//! broadcast channels, one per [`Topic`]. A bus implementation decides how
//! an event reaches the hubs: [`InProcessBus`] hands it straight to its own
//! hub (one coordinator); a networked bus ([`crate::redis_bus`]) publishes
//! it to every coordinator, each of which feeds its own hub.
//!
//! A bus also reports its [health](Bus::health): while events may not reach
//! every coordinator, dispatchers and live tails look at the store more
//! often ([`poll_interval`]), so a bus outage costs latency, not runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::store::{LogChunk, RunStatus};

/// Events a slow subscriber may fall behind by before it is told it lagged.
const QUEUE_CAPACITY: usize = 256;
const RUN_CAPACITY: usize = 1024;
/// Per-run channels are swept of unsubscribed entries when the map grows past this.
const SWEEP_AT: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A run was queued: dispatchers look for a runner for it.
    RunQueued { run_id: Uuid },
    /// A run must stop: the coordinator holding `runner_id`'s stream tells it.
    CancelRun {
        run_id: Uuid,
        runner_id: Uuid,
        fencing_token: i64,
    },
    /// A log chunk was stored.
    Log { run_id: Uuid, chunk: LogChunk },
    /// A run changed status on its way to a final one (leased to a runner,
    /// running): live tails tell their clients at once.
    StatusChanged {
        run_id: Uuid,
        status: RunStatus,
        runner: Option<String>,
    },
    /// A run reached a final status; its log is complete.
    Finished {
        run_id: Uuid,
        status: RunStatus,
        exit_code: Option<i32>,
    },
}

/// Where an event is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Run-queued wake-ups.
    Queue,
    /// Cancel signals.
    Control,
    /// One run's log chunks and its status changes.
    Run(Uuid),
}

impl Event {
    pub fn topic(&self) -> Topic {
        match self {
            Event::RunQueued { .. } => Topic::Queue,
            Event::CancelRun { .. } => Topic::Control,
            Event::Log { run_id, .. }
            | Event::StatusChanged { run_id, .. }
            | Event::Finished { run_id, .. } => Topic::Run(*run_id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("event bus: {0}")]
pub struct BusError(pub String);

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Delivers `event` to its topic's subscribers on every coordinator.
    async fn publish(&self, event: Event) -> Result<(), BusError>;

    /// Events of `topic` from now on. A receiver that falls behind gets
    /// `RecvError::Lagged` and must re-read the store.
    fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event>;

    /// `true` while published events reach every coordinator.
    fn health(&self) -> watch::Receiver<bool>;

    /// Events that did not reach the other coordinators, since start.
    fn publish_errors(&self) -> u64 {
        0
    }
}

/// How often a reader of the bus looks at the store itself while the bus is
/// not healthy, whatever its usual interval.
pub const DEGRADED_POLL: Duration = Duration::from_millis(250);

/// How long to wait for news before looking at the store: `usual` while the
/// bus is healthy, [`DEGRADED_POLL`] while it is not.
pub fn poll_interval(usual: Duration, health: &watch::Receiver<bool>) -> Duration {
    if *health.borrow() {
        usual
    } else {
        usual.min(DEGRADED_POLL)
    }
}

/// Publishes `event`; a failure is logged, not returned. Events are hints
/// (see the module documentation): whoever missed one finds the state in
/// the store, at its next tick or read.
pub async fn announce(bus: &dyn Bus, event: Event) {
    let topic = event.topic();
    if let Err(error) = bus.publish(event).await {
        // An outage fails every publish: say so every 10 s, not every time.
        static LAST_WARNING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let last = LAST_WARNING.load(std::sync::atomic::Ordering::Relaxed);
        if now >= last + 10
            && LAST_WARNING
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(?topic, %error, "could not publish a run event (further failures for 10 s are not logged)");
        }
    }
}

/// This process's subscribers, by topic.
pub struct Hub {
    queue: broadcast::Sender<Event>,
    control: broadcast::Sender<Event>,
    runs: Mutex<HashMap<Uuid, broadcast::Sender<Event>>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            queue: broadcast::channel(QUEUE_CAPACITY).0,
            control: broadcast::channel(QUEUE_CAPACITY).0,
            runs: Mutex::new(HashMap::new()),
        }
    }
}

impl Hub {
    /// Hands `event` to this process's subscribers of its topic, if any.
    pub fn deliver(&self, event: Event) {
        match event.topic() {
            Topic::Queue => {
                let _ = self.queue.send(event);
            }
            Topic::Control => {
                let _ = self.control.send(event);
            }
            Topic::Run(run_id) => {
                let mut runs = self.runs.lock().expect("hub lock");
                if let Some(sender) = runs.get(&run_id) {
                    let done = matches!(event, Event::Finished { .. });
                    if sender.send(event).is_err() || done {
                        // Nobody listens any more, or nothing follows a final status.
                        runs.remove(&run_id);
                    }
                }
            }
        }
    }

    pub fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event> {
        match topic {
            Topic::Queue => self.queue.subscribe(),
            Topic::Control => self.control.subscribe(),
            Topic::Run(run_id) => {
                let mut runs = self.runs.lock().expect("hub lock");
                if runs.len() >= SWEEP_AT {
                    runs.retain(|_, s| s.receiver_count() > 0);
                }
                runs.entry(run_id)
                    .or_insert_with(|| broadcast::channel(RUN_CAPACITY).0)
                    .subscribe()
            }
        }
    }

    /// How many runs have live subscribers (for tests and metrics).
    pub fn watched_runs(&self) -> usize {
        self.watched_run_ids().len()
    }

    /// The runs that have live subscribers.
    pub fn watched_run_ids(&self) -> Vec<Uuid> {
        self.runs
            .lock()
            .expect("hub lock")
            .iter()
            .filter(|(_, s)| s.receiver_count() > 0)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// The bus of a single coordinator: events never leave the process.
pub struct InProcessBus {
    hub: Hub,
    health: watch::Sender<bool>,
}

impl Default for InProcessBus {
    fn default() -> Self {
        InProcessBus {
            hub: Hub::default(),
            health: watch::channel(true).0,
        }
    }
}

impl InProcessBus {
    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}

#[async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, event: Event) -> Result<(), BusError> {
        self.hub.deliver(event);
        Ok(())
    }

    fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event> {
        self.hub.subscribe(topic)
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(run_id: Uuid, seq: i64) -> Event {
        Event::Log {
            run_id,
            chunk: LogChunk {
                seq,
                stream: 1,
                ts: chrono::DateTime::from_timestamp_millis(seq * 1000).expect("valid time"),
                data: format!("line {seq}\n").into_bytes(),
            },
        }
    }

    #[tokio::test]
    async fn events_reach_only_the_subscribers_of_their_topic() {
        let bus = InProcessBus::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut queue_1 = bus.subscribe(Topic::Queue);
        let mut queue_2 = bus.subscribe(Topic::Queue);
        let mut run_a = bus.subscribe(Topic::Run(a));
        let mut run_b = bus.subscribe(Topic::Run(b));

        bus.publish(Event::RunQueued { run_id: a }).await.unwrap();
        bus.publish(log(a, 1)).await.unwrap();
        bus.publish(log(a, 2)).await.unwrap();

        assert_eq!(
            queue_1.recv().await.unwrap(),
            Event::RunQueued { run_id: a }
        );
        assert_eq!(
            queue_2.recv().await.unwrap(),
            Event::RunQueued { run_id: a }
        );
        assert_eq!(run_a.recv().await.unwrap(), log(a, 1));
        assert_eq!(run_a.recv().await.unwrap(), log(a, 2));
        assert!(run_b.try_recv().is_err(), "run b saw run a's log");
        assert!(queue_1.try_recv().is_err(), "the queue saw a log chunk");
    }

    #[tokio::test]
    async fn run_channels_are_dropped_when_the_run_ends_or_nobody_listens() {
        let bus = InProcessBus::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut run_a = bus.subscribe(Topic::Run(a));
        let run_b = bus.subscribe(Topic::Run(b));
        assert_eq!(bus.hub().watched_runs(), 2);

        let finished = Event::Finished {
            run_id: a,
            status: RunStatus::Succeeded,
            exit_code: Some(0),
        };
        bus.publish(finished.clone()).await.unwrap();
        assert_eq!(run_a.recv().await.unwrap(), finished);
        assert!(
            run_a.recv().await.is_err(),
            "the channel closes after the final status"
        );

        drop(run_b);
        bus.publish(log(b, 1)).await.unwrap();
        assert_eq!(bus.hub().runs.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_so() {
        let bus = InProcessBus::default();
        let a = Uuid::new_v4();
        let mut slow = bus.subscribe(Topic::Run(a));
        for seq in 1..=(RUN_CAPACITY as i64 + 10) {
            bus.publish(log(a, seq)).await.unwrap();
        }
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }
}
