"""The simzmq command as an operator and a person use it: up (pid files,
restarts, clean stop), keys, user add with closed registration, and two
`simzmq chat` processes talking with read receipts."""

from __future__ import annotations

import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from simzmq.client import Connection, RequestError
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode
from tests.region import ROOT, Region, free_ports

pytestmark = pytest.mark.timeout(120)


def simzmq(*args, input_text=None, env=None):
    return subprocess.run([sys.executable, "-m", "simzmq", *args], input=input_text, capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(ROOT))


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_keys_makes_a_private_key_and_shows_the_public_one(tmp_path):
    out = simzmq("keys", "--data", str(tmp_path))
    assert out.returncode == 0, out.stderr
    pub = (tmp_path / "keys" / "gate.pub").read_text().strip()
    assert len(pub) == 64 and pub in out.stdout
    assert stat.S_IMODE((tmp_path / "keys" / "gate.key").stat().st_mode) == 0o600
    # Run again: the same key, not a new one.
    assert simzmq("keys", "--data", str(tmp_path)).stdout == out.stdout


def test_up_supervises_and_stops_cleanly(tmp_path):
    region = Region(tmp_path / "data", workers=2).start()
    try:
        run_dir = tmp_path / "data" / "run"
        names = {"broker-primary", "broker-backup", "im-1", "im-2", "gate-1"}
        assert {p.stem for p in run_dir.glob("*.pid")} == names | {"up"}
        pids = {n: region.pid(n) for n in names}
        for pid in pids.values():
            os.kill(pid, 0)  # alive
        # A worker that dies is restarted, under a new pid.
        os.kill(pids["im-1"], signal.SIGKILL)
        wait_for(lambda: region.pid("im-1") != pids["im-1"])
        new_worker = region.pid("im-1")
        os.kill(new_worker, 0)
        assert "im-1" in region.read_log() and "restarting" in region.read_log()
        # A second region on the same data directory refuses to start.
        second = simzmq("up", "--data", str(tmp_path / "data"))
        assert second.returncode != 0 and "already running" in second.stderr and "down --data" in second.stderr
    finally:
        code = region.stop()
    assert code == 0
    assert list(run_dir.glob("*.pid")) == []
    for pid in list(pids.values()) + [new_worker]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log = region.read_log()
    assert "region stopped" in log and "gate gate-1 stopped" in log


def test_user_add_with_closed_registration(tmp_path):
    data = tmp_path / "data"
    out = simzmq("user", "add", "dora", "--data", str(data), "--password-stdin", input_text="s3cret\n")
    assert out.returncode == 0, out.stderr
    again = simzmq("user", "add", "dora", "--data", str(data), "--password-stdin", input_text="x\n")
    assert again.returncode != 0 and "exists" in again.stderr
    bad = simzmq("user", "add", "no way", "--data", str(data), "--password-stdin", input_text="x\n")
    assert bad.returncode != 0 and "user ids" in bad.stderr
    region = Region(data)
    region.argv.append("--closed-registration")
    region.start()
    try:
        import asyncio

        async def main():
            conn = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
            with pytest.raises(RequestError) as err:
                await conn.request(m.Register(user="eve", password="pw"))
            assert err.value.code == ErrorCode.FORBIDDEN
            ok = await conn.request(m.Login(user="dora", password="s3cret", token=b"", device=""))
            assert ok.user == "dora"
            conn.close()
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        region.stop()


class ChatProcess:
    def __init__(self, region: Region, user: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simzmq", "chat", "--data", str(region.data_dir), "--port",
             str(region.gate_port), "--user", user, "--register"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            cwd=str(ROOT))
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.type(f"pw-{user}")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def type(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, fragment: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if fragment in line:
                return line
        raise AssertionError(f"never saw {fragment!r}; saw {self.seen}")

    def quit(self):
        self.type("/quit")
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_two_people_chat_with_read_receipts(tmp_path):
    with Region(tmp_path / "data") as region:
        alice = ChatProcess(region, "alice")
        bob = ChatProcess(region, "bob")
        try:
            alice.expect("logged in as alice")
            bob.expect("logged in as bob")
            bob.type("/to alice")
            bob.expect("talking to alice")
            alice.type("/to bob")
            alice.expect("talking to bob")
            alice.type("hello bob")
            bob.expect("<- alice: hello bob")
            # bob is looking at the conversation, so it is marked read and alice sees the receipt.
            alice.expect("bob read your messages")
            bob.type("hi alice")
            alice.expect("<- bob: hi alice")
            alice.type("/convs")
            alice.expect("bob")
        finally:
            alice.quit()
            bob.quit()
        assert alice.proc.returncode == 0 and bob.proc.returncode == 0


def test_chat_and_history_without_a_region_say_so_before_asking_for_a_password(tmp_path):
    data = tmp_path / "data"
    assert simzmq("keys", "--data", str(data)).returncode == 0  # a region ran here once
    port = free_ports(1)[0]  # nothing listens on it
    for args in (["chat", "--user", "ann"], ["history", "--user", "ann", "bob"]):
        out = simzmq(*args, "--data", str(data), "--port", str(port), input_text="")
        assert out.returncode == 1
        line = out.stderr.strip()
        assert line.startswith(f"Error: cannot reach the gate at 127.0.0.1:{port}: Connection refused (no region "
                               f"is running from {data}: `"), line
        assert line.endswith(f"simzmq up --data {data}` starts one)") and "\n" not in line, line
        assert "password" not in (out.stdout + out.stderr).lower()
