-- A claim takes the oldest queued run its runner may take. That must be an
-- ordered walk of an index in (created_at, id) order that stops at the
-- first match, whatever the statistics say: the planner estimated a handful
-- of queued rows (the table as last analyzed, and a label filter it guesses
-- at 0.1 %) and so read every queued run and sorted them on each claim —
-- 5-10 ms per claim with a few thousand queued, just when the queue is long.
-- The function pins the plan: no sort and no bitmap scan inside it.
CREATE INDEX runs_queued_in_order ON runs (created_at, id) WHERE status = 'queued';
DROP INDEX runs_queued;

CREATE FUNCTION muster_next_queued_run(for_org uuid, labels jsonb) RETURNS uuid
LANGUAGE sql VOLATILE
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
  SELECT id FROM runs
  WHERE status = 'queued' AND (for_org IS NULL OR org_id = for_org) AND labels @> runner_labels
  ORDER BY created_at, id
  LIMIT 1
  FOR UPDATE SKIP LOCKED
$$;
