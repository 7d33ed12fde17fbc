"""A Broker serving in a thread of the test process."""

from __future__ import annotations

import threading

from simzmq.broker import Broker

ANY = "tcp://127.0.0.1:*"


class BrokerThread:
    """Starts `Broker(**kw)` (random ports unless given) and waits until it has
    bound; `ep` holds the endpoints it bound, `error` what run() raised."""

    def __init__(self, start_timeout: float = 10.0, **kw):
        for name in ("frontend", "backend", "notify_in", "notify_out"):
            kw.setdefault(name, ANY)
        self.broker = Broker(install_signal_handlers=False, **kw)
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
