//! The event bus of several coordinators: Redis pub/sub.
//!
//! Every event is handed to this coordinator's own [`Hub`] at once and
//! published to Redis for the others; a coordinator skips its own messages
//! when they come back. Wake-ups and cancels go to two fixed channels every
//! coordinator subscribes to; a run's log and final status go to a channel
//! of that run, which a coordinator subscribes to only while one of its
//! clients tails the run.
//!
//! Redis carries hints (see [`crate::bus`]), never state: when it is
//! unreachable, publishing fails fast, the bus reports itself unhealthy, and
//! readers fall back to the store. Both connections are re-established in
//! the background with backoff; fan-out resumes without a restart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::StreamExt;
use muster_common::secret::Secret;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::AsyncConnectionConfig;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::bus::{Bus, BusError, Event, Hub, Topic};

const QUEUE_CHANNEL: &str = "muster:queue";
const CONTROL_CHANNEL: &str = "muster:control";
const RUN_CHANNEL_PREFIX: &str = "muster:run:";

/// Events waiting to be published; past this, publishing fails (and the
/// other coordinators fall back to the store) rather than using memory.
const OUTBOX_CAPACITY: usize = 16 * 1024;
/// Most events sent to Redis in one pipeline.
const BATCH: usize = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an idle subscription is checked with a ping.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often run channels nobody here listens to any more are left.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How long a starting coordinator waits for Redis before it starts degraded.
const START_WAIT: Duration = Duration::from_secs(5);

pub struct RedisBus {
    hub: Arc<Hub>,
    /// This coordinator process, to skip its own messages.
    origin: Uuid,
    outbox: mpsc::Sender<(String, Vec<u8>)>,
    /// Runs to subscribe to, for the subscriber task.
    watch_runs: mpsc::UnboundedSender<Uuid>,
    links: Arc<Links>,
}

/// The state of the two connections; healthy when both are up.
struct Links {
    publisher: AtomicBool,
    subscriber: AtomicBool,
    health: watch::Sender<bool>,
    /// Events that did not reach Redis.
    failed: AtomicU64,
}

impl Links {
    fn set(&self, which: &AtomicBool, up: bool) {
        which.store(up, Ordering::SeqCst);
        let healthy =
            self.publisher.load(Ordering::SeqCst) && self.subscriber.load(Ordering::SeqCst);
        self.health.send_if_modified(|current| {
            if *current == healthy {
                return false;
            }
            *current = healthy;
            if healthy {
                tracing::info!("event bus connected to Redis; live fan-out between coordinators is on");
            } else {
                tracing::warn!("event bus lost Redis; other coordinators' events arrive through the store until it is back");
            }
            true
        });
    }
}

impl RedisBus {
    /// Connects to Redis at `url` and runs the bus's connections on
    /// `tracker` until `shutdown`. Waits a few seconds for Redis; when it does
    /// not answer, the coordinator starts anyway, degraded, and keeps trying.
    pub async fn start(
        url: &Secret,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<RedisBus>> {
        let client = redis::Client::open(url.expose())
            .context("--redis-url: expected redis://[user:password@]host[:port][/db]")?;
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX_CAPACITY);
        let (watch_runs, watch_rx) = mpsc::unbounded_channel();
        let links = Arc::new(Links {
            publisher: AtomicBool::new(false),
            subscriber: AtomicBool::new(false),
            health: watch::channel(false).0,
            failed: AtomicU64::new(0),
        });
        let bus = Arc::new(RedisBus {
            hub: Arc::new(Hub::default()),
            origin: Uuid::new_v4(),
            outbox,
            watch_runs,
            links: links.clone(),
        });
        tracker.spawn(publish_loop(
            client.clone(),
            outbox_rx,
            links.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(subscribe_loop(
            client,
            bus.hub.clone(),
            bus.origin,
            watch_rx,
            links,
            shutdown,
        ));
        let mut health = bus.health();
        if tokio::time::timeout(START_WAIT, health.wait_for(|healthy| *healthy))
            .await
            .is_err()
        {
            tracing::error!(
                "Redis (--redis-url) does not answer; starting without live fan-out between coordinators, and retrying"
            );
        }
        Ok(bus)
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(&self, event: Event) -> Result<(), BusError> {
        let channel = channel_of(event.topic());
        let mut payload = self.origin.as_bytes().to_vec();
        serde_json::to_writer(&mut payload, &event)
            .map_err(|e| BusError(format!("encoding an event: {e}")))?;
        self.hub.deliver(event);
        if !self.links.publisher.load(Ordering::SeqCst) {
            self.links.failed.fetch_add(1, Ordering::Relaxed);
            return Err(BusError(
                "Redis is unreachable: the event reached this coordinator only".into(),
            ));
        }
        self.outbox.try_send((channel, payload)).map_err(|_| {
            self.links.failed.fetch_add(1, Ordering::Relaxed);
            BusError("Redis falls behind: the event reached this coordinator only".into())
        })
    }

    fn publish_errors(&self) -> u64 {
        self.links.failed.load(Ordering::Relaxed)
    }

    fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event> {
        let receiver = self.hub.subscribe(topic);
        if let Topic::Run(run_id) = topic {
            // The subscriber task is gone only at shutdown.
            let _ = self.watch_runs.send(run_id);
        }
        receiver
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.links.health.subscribe()
    }
}

fn channel_of(topic: Topic) -> String {
    match topic {
        Topic::Queue => QUEUE_CHANNEL.to_owned(),
        Topic::Control => CONTROL_CHANNEL.to_owned(),
        Topic::Run(run_id) => run_channel(run_id),
    }
}

fn run_channel(run_id: Uuid) -> String {
    format!("{RUN_CHANNEL_PREFIX}{run_id}")
}

fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(MAX_BACKOFF)
}

/// Sleeps `backoff`; false when shutdown came first.
async fn pause(backoff: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(backoff) => true,
    }
}

async fn publish_loop(
    client: redis::Client,
    mut outbox: mpsc::Receiver<(String, Vec<u8>)>,
    links: Arc<Links>,
    shutdown: CancellationToken,
) {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut backoff = MIN_BACKOFF;
    // A batch whose sending failed, sent once more on the next connection:
    // a connection found dead only when used (Redis restarted meanwhile)
    // must not swallow the first events after the restart.
    let mut retry: Option<Vec<(String, Vec<u8>)>> = None;
    loop {
        let mut connection: MultiplexedConnection = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = client.get_multiplexed_async_connection_with_config(&config) => match connected {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::debug!(%error, "cannot connect to Redis to publish");
                    links.set(&links.publisher, false);
                    // What waited for this connection is dropped: the store has it.
                    let mut dropped = retry.take().map_or(0, |batch| batch.len());
                    while outbox.try_recv().is_ok() {
                        dropped += 1;
                    }
                    links.failed.fetch_add(dropped as u64, Ordering::Relaxed);
                    if !pause(backoff, &shutdown).await {
                        return;
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        };
        backoff = MIN_BACKOFF;
        links.set(&links.publisher, true);
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            let (batch, retried) = match retry.take() {
                Some(batch) => (batch, true),
                None => {
                    let first = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = outbox.recv() => match message {
                            Some(message) => message,
                            None => return,
                        },
                        _ = ping.tick() => {
                            // Finds a dead connection before an event needs it.
                            if !within(redis::cmd("PING").query_async::<()>(&mut connection)).await {
                                break;
                            }
                            continue;
                        }
                    };
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        let Ok(message) = outbox.try_recv() else {
                            break;
                        };
                        batch.push(message);
                    }
                    (batch, false)
                }
            };
            let mut pipe = redis::pipe();
            for (channel, payload) in &batch {
                pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
            }
            if let Err(error) = pipe.query_async::<()>(&mut connection).await {
                tracing::debug!(%error, "publishing to Redis failed");
                if retried {
                    links
                        .failed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                } else {
                    retry = Some(batch);
                }
                break;
            }
        }
        links.set(&links.publisher, false);
    }
}

async fn subscribe_loop(
    client: redis::Client,
    hub: Arc<Hub>,
    origin: Uuid,
    mut watch_runs: mpsc::UnboundedReceiver<Uuid>,
    links: Arc<Links>,
    shutdown: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let connect = subscribe(&client, hub.watched_run_ids());
        let (mut sink, mut stream, mut subscribed) = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match connected {
                Ok(Ok(connected)) => connected,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "cannot subscribe to Redis");
                    links.set(&links.subscriber, false);
                    if !pause(backoff, &shutdown).await {
                        return;
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
                Err(_) => {
                    tracing::debug!("subscribing to Redis timed out");
                    links.set(&links.subscriber, false);
                    if !pause(backoff, &shutdown).await {
                        return;
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        };
        backoff = MIN_BACKOFF;
        links.set(&links.subscriber, true);
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                message = stream.next() => match message {
                    Some(message) => deliver(&hub, origin, message.get_payload_bytes()),
                    None => break,
                },
                Some(run_id) = watch_runs.recv() => {
                    if subscribed.insert(run_id)
                        && !within(sink.subscribe(run_channel(run_id))).await
                    {
                        break;
                    }
                }
                _ = sweep.tick() => {
                    let watched: HashSet<Uuid> = hub.watched_run_ids().into_iter().collect();
                    let left: Vec<String> = subscribed
                        .difference(&watched)
                        .map(|run_id| run_channel(*run_id))
                        .collect();
                    if !left.is_empty() {
                        if !within(sink.unsubscribe(&left)).await {
                            break;
                        }
                        subscribed.retain(|run_id| watched.contains(run_id));
                    }
                }
                _ = ping.tick() => {
                    if !within(sink.ping::<redis::Value>()).await {
                        break;
                    }
                }
            }
        }
        tracing::debug!("the Redis subscription ended; reconnecting");
        links.set(&links.subscriber, false);
    }
}

/// A subscription to the fixed channels and to `runs`.
async fn subscribe(
    client: &redis::Client,
    runs: Vec<Uuid>,
) -> redis::RedisResult<(PubSubSink, PubSubStream, HashSet<Uuid>)> {
    let (mut sink, stream) = client.get_async_pubsub().await?.split();
    sink.subscribe(&[QUEUE_CHANNEL, CONTROL_CHANNEL]).await?;
    if !runs.is_empty() {
        let channels: Vec<String> = runs.iter().map(|run_id| run_channel(*run_id)).collect();
        sink.subscribe(&channels).await?;
    }
    Ok((sink, stream, runs.into_iter().collect()))
}

/// Whether a request on the subscription succeeded in time.
async fn within<T>(request: impl std::future::Future<Output = redis::RedisResult<T>>) -> bool {
    matches!(
        tokio::time::timeout(RESPONSE_TIMEOUT, request).await,
        Ok(Ok(_))
    )
}

/// Hands a message from another coordinator to this one's subscribers.
fn deliver(hub: &Hub, origin: Uuid, payload: &[u8]) {
    let Some((sender, body)) = payload.split_first_chunk::<16>() else {
        tracing::warn!(len = payload.len(), "ignored a malformed event bus message");
        return;
    };
    if Uuid::from_bytes(*sender) == origin {
        return;
    }
    match serde_json::from_slice::<Event>(body) {
        Ok(event) => hub.deliver(event),
        // A coordinator of another version may send what this one does not know.
        Err(error) => {
            tracing::warn!(%error, "ignored an event bus message this coordinator cannot read")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LogChunk, RunStatus};

    fn message(origin: Uuid, event: &Event) -> Vec<u8> {
        let mut payload = origin.as_bytes().to_vec();
        serde_json::to_writer(&mut payload, event).unwrap();
        payload
    }

    #[tokio::test]
    async fn messages_of_others_are_delivered_and_own_ones_skipped() {
        let hub = Hub::default();
        let (me, other, run_id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut run = hub.subscribe(Topic::Run(run_id));
        let chunk = Event::Log {
            run_id,
            chunk: LogChunk {
                seq: 7,
                stream: 2,
                ts: chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
                data: b"\x00binary \xff and text\n".to_vec(),
            },
        };
        let finished = Event::Finished {
            run_id,
            status: RunStatus::TimedOut,
            exit_code: None,
        };
        deliver(&hub, me, &message(me, &chunk));
        deliver(&hub, me, &message(other, &chunk));
        deliver(&hub, me, &message(other, &finished));
        assert_eq!(run.recv().await.unwrap(), chunk, "bytes survive the trip");
        assert_eq!(run.recv().await.unwrap(), finished);
    }

    #[tokio::test]
    async fn malformed_messages_are_ignored() {
        let hub = Hub::default();
        let mut queue = hub.subscribe(Topic::Queue);
        let me = Uuid::new_v4();
        for payload in [
            &b""[..],
            b"short",
            &[0u8; 16],
            b"0123456789abcdef{\"kind\":\"no_such_event\"}",
            b"0123456789abcdef{\"kind\":\"run_queued\"}",
        ] {
            deliver(&hub, me, payload);
        }
        assert!(queue.try_recv().is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_message_is_read_or_ignored_never_a_panic(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            deliver(&Hub::default(), Uuid::new_v4(), &payload);
        }
    }
}
