-- Files a job left in its block's artifacts directory, one row per file.
CREATE TABLE run_artifacts (
    run_id  uuid NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    path    text NOT NULL,
    size    bigint NOT NULL,
    sha256  text NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (run_id, path)
);
