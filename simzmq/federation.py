"""Federation: notifications crossing from one region's bus to another's.

Regions that share one store (Postgres) each run their own brokers, workers
and gates; a message from a user in region A to a user online in region B is
stored by one of A's workers and published on A's bus only. Each region runs
one `federation` process (a child of `simzmq up` when region.peers is set):

* it SUBscribes to every peer region's brokers' notify-out (both brokers of
  each pair, as a bus client of role gate), to every topic group;
* it PUBlishes what it takes into its own brokers' notify-in (as a worker
  does), so its own brokers stamp and forward it to their gates like any
  notification of their own.

What crosses, and what does not (all decided here, in FederationCore; the
process around it is a thin socket shell):

* Only group notifications (simzmq/notify.py), whole: the packed frame as the
  peer's worker published it, plus one *mark* entry (empty user, origin
  ``fed``, payload the region it came from). Gates skip entries whose user is
  empty, so the mark costs them nothing.
* Never a marked frame: it crossed once already. A frame published in A
  reaches B once and is never sent on from B, so no loop forms, whatever the
  number of regions (each federation process subscribes to every peer).
* Each frame once: both brokers of a peer pair forward every notification
  (its workers publish to both), so the same bytes arrive twice, once
  through each link to the pair. A short memory of recent frames
  (RecentFrames: ten seconds, bounded in size) drops the copy. The same
  bytes may also be published again, legitimately (a second TypingNotice
  start carries no time): one broker never forwards a publication twice, so
  the same bytes again through the *same* link are a new frame and cross,
  however soon; only what the other link brings beyond that is a copy.

Loss: a link that drops and returns loses what was published meanwhile. Each
link's stamps are checked as a gate does (a seq jump or a new epoch), and a
link that (re)connects is taken as a possible loss too: after a short
settling delay (so the subscription has reached the peer) the process
publishes a *resync* entry (empty user, origin ``resync``) in every group; a
gate that gets one catches every user of that group it has online up from
the store (the gap -> Catchup path, simzmq/linkcore.py). The store is shared,
so a catch-up finds everything. Nothing is lost, only late.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from prometheus_client import Counter

from simzmq import keys as keys_mod
from simzmq.config import Config
from simzmq.envelope import EnvelopeError, pack_notices, unpack_notices, unpack_stamp
from simzmq.linkcore import FEDERATION_RESYNC
from simzmq.notify import GROUPS, is_group_topic

log = logging.getLogger("simzmq.federation")

# The origin field of the control entries (their user is empty).
FORWARDED = b"fed"
RESYNC = FEDERATION_RESYNC  # the gates act on it (simzmq/linkcore.py)
# After a link (re)connects, wait this long before asking for a resync: the
# subscription travels to the peer meanwhile, so nothing published after the
# resync is missed.
SETTLE_S = 1.0
# How long a frame is remembered to drop its copy from the other broker of
# the pair: the two brokers' forwarding delays differ by far less (a copy
# later than this crosses twice; the gates push each inbox seq once). A
# frame published again is told apart by its link, not by this window.
WINDOW_S = 10.0
# At most this many frames remembered (the oldest forgotten first).
REMEMBER = 65536


FORWARDED_TOTAL = Counter("simzmq_federation_forwarded_total", "Peer notification frames brought into this region")
DUPLICATES_TOTAL = Counter("simzmq_federation_duplicates_total",
                           "Second copies (from the other broker of a peer pair) dropped")
MARKED_TOTAL = Counter("simzmq_federation_marked_total", "Frames that had crossed once already, dropped")
RESYNCS_TOTAL = Counter("simzmq_federation_resyncs_total", "Times the gates were asked to catch every group up")


def group_topics() -> list[bytes]:
    return [b"*%x\0" % g for g in range(GROUPS)]


def is_control(user: bytes) -> bool:
    """An entry for no user: a federation mark or a resync request."""
    return not user


class Link(NamedTuple):
    region: str    # the peer region's name
    endpoint: str  # one of its brokers' notify-out


class _Recent:
    __slots__ = ("until", "crossed", "arrived")

    def __init__(self, until: float, link: int) -> None:
        self.until = until          # forgotten after this
        self.crossed = 1            # times these bytes crossed (publications seen)
        self.arrived = {link: 1}    # link -> times these bytes came through it


class RecentFrames:
    """Which frames the peers brought lately, to tell the copy of one from
    the other broker of a pair from the same bytes published again. Each
    broker forwards each publication once, so the number of publications
    is the most times any one link of the pair brought the bytes; a frame
    crosses when its link brings it more often than that. Pure: time in."""

    def __init__(self, window_s: float, bound: int) -> None:
        self.window_s = window_s
        self.bound = bound
        self.frames: OrderedDict[bytes, _Recent] = OrderedDict()  # soonest forgotten first

    def first_time(self, key: bytes, link: int, now: float) -> bool:
        """Whether the frame `key` (its peer region's, see FederationCore)
        that `link` brought at `now` is a new one, not a copy."""
        frames = self.frames
        while frames and next(iter(frames.values())).until <= now:
            frames.popitem(last=False)
        recent = frames.get(key)
        if recent is None:
            frames[key] = _Recent(now + self.window_s, link)
            if len(frames) > self.bound:
                frames.popitem(last=False)
            return True
        arrived = recent.arrived[link] = recent.arrived.get(link, 0) + 1
        if arrived <= recent.crossed:
            return False
        recent.crossed = arrived
        recent.until = now + self.window_s
        frames.move_to_end(key)
        return True

    def __len__(self) -> int:
        return len(self.frames)


class FederationCore:
    """What to publish locally for what arrives from the peers. Pure: frames
    and the time in, messages ``[topic, packed]`` out."""

    def __init__(self, region: str, links: list[Link], settle_s: float = SETTLE_S,
                 window_s: float = WINDOW_S, remember: int = REMEMBER) -> None:
        self.region = region.encode()
        self.links = links
        self.settle_s = settle_s
        self.stamps: list[dict[bytes, tuple[bytes, int]]] = [{} for _ in links]
        self.recent = RecentFrames(window_s, remember)
        self.resync_due: dict[int, float] = {}  # link -> when to ask for a resync
        self.forwarded = 0
        self.duplicates = 0
        self.looped = 0
        self.resyncs = 0

    def on_link_up(self, link: int, now: float) -> None:
        """The link (re)connected: what was published while it was down is lost."""
        self.stamps[link].clear()
        self.resync_due[link] = now + self.settle_s

    def on_notification(self, link: int, frames: list[bytes], now: float) -> list[list[bytes]]:
        """``topic | stamp | packed`` from a peer broker; raises EnvelopeError
        for a malformed one."""
        if len(frames) != 3:
            raise EnvelopeError(f"notification of {len(frames)} frames")
        topic, stamp, packed = frames
        if not is_group_topic(topic):
            return []
        epoch, seq = unpack_stamp(stamp)
        entries = unpack_notices(packed)
        last = self.stamps[link].get(topic)
        self.stamps[link][topic] = (epoch, seq)
        if last is not None and (last[0] != epoch or seq != last[1] + 1):
            # Lost on the way from that broker: resync at once (the link is up).
            self.resync_due[link] = now
        if any(is_control(user) for user, _, _ in entries):
            self.looped += 1  # crossed once already (or a control entry): never again
            return []
        origin = self.links[link].region.encode()
        # The peer region in the key: the same bytes from another region are
        # not a copy.
        digest = hashlib.blake2b(origin + b"\0" + topic + packed, digest_size=16).digest()
        if not self.recent.first_time(digest, link, now):
            self.duplicates += 1
            return []
        self.forwarded += 1
        return [[topic, packed + pack_notices([(b"", FORWARDED, origin)])]]

    def tick(self, now: float) -> list[list[bytes]]:
        """The resync requests now due: one per group, for each peer region
        that may have lost notifications."""
        due = [link for link, at in self.resync_due.items() if at <= now]
        if not due:
            return []
        regions = sorted({self.links[link].region for link in due})
        for link in due:
            del self.resync_due[link]
        self.resyncs += 1
        entries = pack_notices([(b"", RESYNC, r.encode()) for r in regions])
        return [[topic, entries] for topic in group_topics()]

    def next_due(self) -> float | None:
        return min(self.resync_due.values(), default=None)

    def remembered(self) -> int:
        """Frames remembered now (to drop their copies)."""
        return len(self.recent)


def parse_peers(peers) -> list[Link]:
    """region.peers entries ``NAME@ENDPOINT`` (one per peer broker's notify-out)."""
    links = []
    for entry in peers:
        name, sep, endpoint = entry.partition("@")
        if not sep or not name or not endpoint:
            raise ValueError(f"region.peers entry {entry!r}: expected NAME@tcp://host:port")
        links.append(Link(name, endpoint))
    return links


# --- the process -----------------------------------------------------------------------


class FederationProcess:
    """The thin shell: one SUB per link, one PUB into the own brokers."""

    def __init__(self, cfg: Config, links: list[Link], configure_peer=None, configure_local=None) -> None:
        # links: cfg.region.peers parsed (parse_peers);
        # configure_peer(sock, link): CURVE client of the peer's brokers;
        # configure_local(sock): CURVE client (worker role) of our own.
        self.core = FederationCore(cfg.region.name, links)
        self.links = links
        self.notify_ins = [cfg.broker.primary.notify_in, cfg.broker.backup.notify_in]
        self.configure_peer = configure_peer
        self.configure_local = configure_local
        self.metrics_port = cfg.region.federation_metrics_port or None
        self.metrics_host = cfg.region.metrics_host
        self.exported: dict = {}
        self.running = True

    def stop(self, *_):
        self.running = False

    def _export(self) -> None:
        """The core's counts, as they rose since the last call, into the counters."""
        core = self.core
        for counter, value in ((FORWARDED_TOTAL, core.forwarded), (DUPLICATES_TOTAL, core.duplicates),
                               (MARKED_TOTAL, core.looped), (RESYNCS_TOTAL, core.resyncs)):
            rise = value - self.exported.get(counter, 0)
            if rise:
                counter.inc(rise)
                self.exported[counter] = value

    def run(self) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        from simzmq.zmqio import sender

        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 1000)
        pub.setsockopt(zmq.SNDHWM, 0)
        if self.configure_local is not None:
            self.configure_local(pub)
        for ep in self.notify_ins:
            pub.connect(ep)
        publish = sender(pub)
        subs, monitors = [], []
        poller = zmq.Poller()
        up_event = zmq.EVENT_HANDSHAKE_SUCCEEDED if self.configure_peer is not None else zmq.EVENT_CONNECTED
        for i, link in enumerate(self.links):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 100_000)
            if self.configure_peer is not None:
                self.configure_peer(sub, link)
            monitor = sub.get_monitor_socket(up_event | zmq.EVENT_DISCONNECTED)
            for topic in group_topics():
                sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(link.endpoint)
            subs.append(sub)
            monitors.append(monitor)
            poller.register(sub, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
        if self.metrics_port:
            from prometheus_client import start_http_server
            start_http_server(self.metrics_port, self.metrics_host)
        log.info("federation %s: from %s into %s, metrics %s", self.core.region.decode(),
                 ", ".join(f"{l.region} {l.endpoint}" for l in self.links), ",".join(self.notify_ins),
                 f"http://{self.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off")
        try:
            while self.running:
                due = self.core.next_due()
                now = time.monotonic()
                timeout = 200 if due is None else max(0, min(200, (due - now) * 1000))
                ready = dict(poller.poll(timeout))
                now = time.monotonic()
                for i, (sub, monitor) in enumerate(zip(subs, monitors)):
                    if monitor in ready:
                        while monitor.poll(0):
                            event = recv_monitor_message(monitor)["event"]
                            if event == up_event:
                                log.info("federation link to %s %s up", self.links[i].region, self.links[i].endpoint)
                                self.core.on_link_up(i, now)
                            elif event == zmq.EVENT_DISCONNECTED:
                                log.info("federation link to %s %s down", self.links[i].region,
                                         self.links[i].endpoint)
                    if sub in ready:
                        for _ in range(512):
                            try:
                                frames = sub.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            try:
                                out = self.core.on_notification(i, frames, now)
                            except EnvelopeError as exc:
                                log.info("dropped a malformed notification from %s: %s", self.links[i].endpoint, exc)
                                continue
                            for message in out:
                                publish(message)
                self._export()
                resync = self.core.tick(now)
                if resync:
                    log.info("a peer link may have lost notifications: the gates catch every group up")
                for message in resync:
                    publish(message)
        finally:
            for sock in subs + monitors + [pub]:
                sock.close(linger=0)
            log.info("federation stopped: %d forwarded, %d duplicates dropped, %d marked dropped, %d resyncs",
                     self.core.forwarded, self.core.duplicates, self.core.looped, self.core.resyncs)


def run(process: FederationProcess) -> None:
    signal.signal(signal.SIGTERM, process.stop)
    signal.signal(signal.SIGINT, process.stop)
    process.run()


# --- keys (bus CURVE on) ---------------------------------------------------------------


def peer_key_path(data_dir: Path, region: str) -> Path:
    """Where this region keeps a peer region's brokers' public key."""
    return keys_mod.bus_keys_dir(data_dir) / "peers" / f"{region}.key"


def peer_configurator(data_dir: Path, links: list[Link]):
    """``configure(sock, link)``: a CURVE client of the link's peer brokers,
    with this region's gate key (the role peers allow on notify-out)."""
    public, secret = keys_mod.load_bus_pair(data_dir, "gate")
    servers = {}
    for link in links:
        if link.region not in servers:
            path = peer_key_path(data_dir, link.region)
            if not path.exists():
                raise keys_mod.KeyFileError(
                    f"missing {path}: copy region {link.region}'s keys/bus/broker.key here "
                    f"(docs/deployment.md, 'Several regions')")
            servers[link.region] = keys_mod.read_curve_cert(path)[0]

    def configure(sock, link: Link) -> None:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = servers[link.region]

    return configure


def exchange_keys(data_a: Path, name_a: str, data_b: Path, name_b: str) -> None:
    """Let regions A and B (on one machine) federate with bus CURVE on: each
    gets the other's broker key as a peer key, and allows the other's gate
    key on its brokers (the running brokers read allow-lists on SIGHUP)."""
    for mine, theirs, their_name, my_name in ((data_a, data_b, name_b, name_a), (data_b, data_a, name_a, name_b)):
        target = peer_key_path(mine, their_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(keys_mod.bus_keys_dir(theirs) / "broker.key", target)
        shutil.copyfile(keys_mod.bus_keys_dir(mine) / "gate.key",
                        keys_mod.allow_dir(theirs, "gate") / f"region-{my_name}.key")
