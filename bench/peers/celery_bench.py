"""Celery with a Redis broker and a Redis result backend, for muster-bench's
throughput scenario (bench/src/peers.rs runs it; see BENCHMARKS.md §2).

muster-bench starts the worker with Celery's own command line,

    celery -A celery_bench worker --pool=prefork --concurrency=N \\
        --without-gossip --without-mingle --without-heartbeat

and then this program, which enqueues the jobs and times them. The Redis URL
comes from MUSTER_PEER_REDIS_URL. A job is the no-op task `bench.noop`; it
counts once Celery has stored its result, SUCCESS, in the result backend.
"""

import json
import os
import uuid

import celery

import common

app = celery.Celery(
    "bench",
    broker=os.environ["MUSTER_PEER_REDIS_URL"],
    backend=os.environ["MUSTER_PEER_REDIS_URL"],
)
app.conf.update(
    # What Celery's "Optimizing" guide advises for many short tasks: a large
    # prefetch multiplier (it names 64 or 128), so the worker reserves many
    # messages ahead instead of going to the broker for each.
    worker_prefetch_multiplier=64,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop():
    return None


def enqueue(task_ids, _index, barrier):
    # Connect before the clock starts: a broker connection into the pool the
    # sends take theirs from, and the result backend's.
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
    app.backend.client.ping()
    barrier.wait(timeout=120)
    for task_id in task_ids:
        noop.apply_async(task_id=task_id)


class Results:
    """Which of a set of task ids have their result stored, read from the
    result backend with MGET of the backend's own keys."""

    def __init__(self, task_ids):
        self.pending = set(task_ids)
        self.total = len(self.pending)

    def finished(self):
        pending = list(self.pending)
        for start in range(0, len(pending), 1000):
            chunk = pending[start : start + 1000]
            keys = [app.backend.get_key_for_task(task_id) for task_id in chunk]
            for task_id, value in zip(chunk, app.backend.client.mget(keys)):
                if value is None:
                    continue
                status = json.loads(value)["status"]
                if status == "SUCCESS":
                    self.pending.discard(task_id)
                elif status in ("FAILURE", "REVOKED"):
                    common.fail(f"task {task_id} ended {status}: {value!r}")
        return self.total - len(self.pending)


def main():
    args = common.arguments(__doc__)
    # The worker answers a ping once its pool is up.
    common.wait_until(
        "the Celery worker to answer a ping",
        lambda: len(app.control.ping(timeout=0.5) or []) >= 1,
        120,
    )
    warmup = Results([noop.apply_async().id for _ in range(args.warmup)])
    common.wait_until("the warm-up tasks", lambda: warmup.finished() >= warmup.total, 120)

    task_ids = [str(uuid.uuid4()) for _ in range(args.jobs)]
    parts, start = [], 0
    for share in common.shares(args.jobs, args.clients):
        parts.append(task_ids[start : start + share])
        start += share
    results = Results(task_ids)
    seconds, enqueue_seconds = common.measure(
        enqueue, parts, args.jobs, results.finished, args.timeout
    )
    common.report("celery", f"Celery {celery.__version__}", args, seconds, enqueue_seconds)


if __name__ == "__main__":
    main()
