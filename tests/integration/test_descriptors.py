"""A gate whose descriptor limit is lower than max_connections refuses the
connections it has no descriptor for, cleanly, and keeps serving."""

from __future__ import annotations

import resource
import socket

import pytest

from simzmq.gate import FD_RESERVE, capped_by_descriptors
from simzmq.limits import LimitsConfig
from simzmq.wire import messages as m
from tests.rawclient import RawClient
from tests.region import Region

pytestmark = pytest.mark.timeout(120)

FD_LIMIT = 400


def test_cap_follows_the_descriptor_limit():
    limits = LimitsConfig(max_connections=20000)
    assert capped_by_descriptors(limits, 20000).max_connections == 20000 - FD_RESERVE
    assert capped_by_descriptors(limits, 100000).max_connections == 20000
    assert capped_by_descriptors(limits, 10).max_connections == 1


def test_gate_refuses_past_its_descriptors_and_keeps_serving(tmp_path):
    region = Region(tmp_path / "data")
    region.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    region.start()
    held = []
    try:
        cap = FD_LIMIT - FD_RESERVE
        for _ in range(cap + 40):
            held.append(socket.create_connection(("127.0.0.1", region.gate_port), timeout=10))
        # The ones past the cap are closed at once; nothing spins.
        closed = 0
        for s in held:
            s.settimeout(0.5)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 40
        for s in held:
            s.close()
        held.clear()
        c = RawClient(region.gate_port, region.gate_pk)
        assert isinstance(c.request(m.Ping(ts_ms=1)), m.Pong)
        c.close()
        assert "file descriptors allow" in region.read_log()
        assert "Too many open files" not in region.read_log()
    finally:
        for s in held:
            s.close()
        region.stop()
