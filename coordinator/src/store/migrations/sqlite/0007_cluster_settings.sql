-- State every coordinator on this database shares and the first one creates
-- (the CA that signs runner certificates).
CREATE TABLE cluster_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
