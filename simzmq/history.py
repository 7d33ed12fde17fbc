"""`simzmq history`: a person's conversation from the gate's HTTP history API.

The API (protocol.md section 6) wants a resume token as a bearer credential;
a person has a password. So the command logs in over the client protocol like
the chat does, takes the session's resume token, asks
``GET /v1/history/{peer}`` with it, and logs out again, which revokes the
token: none is left behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from simzmq.chat import GateAddress, failure, format_body
from simzmq.client import Client, RequestError
from simzmq.wire.errors import ProtocolError

HTTP_TIMEOUT_S = 15.0
# A device name of its own, so that logging in here does not replace the
# person's chat session (a Login on the same device would).
DEVICE = "history"


class HistoryError(Exception):
    """What went wrong, as one line for a person."""


def history_url(gate: GateAddress, peer: str, before: int, limit: int) -> str:
    query = urllib.parse.urlencode({"before": before, "limit": limit})
    return (f"{gate.http_scheme}://{gate.http_host}:{gate.http_port}/v1/history/"
            f"{urllib.parse.quote(peer, safe='')}?{query}")


def fetch_page(url: str, token: bytes, cafile: str | None = None) -> dict:
    """One page of history as the API returns it; HistoryError for anything
    but a 200 with JSON."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.hex()}"})
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") and cafile else None
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")
        try:
            parsed = json.loads(detail)
            detail = f"{parsed.get('error')}: {parsed.get('reason', '')}".rstrip(": ")
        except (ValueError, AttributeError):
            pass
        raise HistoryError(f"the gate answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HistoryError(f"cannot reach the gate's HTTP API at {url.split('/v1/')[0]}: {reason}") from None
    try:
        page = json.loads(body)
    except ValueError:
        page = None
    if not isinstance(page, dict) or not isinstance(page.get("messages"), list) or "more" not in page:
        raise HistoryError("the gate's answer is not a history page")
    return page


def format_page(page: dict, me: str) -> list[str]:
    """The page's messages oldest first, one line each, then how to go back
    further if there is more."""
    messages = list(reversed(page["messages"]))  # the API gives newest first
    if not messages:
        return ["no messages"]
    lines = []
    for msg in messages:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(msg["ts_ms"] / 1000))
        arrow = f"-> {msg['to']}" if msg["sender"] == me else f"<- {msg['sender']}"
        body = format_body(msg["kind"], base64.b64decode(msg["body"]))
        lines.append(f"[{when}] #{msg['msg_id']} {arrow}: {body}")
    if page["more"]:
        lines.append(f"(older messages: --before {messages[0]['msg_id']})")
    return lines


async def run_history(gate: GateAddress, user: str, password: str, peer: str, *, before: int, limit: int,
                      as_json: bool, cafile: str | None = None,
                      out: Callable[[str], None] = print) -> None:
    """Log in, print one page of the conversation with ``peer``, log out.
    Raises HistoryError."""
    client = Client(gate.host, gate.port, gate.gate_pk, user, password, DEVICE, reconnect=False,
                    ping_interval=None)
    try:
        try:
            await client.login()
        except (RequestError, ProtocolError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
            raise HistoryError(failure(exc, gate.host, gate.port)) from None
        url = history_url(gate, peer, before, limit)
        page = await asyncio.to_thread(fetch_page, url, client.token, cafile)
        try:
            await client.logout()
        except (RequestError, ConnectionError):
            pass  # the token expires by itself; the page is what was asked for
    finally:
        await client.close()
    if as_json:
        out(json.dumps(page, indent=2))
    else:
        for line in format_page(page, user):
            out(line)
