"""The webhook call's bytes: body, signature, headers (docs/push.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Simzmq-Signature"
DELIVERY_HEADER = "X-Simzmq-Delivery"


def encode_body(body: dict) -> bytes:
    """Compact UTF-8 JSON: the exact bytes that are signed and sent."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, body: bytes) -> str:
    """The X-Simzmq-Signature value: sha256=<hex HMAC-SHA256 of the body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(signature(secret, body), header)


def headers(secret: str, body: bytes, delivery: str) -> dict[str, str]:
    return {"Content-Type": "application/json", DELIVERY_HEADER: delivery, SIGNATURE_HEADER: signature(secret, body)}


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


def url_problem(url: str) -> str | None:
    """What `url` must be to serve as the webhook (it is not), or None.
    Plain http only to this machine: the body carries message previews."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "a URL whose port is a number from 1 to 65535"
    if any(c.isspace() for c in url):
        return "a URL without spaces"
    if parts.scheme == "http" and not is_loopback_url(url):
        return "https:// (plain http is allowed to a loopback address only)"
    return None
