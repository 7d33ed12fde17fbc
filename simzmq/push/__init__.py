"""The push service: tells the company's app server, over a webhook, about
messages for users who are not online, so it can wake their phones.

- policy.py: the decisions, pure (time and randomness passed in): who is
  online (from the gates' presence reports), which of a user's jobs become a
  call, retry or dead-letter by outcome, backoff with jitter, coalescing.
- webhook.py: the call's JSON body and its HMAC-SHA256 signature.
- service.py: the process (`simzmq push`), a thin shell: the store's outbox,
  the bus (wake-ups and presence), Tornado's HTTP client, metrics.
- echo.py: `simzmq webhook-echo`, a receiver that checks signatures.

docs/push.md is the operator's page; docs/internal-protocol.md describes
the wake-up and presence messages on the bus.
"""

# Topics on the broker's notification path (docs/internal-protocol.md). "!"
# is never in a user id and no gate subscribes to them, so they reach the
# push service only.
# The IM worker publishes [WAKE_TOPIC, due_ms (u64 big-endian)] after a
# commit that queued push jobs: the earliest of their due times.
WAKE_TOPIC = b"!push\0"
# Gates publish [PRESENCE_TOPIC, JSON report] (simzmq/push/policy.py).
PRESENCE_TOPIC = b"!presence\0"
