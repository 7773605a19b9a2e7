-- Files a job left in its block's artifacts directory, one row per file.
CREATE TABLE run_artifacts (
    run_id  TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    path    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    sha256  TEXT NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (run_id, path)
);
