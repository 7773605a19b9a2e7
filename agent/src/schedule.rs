//! When each endpoint is checked: one task with one timer for all
//! endpoints. Due times sit in a binary heap; the task sleeps until the
//! earliest, starts the checks that are due (each in a short-lived task,
//! at most `--max-concurrent-checks` at once) and puts each endpoint back
//! one interval later. An endpoint costs its spec and a heap entry, not a
//! task, so ten thousand of them are cheap.
//!
//! Jitter: a new or changed endpoint's first check falls at a random point
//! of its first interval, so endpoints added together do not fire together;
//! from then on it keeps its phase (fixed rate, no drift). An endpoint whose
//! previous check is still running when it is due again skips that turn
//! (counted), so a slow target never has two checks in flight. When every
//! slot is taken, due checks wait for one (counted) and start late.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_common::monitor::{CheckResult, EndpointList};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::check::{self, Checker, Prepared};
use crate::metrics::Metrics;

/// An endpoint on the schedule.
#[derive(Debug)]
pub struct Scheduled {
    pub endpoint: Prepared,
    running: AtomicBool,
}

struct Slot {
    /// `None` once the endpoint is removed, until the slot is reused.
    scheduled: Option<Arc<Scheduled>>,
    /// Bumped whenever the slot changes, so heap entries made before are
    /// recognised as stale and dropped.
    generation: u32,
}

impl Slot {
    /// The endpoint, if `generation` is still this slot's.
    fn current(&self, generation: u32) -> Option<&Arc<Scheduled>> {
        self.scheduled
            .as_ref()
            .filter(|_| self.generation == generation)
    }
}

/// Due time, slot, generation.
type Entry = Reverse<(Instant, u32, u32)>;

/// The endpoints and when each is next due.
#[derive(Default)]
pub struct Schedule {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_id: HashMap<Uuid, u32>,
    heap: BinaryHeap<Entry>,
}

impl Schedule {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Makes the schedule hold exactly the endpoints of `list`: unchanged
    /// ones keep their times, new and changed ones start within one
    /// interval, removed ones are gone.
    pub fn update(&mut self, list: &EndpointList, now: Instant) {
        let mut seen = HashSet::with_capacity(list.endpoints.len());
        for spec in &list.endpoints {
            if !seen.insert(spec.id) {
                tracing::warn!(endpoint_id = %spec.id, "the endpoint list names an endpoint twice; checking it once");
                continue;
            }
            let index = match self.by_id.get(&spec.id) {
                Some(&index) => {
                    let slot = &mut self.slots[index as usize];
                    if slot
                        .scheduled
                        .as_ref()
                        .is_some_and(|s| s.endpoint.spec == *spec)
                    {
                        continue;
                    }
                    slot.generation = slot.generation.wrapping_add(1);
                    slot.scheduled = Some(Arc::new(Scheduled::new(spec.clone())));
                    index
                }
                None => {
                    let scheduled = Some(Arc::new(Scheduled::new(spec.clone())));
                    let index = match self.free.pop() {
                        Some(index) => {
                            let slot = &mut self.slots[index as usize];
                            slot.generation = slot.generation.wrapping_add(1);
                            slot.scheduled = scheduled;
                            index
                        }
                        None => {
                            self.slots.push(Slot {
                                scheduled,
                                generation: 0,
                            });
                            (self.slots.len() - 1) as u32
                        }
                    };
                    self.by_id.insert(spec.id, index);
                    index
                }
            };
            let slot = &self.slots[index as usize];
            let interval = slot
                .scheduled
                .as_ref()
                .expect("just filled")
                .endpoint
                .interval();
            let due = now + interval.mul_f64(crate::random_fraction());
            self.heap.push(Reverse((due, index, slot.generation)));
        }
        let removed: Vec<Uuid> = self
            .by_id
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        for id in removed {
            let index = self.by_id.remove(&id).expect("listed above");
            // The entries left in the heap for it are stale now.
            let slot = &mut self.slots[index as usize];
            slot.scheduled = None;
            slot.generation = slot.generation.wrapping_add(1);
            self.free.push(index);
        }
        // Stale entries leave as they come due; rebuild when they dominate.
        if self.heap.len() > 2 * self.by_id.len() + 1024 {
            self.rebuild(now);
        }
    }

    fn rebuild(&mut self, now: Instant) {
        let mut live: HashMap<u32, Instant> = HashMap::new();
        for Reverse((due, index, generation)) in self.heap.drain() {
            if self.slots[index as usize].current(generation).is_some() {
                live.entry(index)
                    .and_modify(|d| *d = (*d).min(due))
                    .or_insert(due);
            }
        }
        for (index, due) in live {
            let generation = self.slots[index as usize].generation;
            self.heap.push(Reverse((due.max(now), index, generation)));
        }
    }

    /// When the next check is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// The next endpoint due at or before `now`, put back one interval on.
    pub fn pop_due(&mut self, now: Instant) -> Option<Arc<Scheduled>> {
        while let Some(&Reverse((due, index, generation))) = self.heap.peek() {
            if due > now {
                return None;
            }
            self.heap.pop();
            let Some(scheduled) = self.slots[index as usize].current(generation).cloned() else {
                continue;
            };
            let interval = scheduled.endpoint.interval();
            let mut next = due + interval;
            if next <= now {
                // Fell behind (a long wait for a slot, a suspended host):
                // skip the turns missed rather than run them in a burst.
                next = now + interval;
            }
            self.heap.push(Reverse((next, index, generation)));
            return Some(scheduled);
        }
        None
    }
}

impl Scheduled {
    fn new(spec: muster_common::monitor::EndpointSpec) -> Scheduled {
        Scheduled {
            endpoint: Prepared::new(spec),
            running: AtomicBool::new(false),
        }
    }
}

/// What running checks need.
pub struct Runner {
    pub checker: Arc<Checker>,
    pub metrics: Arc<Metrics>,
    pub slots: Arc<Semaphore>,
    pub results: mpsc::Sender<CheckResult>,
    /// Check tasks, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// Runs the schedule until `stop` fires: takes each new endpoint list from
/// `lists`, starts the checks as they come due.
pub async fn run(
    mut lists: watch::Receiver<Option<Arc<EndpointList>>>,
    runner: Runner,
    stop: CancellationToken,
) {
    let mut schedule = Schedule::default();
    let mut lists_open = true;
    let apply = |schedule: &mut Schedule, list: &Option<Arc<EndpointList>>| {
        if let Some(list) = list {
            schedule.update(list, Instant::now());
            runner.metrics.endpoints.set(schedule.len() as i64);
            tracing::info!(endpoints = schedule.len(), version = %list.version, "checking a new endpoint list");
        }
    };
    apply(&mut schedule, &lists.borrow_and_update().clone());
    loop {
        let next = schedule.next_due();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = lists.changed(), if lists_open => {
                if changed.is_err() {
                    lists_open = false;
                    continue;
                }
                let list = lists.borrow_and_update().clone();
                apply(&mut schedule, &list);
            }
            _ = sleep_until(next) => {
                while let Some(scheduled) = schedule.pop_due(Instant::now()) {
                    if scheduled.running.swap(true, Ordering::AcqRel) {
                        runner.metrics.checks_skipped.inc();
                        continue;
                    }
                    let permit = match runner.slots.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => {
                            runner.metrics.check_slot_waits.inc();
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                permit = runner.slots.clone().acquire_owned() => match permit {
                                    Ok(permit) => permit,
                                    Err(_) => return,
                                },
                            }
                        }
                    };
                    let checker = runner.checker.clone();
                    let metrics = runner.metrics.clone();
                    let results = runner.results.clone();
                    runner.tasks.spawn(async move {
                        let _permit = permit;
                        metrics.checks_running.inc();
                        let began = Instant::now();
                        let result = check::run(&checker, &scheduled.endpoint).await;
                        scheduled.running.store(false, Ordering::Release);
                        metrics.checks_running.dec();
                        metrics.checked(scheduled.endpoint.spec.kind, result.verdict, began.elapsed());
                        // The reporter is gone only at the end of shutdown.
                        let _ = results.send(result).await;
                    });
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await,
        None => std::future::pending().await,
    }
}

/// How long until `due`, for tests and logs.
pub fn until(due: Instant, now: Instant) -> Duration {
    due.saturating_duration_since(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_common::monitor::EndpointSpec;

    fn spec(id: u128, interval: u32) -> EndpointSpec {
        serde_json::from_value(serde_json::json!({
            "id": Uuid::from_u128(id), "name": format!("e{id}"), "kind": "tcp",
            "target": "127.0.0.1:1", "interval": interval, "timeout": 1,
        }))
        .unwrap()
    }

    fn list(specs: Vec<EndpointSpec>) -> EndpointList {
        EndpointList {
            version: "v".into(),
            endpoints: specs,
        }
    }

    /// Every check due up to `end`, as (offset from `start` in ms, endpoint).
    fn drain(schedule: &mut Schedule, start: Instant, end: Instant) -> Vec<(u128, Uuid)> {
        let mut fired = Vec::new();
        while let Some(due) = schedule.next_due().filter(|d| *d <= end) {
            // `None`: the entry was stale (a removed or changed endpoint).
            if let Some(s) = schedule.pop_due(due) {
                fired.push((due.duration_since(start).as_millis(), s.endpoint.spec.id));
            }
        }
        fired
    }

    #[test]
    fn first_checks_spread_over_the_interval_then_keep_their_rate() {
        let start = Instant::now();
        let mut schedule = Schedule::default();
        let specs: Vec<EndpointSpec> = (1..=200).map(|i| spec(i, 10)).collect();
        schedule.update(&list(specs), start);
        let fired = drain(&mut schedule, start, start + Duration::from_secs(30));
        // 200 endpoints, every 10 s, for 30 s: three checks each (the first
        // in [0, 10 s)), give or take the one whose phase is at the edge.
        assert!((600..=800).contains(&fired.len()), "{}", fired.len());
        let firsts: Vec<u128> = (1..=200)
            .map(|i| {
                fired
                    .iter()
                    .find(|(_, id)| *id == Uuid::from_u128(i))
                    .unwrap()
                    .0
            })
            .collect();
        assert!(firsts.iter().all(|ms| *ms < 10_000));
        // Spread: not all in one second.
        let early = firsts.iter().filter(|ms| **ms < 1_000).count();
        assert!(
            early < 60,
            "{early} of 200 first checks in the first second"
        );
        // Each endpoint keeps exactly its interval between checks.
        let one: Vec<u128> = fired
            .iter()
            .filter(|(_, id)| *id == Uuid::from_u128(7))
            .map(|(ms, _)| *ms)
            .collect();
        for pair in one.windows(2) {
            assert_eq!(pair[1] - pair[0], 10_000);
        }
    }

    #[test]
    fn updates_keep_unchanged_endpoints_and_drop_removed_ones() {
        let start = Instant::now();
        let mut schedule = Schedule::default();
        schedule.update(&list(vec![spec(1, 5), spec(2, 5), spec(3, 5)]), start);
        let before = drain(&mut schedule, start, start + Duration::from_secs(5));
        let phase_of_1 = before
            .iter()
            .find(|(_, id)| *id == Uuid::from_u128(1))
            .unwrap()
            .0;

        // 2 goes away, 3 changes interval, 4 is new.
        let now = start + Duration::from_secs(5);
        schedule.update(&list(vec![spec(1, 5), spec(3, 7), spec(4, 5)]), now);
        assert_eq!(schedule.len(), 3);
        let after = drain(&mut schedule, start, start + Duration::from_secs(20));
        assert!(after.iter().all(|(_, id)| *id != Uuid::from_u128(2)));
        let of = |n: u128| -> Vec<u128> {
            after
                .iter()
                .filter(|(_, id)| *id == Uuid::from_u128(n))
                .map(|(ms, _)| *ms)
                .collect()
        };
        // 1 kept its phase.
        assert!(of(1).iter().all(|ms| ms % 5_000 == phase_of_1 % 5_000));
        // 3 runs every 7 s now, once.
        let three = of(3);
        assert!(three.windows(2).all(|p| p[1] - p[0] == 7_000), "{three:?}");
        assert!(!of(4).is_empty());

        // A removed slot is reused without reviving the old entries.
        schedule.update(
            &list(vec![spec(1, 5), spec(3, 7), spec(4, 5), spec(9, 5)]),
            now,
        );
        assert_eq!(schedule.len(), 4);
    }

    #[test]
    fn duplicates_in_a_list_are_scheduled_once() {
        let start = Instant::now();
        let mut schedule = Schedule::default();
        schedule.update(&list(vec![spec(1, 5), spec(1, 5)]), start);
        assert_eq!(schedule.len(), 1);
        let fired = drain(&mut schedule, start, start + Duration::from_millis(4_999));
        assert_eq!(fired.len(), 1);
    }

    #[test]
    fn a_schedule_that_fell_behind_skips_missed_turns() {
        let start = Instant::now();
        let mut schedule = Schedule::default();
        schedule.update(&list(vec![spec(1, 1)]), start);
        let late = start + Duration::from_secs(60);
        assert!(schedule.pop_due(late).is_some());
        assert!(schedule.pop_due(late).is_none());
        assert_eq!(
            until(schedule.next_due().unwrap(), late),
            Duration::from_secs(1)
        );
    }
}
