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
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import signal
import threading
import time
from typing import NamedTuple

import nacl.exceptions
import nacl.pwhash
import zmq
from prometheus_client import Counter, Histogram, start_http_server

from simzmq.envelope import EnvelopeError, pack_notices, pack_reply, unpack_request
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
OK_REPLY = BIN.encode(m.Ok(), 0)

REQUESTS = Counter("simzmq_im_requests_total", "Requests handled by type and outcome", ["type", "outcome"])
BATCH_SIZE = Histogram("simzmq_im_batch_requests", "Requests per group commit",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
COMMIT_SECONDS = Histogram("simzmq_im_commit_seconds", "Time to run and commit one batch",
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1))

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
    def __init__(self, name: str, store_url: str, im_cfg: dict, max_frame: int, backends: list[str],
                 notify_ins: list[str], heartbeat_ms: int, liveness: int, metrics_port: int | None,
                 sqlite_synchronous: str = "FULL", metrics_host: str = "127.0.0.1",
                 configure_socket=None, push_delay_ms: int | None = None):
        self.name = name
        self.store_url = store_url
        self.im_cfg = im_cfg
        self.max_frame = max_frame
        self.backends = backends
        self.notify_ins = notify_ins
        self.heartbeat_s = heartbeat_ms / 1000
        self.liveness = liveness
        self.metrics_port = metrics_port
        self.sqlite_synchronous = sqlite_synchronous
        self.metrics_host = metrics_host
        # configure_socket(sock, name) before each bus socket connects (CURVE):
        # name is "backend" for the MDP sessions, "notify_in" for the PUB.
        self.configure_socket = configure_socket
        # Not None: the push service is on; every new message queues a push
        # job due this long after it (simzmq/push/).
        self.push_delay_ms = push_delay_ms
        self.running = True
        self.done: queue.SimpleQueue[Job] = queue.SimpleQueue()

    def stop(self, *_):
        self.running = False

    def run(self) -> None:
        store = open_store(self.store_url, synchronous=self.sqlite_synchronous)
        service = IMService(store, self.im_cfg["token_ttl_s"] * 1000, self.max_frame, self.push_delay_ms)
        ctx = zmq.Context.instance()
        # One identity with every broker, so each routes the same users here.
        identity = os.urandom(8)
        configure = self.configure_socket
        sessions = [WorkerSession(context=ctx, endpoint=ep, service=SERVICE, credit=self.im_cfg["credit"],
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
        pool = concurrent.futures.ThreadPoolExecutor(self.im_cfg["pwhash_threads"], thread_name_prefix="pwhash",
                                                     initializer=lower_thread_priority,
                                                     initargs=(self.im_cfg["pwhash_nice"],))
        if self.metrics_port:
            start_http_server(self.metrics_port, self.metrics_host)
        log.info("im worker %s: store %s, brokers %s, notifications to %s, metrics %s, credit %d",
                 self.name, store.describe() if hasattr(store, "describe") else self.store_url,
                 ",".join(self.backends), ",".join(self.notify_ins),
                 f"http://{self.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                 self.im_cfg["credit"])
        poller = zmq.Poller()
        for s in sessions:
            poller.register(s.socket, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        try:
            while self.running:
                events = dict(poller.poll(POLL_MS))
                now = time.monotonic()
                jobs: list[Job] = []
                for s in sessions:
                    for req in s.recv_requests(now):
                        job = self._decode(req)
                        if job is not None:
                            jobs.append(job)
                if wake_r in events:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        jobs.append(self.done.get_nowait())
                    except queue.Empty:
                        break
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

    def _decode(self, req) -> Job | None:
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
        return Job(req, corr, key, origin, msg)

    def process(self, store, service: IMService, pool, publish, jobs: list[Job]) -> None:
        started = time.monotonic()
        now_ms = int(time.time() * 1000)
        ready: list[Job] = []
        waiting: list[Job] = []  # need password work first
        relayed: list[Job] = []  # gates' presence reports, for the push service
        for job in jobs:
            msg = job.msg
            if type(msg) is m.PresenceReport:
                relayed.append(job)
            elif job.prepared is None and (isinstance(msg, m.Register)
                                         or (isinstance(msg, m.Login) and not msg.token)):
                waiting.append(job)
            else:
                ready.append(job)
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
        for job in relayed:
            answers.setdefault(job.request.session, []).append((job.request, pack_reply(job.corr, OK_REPLY)))
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
        if isinstance(job.msg, m.Register):
            if pw_hash is not None:
                return job._replace(prepared=RegisterWork(None, verify_password(pw_hash, job.msg.password)))
            return job._replace(prepared=RegisterWork(hash_password(job.msg.password, self.im_cfg["pwhash_strength"]),
                                                      False))
        return job._replace(prepared=verify_password(pw_hash, job.msg.password))

    def _password_done(self, fut) -> None:
        try:
            self.done.put(fut.result())
        except concurrent.futures.CancelledError:
            return
        except Exception:
            log.exception("password work failed")
            return
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass


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
    while True:
        live = [i for i in range(len(requests)) if i not in failed]
        try:
            with store.transaction():
                outcomes = service.handle_batch([requests[i] for i in live], now_ms,
                                                {k for k, i in enumerate(live) if i in alone})
                hashes = [store.get_password_hash(user) for user in password_users]
        except StepFailed as exc:
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
