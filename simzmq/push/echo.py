"""`simzmq webhook-echo`: a small webhook receiver for trying the push
service out. It checks each call's signature, prints the call as one JSON
line on stdout, and answers 200 (401 for a bad signature), or the status
it was told to. A repeated X-Simzmq-Delivery is answered the same and
marked "repeat": true (a receiver drops those)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

import tornado.web

from simzmq.push import webhook

log = logging.getLogger("simzmq.webhook-echo")


class HookHandler(tornado.web.RequestHandler):
    def initialize(self, secret: str, status: int, seen: set, out) -> None:
        self.secret = secret
        self.status = status
        self.seen = seen
        self.out = out

    def post(self, *_):
        body = self.request.body
        signed = webhook.signature_ok(self.secret, body, self.request.headers.get(webhook.SIGNATURE_HEADER))
        delivery = self.request.headers.get(webhook.DELIVERY_HEADER)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode("utf-8", "replace")
        record = {"delivery": delivery, "signature_ok": signed, "repeat": delivery in self.seen, "body": parsed}
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        if not signed:
            self.set_status(401)
            self.finish("bad signature\n")
            return
        self.seen.add(delivery)
        self.set_status(self.status)
        self.finish()


def make_app(secret: str, status: int = 200, out=None) -> tornado.web.Application:
    return tornado.web.Application([(r"/.*", HookHandler, {"secret": secret, "status": status, "seen": set(),
                                                            "out": out or sys.stdout})])


def run(host: str, port: int, secret: str, status: int) -> None:
    async def main():
        server = make_app(secret, status).listen(port, host)
        log.info("webhook-echo listening on http://%s:%d/ (answering %d to correctly signed calls)",
                 host, port, status)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()
        log.info("webhook-echo stopped")
    asyncio.run(main())
