"""A Broker serving in a thread of the test process."""

from __future__ import annotations

import threading

from simzmq.broker import Broker
from tests.configs import defaults, with_brokers

ANY = "tcp://127.0.0.1:*"
ENDPOINTS = ("frontend", "backend", "notify_in", "notify_out")


class BrokerThread:
    """Starts a Broker of `role` on the endpoints given (random ports for
    those not given), publishing its state on `state_pub` and following a
    peer's on `peer_state` (empty: none, it runs alone), and waits until it
    has bound; `ep` holds the endpoints it bound, `error` what run() raised.
    Other keyword arguments are [broker] settings (heartbeat_ms, ...)."""

    def __init__(self, start_timeout: float = 10.0, *, role: str = "primary", state_pub: str = "",
                 peer_state: str = "", context=None, configure_socket=None, auth_counts=None, **settings):
        mine = {name: settings.pop(name, ANY) for name in ENDPOINTS}
        mine["state"] = state_pub
        peer = {"state": peer_state}
        cfg = with_brokers(defaults(), *((mine, peer) if role == "primary" else (peer, mine)), **settings)
        self.broker = Broker(cfg.broker, role, context=context, configure_socket=configure_socket,
                             auth_counts=auth_counts, install_signal_handlers=False)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.broker.ready.wait(start_timeout):
            raise RuntimeError(f"broker did not start: {self.error!r}")
        self.ep = self.broker.bound

    def _run(self):
        try:
            self.broker.run()
        except Exception as exc:  # noqa: BLE001 — surfaced by the test
            self.error = exc

    def stop(self):
        self.broker.stop()
        self.thread.join(5)
