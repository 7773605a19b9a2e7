-- Muster's schema, version 1.

CREATE TABLE organizations (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identities (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organizations(id),
    name        text NOT NULL,
    role        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    identity_id   uuid NOT NULL REFERENCES identities(id),
    org_id        uuid NOT NULL REFERENCES organizations(id),
    name          text NOT NULL,
    prefix        text NOT NULL,
    token_hash    text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

-- Bundles are content-addressed: one row per digest, whatever pushed it.
CREATE TABLE bundles (
    digest      text PRIMARY KEY,
    size        bigint NOT NULL,
    data        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workspaces (
    id             uuid PRIMARY KEY,
    org_id         uuid NOT NULL REFERENCES organizations(id),
    name           text NOT NULL,
    bundle_digest  text NOT NULL REFERENCES bundles(digest),
    model          jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

-- Join tokens enroll runners; org_id NULL makes an instance-wide runner.
CREATE TABLE join_tokens (
    id           uuid PRIMARY KEY,
    token_hash   text NOT NULL UNIQUE,
    org_id       uuid REFERENCES organizations(id),
    created_by   uuid REFERENCES identities(id),
    single_use   boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz
);

CREATE TABLE runners (
    id               uuid PRIMARY KEY,
    org_id           uuid REFERENCES organizations(id),
    name             text NOT NULL,
    labels           jsonb NOT NULL DEFAULT '{}',
    capacity         integer NOT NULL,
    version          text NOT NULL DEFAULT '',
    cert_serial      text NOT NULL,
    cert_not_after   timestamptz NOT NULL,
    connected        boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz,
    revoked_at       timestamptz
);

-- Every lease takes the next value: a lease with a higher token supersedes
-- any older one for the same run (the fencing token).
CREATE SEQUENCE fencing_tokens;

CREATE TABLE runs (
    id                uuid PRIMARY KEY,
    org_id            uuid NOT NULL REFERENCES organizations(id),
    workspace_id      uuid NOT NULL REFERENCES workspaces(id),
    workspace         text NOT NULL,
    bundle_digest     text NOT NULL,
    block             text NOT NULL,
    block_version     text,
    action            text NOT NULL,
    parameters        jsonb NOT NULL,
    reason            text,
    trigger           jsonb NOT NULL,
    plan              jsonb NOT NULL,
    runner_labels     jsonb NOT NULL DEFAULT '{}',
    status            text NOT NULL,
    exit_code         integer,
    error             text,
    runner_id         uuid REFERENCES runners(id),
    executor          text,
    image             text,
    image_digest      text,
    fencing_token     bigint NOT NULL DEFAULT 0,
    attempt           integer NOT NULL DEFAULT 0,
    log_acked_seq     bigint NOT NULL DEFAULT 0,
    log_last_seq      bigint,
    created_at        timestamptz NOT NULL DEFAULT now(),
    leased_at         timestamptz,
    lease_expires_at  timestamptz,
    started_at        timestamptz,
    finished_at       timestamptz
);

-- The queue: a partial index keeps claiming fast however many finished runs pile up.
CREATE INDEX runs_queued ON runs (created_at) WHERE status = 'queued';
CREATE INDEX runs_active_by_runner ON runs (runner_id) WHERE status IN ('leased', 'running');
CREATE INDEX runs_org_created ON runs (org_id, created_at DESC);

CREATE TABLE run_logs (
    run_id   uuid NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq      bigint NOT NULL,
    stream   smallint NOT NULL,
    ts       timestamptz NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- One row once the first admin exists, so concurrent first starts bootstrap once.
CREATE TABLE bootstrap (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
