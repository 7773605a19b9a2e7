-- What the runner says the run's log was (bytes and SHA-256 of this
-- attempt's output), and whether the stored log matched it.
ALTER TABLE runs ADD COLUMN log_bytes INTEGER;
ALTER TABLE runs ADD COLUMN log_sha256 TEXT;
ALTER TABLE runs ADD COLUMN log_verified INTEGER;
