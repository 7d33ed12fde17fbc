"""What a gate says when it starts: a port it cannot have ends it with one
clear line and a non-zero exit; the descriptor warning only when true."""

from __future__ import annotations

import logging
import socket

import pytest

from simzmq import gate as gate_mod
from simzmq.limits import LimitsConfig
from tests.region import free_ports
from tests.configs import defaults
from tests.unit.test_fuzz_gate import GATE_SK


@pytest.mark.parametrize("taken", ["tcp", "http"])
def test_a_taken_port_ends_the_gate_with_one_line(taken, caplog):
    tcp_port, http_port = free_ports(2)
    holder = socket.socket()
    holder.bind(("127.0.0.1", tcp_port if taken == "tcp" else http_port))
    holder.listen()
    try:
        with caplog.at_level(logging.INFO, logger="simzmq.gate"), pytest.raises(SystemExit) as exit_:
            gate_mod.run("g1", defaults(), GATE_SK, tcp_port, http_port)
    finally:
        holder.close()
    assert exit_.value.code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    line = errors[0].getMessage()
    port = tcp_port if taken == "tcp" else http_port
    assert f"127.0.0.1:{port}" in line and "in use" in line, line
    assert not any("listening" in r.getMessage() for r in caplog.records)


def test_descriptor_warning_only_when_max_connections_does_not_fit(caplog):
    with caplog.at_level(logging.WARNING, logger="simzmq.gate"):
        fits = gate_mod.capped_by_descriptors(LimitsConfig(max_connections=1000), 1000 + gate_mod.FD_RESERVE)
    assert fits.max_connections == 1000 and not caplog.records
    with caplog.at_level(logging.WARNING, logger="simzmq.gate"):
        capped = gate_mod.capped_by_descriptors(LimitsConfig(max_connections=1000), 1000)
    assert capped.max_connections == 1000 - gate_mod.FD_RESERVE
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"gate.limits.max_connections 1000 does not fit: the descriptor limit is 1000 and the "
                           f"gate keeps {gate_mod.FD_RESERVE} for itself, so it holds at most "
                           f"{1000 - gate_mod.FD_RESERVE} connections; give it {1000 + gate_mod.FD_RESERVE} "
                           f"descriptors"), line


def test_the_default_max_connections_follows_the_descriptor_limit_without_a_warning(caplog):
    default = gate_mod.DEFAULT_MAX_CONNECTIONS
    with caplog.at_level(logging.INFO, logger="simzmq.gate"):
        capped = gate_mod.capped_by_descriptors(LimitsConfig(), default)
    assert capped.max_connections == default - gate_mod.FD_RESERVE
    assert caplog.records == []
    # The gate's "listening" line says what the ceiling came to.
    assert gate_mod.connection_ceiling(LimitsConfig(), capped) == (
        f"up to {default - gate_mod.FD_RESERVE} connections (what {default} file descriptors allow)")
    assert gate_mod.connection_ceiling(LimitsConfig(), LimitsConfig()) == f"up to {default} connections"
