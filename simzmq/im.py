"""The IM worker: a 7/MDP worker for service `im`, the only writer of the store.

A thin I/O shell around simzmq.service. Its loop:

1. wait for input on any broker session (a worker holds one per broker of the
   pair) or for finished password work;
2. take everything that is waiting — that is the batch;
3. run the whole batch in ONE transaction (group commit: one fsync for the
   batch), its Sends written together (see commit_batch: a request whose
   store step fails is left out and the batch run again, so one bad request
   spoils nothing);
4. commit, and only then send the replies (one message per broker session)
   and publish the notifications (one message per topic group).

Argon2id hashing and verification take tens of milliseconds, so they run on a
small thread pool and their requests join a later batch.

Nobody's work is done for a caller who gave up: a request carries the time
its gate still waits for the reply (its budget, docs/internal-protocol.md).
Queued work whose deadline has passed is answered `unavailable` at once and
not computed; a password check that could not finish in time, given the
queue ahead of it and the measured cost of one check, is refused the same way
before it reads the store. And one user's large requests do not fill a batch:
beyond FAIR_BYTES_PER_USER in one batch, the rest of that user's requests
wait for the next one (in order), behind everyone else's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import queue
import signal
import threading
import time
from typing import NamedTuple

import nacl.exceptions
import nacl.pwhash
import zmq
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from simzmq.config import Config
from simzmq.envelope import EnvelopeError, pack_notices, pack_reply, request_budget_ms, unpack_request
from simzmq.mdpworker import Request, WorkerSession
from simzmq.notify import group_topic
from simzmq.push import PRESENCE_TOPIC, WAKE_TOPIC
from simzmq.service import IMService, Outcome, RegisterWork, StepFailed, error
from simzmq.service import Request as IMRequest  # mdpworker's Request is the MDP one
from simzmq.store import StoreBusy, open_store
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, bin_newmsg_with_seq
from simzmq.zmqio import sender
from simzmq.wire.errors import ProtocolError
from simzmq.wire.messages import ErrorCode

log = logging.getLogger("simzmq.im")

SERVICE = b"im"
POLL_MS = 100

REQUESTS = Counter("simzmq_im_requests_total", "Requests handled by type and outcome", ["type", "outcome"])
BATCH_SIZE = Histogram("simzmq_im_batch_requests", "Requests per group commit",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
COMMIT_SECONDS = Histogram("simzmq_im_commit_seconds", "Time to run and commit one batch",
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1))

BUSY_BATCHES = Counter("simzmq_im_busy_retries_total",
                       "Batches run again whole after a deadlock or serialization failure")
# How often a batch is run again whole after the store was busy, before its
# requests are tried one by one (and a request still busy gets UNAVAILABLE).
BUSY_RETRIES = 5
EXPIRED_DROPPED = Counter("simzmq_im_expired_dropped_total",
                          "Requests answered unavailable without being computed because their caller's "
                          "deadline had passed: waiting in the worker (queued) or for a password thread (password)",
                          ["stage"])
PASSWORD_REFUSED = Counter("simzmq_im_password_refused_total",
                           "Password checks (Login, Register) refused at once because the password queue "
                           "could not finish them before their deadline")
PASSWORD_QUEUE = Gauge("simzmq_im_password_queue", "Password checks queued or running")
PASSWORD_CHECK_SECONDS = Gauge("simzmq_im_password_check_seconds",
                               "Measured time of one password check (hash or verify), moving average")
DEFERRED = Counter("simzmq_im_fairness_deferred_total",
                   "Requests put off to the next batch because their user had sent FAIR_BYTES_PER_USER in this one")

# Bytes of requests one user may put into one batch (at least one request
# always goes): a user sending megabytes makes the others wait one batch, not
# all of theirs.
FAIR_BYTES_PER_USER = 64 * 1024
# Time a reply needs to get back to the gate after the worker is done.
REPLY_MARGIN_S = 0.05

_request_counters: dict = {}


def count_request(type_name: str, outcome: str) -> None:
    # labels() takes a lock and builds a key per call; the worker counts every
    # request, so it keeps the children it has made.
    counter = _request_counters.get((type_name, outcome))
    if counter is None:
        counter = _request_counters[(type_name, outcome)] = REQUESTS.labels(type_name, outcome)
    counter.inc()


PWHASH_STRENGTH = {
    "interactive": (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "sensitive": (nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE),
}


class Job(NamedTuple):
    """One decoded request and where its reply goes."""
    request: Request         # where the reply goes (broker session, client envelope)
    corr: bytes
    key: str
    origin: bytes
    msg: object
    prepared: object = None  # result of the password work, once done
    deadline: float = math.inf  # monotonic; inf: the gate gave no budget
    size: int = 0  # bytes of the request, for fair batching


# Job.prepared of password work dropped because its deadline passed first.
EXPIRED = object()


def fair_batch(jobs: list, cap: int) -> tuple[list, list]:
    """(this batch, the next one): each user's jobs up to `cap` bytes (at
    least one), in order; once a user's job is put off, so are the user's
    later ones, so each user's requests stay in order."""
    spent: dict = {}
    put_off: set = set()
    now, later = [], []
    for job in jobs:
        user = job.key
        used = spent.get(user, 0)
        if user in put_off or (used and used + job.size > cap):
            put_off.add(user)
            later.append(job)
            continue
        spent[user] = used + job.size
        now.append(job)
    return now, later


class PasswordQueue:
    """The password threads' queue: how much is in it, what one check costs
    (measured), and so whether one more can finish before its deadline.

    Counts change on the worker's loop only; `measured` is called from the
    threads (one float assignment)."""

    SMOOTHING = 0.2

    def __init__(self, threads: int, cost_s: float | None = None):
        self.threads = max(1, threads)
        self.cost_s = cost_s
        self.queued = 0  # submitted and not yet back on the loop

    def measured(self, seconds: float) -> None:
        self.cost_s = seconds if self.cost_s is None else self.cost_s + self.SMOOTHING * (seconds - self.cost_s)

    def finish_after(self) -> float:
        """Seconds until one more check, queued now, would be done."""
        if self.cost_s is None:
            return 0.0
        return (self.queued // self.threads + 1) * self.cost_s

    def admit(self, now: float, deadline: float) -> bool:
        """Queue one more check with this deadline, or refuse it now?"""
        return now + self.finish_after() + REPLY_MARGIN_S <= deadline

    def worth_starting(self, now: float, deadline: float) -> bool:
        """A thread is free for this check: can it still be in time?"""
        return now + (self.cost_s or 0.0) + REPLY_MARGIN_S <= deadline


def lower_thread_priority(steps: int) -> None:
    """Run the calling thread `steps` nice steps lower than it does now
    (Linux schedules threads on their own; elsewhere this does nothing).
    Raising one's own nice value needs no privilege."""
    if not steps or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(steps)))
    except OSError as exc:
        log.warning("could not lower the password threads' priority: %s", exc)


def hash_password(password: str, strength: str) -> str:
    ops, mem = PWHASH_STRENGTH[strength]
    return nacl.pwhash.argon2id.str(password.encode(), opslimit=ops, memlimit=mem).decode()


def verify_password(pw_hash: str | None, password: str) -> bool:
    if pw_hash is None:
        return False
    try:
        return nacl.pwhash.verify(pw_hash.encode(), password.encode())
    except nacl.exceptions.InvalidkeyError:
        return False


class IMWorker:
    def __init__(self, name: str, cfg: Config, metrics_port: int | None, configure_socket=None):
        """`metrics_port`: this worker's (im-N: im.metrics_port + N - 1; None: off)."""
        b = cfg.broker
        self.name = name
        self.store_url = cfg.store_url()
        self.im_cfg = cfg.im
        self.max_frame = cfg.gate.max_frame
        self.max_group_members = cfg.gate.max_group_members
        self.max_groups_per_user = cfg.gate.limits.max_groups_per_user
        self.backends = [b.primary.backend, b.backup.backend]
        self.notify_ins = [b.primary.notify_in, b.backup.notify_in]
        self.heartbeat_s = b.heartbeat_ms / 1000
        self.liveness = b.liveness
        self.metrics_port = metrics_port
        self.sqlite_synchronous = cfg.im.sqlite_synchronous
        self.metrics_host = cfg.region.metrics_host
        # configure_socket(sock, name) before each bus socket connects (CURVE):
        # name is "backend" for the MDP sessions, "notify_in" for the PUB.
        self.configure_socket = configure_socket
        # Not None: the push service is on; every new message queues a push
        # job due this long after it (simzmq/push/).
        self.push_delay_ms = cfg.push.job_delay_ms if cfg.push.enabled else None
        self.running = True
        self.done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.passwords = PasswordQueue(cfg.im.pwhash_threads)
        self.carried: list[Job] = []  # put off by fair_batch, first in the next batch

    def stop(self, *_):
        self.running = False

    def run(self) -> None:
        store = open_store(self.store_url, synchronous=self.sqlite_synchronous)
        service = IMService(store, self.im_cfg.token_ttl_s * 1000, self.max_frame, self.max_group_members,
                            self.push_delay_ms, self.max_groups_per_user)
        ctx = zmq.Context.instance()
        # One identity with every broker, so each routes the same users here.
        identity = os.urandom(8)
        configure = self.configure_socket
        sessions = [WorkerSession(context=ctx, endpoint=ep, service=SERVICE, credit=self.im_cfg.credit,
                                  heartbeat_interval=self.heartbeat_s, liveness=self.liveness, identity=identity,
                                  configure_socket=(lambda sock: configure(sock, "backend")) if configure else None,
                                  batches=True)
                    for ep in self.backends]
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 1000)
        pub.setsockopt(zmq.SNDHWM, 0)
        if configure is not None:
            configure(pub, "notify_in")
        for ep in self.notify_ins:
            pub.connect(ep)
        publish = sender(pub)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        self.wake_w = wake_w
        pool = concurrent.futures.ThreadPoolExecutor(self.im_cfg.pwhash_threads, thread_name_prefix="pwhash",
                                                     initializer=lower_thread_priority,
                                                     initargs=(self.im_cfg.pwhash_nice,))
        # The cost of one check, before the first Login needs it.
        self.passwords.queued += 1
        pool.submit(self._calibrate).add_done_callback(self._password_done)
        if self.metrics_port:
            start_http_server(self.metrics_port, self.metrics_host)
        log.info("im worker %s: store %s, brokers %s, notifications to %s, metrics %s, credit %d",
                 self.name, store.describe() if hasattr(store, "describe") else self.store_url,
                 ",".join(self.backends), ",".join(self.notify_ins),
                 f"http://{self.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                 self.im_cfg.credit)
        poller = zmq.Poller()
        for s in sessions:
            poller.register(s.socket, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        try:
            while self.running:
                events = dict(poller.poll(0 if self.carried else POLL_MS))
                now = time.monotonic()
                jobs, self.carried = self.carried, []
                for s in sessions:
                    for req in s.recv_requests(now):
                        job = self._decode(req, now)
                        if job is not None:
                            jobs.append(job)
                if wake_r in events:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        job = self.done.get_nowait()
                    except queue.Empty:
                        break
                    self.passwords.queued -= 1
                    if job is not None:
                        jobs.append(job)
                PASSWORD_QUEUE.set(self.passwords.queued)
                jobs, self.carried = fair_batch(jobs, FAIR_BYTES_PER_USER)
                if self.carried:
                    DEFERRED.inc(len(self.carried))
                jobs = self._drop_expired(jobs, now)
                if jobs:
                    self.process(store, service, pool, publish, jobs)
                for s in sessions:
                    old = s.socket
                    if s.tick(time.monotonic()):
                        poller.unregister(old)
                        poller.register(s.socket, zmq.POLLIN)
        finally:
            log.info("im worker %s stopping", self.name)
            for s in sessions:
                s.close()
            pool.shutdown(wait=False, cancel_futures=True)
            pub.close()
            store.close()
            log.info("im worker %s stopped", self.name)

    def _drop_expired(self, jobs: list[Job], now: float) -> list[Job]:
        """The jobs still worth doing; the others get `unavailable` (which
        also frees the broker's credit for them) and are counted."""
        live = []
        expired: dict = {}
        for job in jobs:
            if job.prepared is EXPIRED:
                EXPIRED_DROPPED.labels("password").inc()
            elif now > job.deadline:
                EXPIRED_DROPPED.labels("queued").inc()
            else:
                live.append(job)
                continue
            expired.setdefault(job.request.session, []).append((job.request, pack_reply(job.corr, UNAVAILABLE_LATE)))
            count_request(type(job.msg).__name__, "expired")
        for session, replies in expired.items():
            session.reply_all(replies)
        return live

    def _decode(self, req, now: float) -> Job | None:
        body = req.body
        # A request that cannot be read is still answered (with an empty body
        # the gate drops): the broker counts it against this worker's credit
        # until a reply comes, so a silent drop would hold that credit forever.
        if len(body) != 2:
            log.info("refusing an im request with %d body frames", len(body))
            req.session.reply(req, [b""])
            return None
        try:
            corr, origin, payload = unpack_request(body[1])
        except EnvelopeError as exc:
            log.info("refusing an im request: %s", exc)
            req.session.reply(req, [b""])
            return None
        try:
            _, msg = BIN.decode(payload)
            key = body[0].decode("utf-8")
        except (ProtocolError, UnicodeDecodeError) as exc:
            log.info("bad im request: %s", exc)
            req.session.reply(req, [pack_reply(corr, BIN.encode(m.Error(code=int(ErrorCode.BAD_REQUEST),
                                                                        reason="undecodable request"), 0))])
            return None
        budget = request_budget_ms(payload)
        deadline = now + budget / 1000 if budget else math.inf
        return Job(req, corr, key, origin, msg, deadline=deadline, size=len(payload))

    def process(self, store, service: IMService, pool, publish, jobs: list[Job]) -> None:
        started = time.monotonic()
        now_ms = int(time.time() * 1000)
        ready: list[Job] = []
        waiting: list[Job] = []  # need password work first
        relayed: list[Job] = []  # gates' presence reports, for the push service too
        refused: dict = {}  # session -> replies: the password queue cannot make their deadline
        for job in jobs:
            msg = job.msg
            if type(msg) is m.PresenceReport:
                # Applied to the store like any request (the gates' local
                # states), then relayed as it is to the push service.
                relayed.append(job)
                ready.append(job)
            elif job.prepared is None and (isinstance(msg, m.Register)
                                         or (isinstance(msg, m.Login) and not msg.token)):
                if self.passwords.admit(started, job.deadline):
                    self.passwords.queued += 1
                    waiting.append(job)
                else:
                    PASSWORD_REFUSED.inc()
                    count_request(type(msg).__name__, "unavailable")
                    refused.setdefault(job.request.session, []).append(
                        (job.request, pack_reply(job.corr, UNAVAILABLE_BUSY)))
            else:
                ready.append(job)
        for session, replies in refused.items():
            session.reply_all(replies)
        try:
            outcomes, hashes = commit_batch(store, service,
                                            [IMRequest(j.key, j.origin, j.msg, j.prepared) for j in ready],
                                            now_ms, [j.msg.user for j in waiting])
        except Exception as exc:
            # BEGIN, COMMIT or a password-hash read failed (a store locked
            # past busy_timeout, a lost Postgres connection): nothing of the
            # batch was committed, so every request may be retried. Answer
            # them all rather than let the worker die with the batch.
            log.error("a batch of %d requests was not committed: %s", len(jobs), exc,
                      exc_info=not isinstance(exc, StoreBusy))
            self.passwords.queued -= len(waiting)  # answered here, never submitted
            ready, waiting = ready + waiting, []
            outcomes, hashes = [error(ErrorCode.UNAVAILABLE, "the store is unavailable; retry")] * len(ready), []
        answered: list[tuple[Job, Outcome]] = list(zip(ready, outcomes))
        # For Register, the stored hash if the user exists: a Register the
        # broker delivered twice (its worker died) must answer Ok again.
        deferred: list[tuple[Job, str | None]] = list(zip(waiting, hashes))
        COMMIT_SECONDS.observe(time.monotonic() - started)
        BATCH_SIZE.observe(len(jobs))
        # Committed: now the world may hear of it. One reply message per
        # broker session, one notification message per topic group.
        answers: dict = {}
        notices = []
        for job, outcome in answered:
            answers.setdefault(job.request.session, []).append(
                (job.request, pack_reply(job.corr, BIN.encode(outcome.reply, 0))))
            count_request(type(job.msg).__name__, _outcome(outcome.reply))
            notices.extend(outcome.notices)
        for session, replies in answers.items():
            session.reply_all(replies)
        for message in encode_notices(notices):
            publish(message)
        push_due = service.take_push_due()
        if push_due is not None:
            publish((WAKE_TOPIC, push_due.to_bytes(8, "big")))
        for job in relayed:
            publish((PRESENCE_TOPIC, bytes(job.msg.report)))
        for job, pw_hash in deferred:
            fut = pool.submit(self._password_work, job, pw_hash)
            fut.add_done_callback(self._password_done)

    def _password_work(self, job: Job, pw_hash: str | None) -> Job:
        started = time.monotonic()
        if not self.passwords.worth_starting(started, job.deadline):
            return job._replace(prepared=EXPIRED)
        if isinstance(job.msg, m.Register):
            if pw_hash is not None:
                done = job._replace(prepared=RegisterWork(None, verify_password(pw_hash, job.msg.password)))
            else:
                done = job._replace(prepared=RegisterWork(
                    hash_password(job.msg.password, self.im_cfg.pwhash_strength), False))
        elif pw_hash is None:
            # No such user: nothing to check, and nothing measured (it cost nothing).
            return job._replace(prepared=False)
        else:
            done = job._replace(prepared=verify_password(pw_hash, job.msg.password))
        self.passwords.measured(time.monotonic() - started)
        PASSWORD_CHECK_SECONDS.set(self.passwords.cost_s)
        return done

    def _calibrate(self) -> None:
        """One hash, to measure what a check costs on this machine now."""
        started = time.monotonic()
        hash_password("calibration", self.im_cfg.pwhash_strength)
        self.passwords.measured(time.monotonic() - started)
        PASSWORD_CHECK_SECONDS.set(self.passwords.cost_s)
        log.info("one password check takes %.0f ms here (%d threads)", self.passwords.cost_s * 1000,
                 self.passwords.threads)

    def _password_done(self, fut) -> None:
        # Always something on the queue (None for nothing to answer), so the
        # loop counts every submitted check out again.
        try:
            result = fut.result()
        except concurrent.futures.CancelledError:
            return
        except Exception:
            log.exception("password work failed")
            result = None
        self.done.put(result)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass


UNAVAILABLE_LATE = BIN.encode(m.Error(code=int(ErrorCode.UNAVAILABLE),
                                     reason="the back end could not answer in time; retry"), 0)
UNAVAILABLE_BUSY = BIN.encode(m.Error(code=int(ErrorCode.UNAVAILABLE),
                                     reason="too many password checks waiting; retry"), 0)


def encode_notices(notices) -> list[tuple[bytes, bytes]]:
    """The notifications of one commit as ``(group topic, packed frame)``
    messages, one per topic group, each user's in commit order. The copies of
    one message differ only in their seq, so later copies are the first one
    re-stamped rather than encoded again."""
    groups: dict[bytes, list] = {}
    first = None  # (msg_id, payload) of the first NewMsg
    for notice in notices:
        msg = notice.msg
        if type(msg) is m.NewMsg:
            if first is not None and first[0] == msg.msg.msg_id:
                payload = bin_newmsg_with_seq(first[1], msg.msg.seq)
            else:
                payload = BIN.encode(msg, 0)
                first = (msg.msg.msg_id, payload)
        else:
            payload = BIN.encode(msg, 0)
        user = notice.user.encode()
        groups.setdefault(group_topic(user), []).append((user, notice.origin, payload))
    return [(topic, pack_notices(entries)) for topic, entries in groups.items()]


def commit_batch(store, service: IMService, requests: list[IMRequest], now_ms: int,
                 password_users: list[str] = ()) -> tuple[list[Outcome], list[str | None]]:
    """Run the batch in one transaction and commit it: the outcome of each
    request, and the stored password hash of each of `password_users`.

    The batch runs optimistically, without savepoints. When a store step
    fails, the transaction is rolled back and the batch runs again: a step
    that served one request gets that request its Error and leaves it out; a
    step that served several (a run of Sends) has them written one by one
    next time, which finds the one at fault."""
    failed: dict[int, Outcome] = {}
    alone: set[int] = set()
    busy_retries = BUSY_RETRIES
    while True:
        live = [i for i in range(len(requests)) if i not in failed]
        try:
            with store.transaction():
                outcomes = service.handle_batch([requests[i] for i in live], now_ms,
                                                {k for k, i in enumerate(live) if i in alone})
                hashes = [store.get_password_hash(user) for user in password_users]
        except StepFailed as exc:
            if isinstance(exc.cause, StoreBusy) and busy_retries:
                # A deadlock or serialization failure is nobody's fault: the
                # same batch again (the other transaction has gone ahead).
                busy_retries -= 1
                BUSY_BATCHES.inc()
                continue
            culprits = [live[k] for k in exc.indices]
            if len(culprits) > 1 and not alone.issuperset(culprits):
                alone.update(culprits)
                continue
            for i in culprits:
                failed[i] = _failure(requests[i], exc.cause)
            continue
        done = dict(zip(live, outcomes))
        done.update(failed)
        return [done[i] for i in range(len(requests))], hashes


def _failure(request: IMRequest, exc: BaseException) -> Outcome:
    """The Error of a request whose store step raised."""
    name = type(request.msg).__name__
    if isinstance(exc, StoreBusy):
        # A lock timeout or deadlock: nothing of it stays, and the client
        # retries (a Send with the same cmid).
        log.info("request %s hit a busy store: %s", name, exc)
        return error(ErrorCode.UNAVAILABLE, "the store is busy; retry")
    log.error("request %s failed", name, exc_info=exc)
    return error(ErrorCode.INTERNAL, "internal error")


def _outcome(reply) -> str:
    if isinstance(reply, m.Error):
        try:
            return ErrorCode(reply.code).name.lower()
        except ValueError:
            return str(reply.code)
    return "ok"


def run(worker: IMWorker) -> None:
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
