//! Pushes leases to connected runners with free capacity.
//!
//! The dispatcher keeps, per coordinator, the runners whose streams this
//! coordinator holds and how many runs each is executing. It wakes when the
//! bus says a run was queued, when a runner connects or finishes a run, and
//! on a short fallback tick (a wake-up the bus lost). Claiming is the store's
//! atomic `claim_run`, so coordinators racing for one run never both lease
//! it. A busy runner's slot is refilled in the transaction that records the
//! result of the run that held it (`finish_and_claim`), without a pass. It
//! also forwards the bus's cancel signals to the runners it holds, and
//! closes the stream of a runner that was revoked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_proto::runner::v1::{coordinator_message, CancelRun, CoordinatorMessage, Lease};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{announce, Bus, Event, Topic};
use crate::metrics::Metrics;
use crate::store::{Claim, Fenced, Run, RunStatus, Store};

/// How often the dispatcher looks for work it was not told about while the
/// bus is healthy (more often while it is not: [`crate::bus::poll_interval`]).
pub const FALLBACK_TICK: Duration = Duration::from_secs(1);

pub type Outbox = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

struct Slot {
    session: u64,
    org: Option<Uuid>,
    labels: BTreeMap<String, String>,
    capacity: usize,
    /// The runs this runner holds through this coordinator, with their
    /// fencing tokens.
    running: HashMap<Uuid, i64>,
    outbox: Outbox,
    /// Fired when the runner must be cut off (it was revoked): its session
    /// ends the stream.
    kicked: CancellationToken,
}

/// A runner's registered stream, as `connect` returns it.
pub struct Session {
    /// What to pass to `disconnect`.
    pub id: u64,
    /// Fires when the dispatcher cuts the runner off; the stream must end.
    pub kicked: CancellationToken,
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    lease_ttl: Duration,
    fallback_tick: Duration,
    metrics: Arc<Metrics>,
    runners: Mutex<HashMap<Uuid, Slot>>,
    wake: Notify,
    next_session: std::sync::atomic::AtomicU64,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        lease_ttl: Duration,
        fallback_tick: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            bus,
            lease_ttl,
            fallback_tick,
            metrics,
            runners: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            next_session: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// How long a lease lasts without a heartbeat.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// This coordinator's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// How many runners' streams this coordinator holds.
    pub fn connected_runners(&self) -> usize {
        self.runners.lock().expect("dispatcher lock").len()
    }

    /// Asks for a dispatch pass soon. Wake-ups are never lost: one that comes
    /// while a pass runs causes another pass.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Registers a runner's stream; a newer session replaces an older one of
    /// the same runner. `running` are the runs it holds, with their fencing
    /// tokens.
    pub fn connect(
        &self,
        runner_id: Uuid,
        org: Option<Uuid>,
        labels: BTreeMap<String, String>,
        capacity: usize,
        running: HashMap<Uuid, i64>,
        outbox: Outbox,
    ) -> Session {
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kicked = CancellationToken::new();
        let slot = Slot {
            session,
            org,
            labels,
            capacity,
            running,
            outbox,
            kicked: kicked.clone(),
        };
        self.runners
            .lock()
            .expect("dispatcher lock")
            .insert(runner_id, slot);
        self.wake();
        Session {
            id: session,
            kicked,
        }
    }

    /// Cuts a runner off at once: it is told to stop the runs it holds
    /// through this coordinator, gets no further lease, and its session ends
    /// the stream. Returns whether this coordinator held its stream.
    pub fn kick(&self, runner_id: Uuid) -> bool {
        let slot = self
            .runners
            .lock()
            .expect("dispatcher lock")
            .remove(&runner_id);
        let Some(slot) = slot else { return false };
        for (run_id, token) in &slot.running {
            // Queued before the session's closing status, so said first.
            let _ = slot.outbox.try_send(Ok(cancel_message(*run_id, *token)));
        }
        slot.kicked.cancel();
        true
    }

    /// Kicks every runner `doomed` says must go; returns their ids.
    pub fn kick_where(&self, doomed: impl Fn(Uuid) -> bool) -> Vec<Uuid> {
        let ids: Vec<Uuid> = self
            .runners
            .lock()
            .expect("dispatcher lock")
            .keys()
            .copied()
            .filter(|id| doomed(*id))
            .collect();
        ids.into_iter().filter(|id| self.kick(*id)).collect()
    }

    pub fn disconnect(&self, runner_id: Uuid, session: u64) {
        let mut runners = self.runners.lock().expect("dispatcher lock");
        if runners
            .get(&runner_id)
            .is_some_and(|s| s.session == session)
        {
            runners.remove(&runner_id);
        }
    }

    /// The runner shuts down: it gets no further lease on this stream.
    pub fn drain(&self, runner_id: Uuid) {
        if let Some(slot) = self
            .runners
            .lock()
            .expect("dispatcher lock")
            .get_mut(&runner_id)
        {
            slot.capacity = 0;
        }
    }

    /// The claim that refills the slot run `run_id` holds on `runner_id`
    /// once it ends, made in the transaction that records its result
    /// ([`Store::finish_and_claim`]); `None` when that runner takes no
    /// further run here (not connected to this coordinator, draining, or
    /// over its capacity even without this run). The run keeps its slot
    /// until [`Dispatcher::release`] or [`Dispatcher::hand_over`], so no
    /// dispatch pass fills it meanwhile.
    pub fn refill(&self, runner_id: Uuid, run_id: Uuid) -> Option<Claim> {
        let runners = self.runners.lock().expect("dispatcher lock");
        let slot = runners.get(&runner_id)?;
        let frees_a_slot =
            slot.running.contains_key(&run_id) && slot.running.len() <= slot.capacity;
        frees_a_slot.then(|| Claim {
            runner_id,
            runner_org: slot.org,
            labels: slot.labels.clone(),
            lease_expires_at: chrono::Utc::now() + self.lease_ttl,
        })
    }

    /// Run `ended`'s slot goes to `next`, claimed by [`Dispatcher::refill`]'s
    /// claim: the lease is sent on the runner's stream, or the run queued
    /// again if the stream is gone.
    pub async fn hand_over(
        &self,
        runner_id: Uuid,
        ended: Uuid,
        next: &Run,
    ) -> Result<(), crate::store::StoreError> {
        self.deliver_to(runner_id, next, Some(ended)).await?;
        Ok(())
    }

    /// A run no longer occupies a slot of its runner.
    pub fn release(&self, runner_id: Uuid, run_id: Uuid) {
        if let Some(slot) = self
            .runners
            .lock()
            .expect("dispatcher lock")
            .get_mut(&runner_id)
        {
            slot.running.remove(&run_id);
        }
        self.wake();
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut queued = self.bus.subscribe(Topic::Queue);
        let mut control = self.bus.subscribe(Topic::Control);
        let mut health = self.bus.health();
        loop {
            let tick = crate::bus::poll_interval(self.fallback_tick, &health);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                // Back from an outage, or into one: what the bus missed is in the store.
                Ok(()) = health.changed() => {}
                event = queued.recv() => {
                    if matches!(event, Err(broadcast::error::RecvError::Closed)) {
                        queued = self.bus.subscribe(Topic::Queue);
                    }
                }
                event = control.recv() => {
                    match event {
                        Ok(event) => self.forward_cancel(event).await,
                        Err(broadcast::error::RecvError::Closed) => {
                            control = self.bus.subscribe(Topic::Control);
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "cancel signals were missed; runners learn of them when they report");
                        }
                    }
                    continue;
                }
                _ = tokio::time::sleep(tick) => {}
            }
            if let Err(error) = self.dispatch_pass().await {
                tracing::warn!(%error, "dispatch pass failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Tells the runner of a canceled run to stop it, if this coordinator
    /// holds that runner's stream.
    async fn forward_cancel(&self, event: Event) {
        let Event::CancelRun {
            run_id,
            runner_id,
            fencing_token,
        } = event
        else {
            return;
        };
        let outbox = self
            .runners
            .lock()
            .expect("dispatcher lock")
            .get(&runner_id)
            .map(|slot| slot.outbox.clone());
        if let Some(outbox) = outbox {
            let message = cancel_message(run_id, fencing_token);
            if outbox.send(Ok(message)).await.is_ok() {
                tracing::info!(run_id = %run_id, runner_id = %runner_id, "asked the runner to cancel the run");
            }
        }
    }

    /// Leases queued runs to runners with free slots until either runs
    /// or slots run out. Runners that share an organization and labels see the
    /// same queue, so one empty answer covers all of them.
    async fn dispatch_pass(&self) -> Result<(), crate::store::StoreError> {
        loop {
            let candidates: Vec<(Uuid, Option<Uuid>, BTreeMap<String, String>)> = {
                let runners = self.runners.lock().expect("dispatcher lock");
                let mut free: Vec<_> = runners
                    .iter()
                    .filter(|(_, s)| s.running.len() < s.capacity)
                    .map(|(id, s)| {
                        (
                            s.running.len() as f64 / s.capacity as f64,
                            *id,
                            s.org,
                            s.labels.clone(),
                        )
                    })
                    .collect();
                // Least loaded first spreads runs over the fleet.
                free.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                free.into_iter()
                    .map(|(_, id, org, labels)| (id, org, labels))
                    .collect()
            };
            if candidates.is_empty() {
                return Ok(());
            }
            let mut exhausted: HashSet<(Option<Uuid>, BTreeMap<String, String>)> = HashSet::new();
            let mut leased = 0;
            for (runner_id, org, labels) in candidates {
                if exhausted.contains(&(org, labels.clone())) {
                    continue;
                }
                let claim = Claim {
                    runner_id,
                    runner_org: org,
                    labels: labels.clone(),
                    lease_expires_at: chrono::Utc::now() + self.lease_ttl,
                };
                match self.store.claim_run(&claim).await? {
                    Some(run) => {
                        if self.deliver_to(runner_id, &run, None).await? {
                            leased += 1;
                        }
                    }
                    None => {
                        exhausted.insert((org, labels));
                    }
                }
            }
            if leased == 0 {
                return Ok(());
            }
        }
    }

    /// Sends a lease on the runner's stream, in the slot of run `replacing`
    /// if given (taken over in one step, so that no pass sees the slot free
    /// in between); if the stream is gone, the run goes back to the queue
    /// under the same fencing check.
    async fn deliver_to(
        &self,
        runner_id: Uuid,
        run: &Run,
        replacing: Option<Uuid>,
    ) -> Result<bool, crate::store::StoreError> {
        let lease = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Lease(Lease {
                run_id: run.id.to_string(),
                fencing_token: run.fencing_token as u64,
                bundle_digest: run.bundle_digest.clone(),
                plan_json: run.plan.to_string(),
                expires_at_ms: run
                    .lease_expires_at
                    .map(|t| t.timestamp_millis())
                    .unwrap_or_default(),
                attempt: run.attempt as u32,
                log_seq_base: run.log_seq_base as u64,
            })),
        };
        let outbox = {
            let mut runners = self.runners.lock().expect("dispatcher lock");
            runners.get_mut(&runner_id).map(|slot| {
                if let Some(ended) = replacing {
                    slot.running.remove(&ended);
                }
                slot.running.insert(run.id, run.fencing_token);
                slot.outbox.clone()
            })
        };
        let sent = match outbox {
            Some(outbox) => outbox.send(Ok(lease)).await.is_ok(),
            None => false,
        };
        if sent {
            self.metrics.run_leased(run);
            tracing::info!(run_id = %run.id, runner_id = %runner_id, token = run.fencing_token, "leased run");
            let leased = Event::StatusChanged {
                run_id: run.id,
                status: run.status,
                runner: run.runner_name.clone(),
            };
            announce(&*self.bus, leased).await;
            return Ok(true);
        }
        if let Some(slot) = self
            .runners
            .lock()
            .expect("dispatcher lock")
            .get_mut(&runner_id)
        {
            slot.running.remove(&run.id);
        }
        if self.store.release_lease(run.id, run.fencing_token).await? == Fenced::Applied {
            tracing::info!(run_id = %run.id, runner_id = %runner_id, "runner went away before its lease; run queued again");
        }
        Ok(false)
    }
}

/// How often leases are checked for expiry.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// Takes runs whose lease ran out (their runner stopped heartbeating: it
/// died, froze, or is cut off past the lease TTL) from their runner: queued
/// again when the action allows retries, else `lost` or `timed_out`. Every
/// coordinator runs this; the fencing token makes each run's change apply once.
pub async fn expire_leases(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    lease_ttl: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let reason = format!(
        "its runner stopped responding (no heartbeat for {} s)",
        lease_ttl.as_secs()
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EXPIRY_TICK) => {}
        }
        let expired = match store.expired_leases(chrono::Utc::now(), 100).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "could not look for expired leases");
                continue;
            }
        };
        for (run_id, token) in expired {
            match abandon(&*store, &*bus, &metrics, run_id, token, &reason).await {
                Ok(true) => metrics.lease_expired(),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(run_id = %run_id, %error, "could not end a run whose lease expired")
                }
            }
        }
    }
}

pub(crate) fn cancel_message(run_id: Uuid, fencing_token: i64) -> CoordinatorMessage {
    CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Cancel(CancelRun {
            run_id: run_id.to_string(),
            fencing_token: fencing_token as u64,
        })),
    }
}

/// Takes a run from a runner that no longer executes it (see
/// `Store::abandon_run`) and announces the outcome: queued again for
/// another attempt, or ended `lost` / `timed_out`. Returns whether `token`
/// still held the run (else nothing changed).
pub async fn abandon(
    store: &dyn Store,
    bus: &dyn Bus,
    metrics: &Metrics,
    run_id: Uuid,
    token: i64,
    reason: &str,
) -> Result<bool, crate::store::StoreError> {
    let Some(run) = store
        .abandon_run(run_id, token, reason, chrono::Utc::now())
        .await?
    else {
        return Ok(false);
    };
    if run.status == RunStatus::Queued {
        tracing::warn!(run_id = %run.id, attempt = run.attempt, max_attempts = run.max_attempts, reason, "runner lost; the run is queued for another attempt");
        announce(bus, Event::RunQueued { run_id: run.id }).await;
    } else {
        tracing::warn!(run_id = %run.id, status = run.status.as_str(), reason, "run ended without its runner");
        metrics.run_finished(&run);
        announce(
            bus,
            Event::Finished {
                run_id: run.id,
                status: run.status,
                exit_code: None,
            },
        )
        .await;
    }
    Ok(true)
}
