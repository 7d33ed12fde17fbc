"""`simzmq push`: the push service process, a thin shell around policy.py.

It listens on the brokers' notification path for the IM workers' wake-ups
and the gates' presence reports, claims due jobs from the store's outbox
(leases, so any number of instances share it), asks the policy what to do
with each user's jobs, makes the calls with Tornado's async HTTP client and
records each outcome in the store. It also scans the outbox every
scan_interval_ms, so it needs no wake-up to find what was queued while it
was down. A slow or dead webhook only slows this process: the workers'
commits never wait for it.

Store steps run on one thread of their own (the store's connection is not
shared between threads), each in its own short transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import random
import signal
import time

import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from simzmq.config import Config
from simzmq.limits import LogThrottle
from simzmq.push import PRESENCE_TOPIC, WAKE_TOPIC
from simzmq.push import webhook
from simzmq.push.policy import (BadReport, Dead, Heard, Presence, PushTiming, Verdict, after_failure, call_body,
                                delivery_id, failure_kind, parse_report, plan, verdict)
from simzmq.store import StoreBusy, open_store

log = logging.getLogger("simzmq.push")

QUEUED = Gauge("simzmq_push_queued_jobs", "Push jobs in the outbox")
OLDEST = Gauge("simzmq_push_oldest_job_age_seconds", "Age of the oldest job in the outbox (0: none)")
DEAD_NOW = Gauge("simzmq_push_dead_jobs", "Push jobs in the dead-letter table")
ONLINE = Gauge("simzmq_push_online_users", "Users online in the region, as the gates report them")
SENT = Counter("simzmq_push_sent_total", "Webhook calls answered 2xx")
SETTLED = Counter("simzmq_push_jobs_sent_total", "Jobs settled by a 2xx call (several per call when coalescing)")
SKIPPED = Counter("simzmq_push_skipped_total", "Jobs that needed no call", ["reason"])
RETRIED = Counter("simzmq_push_retried_total", "Calls that failed and will be tried again")
DEAD = Counter("simzmq_push_dead_total", "Jobs moved to the dead-letter table")
FAILURES = Counter("simzmq_push_failures_total", "Failed webhook calls by kind", ["kind"])
LATENCY = Histogram("simzmq_push_webhook_seconds", "Webhook call latency (answered or not)",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BAD_REPORTS = Counter("simzmq_push_bad_reports_total", "Undecodable messages on the push topics")

STATS_INTERVAL_S = 5.0
# How long a stopping instance lets calls under way finish before it drops them
# (their leases expire, and another instance, or this one restarted, resends).
STOP_GRACE_S = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


class PushService:
    def __init__(self, name: str, config: Config, metrics_port: int | None, configure_socket=None,
                 peers=(), configure_peer=None):
        """`metrics_port`: this instance's (push-N: push.metrics_port + N - 1; None: off)."""
        cfg = config.push
        self.name = name
        # The peer regions sharing the store (region.peers, federation.Link):
        # their users' jobs are in the same outbox, so the presence reports
        # of their gates are heard too, from their brokers' notify-out
        # (configure_peer(sock, link): CURVE as a gate of theirs, as the
        # federation process connects).
        self.peers = list(peers)
        self.configure_peer = configure_peer
        self.cfg = cfg
        self.store_url = config.store_url()
        self.notify_outs = [config.broker.primary.notify_out, config.broker.backup.notify_out]
        self.metrics_host = config.region.metrics_host
        self.metrics_port = metrics_port
        self.sqlite_synchronous = config.im.sqlite_synchronous
        self.configure_socket = configure_socket
        self.config_sources = config.describe()
        self.timing = PushTiming(cfg.max_age_s * 1000, cfg.backoff_min_ms, cfg.backoff_max_ms, cfg.coalesce_ms)
        self.instance = f"{name}/{os.urandom(4).hex()}"
        self.tokens = itertools.count(1)
        self.presence = Presence(3 * cfg.presence_interval_s, cfg.presence_interval_s + 1.0, time.monotonic())
        self.peers_heard = Heard([link.region for link in self.peers], self.presence.expire_s, time.monotonic())
        self.throttle = LogThrottle(1, 60.0)
        self.random = random.Random()
        self.inflight: dict[str, asyncio.Task] = {}
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self._wake_timer: asyncio.TimerHandle | None = None
        self._wake_at = None
        self.db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="push-store")
        self.store = None
        self.http = None

    # -- plumbing ---------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def db(self, fn, *args):
        """Run a store step in its own transaction on the store's thread."""
        def step():
            with self.store.transaction():
                return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, step)

    def log_throttled(self, kind: str, fmt: str, *args, level=logging.WARNING) -> None:
        ok, suppressed = self.throttle.allow(kind, time.monotonic())
        if ok:
            if suppressed:
                fmt += " (%d more like it in the last minute)"
                args = args + (suppressed,)
            log.log(level, fmt, *args)

    def wake_at(self, due_ms: int) -> None:
        """Scan when `due_ms` (wall clock) comes, or now if it has."""
        delay = (due_ms - now_ms()) / 1000
        if delay <= 0:
            self.wake.set()
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if self._wake_at is not None and self._wake_at <= at:
            return  # an earlier wake-up is already set
        if self._wake_timer is not None:
            self._wake_timer.cancel()
        self._wake_at = at
        self._wake_timer = loop.call_at(at, self._timer_fired)

    def _timer_fired(self) -> None:
        self._wake_at = self._wake_timer = None
        self.wake.set()

    # -- the bus: wake-ups and presence -------------------------------------------------

    async def listen(self, sub, region: str | None = None) -> None:
        """`region`: the peer region whose brokers `sub` listens to (None: ours)."""
        while True:
            frames = await sub.recv_multipart()
            # Through a broker: topic, stamp, payload (simzmq/notify.py).
            if len(frames) != 3:
                BAD_REPORTS.inc()
                continue
            topic, payload = frames[0], frames[2]
            if topic == WAKE_TOPIC and len(payload) == 8:
                self.wake_at(int.from_bytes(payload, "big"))
            elif topic == PRESENCE_TOPIC:
                try:
                    self.presence.report(parse_report(payload), time.monotonic())
                    if region is not None and self.peers_heard.hear(region, time.monotonic()):
                        log.info("presence: region %s heard again", region)
                except BadReport as exc:
                    BAD_REPORTS.inc()
                    self.log_throttled("report", "ignoring a presence report: %s", exc)
            else:
                BAD_REPORTS.inc()

    # -- claiming and working ----------------------------------------------------------

    async def scan_loop(self) -> None:
        interval = self.cfg.scan_interval_ms / 1000
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            if self.stopping.is_set():
                return
            now = time.monotonic()
            for gate in self.presence.expire(now):
                log.info("presence: gate %s silent for %.0f s, its users count as offline", gate,
                         self.presence.expire_s)
            for region in self.peers_heard.fallen_silent(now):
                log.warning("presence: nothing heard from region %s for %.0f s (at %s): users online only there "
                            "count as offline here", region, self.peers_heard.silent_s,
                            ",".join(link.endpoint for link in self.peers if link.region == region))
            if not self.presence.warm(now):
                continue  # a user we have not heard of yet may be online
            free = self.cfg.concurrency - len(self.inflight)
            if free <= 0:
                continue  # a finishing user wakes us
            token = f"{self.instance}/{next(self.tokens)}"
            start = now_ms()
            lease_until = start + self.cfg.lease_s * 1000
            try:
                jobs = await self.db(self.store.claim_push_jobs, token, start, lease_until, free,
                                     self.cfg.jobs_per_user)
            except StoreBusy as exc:
                self.log_throttled("store", "store busy while claiming push jobs: %s", exc)
                continue
            except Exception as exc:
                self.log_throttled("store", "claiming push jobs failed: %r", exc, level=logging.ERROR)
                continue
            by_user: dict[str, list] = {}
            for job in jobs:
                by_user.setdefault(job.user, []).append(job)
            for user, mine in by_user.items():
                self.inflight[user] = asyncio.ensure_future(self.work(token, lease_until, user, mine))
            if len(by_user) == free:
                self.wake.set()  # there may be more

    async def work(self, token: str, lease_until: int, user: str, jobs: list) -> None:
        try:
            decided = plan(jobs, self.presence.online(user), now_ms(), self.cfg.coalesce_ms)
            if decided.skipped:
                await self.db(self.store.finish_push_jobs, user, list(decided.skipped))
                for reason in decided.skipped.values():
                    SKIPPED.labels(reason).inc()
            for call in decided.calls:
                # Stop while the claim surely outlives the next call.
                if self.stopping.is_set() or now_ms() + self.cfg.timeout_s * 1000 >= lease_until - 1000:
                    break
                if not await self.make(call):
                    break  # the rest wait behind the one that failed
        except Exception as exc:
            self.log_throttled("work", "push jobs of %s failed: %r", user, exc, level=logging.ERROR)
        finally:
            try:
                await self.db(self.store.release_push_jobs, token, user)
            except Exception as exc:
                self.log_throttled("store", "releasing the claim on %s failed: %r (it expires)", user, exc)
            self.inflight.pop(user, None)
            self.wake.set()

    async def make(self, call) -> bool:
        """One webhook call and its bookkeeping; True if the user's next may follow."""
        body = webhook.encode_body(call_body(call))
        request = HTTPRequest(self.cfg.webhook, method="POST", body=body,
                              headers=webhook.headers(self.cfg.secret, body, delivery_id(call)),
                              connect_timeout=self.cfg.timeout_s, request_timeout=self.cfg.timeout_s,
                              follow_redirects=False, validate_cert=True, decompress_response=False)
        status, error = None, None
        started = time.monotonic()
        try:
            status = (await self.http.fetch(request)).code
        except HTTPClientError as exc:
            status, error = (None, str(exc)) if exc.code == 599 else (exc.code, None)
        except Exception as exc:  # connection refused, reset, TLS failure...
            error = f"{type(exc).__name__}: {exc}"
        LATENCY.observe(time.monotonic() - started)
        head = call.head
        if verdict(status) is Verdict.DONE:
            await self.db(self.store.finish_push_jobs, head.user, list(call.covers))
            SENT.inc()
            SETTLED.inc(len(call.covers))
            return True
        kind = failure_kind(status, error)
        FAILURES.labels(kind).inc()
        outcome = after_failure(head.created_ms, head.attempts + 1, status, error, now_ms(), self.random.random(),
                                self.timing)
        if isinstance(outcome, Dead):
            await self.db(self.store.bury_push_jobs, head.user, list(call.covers), now_ms(), outcome.reason)
            DEAD.inc(len(call.covers))
            self.log_throttled(kind, "webhook call %s failed (%s): dead-lettered after %d attempts",
                               delivery_id(call), outcome.reason, head.attempts + 1)
            return True
        await self.db(self.store.retry_push_job, head.user, head.msg_id, outcome.due_ms, head.attempts + 1,
                      f"status {status}" if status is not None else (error or "no answer"))
        RETRIED.inc()
        self.log_throttled(kind, "webhook call %s failed (%s): attempt %d, next in %.1f s", delivery_id(call),
                           f"status {status}" if status is not None else error, head.attempts + 1,
                           (outcome.due_ms - now_ms()) / 1000)
        return False

    async def stats_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                stats = await self.db(self.store.push_stats)
                QUEUED.set(stats.queued)
                DEAD_NOW.set(stats.dead)
                OLDEST.set(max(0, now_ms() - stats.oldest_created_ms) / 1000 if stats.oldest_created_ms else 0)
            except Exception as exc:
                self.log_throttled("store", "reading push stats failed: %r", exc)
            ONLINE.set(self.presence.count())
            try:
                await asyncio.wait_for(self.stopping.wait(), STATS_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    # -- life cycle ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self.store = await loop.run_in_executor(
            self.db_thread, lambda: open_store(self.store_url, synchronous=self.sqlite_synchronous))
        ctx = zmq.asyncio.Context()

        def subscriber(endpoints, topics, configure):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 0)
            if configure is not None:
                configure(sub)
            for topic in topics:
                sub.setsockopt(zmq.SUBSCRIBE, topic)
            for ep in endpoints:
                sub.connect(ep)
            return sub
        own = self.configure_socket
        subs = [subscriber(self.notify_outs, (WAKE_TOPIC, PRESENCE_TOPIC),
                           (lambda sock: own(sock, "notify_out")) if own else None)]
        regions: list[str | None] = [None]
        for link in self.peers:
            peer = self.configure_peer
            subs.append(subscriber([link.endpoint], (PRESENCE_TOPIC,),
                                   (lambda sock, link=link: peer(sock, link)) if peer else None))
            regions.append(link.region)
        self.http = AsyncHTTPClient(force_instance=True, max_clients=self.cfg.concurrency)
        if self.metrics_port:
            start_http_server(self.metrics_port, self.metrics_host)
        c = self.cfg
        log.info("push service %s: config %s", self.name, self.config_sources)
        log.info("push service %s: calls POST %s (timeout %.1f s, %d users at once), store %s, listening to %s%s, "
                 "metrics %s", self.name, c.webhook, c.timeout_s, c.concurrency, self.store.describe(),
                 ",".join(self.notify_outs),
                 "".join(f", presence of region {link.region} at {link.endpoint}" for link in self.peers),
                 f"http://{self.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off")
        log.info("push service %s: jobs due %d ms after their message (coalescing %d ms), retried up to %d s; "
                 "first calls after %.1f s of presence reports", self.name, c.delay_ms, c.coalesce_ms,
                 c.max_age_s, self.presence.warm_s)
        listeners = [asyncio.ensure_future(self.listen(sub, region)) for sub, region in zip(subs, regions)]
        stats = asyncio.ensure_future(self.stats_loop())
        try:
            await self.scan_loop()
        finally:
            log.info("push service %s stopping: %d users' calls under way", self.name, len(self.inflight))
            if self.inflight:
                await asyncio.wait(list(self.inflight.values()), timeout=STOP_GRACE_S)
            for task in (*listeners, stats, *self.inflight.values()):
                task.cancel()
            await asyncio.gather(*listeners, stats, *self.inflight.values(), return_exceptions=True)
            self.http.close()
            for sub in subs:
                sub.close()
            ctx.term()
            await loop.run_in_executor(self.db_thread, self.store.close)
            self.db_thread.shutdown()
            log.info("push service %s stopped", self.name)


def run(service: PushService) -> None:
    asyncio.run(service.run())
