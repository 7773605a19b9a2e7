//! The evaluation rules: check results → the state at a location → the
//! endpoint's status → incidents and the messages about them.
//!
//! Everything here is pure: the store loads an endpoint and its location
//! states inside a transaction, calls these functions, and writes back what
//! they changed in the same transaction. So the rules live in one place and
//! both stores apply them alike, and several coordinators sharing one
//! database serialise on the endpoint's row instead of racing.

use chrono::{DateTime, Utc};
use muster_common::monitor::{CheckResult, Verdict};
use uuid::Uuid;

use super::notify::Alert;
use super::{Endpoint, Incident, LocationState, Status};

/// How much of a response body, error or condition message is kept with a
/// stored result: enough to see why a check failed, not a copy of the site.
const KEEP_TEXT: usize = 1024;

/// Flap protection: consecutive failures before a location is `down`, and
/// consecutive other results before it leaves `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub failure: u32,
    pub success: u32,
}

impl LocationState {
    /// Feeds one verdict, in time order.
    pub fn observe(&mut self, verdict: Verdict, t: Thresholds) {
        match verdict {
            Verdict::Down => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                if self.state != Status::Down && self.failures >= t.failure.max(1) {
                    self.state = Status::Down;
                }
            }
            Verdict::Up | Verdict::Degraded => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                let seen = if verdict == Verdict::Up {
                    Status::Up
                } else {
                    Status::Degraded
                };
                if self.state != Status::Down || self.successes >= t.success.max(1) {
                    self.state = seen;
                }
            }
        }
    }

    /// No live agent reports from here any more.
    pub fn go_dark(&mut self) {
        self.state = Status::Unknown;
        self.failures = 0;
        self.successes = 0;
    }

    /// Applies newly stored results of this location (in any order).
    /// Results older than the newest one already applied are history only:
    /// they were buffered by an agent and arrive late. Returns whether the
    /// state changed.
    pub fn apply(&mut self, agent_id: Uuid, results: &[&CheckResult], t: Thresholds) -> bool {
        let mut fresh: Vec<&CheckResult> = results
            .iter()
            .copied()
            .filter(|r| self.last_checked_at.is_none_or(|last| r.checked_at >= last))
            .collect();
        fresh.sort_by_key(|r| (r.checked_at, r.id));
        let Some(newest) = fresh.last() else {
            return false;
        };
        for result in &fresh {
            self.observe(result.verdict, t);
        }
        self.last_checked_at = Some(newest.checked_at);
        self.last_result = Some(for_storage(newest));
        self.agent_id = Some(agent_id);
        true
    }
}

/// The endpoint's status from its locations: `down` when at least
/// `min_failing` of them are down; `degraded` when some are down or
/// degraded, but too few are down; `up` when every location with data is
/// up; `unknown` without data.
pub fn aggregate(states: &[LocationState], min_failing: u32) -> Status {
    let down = states.iter().filter(|s| s.state == Status::Down).count();
    if down > 0 && down >= min_failing.max(1) as usize {
        Status::Down
    } else if down > 0 || states.iter().any(|s| s.state == Status::Degraded) {
        Status::Degraded
    } else if states.iter().any(|s| s.state == Status::Up) {
        Status::Up
    } else {
        Status::Unknown
    }
}

/// An endpoint as the store loads it for evaluation, and writes it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub endpoint: Endpoint,
    /// One per configured location.
    pub states: Vec<LocationState>,
}

impl Loaded {
    fn thresholds(&self) -> Thresholds {
        Thresholds {
            failure: self.endpoint.config.failure_threshold,
            success: self.endpoint.config.success_threshold,
        }
    }

    /// New results from `agent_id` at `location`: updates that location's
    /// state and the endpoint's status. Returns the message to send, if the
    /// endpoint went down or recovered.
    pub fn results_arrived(
        &mut self,
        location: &str,
        agent_id: Uuid,
        results: &[&CheckResult],
        now: DateTime<Utc>,
        muted: bool,
    ) -> Option<Alert> {
        let t = self.thresholds();
        let state = self.states.iter_mut().find(|s| s.location == location)?;
        if !state.apply(agent_id, results, t) {
            return None;
        }
        self.settle(now, muted, true)
    }

    /// No live agent reports from `location` any more: its state becomes
    /// `unknown`. `may_resolve`: whether that may end an incident (an
    /// operator revoking the agent) or not (an agent falling silent, which
    /// says nothing about the endpoint).
    pub fn location_went_dark(
        &mut self,
        location: &str,
        now: DateTime<Utc>,
        may_resolve: bool,
    ) -> Option<Alert> {
        let state = self.states.iter_mut().find(|s| s.location == location)?;
        state.go_dark();
        self.settle(now, false, may_resolve)
    }

    /// Recomputes the status and opens or ends the incident.
    pub fn settle(&mut self, now: DateTime<Utc>, muted: bool, may_resolve: bool) -> Option<Alert> {
        let endpoint = &mut self.endpoint;
        let status = aggregate(&self.states, endpoint.config.min_failing_locations);
        if status != endpoint.status {
            endpoint.status = status;
            endpoint.status_changed_at = now;
        }
        let any_down = self.states.iter().any(|s| s.state == Status::Down);
        match &endpoint.incident {
            None if status == Status::Down => {
                let incident = Incident {
                    id: Uuid::now_v7(),
                    started_at: now,
                    muted,
                };
                endpoint.incident = Some(incident.clone());
                (!muted).then(|| Alert::endpoint_down(endpoint, &self.states, &incident, now))
            }
            Some(incident)
                if may_resolve && matches!(status, Status::Up | Status::Degraded) && !any_down =>
            {
                let incident = incident.clone();
                endpoint.incident = None;
                (!incident.muted)
                    .then(|| Alert::endpoint_resolved(endpoint, &self.states, &incident, now))
            }
            _ => None,
        }
    }
}

/// A result as it is kept: long texts cut to a useful length.
pub fn for_storage(result: &CheckResult) -> CheckResult {
    let mut kept = result.clone();
    if let Some(body) = &mut kept.measured.body {
        cut(body, KEEP_TEXT);
    }
    if let Some(error) = &mut kept.error {
        cut(error, KEEP_TEXT);
    }
    for condition in &mut kept.conditions {
        cut(&mut condition.condition, KEEP_TEXT);
        if let Some(message) = &mut condition.message {
            cut(message, KEEP_TEXT);
        }
    }
    kept
}

fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitoring::{CheckOptions, EndpointConfig};
    use muster_common::condition::Measured;
    use muster_common::monitor::{CheckKind, Timings};

    const T: Thresholds = Thresholds {
        failure: 3,
        success: 2,
    };

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn result(secs: i64, verdict: Verdict) -> CheckResult {
        CheckResult {
            id: Uuid::now_v7(),
            endpoint_id: Uuid::nil(),
            checked_at: at(secs),
            verdict,
            error: (verdict == Verdict::Down).then(|| "connection refused".to_owned()),
            measured: Measured::default(),
            timings: Timings::default(),
            tls: Default::default(),
            conditions: Vec::new(),
        }
    }

    fn feed(state: &mut LocationState, verdicts: &[Verdict]) -> Vec<Status> {
        verdicts
            .iter()
            .map(|v| {
                state.observe(*v, T);
                state.state
            })
            .collect()
    }

    use Status::{Degraded as Dg, Down as Dn, Unknown as Un, Up as U};
    use Verdict::{Degraded as VDg, Down as VDn, Up as VU};

    #[test]
    fn a_location_goes_down_after_the_failure_threshold_and_back_after_the_success_threshold() {
        let mut s = LocationState::unknown("site-a");
        assert_eq!(
            feed(&mut s, &[VU, VDn, VDn, VDn, VDn, VU, VDn, VU, VU, VDn]),
            [U, U, U, Dn, Dn, Dn, Dn, Dn, U, U]
        );
    }

    #[test]
    fn failures_below_the_threshold_keep_what_was_known() {
        let mut s = LocationState::unknown("site-a");
        assert_eq!(feed(&mut s, &[VDn, VDn]), [Un, Un]);
        assert_eq!(feed(&mut s, &[VDn]), [Dn]);
        let mut s = LocationState::unknown("site-a");
        assert_eq!(feed(&mut s, &[VDg, VDn, VDn, VU]), [Dg, Dg, Dg, U]);
    }

    #[test]
    fn degraded_counts_towards_recovery_and_shows_as_degraded() {
        let mut s = LocationState::unknown("site-a");
        feed(&mut s, &[VDn, VDn, VDn]);
        assert_eq!(feed(&mut s, &[VDg, VDg]), [Dn, Dg]);
    }

    #[test]
    fn thresholds_of_one_switch_at_once() {
        let t = Thresholds {
            failure: 1,
            success: 1,
        };
        let mut s = LocationState::unknown("x");
        s.observe(VDn, t);
        assert_eq!(s.state, Dn);
        s.observe(VU, t);
        assert_eq!(s.state, U);
    }

    #[test]
    fn late_results_are_history_only_and_batches_apply_in_time_order() {
        let mut s = LocationState::unknown("site-a");
        let agent = Uuid::now_v7();
        // Out of order within the batch: applied sorted, so the last is up.
        let batch = [result(3, VU), result(1, VDn), result(2, VDn)];
        assert!(s.apply(agent, &batch.iter().collect::<Vec<_>>(), T));
        assert_eq!(s.state, U);
        assert_eq!(s.last_checked_at, Some(at(3)));
        // Older than what was applied: ignored.
        let late = [result(0, VDn), result(1, VDn), result(2, VDn)];
        assert!(!s.apply(agent, &late.iter().collect::<Vec<_>>(), T));
        assert_eq!((s.state, s.failures), (U, 0));
        assert_eq!(s.agent_id, Some(agent));
    }

    fn states(list: &[Status]) -> Vec<LocationState> {
        list.iter()
            .enumerate()
            .map(|(i, st)| LocationState {
                state: *st,
                ..LocationState::unknown(&format!("site-{i}"))
            })
            .collect()
    }

    #[test]
    fn the_endpoint_is_down_only_with_enough_failing_locations() {
        assert_eq!(aggregate(&states(&[Un, Un]), 1), Un);
        assert_eq!(aggregate(&states(&[]), 1), Un);
        assert_eq!(aggregate(&states(&[U, Un]), 1), U);
        assert_eq!(aggregate(&states(&[U, Dg]), 1), Dg);
        assert_eq!(aggregate(&states(&[U, Dn]), 1), Dn);
        assert_eq!(aggregate(&states(&[U, Dn]), 2), Dg);
        assert_eq!(aggregate(&states(&[Dn, Un]), 2), Dg);
        assert_eq!(aggregate(&states(&[Dn, Dn]), 2), Dn);
        assert_eq!(aggregate(&states(&[Dn, Dn, U]), 2), Dn);
    }

    fn loaded(locations: &[&str], min_failing: u32) -> Loaded {
        Loaded {
            endpoint: Endpoint {
                id: Uuid::now_v7(),
                org_id: Uuid::now_v7(),
                config: EndpointConfig {
                    name: "web".into(),
                    kind: CheckKind::Http,
                    target: "http://127.0.0.1:8000/".into(),
                    interval: 5,
                    timeout: 2,
                    locations: locations.iter().map(|l| l.to_string()).collect(),
                    min_failing_locations: min_failing,
                    failure_threshold: 2,
                    success_threshold: 2,
                    conditions: Vec::new(),
                    options: CheckOptions::default(),
                },
                status: Un,
                status_changed_at: at(0),
                incident: None,
                created_at: at(0),
                updated_at: at(0),
            },
            states: locations
                .iter()
                .map(|l| LocationState::unknown(l))
                .collect(),
        }
    }

    /// Feeds `verdict` twice at `location` (the thresholds are 2) and
    /// returns the event of the message sent, if any.
    fn twice(l: &mut Loaded, location: &str, secs: i64, verdict: Verdict) -> Option<String> {
        let batch = [result(secs, verdict), result(secs + 1, verdict)];
        let refs: Vec<&CheckResult> = batch.iter().collect();
        l.results_arrived(location, Uuid::nil(), &refs, at(secs + 1), false)
            .map(|a| a.event.as_str().to_owned())
    }

    #[test]
    fn one_alert_when_down_and_one_resolve_when_recovered() {
        let mut l = loaded(&["site-a"], 1);
        assert_eq!(twice(&mut l, "site-a", 0, VU), None);
        assert_eq!(l.endpoint.status, U);
        assert_eq!(
            twice(&mut l, "site-a", 10, VDn).as_deref(),
            Some("endpoint_down")
        );
        let incident = l.endpoint.incident.clone().expect("an open incident");
        assert_eq!(incident.started_at, at(11));
        // Still down: nothing more.
        assert_eq!(twice(&mut l, "site-a", 20, VDn), None);
        assert_eq!(l.endpoint.incident.as_ref(), Some(&incident));
        assert_eq!(
            twice(&mut l, "site-a", 30, VU).as_deref(),
            Some("endpoint_resolved")
        );
        assert_eq!((l.endpoint.status, l.endpoint.incident.clone()), (U, None));
        assert_eq!(l.endpoint.status_changed_at, at(31));
    }

    #[test]
    fn quorum_two_degrades_with_one_failing_location_and_is_down_with_both() {
        let mut l = loaded(&["site-a", "site-b"], 2);
        twice(&mut l, "site-a", 0, VU);
        twice(&mut l, "site-b", 0, VU);
        assert_eq!(twice(&mut l, "site-a", 10, VDn), None);
        assert_eq!(l.endpoint.status, Dg);
        assert_eq!(
            twice(&mut l, "site-b", 10, VDn).as_deref(),
            Some("endpoint_down")
        );
        assert_eq!(l.endpoint.status, Dn);
        // One location recovers: below the quorum, but still failing at
        // site-b, so the incident goes on.
        assert_eq!(twice(&mut l, "site-a", 20, VU), None);
        assert_eq!(l.endpoint.status, Dg);
        assert!(l.endpoint.incident.is_some());
        assert_eq!(
            twice(&mut l, "site-b", 20, VU).as_deref(),
            Some("endpoint_resolved")
        );
    }

    #[test]
    fn a_silent_agent_makes_its_location_unknown_and_never_resolves() {
        let mut l = loaded(&["site-a"], 1);
        twice(&mut l, "site-a", 0, VDn);
        assert_eq!(l.endpoint.status, Dn);
        assert_eq!(l.location_went_dark("site-a", at(50), false), None);
        assert_eq!(l.endpoint.status, Un);
        assert!(l.endpoint.incident.is_some(), "no data is no recovery");
        // Back, and well: resolved then.
        assert_eq!(
            twice(&mut l, "site-a", 60, VU).as_deref(),
            Some("endpoint_resolved")
        );
        // An up location going dark changes the status only.
        assert_eq!(l.location_went_dark("site-a", at(70), true), None);
        assert_eq!(l.endpoint.status, Un);
    }

    #[test]
    fn muted_incidents_send_nothing_at_either_end() {
        let mut l = loaded(&["site-a"], 1);
        let batch = [result(0, VDn), result(1, VDn)];
        let refs: Vec<&CheckResult> = batch.iter().collect();
        assert_eq!(
            l.results_arrived("site-a", Uuid::nil(), &refs, at(1), true),
            None
        );
        assert!(l.endpoint.incident.as_ref().is_some_and(|i| i.muted));
        assert_eq!(twice(&mut l, "site-a", 10, VU), None);
        assert_eq!(l.endpoint.incident, None);
    }

    #[test]
    fn results_for_a_location_not_configured_change_nothing() {
        let mut l = loaded(&["site-a"], 1);
        let before = l.clone();
        assert_eq!(twice(&mut l, "elsewhere", 0, VDn), None);
        assert_eq!(l, before);
    }

    #[test]
    fn stored_results_keep_a_useful_length_of_text() {
        let mut r = result(0, VDn);
        r.measured.body = Some("é".repeat(2000));
        r.error = Some("x".repeat(10));
        let kept = for_storage(&r);
        let body = kept.measured.body.unwrap();
        assert!(body.len() <= KEEP_TEXT + '…'.len_utf8(), "{}", body.len());
        assert!(body.ends_with('…'));
        assert_eq!(kept.error.as_deref(), Some("xxxxxxxxxx"));
    }
}
