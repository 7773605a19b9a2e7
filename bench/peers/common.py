"""What both peer programs share: the command line, the client processes that
enqueue, the wait for results and the one JSON line muster-bench reads.

A run: wait until the workers are up; a warm-up of --warmup jobs,
waited for; then --clients processes (spawned, so no connection is inherited)
connect, meet at a barrier and enqueue --jobs jobs between them as fast as
they can. The clock runs from the barrier to the moment the last result is
seen in the backend, which is looked at every 100 ms (as muster-bench looks
at Muster's runs). At the end the program prints one line of JSON with the
figures on stdout (bench/src/peers.rs reads it); errors go to stderr.
"""

import argparse
import json
import multiprocessing
import sys
import time

POLL_EVERY = 0.1


def arguments(description):
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, required=True, help="jobs measured")
    parser.add_argument("--clients", type=int, required=True, help="client processes enqueuing")
    parser.add_argument("--workers", type=int, required=True, help="worker processes to wait for")
    parser.add_argument("--warmup", type=int, required=True, help="jobs before the measured ones")
    parser.add_argument("--timeout", type=float, required=True, help="seconds the measure may take")
    return parser.parse_args()


def shares(jobs, clients):
    """`jobs` split over `clients` as evenly as it goes."""
    return [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]


def _client(enqueue, part, index, barrier, done):
    try:
        enqueue(part, index, barrier)
        done.put(("ok", time.monotonic()))
    except BaseException as error:  # reported to the driver, which fails the run
        done.put(("error", f"client {index}: {type(error).__name__}: {error}"))
        raise


def measure(enqueue, parts, total, finished, timeout):
    """Runs one client process per part; `enqueue(part, index, barrier)` must
    connect, call `barrier.wait()`, then enqueue its part of the `total` jobs.
    `finished()` says how many of them have their result stored (failing the
    program if one failed). Returns (seconds from the barrier to the last
    result seen, seconds until every client had enqueued its part)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(parts) + 1)
    done = context.Queue()
    clients = [
        context.Process(target=_client, args=(enqueue, part, i, barrier, done), daemon=True)
        for i, part in enumerate(parts)
    ]
    for client in clients:
        client.start()
    barrier.wait(timeout=120)
    began = time.monotonic()
    enqueued_at, reported = began, 0
    while True:
        while not done.empty():
            outcome, value = done.get()
            if outcome != "ok":
                fail(value)
            enqueued_at, reported = max(enqueued_at, value), reported + 1
        if finished() >= total:
            ended = time.monotonic()
            break
        if time.monotonic() - began > timeout:
            fail(f"timed out after {timeout:.0f} s waiting for {total} results")
        if any(c.exitcode not in (None, 0) for c in clients) and done.empty():
            fail("a client process exited with an error")
        time.sleep(POLL_EVERY)
    for client in clients:
        client.join(timeout=30)
    while not done.empty():
        outcome, value = done.get()
        if outcome != "ok":
            fail(value)
        enqueued_at, reported = max(enqueued_at, value), reported + 1
    if reported != len(clients):
        fail(f"only {reported} of {len(clients)} clients reported")
    return ended - began, enqueued_at - began


def wait_until(what, check, timeout):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_EVERY)


def report(system, version, args, seconds, enqueue_seconds):
    print(
        json.dumps(
            {
                "system": system,
                "version": version,
                "jobs": args.jobs,
                "clients": args.clients,
                "workers": args.workers,
                "warmup": args.warmup,
                "seconds": round(seconds, 4),
                "enqueue_seconds": round(enqueue_seconds, 4),
            }
        ),
        flush=True,
    )


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
