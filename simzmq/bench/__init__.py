"""`simzmq bench`: a load generator for a running region.

The generator runs in its own processes (``procs``), each with its own uvloop
event loop over its share of the users, speaking the client protocol through
``simzmq.client.Connection``. The parent process only coordinates: it starts
the children, moves them through the phases of a scenario together (a barrier
per phase), samples the region's processes at each barrier, draws the progress
bar, and merges what the children measured into one report.

The modules, one job each:

* ``plan``        — Options, and who does what (users, flows, which process);
* ``load``        — a generator process: senders, receivers, the scenarios;
* ``coordinator`` — the parent: phases, samples, merging into the report;
* ``procstats``   — CPU and memory of the region's processes and the machine;
* ``gatemetrics`` — the gates' event counters from their /metrics;
* ``check``       — percentiles and the delivery check;
* ``progress``    — the progress bar;
* ``report``      — the report as text;
* ``logins``      — the logins scenario, which runs on its own (one process);
* ``groups``      — the groups scenario's plan, members, check and report rows
  (its traffic runs on the generator of ``load``);
* ``command``     — the `simzmq bench` command itself.

Scenarios:

* ``pairs``   — users as sender→receiver pairs; each sender sends ``messages``
  100-byte messages, either keeping ``window`` Sends unacknowledged or paced at
  a total offered ``rate``. Delivered msgs/s counts the NewMsg pushes that
  receivers see; send→push latency is measured at the receiver from the send
  time carried in the body (one machine, one monotonic clock).
* ``fanin``   — every user but one sends to that one.
* ``backlog`` — senders fill an offline recipient's inbox with ``backlog``
  messages; the measured part is the recipient reconnecting (token login) and
  Syncing all of it.
* ``connect`` — ``connections`` connections handshake and log in with a resume
  token; before that, every user logs in once with its password (measured
  apart, since Argon2id dominates it). Reports logins/s, latencies and the
  region's memory per idle logged-in connection.
* ``groups``  — ``users`` (default 256) members of one group, spread over the
  region's gates; ``senders`` of them send ``messages`` each to the group.
  Reports delivered member copies/s, region CPU per member copy and send→push
  latency to the last member, and checks that every member holds the group's
  messages in one order (see simzmq/bench/groups.py).
* ``logins``  — ``users`` (default 500) password Logins at once, each client
  retrying ``unavailable`` and ``rate_limited`` with backoff; reports
  logins/s against the password threads' capacity (threads ÷ one Argon2id
  check, timed on the same machine first).

Every scenario that sends ends with a check through Sync: each receiver reads
its whole inbox and every acknowledged message must be there exactly once, in
the order its sender sent it.

Setup (registering the per-run users, whose Argon2id hashing takes tens of
milliseconds each, and the first password logins) happens before the measured
window and is reported apart.
"""

from simzmq.bench.check import check_delivery, order_check, percentiles
from simzmq.bench.command import main
from simzmq.bench.coordinator import run
from simzmq.bench.plan import SCENARIOS, BenchError, Options
from simzmq.bench.procstats import machine_report, read_pid_files, sample_all

__all__ = ["SCENARIOS", "BenchError", "Options", "check_delivery", "machine_report", "main", "order_check",
           "percentiles", "read_pid_files", "run", "sample_all"]
