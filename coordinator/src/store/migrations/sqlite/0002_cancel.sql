-- A cancel asked for while a runner holds the run: kept, so a runner that
-- was unreachable at that moment is told again when it reports or returns.
ALTER TABLE runs ADD COLUMN cancel_requested_at INTEGER;
