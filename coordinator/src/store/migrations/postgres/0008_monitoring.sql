-- Endpoint monitoring (issue 6): agents and their tokens, endpoints and
-- their state at each location, the history of check results, notifiers,
-- maintenance windows, and the outbox of notifications to deliver.

-- An agent checks, from its location, the endpoints of its organization
-- assigned there. Its token is stored only as a hash.
CREATE TABLE agents (
    id                  uuid PRIMARY KEY,
    org_id              uuid NOT NULL REFERENCES organizations(id),
    name                text NOT NULL,
    location            text NOT NULL,
    prefix              text NOT NULL,
    token_hash          text NOT NULL UNIQUE,
    created_by          uuid REFERENCES identities(id),
    created_at          timestamptz NOT NULL DEFAULT now(),
    revoked_at          timestamptz,
    -- From its last heartbeat.
    version             text,
    endpoints_version   text,
    buffered_results    bigint NOT NULL DEFAULT 0,
    checks_per_minute   double precision NOT NULL DEFAULT 0,
    last_heartbeat_at   timestamptz,
    last_report_at      timestamptz,
    -- Set by the one coordinator that found the agent silent (a conditional
    -- update), with the incident its alert opened and whether a maintenance
    -- window muted it; cleared by the agent's next heartbeat.
    silent_since        timestamptz,
    silent_incident_id  uuid,
    silent_muted        boolean NOT NULL DEFAULT false,
    UNIQUE (org_id, name)
);
CREATE INDEX agents_by_location ON agents (org_id, location);
CREATE INDEX agents_heartbeats ON agents (last_heartbeat_at)
    WHERE revoked_at IS NULL AND silent_since IS NULL;

CREATE TABLE endpoints (
    id                     uuid PRIMARY KEY,
    org_id                 uuid NOT NULL REFERENCES organizations(id),
    name                   text NOT NULL,
    kind                   text NOT NULL,
    target                 text NOT NULL,
    interval_secs          integer NOT NULL,
    timeout_secs           integer NOT NULL,
    min_failing_locations  integer NOT NULL,
    failure_threshold      integer NOT NULL,
    success_threshold      integer NOT NULL,
    -- [{"condition": "...", "degrades": false}]
    conditions             jsonb NOT NULL,
    -- {"http": {...}, "tcp": {...}, "icmp": {...}, "dns": {...}}
    options                jsonb NOT NULL,
    -- Across locations: up, degraded, down or unknown.
    status                 text NOT NULL,
    status_changed_at      timestamptz NOT NULL,
    -- The open incident, if the endpoint went down and has not recovered.
    incident_id            uuid,
    incident_started_at    timestamptz,
    incident_muted         boolean NOT NULL DEFAULT false,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    UNIQUE (org_id, name)
);

-- One row per configured location of an endpoint: the assignment (agents
-- find their endpoints by organization and location) and the state there.
CREATE TABLE endpoint_locations (
    endpoint_id      uuid NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    org_id           uuid NOT NULL,
    location         text NOT NULL,
    state            text NOT NULL,
    failures         integer NOT NULL DEFAULT 0,
    successes        integer NOT NULL DEFAULT 0,
    last_checked_at  timestamptz,
    last_result      jsonb,
    agent_id         uuid,
    PRIMARY KEY (endpoint_id, location)
);
CREATE INDEX endpoint_locations_by_location ON endpoint_locations (org_id, location);

-- The history. A result's id is made by its agent, so a replayed batch is
-- stored once; keyed within its endpoint, so no tenant can take another's ids.
CREATE TABLE check_results (
    endpoint_id  uuid NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    id           uuid NOT NULL,
    agent_id     uuid NOT NULL,
    location     text NOT NULL,
    checked_at   timestamptz NOT NULL,
    verdict      text NOT NULL,
    received_at  timestamptz NOT NULL,
    result       jsonb NOT NULL,
    PRIMARY KEY (endpoint_id, id)
);
CREATE INDEX check_results_by_time ON check_results (endpoint_id, checked_at);
CREATE INDEX check_results_retention ON check_results (checked_at);

CREATE TABLE notifiers (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organizations(id),
    kind        text NOT NULL,
    url         text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE maintenance_windows (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES organizations(id),
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz NOT NULL,
    -- A JSON array of endpoint ids; empty: all of the organization's.
    endpoint_ids  jsonb NOT NULL,
    reason        text,
    created_by    uuid REFERENCES identities(id),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX maintenance_windows_by_org ON maintenance_windows (org_id, ends_at);

-- Notifications to deliver, queued in the transaction that changed the
-- state they report. A coordinator claims a row with a lease (owner and
-- expiry); `seq` keeps one subject's messages in order.
CREATE TABLE notification_outbox (
    id               uuid PRIMARY KEY,
    seq              bigserial NOT NULL,
    org_id           uuid NOT NULL,
    notifier_id      uuid NOT NULL REFERENCES notifiers(id) ON DELETE CASCADE,
    subject_id       uuid NOT NULL,
    payload          jsonb NOT NULL,
    created_at       timestamptz NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    lease_owner      uuid,
    lease_until      timestamptz,
    last_error       text,
    sent_at          timestamptz,
    failed_at        timestamptz
);
CREATE INDEX notification_outbox_pending ON notification_outbox (seq)
    WHERE sent_at IS NULL AND failed_at IS NULL;
CREATE INDEX notification_outbox_subject ON notification_outbox (notifier_id, subject_id, seq)
    WHERE sent_at IS NULL AND failed_at IS NULL;
