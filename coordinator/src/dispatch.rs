//! Pushes leases to connected runners with free capacity.
//!
//! The dispatcher keeps, per coordinator, the runners whose streams this
//! coordinator holds and how many runs each is executing. It wakes when a run
//! is queued here, when a runner connects or finishes a run, and on a short
//! fallback tick (runs queued through another coordinator sharing the
//! database). Claiming is the store's atomic `claim_run`, so coordinators
//! racing for one run never both lease it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_proto::runner::v1::{coordinator_message, CoordinatorMessage, Lease};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{Claim, Fenced, Run, Store};

/// How often the dispatcher looks for work it was not told about.
const FALLBACK_TICK: Duration = Duration::from_secs(1);

pub type Outbox = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

struct Slot {
    session: u64,
    org: Option<Uuid>,
    labels: BTreeMap<String, String>,
    capacity: usize,
    running: HashSet<Uuid>,
    outbox: Outbox,
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    lease_ttl: Duration,
    runners: Mutex<HashMap<Uuid, Slot>>,
    wake: Notify,
    next_session: std::sync::atomic::AtomicU64,
}

impl Dispatcher {
    pub fn new(store: Arc<dyn Store>, lease_ttl: Duration) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            lease_ttl,
            runners: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            next_session: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Asks for a dispatch pass soon. Wake-ups are never lost: one that comes
    /// while a pass runs causes another pass.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Registers a runner's stream; a newer session replaces an older one of
    /// the same runner. Returns the session id to pass to `disconnect`.
    pub fn connect(
        &self,
        runner_id: Uuid,
        org: Option<Uuid>,
        labels: BTreeMap<String, String>,
        capacity: usize,
        running: HashSet<Uuid>,
        outbox: Outbox,
    ) -> u64 {
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = Slot {
            session,
            org,
            labels,
            capacity,
            running,
            outbox,
        };
        self.runners
            .lock()
            .expect("dispatcher lock")
            .insert(runner_id, slot);
        self.wake();
        session
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
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(FALLBACK_TICK) => {}
            }
            if let Err(error) = self.dispatch_pass().await {
                tracing::warn!(%error, "dispatch pass failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
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
                        if self.deliver(runner_id, &run).await? {
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

    /// Sends a lease on the runner's stream; if the stream is gone, the run
    /// goes back to the queue under the same fencing check.
    async fn deliver(&self, runner_id: Uuid, run: &Run) -> Result<bool, crate::store::StoreError> {
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
            })),
        };
        let outbox = {
            let mut runners = self.runners.lock().expect("dispatcher lock");
            runners.get_mut(&runner_id).map(|slot| {
                slot.running.insert(run.id);
                slot.outbox.clone()
            })
        };
        let sent = match outbox {
            Some(outbox) => outbox.send(Ok(lease)).await.is_ok(),
            None => false,
        };
        if sent {
            tracing::info!(run_id = %run.id, runner_id = %runner_id, token = run.fencing_token, "leased run");
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
