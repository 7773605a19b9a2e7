-- State every coordinator on this database shares and the first one creates:
-- the CA that signs runner certificates, so a runner enrolled through one
-- coordinator is accepted by all.
CREATE TABLE cluster_settings (
    name text PRIMARY KEY,
    value text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
