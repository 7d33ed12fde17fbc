"""The IM worker's CPU per gate presence report and per token Login, in
process: IMService on a real store, no region, no sockets.

A token login costs the worker the Login and the report its gate sends for
the new session ("start"). What a report costs can depend on how many users
are online on its gate, which `simzmq bench connect` does not vary; this
measures it for each `--online`, from the reports the gate's own encoder
(PresenceReporter) makes:

* report, no change: the start and end of a second session of a user online
  on the gate (its local state stays online; what most reports of `connect`
  are, with 10 sessions per user);
* report, state change: the start and end of a user's only session (online,
  then offline: a PresenceNotice each, last_seen written);
* token login: a Login with a resume token.

Each figure is the mean CPU time (time.process_time, so this process's only:
a Postgres server's share is not in it) of one request in its own
transaction, commit included. docs/benchmarks.md, "The worker's cost per
token login, profiled", has the results and how they were taken.

    python -m simzmq.bench.presencecost --online 10 --online 2000
    python -m simzmq.bench.presencecost --store postgresql://... --online 200
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from urllib.parse import urlsplit

import click

from simzmq.bench.calibrate import calibrate, format_calibration
from simzmq.presence import ONLINE
from simzmq.push.presence import PresenceReporter
from simzmq.service import IMService, token_hash
from simzmq.store import POSTGRES_SCHEMES, open_store
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN

T0 = 1_700_000_000_000
TTL_MS = 10**9
TOKEN = b"t" * 32


class Gate:
    """A gate's reports as its PresenceReporter encodes them."""

    def __init__(self):
        self.sent: list = []
        self.reporter = PresenceReporter("gate-1", 10.0, self._request, TTL_MS)

    def _request(self, key, origin, payload, callback) -> None:
        self.sent.append(BIN.decode(payload)[1])

    def take(self):
        (report,) = self.sent
        self.sent.clear()
        return report


def measure(url: str, online: int, reps: int) -> dict[str, float]:
    """Mean CPU µs per request of each kind, with `online` users online on
    the reporting gate. `url` must name an empty store."""
    store = open_store(url)
    try:
        service = IMService(store, TTL_MS, 1 << 20)
        now = T0

        def handle(key, origin, msg):
            nonlocal now
            now += 1
            with store.transaction():
                return service.handle(key, origin, msg, now)

        names = [f"u{i:06d}" for i in range(online)]
        alone, extra = "alone", "extra"
        with store.transaction():
            for user in [*names, alone, extra]:
                store.create_user(user, "not a hash", T0)
            store.add_token(alone, token_hash(TOKEN), "", T0 + TTL_MS)
        gate = Gate()
        gate.reporter.snapshot({u: {b"s1": None} for u in [*names, extra]}, {u: ONLINE for u in [*names, extra]})
        for report in gate.sent:
            handle(gate.reporter.gate_id, b"", report)
        gate.sent.clear()

        def timed(make, notices: int) -> float:
            """Mean CPU µs of `reps` requests from make(i) -> (key, origin,
            msg), each checked to do what it stands for: `notices`
            notifications, no Error."""
            spent = []
            for i in range(reps):
                key, origin, msg = make(i)
                started = time.process_time()
                out = handle(key, origin, msg)
                spent.append(time.process_time() - started)
                if isinstance(out.reply, m.Error) or len(out.notices) != notices:
                    raise RuntimeError(f"{type(msg).__name__} #{i}: {out.reply}, {len(out.notices)} notices")
            return statistics.fmean(spent) * 1e6

        def session(user, op, state):
            gate.reporter.session(op, user, b"s2", state)
            return gate.reporter.gate_id, b"", gate.take()

        # Alternately start and end, so the store stays the same size.
        return {
            "report, no change": timed(lambda i: session(extra, *(("start", ONLINE), ("end", ONLINE))[i % 2]), 0),
            "report, state change": timed(lambda i: session(alone, *(("start", ONLINE), ("end", 0))[i % 2]), 1),
            "token login": timed(lambda i: (alone, b"s" * 16, m.Login(user=alone, token=TOKEN)), 0),
        }
    finally:
        store.close()


@click.command()
@click.option("--online", type=click.IntRange(min=0), multiple=True, default=(10, 200, 2000), show_default=True,
              help="Users online on the reporting gate (repeatable).")
@click.option("--reps", type=click.IntRange(min=1), default=400, show_default=True,
              help="Requests of each kind measured.")
@click.option("--store", "store_url", default=None,
              help="A postgresql:// URL whose server makes a new database per --online (dropped after); "
                   "default: SQLite files in a temporary directory (synchronous FULL).")
def main(online, reps, store_url):
    if store_url and urlsplit(store_url).scheme not in POSTGRES_SCHEMES:
        raise click.BadParameter("not a postgresql:// URL", param_hint="--store")
    work = tempfile.mkdtemp(prefix="simzmq-presencecost-")
    try:
        click.echo(format_calibration(calibrate(work)))
        for i, count in enumerate(online):
            if store_url:
                with _scratch_database(store_url) as url:
                    figures = measure(url, count, reps)
            else:
                figures = measure(f"sqlite:///{work}/im-{i}.db", count, reps)
            click.echo(f"online on the gate {count:6d}: " + "; ".join(
                f"{name} {us:.0f} µs" for name, us in figures.items()) + f" (CPU per request, mean of {reps})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _scratch_database(url: str):
    """A new, empty database on the server of `url`, dropped afterwards."""
    import psycopg

    name = f"simzmq_presencecost_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlsplit(url)._replace(path=f"/{name}").geturl()
        finally:
            conn.execute(f'DROP DATABASE "{name}"')


if __name__ == "__main__":
    main()
