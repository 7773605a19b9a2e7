-- Lease expiry and retries: how many attempts a run may take, its timeout
-- (so the coordinator can tell a timed-out run from a lost one when the
-- runner is gone), and where a further attempt's log continues.
ALTER TABLE runs ADD COLUMN max_attempts integer NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN timeout_secs bigint;
ALTER TABLE runs ADD COLUMN log_seq_base bigint NOT NULL DEFAULT 0;
CREATE INDEX runs_lease_expiry ON runs (lease_expires_at) WHERE status IN ('leased', 'running');
