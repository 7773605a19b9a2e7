"""procrastinate, a PostgreSQL task queue, for muster-bench's throughput
scenario (bench/src/peers.rs runs it; see BENCHMARKS.md §2).

muster-bench creates the schema and starts N worker processes of the app in
procrastinate_app.py with procrastinate's own command line, then runs this
program, which enqueues the jobs and times them, in a throwaway database
muster-bench creates and drops (MUSTER_PEER_DATABASE_URL). A job is the
no-op task `bench.noop`; it counts once its row in procrastinate_jobs has
reached `succeeded` (workers keep finished jobs, procrastinate's default).
"""

import asyncio

import procrastinate
import psycopg

import common
from procrastinate_app import DATABASE_URL, QUEUE, TASK, make_app


async def defer(count, barrier=None):
    """Defers `count` no-op jobs one after the other through an app of its
    own (one connection is all that uses), after `barrier` if given."""
    client = make_app(min_size=1, max_size=1)
    async with client.open_async():
        task = client.configure_task(TASK, queue=QUEUE)
        if barrier is not None:
            barrier.wait(timeout=120)
        for _ in range(count):
            await task.defer_async()


def enqueue(count, _index, barrier):
    asyncio.run(defer(count, barrier))


class Jobs:
    """What procrastinate's own tables say: jobs by status, workers."""

    def __init__(self):
        self.connection = psycopg.connect(DATABASE_URL, autocommit=True)

    def succeeded(self):
        counts = dict(
            self.connection.execute(
                "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY status"
            ).fetchall()
        )
        for bad in ("failed", "cancelled", "aborted"):
            if counts.get(bad):
                common.fail(f"{counts[bad]} job(s) ended {bad}")
        return counts.get("succeeded", 0)

    def workers(self):
        return self.connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]


def main():
    args = common.arguments(__doc__)
    jobs = Jobs()
    common.wait_until(
        f"{args.workers} procrastinate workers to register",
        lambda: jobs.workers() >= args.workers,
        120,
    )
    asyncio.run(defer(args.warmup))
    common.wait_until("the warm-up jobs", lambda: jobs.succeeded() >= args.warmup, 120)
    seconds, enqueue_seconds = common.measure(
        enqueue,
        common.shares(args.jobs, args.clients),
        args.jobs,
        lambda: jobs.succeeded() - args.warmup,
        args.timeout,
    )
    version = f"procrastinate {procrastinate.__version__}"
    common.report("procrastinate", version, args, seconds, enqueue_seconds)


if __name__ == "__main__":
    main()
