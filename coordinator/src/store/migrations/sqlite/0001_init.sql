-- Muster's SQLite schema, version 1: the same tables as
-- migrations/postgres/0001_init.sql, in SQLite's types.
--
-- Conventions, relied on by store/sqlite.rs:
--   - UUIDs are TEXT in their lowercase hyphenated form, so equality works.
--   - Timestamps are INTEGER microseconds since the Unix epoch, UTC: the
--     precision of PostgreSQL's timestamptz, and integers sort and compare
--     exactly, which text timestamps only do when every writer formats alike.
--     The store always supplies them, so no column has a clock default.
--   - JSON is TEXT that json_valid() accepts; booleans are INTEGER 0 or 1.
-- Tables are STRICT, so a value of the wrong type is refused, not coerced.

CREATE TABLE organizations (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE identities (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES organizations(id),
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (org_id, name)
) STRICT;

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    identity_id   TEXT NOT NULL REFERENCES identities(id),
    org_id        TEXT NOT NULL REFERENCES organizations(id),
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    last_used_at  INTEGER,
    revoked_at    INTEGER
) STRICT;

CREATE INDEX api_keys_org_created ON api_keys (org_id, created_at, id);

-- Bundles are content-addressed: one row per digest, whatever pushed it.
CREATE TABLE bundles (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    data        BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE workspaces (
    id             TEXT PRIMARY KEY,
    org_id         TEXT NOT NULL REFERENCES organizations(id),
    name           TEXT NOT NULL,
    bundle_digest  TEXT NOT NULL REFERENCES bundles(digest),
    model          TEXT NOT NULL CHECK (json_valid(model)),
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (org_id, name)
) STRICT;

CREATE INDEX workspaces_name ON workspaces (name);

-- Join tokens enroll runners; org_id NULL makes an instance-wide runner.
CREATE TABLE join_tokens (
    id           TEXT PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    org_id       TEXT REFERENCES organizations(id),
    created_by   TEXT REFERENCES identities(id),
    single_use   INTEGER NOT NULL CHECK (single_use IN (0, 1)),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    used_at      INTEGER
) STRICT;

CREATE TABLE runners (
    id               TEXT PRIMARY KEY,
    org_id           TEXT REFERENCES organizations(id),
    name             TEXT NOT NULL,
    labels           TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    capacity         INTEGER NOT NULL,
    version          TEXT NOT NULL DEFAULT '',
    cert_serial      TEXT NOT NULL,
    cert_not_after   INTEGER NOT NULL,
    connected        INTEGER NOT NULL DEFAULT 0 CHECK (connected IN (0, 1)),
    created_at       INTEGER NOT NULL,
    last_seen_at     INTEGER,
    revoked_at       INTEGER
) STRICT;

-- SQLite has no sequences: this one row is the counter every lease takes the
-- next value of. A lease with a higher token supersedes any older one for the
-- same run (the fencing token), so the counter only ever rises, across all runs.
CREATE TABLE fencing_tokens (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    last  INTEGER NOT NULL
) STRICT;

INSERT INTO fencing_tokens (id, last) VALUES (1, 0);

CREATE TABLE runs (
    id                TEXT PRIMARY KEY,
    org_id            TEXT NOT NULL REFERENCES organizations(id),
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    workspace         TEXT NOT NULL,
    bundle_digest     TEXT NOT NULL,
    block             TEXT NOT NULL,
    block_version     TEXT,
    action            TEXT NOT NULL,
    parameters        TEXT NOT NULL CHECK (json_valid(parameters)),
    reason            TEXT,
    trigger           TEXT NOT NULL CHECK (json_valid(trigger)),
    plan              TEXT NOT NULL CHECK (json_valid(plan)),
    runner_labels     TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(runner_labels)),
    status            TEXT NOT NULL,
    exit_code         INTEGER,
    error             TEXT,
    runner_id         TEXT REFERENCES runners(id),
    executor          TEXT,
    image             TEXT,
    image_digest      TEXT,
    fencing_token     INTEGER NOT NULL DEFAULT 0,
    attempt           INTEGER NOT NULL DEFAULT 0,
    log_acked_seq     INTEGER NOT NULL DEFAULT 0,
    log_last_seq      INTEGER,
    created_at        INTEGER NOT NULL,
    leased_at         INTEGER,
    lease_expires_at  INTEGER,
    started_at        INTEGER,
    finished_at       INTEGER
) STRICT;

-- The queue: a partial index keeps claiming fast however many finished runs pile up.
CREATE INDEX runs_queued ON runs (created_at, id) WHERE status = 'queued';
CREATE INDEX runs_active_by_runner ON runs (runner_id) WHERE status IN ('leased', 'running');
CREATE INDEX runs_org_created ON runs (org_id, created_at DESC);
CREATE INDEX runs_created ON runs (created_at DESC, id DESC);

CREATE TABLE run_logs (
    run_id   TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    stream   INTEGER NOT NULL,
    ts       INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
) STRICT, WITHOUT ROWID;

-- One row once the first admin exists, so a second start bootstraps nothing.
CREATE TABLE bootstrap (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    created_at  INTEGER NOT NULL
) STRICT;
