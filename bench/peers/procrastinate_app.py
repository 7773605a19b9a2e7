"""The procrastinate app and its no-op task, in a module of their own as
procrastinate advises (its workers import the app by its dotted path):

    procrastinate --app=procrastinate_app.app schema --apply
    procrastinate --app=procrastinate_app.app worker --queues=bench --concurrency=1

The database URL comes from MUSTER_PEER_DATABASE_URL.
"""

import os

import procrastinate

DATABASE_URL = os.environ["MUSTER_PEER_DATABASE_URL"]
QUEUE = "bench"
TASK = "bench.noop"


def make_app(**pool):
    """An app on the bench database; `pool` goes to psycopg's connection pool."""
    return procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=DATABASE_URL, **pool)
    )


# The app the workers run, with procrastinate's default connection pool.
app = make_app()


@app.task(name=TASK, queue=QUEUE)
async def noop():
    return None
