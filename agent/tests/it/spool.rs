//! The result buffer with real files: order, crash and reopen, torn
//! writes, the age and size bounds, one agent per directory.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use muster_agent::spool::{Spool, SpoolError};
use muster_common::condition::Measured;
use muster_common::monitor::{CheckResult, Timings, TlsInfo, Verdict};
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn result(n: u128, at: DateTime<Utc>) -> CheckResult {
    CheckResult {
        id: Uuid::from_u128(n),
        endpoint_id: Uuid::from_u128(7),
        checked_at: at,
        verdict: Verdict::Up,
        error: Some(format!("result {n}")),
        measured: Measured::default(),
        timings: Timings {
            total_ms: n as f64,
            ..Timings::default()
        },
        tls: TlsInfo::default(),
        conditions: Vec::new(),
    }
}

fn ids(results: &[CheckResult]) -> Vec<u128> {
    results.iter().map(|r| r.id.as_u128()).collect()
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    found.sort();
    found
}

/// Delivers everything, in batches of `batch`; returns the ids in order.
fn drain(spool: &mut Spool, batch: usize) -> Vec<u128> {
    let mut all = Vec::new();
    loop {
        let b = spool.peek(batch).unwrap();
        if b.results.is_empty() && b.expired == 0 {
            return all;
        }
        all.extend(ids(&b.results));
        spool.commit(&b).unwrap();
    }
}

#[test]
fn results_come_back_in_order_with_their_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
    assert!(spool.is_empty());
    let at = Utc::now() - chrono::Duration::hours(2);
    let first: Vec<_> = (1..=300).map(|n| result(n, at)).collect();
    let second: Vec<_> = (301..=450).map(|n| result(n, at)).collect();
    spool.append(&first).unwrap();
    spool.append(&second).unwrap();
    assert_eq!(spool.pending(), 450);

    // Peeking does not consume.
    let batch = spool.peek(100).unwrap();
    assert_eq!(ids(&batch.results), (1..=100).collect::<Vec<_>>());
    assert_eq!(
        batch.results[0], first[0],
        "kept exactly, timestamp included"
    );
    let again = spool.peek(100).unwrap();
    assert_eq!(ids(&again.results), ids(&batch.results));
    spool.commit(&batch).unwrap();
    assert_eq!(spool.pending(), 350);

    assert_eq!(drain(&mut spool, 128), (101..=450).collect::<Vec<_>>());
    assert_eq!(spool.pending(), 0);
    assert!(
        segments(dir.path()).is_empty(),
        "delivered segments are deleted"
    );

    // And it is usable afterwards.
    spool.append(&[result(999, Utc::now())]).unwrap();
    assert_eq!(drain(&mut spool, 10), vec![999]);
}

#[test]
fn a_crash_loses_nothing_that_was_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    {
        let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
        spool
            .append(&(1..=50).map(|n| result(n, now)).collect::<Vec<_>>())
            .unwrap();
        let batch = spool.peek(20).unwrap();
        spool.commit(&batch).unwrap();
        // Read but never acknowledged: must come again.
        let _unacknowledged = spool.peek(10).unwrap();
        // Dropped without any closing: what a crash leaves.
    }
    let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
    assert_eq!(spool.pending(), 30);
    spool
        .append(&(51..=60).map(|n| result(n, now)).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(drain(&mut spool, 7), (21..=60).collect::<Vec<_>>());
}

#[test]
fn a_torn_record_is_cut_off_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    {
        let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
        spool
            .append(&(1..=10).map(|n| result(n, now)).collect::<Vec<_>>())
            .unwrap();
    }
    // A write cut short by a crash: a header promising more than follows.
    let last = segments(dir.path()).pop().unwrap();
    let good_len = std::fs::metadata(&last).unwrap().len();
    let mut file = OpenOptions::new().append(true).open(&last).unwrap();
    file.write_all(&200u32.to_le_bytes()).unwrap();
    file.write_all(&[1, 2, 3, 4, b'{', b'"']).unwrap();
    drop(file);

    let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
    assert_eq!(std::fs::metadata(&last).unwrap().len(), good_len);
    assert_eq!(spool.pending(), 10);
    spool.append(&[result(11, now)]).unwrap();
    assert_eq!(drain(&mut spool, 4), (1..=11).collect::<Vec<_>>());
    drop(spool);

    // A record whose checksum does not match is cut off the same way.
    {
        let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
        spool
            .append(&(20..=22).map(|n| result(n, now)).collect::<Vec<_>>())
            .unwrap();
    }
    let last = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let end = bytes.len() - 1;
    bytes[end] ^= 0xff;
    std::fs::write(&last, &bytes).unwrap();
    let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
    assert_eq!(drain(&mut spool, 10), vec![20, 21]);
}

#[test]
fn results_older_than_the_bound_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
    let old = Utc::now() - chrono::Duration::hours(30);
    let fresh = Utc::now() - chrono::Duration::hours(1);
    let mut results: Vec<_> = (1..=5).map(|n| result(n, old)).collect();
    results.extend((6..=8).map(|n| result(n, fresh)));
    spool.append(&results).unwrap();
    let batch = spool.peek(100).unwrap();
    assert_eq!(batch.expired, 5);
    assert_eq!(ids(&batch.results), vec![6, 7, 8]);
    spool.commit(&batch).unwrap();
    assert_eq!(spool.pending(), 0);
}

#[test]
fn segments_last_written_before_the_bound_are_deleted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    {
        let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
        spool
            .append(&(1..=5).map(|n| result(n, now)).collect::<Vec<_>>())
            .unwrap();
    }
    // As if written two days ago.
    let old = segments(dir.path()).pop().unwrap();
    let two_days_ago = SystemTime::now() - 2 * DAY;
    OpenOptions::new()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let mut spool = Spool::open(dir.path(), DAY, 1 << 30).unwrap();
    assert_eq!(spool.expire().unwrap(), 5);
    assert!(!old.exists());
    assert_eq!(spool.pending(), 0);
    spool.append(&[result(6, now)]).unwrap();
    assert_eq!(drain(&mut spool, 10), vec![6]);
}

#[test]
fn past_the_size_cap_the_oldest_results_go() {
    let dir = tempfile::tempdir().unwrap();
    // 256 KiB: segments of 64 KiB.
    let mut spool = Spool::open(dir.path(), DAY, 256 * 1024).unwrap();
    let now = Utc::now();
    let mut dropped = 0;
    for chunk in 0..40u128 {
        let results: Vec<_> = (0..100).map(|i| result(chunk * 100 + i + 1, now)).collect();
        dropped += spool.append(&results).unwrap().over_size;
    }
    assert!(dropped > 0);
    assert!(spool.bytes() <= 256 * 1024 + 64 * 1024, "{}", spool.bytes());
    assert_eq!(spool.pending() + dropped, 4000);
    let delivered = drain(&mut spool, 1000);
    // What is left is the newest, still in order.
    assert_eq!(delivered.len() as u64 + dropped, 4000);
    assert_eq!(*delivered.last().unwrap(), 4000);
    assert!(delivered.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn one_agent_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Spool::open(dir.path(), DAY, 1 << 20).unwrap();
    match Spool::open(dir.path(), DAY, 1 << 20) {
        Err(SpoolError::Locked(path)) => assert_eq!(path, dir.path()),
        other => panic!("expected the directory to be locked, got {:?}", other.err()),
    }
}
