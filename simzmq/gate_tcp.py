"""Client connections over TCP: an asyncio protocol per connection.

Bytes read go into a FrameDecoder and each complete frame's payload to the
connection's session (gate_session.ClientConnection). Frames the session
writes during one turn of the event loop, replies and pushes alike, are
joined and handed to the socket in one transport.write at the end of that
turn: one `Flusher` per gate, one call_soon per turn for every connection
that wrote.

Reading stops (transport.pause_reading) while any of these holds, and
resumes when none does:
  - the session is `paused`: it has max_pending_requests with the back
    end, or a Sync or Convs whose reply is not in yet (one at a time);
  - more than pause_reading_bytes wait in the socket's write buffer
    (pause_writing/resume_writing, limits at exactly that many bytes): a
    client that asks and never reads would make the back end produce replies
    only to pile them up here;
  - FRAMES_PER_TURN frames, or BYTES_PER_TURN bytes of them, were served
    this turn and more are buffered: the rest wait for the next turn, so one
    busy client, or one sending large frames, cannot keep the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from simzmq.gate_session import BACKPRESSURE, CLOSED, ClientConnection, SlowConsumer, inc, turn_used
from simzmq.wire.errors import ProtocolError
from simzmq.wire.frames import FrameDecoder
from simzmq.wire.handshake import MAX_HANDSHAKE_FRAME

# Bytes read from a client socket at once, into one buffer all connections
# share (a read is handed over before the next one starts). It bounds what a
# connection holds between frames (this plus one partial frame), which over
# many connections is most of a busy gate's memory; a large frame simply
# takes several reads.
READ_CHUNK = 16384
# Connections a listener lets wait to be accepted.
LISTEN_BACKLOG = 1024

_LENGTH = struct.Struct(">I").pack
_read_view = memoryview(bytearray(READ_CHUNK))


class Flusher:
    """Writes what each connection queued this turn, once, at the end of it."""

    def __init__(self, loop):
        self.loop = loop
        self.dirty: list[GateProtocol] = []

    def mark(self, proto: "GateProtocol") -> None:
        if not self.dirty:
            self.loop.call_soon(self.flush)
        self.dirty.append(proto)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for proto in dirty:
            proto.flush()


class GateProtocol(asyncio.BufferedProtocol):
    """One TCP client; the session's transport port (see gate_session)."""

    def __init__(self, gate, flusher: Flusher):
        self.gate = gate
        self.flusher = flusher
        self.transport = None
        self.conn: ClientConnection | None = None
        self.address: str | None = None  # set once admitted: released when the connection ends
        self.decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self.out: list[bytes] = []  # frames of this turn, length prefixes and payloads
        self.out_bytes = 0
        self.dirty = False
        self.closing = False
        self.lost = False
        self.reading = True
        self.writing_paused = False
        self.draining = False  # a turn of buffered frames is scheduled
        self.backstop = gate.cfg.max_outbound_bytes + gate.max_frame + 1024
        self._linger = None

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport) -> None:
        gate = self.gate
        self.transport = transport
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else str(peer or "")
        if not gate.admit(ip):
            self.closing = True
            transport.close()
            return
        self.address = ip
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        behind = gate.limiter.cfg.pause_reading_bytes
        transport.set_write_buffer_limits(high=behind, low=behind)
        self.conn = gate.connection_started(self, f"{ip}:{peer[1]}" if isinstance(peer, tuple) else ip, ip)

    def get_buffer(self, sizehint: int):
        return _read_view

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if conn is None or conn.state == CLOSED:
            return  # refused, or a lingering close: dropped
        try:
            self.decoder.append(_read_view[:nbytes])
        except ProtocolError as exc:
            conn.bad_input(type(exc).__name__, str(exc))
            return
        self._serve()

    def eof_received(self):
        # The peer is gone: what it still sent is not worth serving. Returning
        # nothing closes the transport once what was written has gone out.
        self.flush()
        return None

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.conn is not None and self.conn.state != CLOSED:
            inc(BACKPRESSURE, "behind")
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._next_turn()

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.out = []
        self.out_bytes = 0
        if self._linger is not None:
            self._linger.cancel()
        if self.address is not None:
            self.gate.connection_ended(self.conn, self.address)
            self.address = None

    # -- reading -----------------------------------------------------------------

    def _serve(self) -> None:
        """Serve the buffered frames, one at a time: the frame limit rises
        when the handshake completes, which may be in the middle of a read,
        and each frame may pause reading."""
        conn = self.conn
        frames = nbytes = 0
        try:
            while conn.state != CLOSED and not conn.paused and not self.writing_paused:
                if turn_used(frames, nbytes):
                    self._next_turn()
                    break
                payload = self.decoder.next_payload()
                if payload is None:
                    break
                frames += 1
                nbytes += len(payload)
                conn.payload_received(payload)
        except ProtocolError as exc:
            conn.bad_input(type(exc).__name__, str(exc))
        except Exception:
            self.gate.log_throttled("internal", "connection %s failed", conn.peer, level=logging.ERROR,
                                    exc_info=True)
            conn.close("internal error")
        self._update_reading()

    def _next_turn(self) -> None:
        if not self.draining and not self.lost:
            self.draining = True
            self.gate.loop.call_soon(self._turn)

    def _turn(self) -> None:
        self.draining = False
        if not self.lost and self.conn is not None and self.conn.state != CLOSED:
            self._serve()

    def _update_reading(self) -> None:
        conn = self.conn
        if self.lost or conn is None:
            return
        if conn.state == CLOSED:
            want = self.closing  # lingering: read what the peer still sends, and drop it
        else:
            want = not (conn.paused or self.writing_paused or self.draining)
        if want == self.reading or self.transport.is_closing():
            return
        self.reading = want
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    # -- the session's transport port -----------------------------------------

    def pause_changed(self) -> None:
        if self.conn.paused:
            self._update_reading()
        else:
            self._next_turn()  # frames already buffered are served first

    def set_max_frame(self, n: int) -> None:
        self.decoder.max_frame = n

    def queued(self) -> int:
        if self.lost:
            return 0
        return self.out_bytes + self.transport.get_write_buffer_size()

    def write_payloads(self, payloads) -> None:
        if self.closing or self.lost:
            return
        size = sum(len(p) + 4 for p in payloads)
        if self.queued() + size > self.backstop:
            raise SlowConsumer()  # the backstop; the session checks long before
        out = self.out
        for p in payloads:
            out.append(_LENGTH(len(p)))
            out.append(p)
        self.out_bytes += size
        if not self.dirty:
            self.dirty = True
            self.flusher.mark(self)

    def flush(self) -> None:
        self.dirty = False
        if not self.out:
            return
        data = b"".join(self.out)
        self.out = []
        self.out_bytes = 0
        if not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """A lingering close: what was written (a Kick, a final Ok) goes out
        first, then the write side shuts, so the peer reads it all and then
        EOF, while what the peer still sends is read and dropped (closing a
        socket with unread input would reset the connection and could destroy
        the Kick before the peer reads it). The socket closes when the peer
        closes its side, or after close_linger_s at the latest: a peer that
        does not read cannot keep its queue alive."""
        if self.closing or self.lost:
            return
        self.closing = True
        transport = self.transport
        if transport.is_closing():
            return
        cfg = self.gate.limiter.cfg
        if self.queued() > cfg.slow_consumer_min_bytes:
            # A peer this far behind is not reading: lingering would only
            # hold its queue. Closed at once, the memory goes now.
            self.out = []
            self.out_bytes = 0
            transport.abort()
            return
        self.flush()
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered has gone out
        self._linger = self.gate.call_later(cfg.close_linger_s, transport.abort)
        self._update_reading()


async def listen(gate, host: str, port: int):
    """The client listener (an asyncio Server); OSError if it cannot bind."""
    loop = gate.loop
    flusher = Flusher(loop)
    return await loop.create_server(lambda: GateProtocol(gate, flusher), host, port,
                                    backlog=LISTEN_BACKLOG, reuse_address=True)
