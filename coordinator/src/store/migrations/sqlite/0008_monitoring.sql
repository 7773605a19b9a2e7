-- Endpoint monitoring (issue 6): the tables of
-- migrations/postgres/0008_monitoring.sql in SQLite's types (see 0001 for
-- the conventions: TEXT uuids, INTEGER microseconds, TEXT JSON, STRICT).

CREATE TABLE agents (
    id                  TEXT PRIMARY KEY,
    org_id              TEXT NOT NULL REFERENCES organizations(id),
    name                TEXT NOT NULL,
    location            TEXT NOT NULL,
    prefix              TEXT NOT NULL,
    token_hash          TEXT NOT NULL UNIQUE,
    created_by          TEXT REFERENCES identities(id),
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER,
    version             TEXT,
    endpoints_version   TEXT,
    buffered_results    INTEGER NOT NULL DEFAULT 0,
    checks_per_minute   REAL NOT NULL DEFAULT 0,
    last_heartbeat_at   INTEGER,
    last_report_at      INTEGER,
    silent_since        INTEGER,
    silent_incident_id  TEXT,
    silent_muted        INTEGER NOT NULL DEFAULT 0,
    UNIQUE (org_id, name)
) STRICT;
CREATE INDEX agents_by_location ON agents (org_id, location);
CREATE INDEX agents_heartbeats ON agents (last_heartbeat_at)
    WHERE revoked_at IS NULL AND silent_since IS NULL;

CREATE TABLE endpoints (
    id                     TEXT PRIMARY KEY,
    org_id                 TEXT NOT NULL REFERENCES organizations(id),
    name                   TEXT NOT NULL,
    kind                   TEXT NOT NULL,
    target                 TEXT NOT NULL,
    interval_secs          INTEGER NOT NULL,
    timeout_secs           INTEGER NOT NULL,
    min_failing_locations  INTEGER NOT NULL,
    failure_threshold      INTEGER NOT NULL,
    success_threshold      INTEGER NOT NULL,
    conditions             TEXT NOT NULL CHECK (json_valid(conditions)),
    options                TEXT NOT NULL CHECK (json_valid(options)),
    status                 TEXT NOT NULL,
    status_changed_at      INTEGER NOT NULL,
    incident_id            TEXT,
    incident_started_at    INTEGER,
    incident_muted         INTEGER NOT NULL DEFAULT 0,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    UNIQUE (org_id, name)
) STRICT;

CREATE TABLE endpoint_locations (
    endpoint_id      TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    org_id           TEXT NOT NULL,
    location         TEXT NOT NULL,
    state            TEXT NOT NULL,
    failures         INTEGER NOT NULL DEFAULT 0,
    successes        INTEGER NOT NULL DEFAULT 0,
    last_checked_at  INTEGER,
    last_result      TEXT CHECK (last_result IS NULL OR json_valid(last_result)),
    agent_id         TEXT,
    PRIMARY KEY (endpoint_id, location)
) STRICT;
CREATE INDEX endpoint_locations_by_location ON endpoint_locations (org_id, location);

CREATE TABLE check_results (
    endpoint_id  TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    id           TEXT NOT NULL,
    agent_id     TEXT NOT NULL,
    location     TEXT NOT NULL,
    checked_at   INTEGER NOT NULL,
    verdict      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    result       TEXT NOT NULL CHECK (json_valid(result)),
    PRIMARY KEY (endpoint_id, id)
) STRICT;
CREATE INDEX check_results_by_time ON check_results (endpoint_id, checked_at);
CREATE INDEX check_results_retention ON check_results (checked_at);

CREATE TABLE notifiers (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES organizations(id),
    kind        TEXT NOT NULL,
    url         TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE maintenance_windows (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES organizations(id),
    starts_at     INTEGER NOT NULL,
    ends_at       INTEGER NOT NULL,
    endpoint_ids  TEXT NOT NULL CHECK (json_valid(endpoint_ids)),
    reason        TEXT,
    created_by    TEXT REFERENCES identities(id),
    created_at    INTEGER NOT NULL
) STRICT;
CREATE INDEX maintenance_windows_by_org ON maintenance_windows (org_id, ends_at);

-- `seq` is the rowid, AUTOINCREMENT so it never goes back after deletes:
-- it orders one subject's messages.
CREATE TABLE notification_outbox (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    org_id           TEXT NOT NULL,
    notifier_id      TEXT NOT NULL REFERENCES notifiers(id) ON DELETE CASCADE,
    subject_id       TEXT NOT NULL,
    payload          TEXT NOT NULL CHECK (json_valid(payload)),
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_until      INTEGER,
    last_error       TEXT,
    sent_at          INTEGER,
    failed_at        INTEGER
) STRICT;
CREATE INDEX notification_outbox_pending ON notification_outbox (next_attempt_at)
    WHERE sent_at IS NULL AND failed_at IS NULL;
CREATE INDEX notification_outbox_subject ON notification_outbox (notifier_id, subject_id, seq)
    WHERE sent_at IS NULL AND failed_at IS NULL;
