"""What a person does, the way they do it: `simzmq chat` in a terminal (a real
pseudo-terminal, so the password prompt and line discipline are the real
ones) and `simzmq history`, as processes against a real region found from
its data directory alone (no --port: the region runs on free ports)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.region import ROOT, Region, free_ports

pytestmark = pytest.mark.timeout(180)


class Terminal:
    """`python -m simzmq ARGS` on a pseudo-terminal of its own."""

    def __init__(self, *args: str):
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the command, never return into pytest
            try:
                # As a shell starts a foreground job: Ctrl-C interrupts it
                # (a test run started in the background has SIGINT ignored,
                # and exec keeps that).
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.chdir(ROOT)
                os.execv(sys.executable, [sys.executable, "-m", "simzmq", *args])
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.transcript = ""
        self.pos = 0  # where the next expect() starts looking
        self.returncode: int | None = None

    def _read(self, timeout: float) -> bool:
        # poll, not select: a long test run may have descriptors above 1024.
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child has gone and the terminal is closed
            return False
        if not data:
            return False
        self.transcript += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return True

    def expect(self, fragment: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            at = self.transcript.find(fragment, self.pos)
            if at >= 0:
                self.pos = at + len(fragment)
                return self.transcript[at:self.transcript.find("\n", at)]
            if time.monotonic() > deadline or not self._read(0.2):
                raise AssertionError(f"never saw {fragment!r}; the terminal shows:\n{self.transcript[-3000:]}")

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def count(self, fragment: str) -> int:
        return self.transcript.count(fragment)

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"still running; the terminal shows:\n{self.transcript[-3000:]}")
            self._read(0.1)
        while self._read(0):  # what it printed last
            pass
        os.close(self.fd)
        return self.returncode

    def close(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.returncode = -9
            os.close(self.fd)


def chat_in_terminal(region: Region, user: str, password: str) -> Terminal:
    term = Terminal("chat", "--data", str(region.data_dir), "--user", user, "--register")
    term.expect(f"Password for {user}:")
    term.type(password)
    term.expect("Again:")
    term.type(password)
    term.expect(f"logged in as {user}")
    return term


def simzmq(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simzmq", *args], input=input_text, capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT),
                          stdin=subprocess.DEVNULL if input_text is None else None)


def test_the_readme_walkthrough_in_two_terminals(tmp_path):
    with Region(tmp_path / "data") as region:
        alice = chat_in_terminal(region, "alice", "alice's secret")
        bob = chat_in_terminal(region, "bob", "bob's secret")
        try:
            assert "registered alice" in alice.transcript
            alice.type("/to bob")
            alice.expect("talking to bob")
            alice.type("hello bob")
            alice.expect("-> bob: hello bob")
            bob.expect("<- alice: hello bob")
            # bob looks at the conversation: alice sees the read receipt.
            bob.type("/to alice")
            bob.expect("talking to alice")
            alice.expect("bob read your messages up to")
            # With the conversation open, what arrives is read as it arrives.
            alice.type("are you there?")
            bob.expect("<- alice: are you there?")
            alice.expect("bob read your messages up to")
            bob.type("hi alice")
            alice.expect("<- bob: hi alice")
            alice.type("/convs")
            alice.expect("bob")
            alice.type("/quit")
            # bob leaves with Ctrl-C: the terminal's interrupt, a quiet exit
            # with the status of an interrupted program.
            os.write(bob.fd, b"\x03")
            assert alice.wait() == 0 and bob.wait() == 130
        finally:
            alice.close()
            bob.close()
        assert "Aborted" not in bob.transcript and "Traceback" not in bob.transcript, bob.transcript
        for line in ("-> bob: hello bob", "-> bob: are you there?", "<- bob: hi alice"):
            assert alice.count(line) == 1, alice.transcript
        # The password never showed on the screen.
        assert "secret" not in alice.transcript and "secret" not in bob.transcript


def test_each_message_is_shown_once_across_a_broker_failover(tmp_path):
    with Region(tmp_path / "data") as region:
        alice = chat_in_terminal(region, "alice", "pw-alice")
        bob = chat_in_terminal(region, "bob", "pw-bob")
        try:
            alice.type("/to bob")
            alice.expect("talking to bob")
            for i in range(5):
                alice.type(f"before {i}")
            alice.expect("-> bob: before 4")
            os.kill(region.pid("broker-primary"), signal.SIGKILL)
            for i in range(5):
                alice.type(f"after {i}")
            for i in range(5):
                bob.expect(f"<- alice: after {i}", timeout=60)
            alice.expect("-> bob: after 4", timeout=60)
            alice.type("/quit")
            assert alice.wait() == 0
        finally:
            alice.close()
            bob.close()
        for when in ("before", "after"):
            for i in range(5):
                assert alice.count(f"-> bob: {when} {i}") == 1, alice.transcript
                assert bob.count(f"<- alice: {when} {i}") == 1, bob.transcript


def test_chat_says_why_it_cannot_start_and_exits_non_zero(tmp_path):
    with Region(tmp_path / "data") as region:
        data = str(region.data_dir)
        made = simzmq("chat", "--data", data, "--user", "alice", "--register", input_text="right\n/quit\n")
        assert made.returncode == 0 and "registered alice" in made.stdout, made.stdout + made.stderr
        wrong = simzmq("chat", "--data", data, "--user", "alice", input_text="wrong\n/quit\n")
        assert wrong.returncode == 1 and "login refused: auth_failed" in wrong.stdout
        # The gate does not say whether the user exists; the chat says what may be wrong.
        nobody = simzmq("chat", "--data", data, "--user", "nobody", input_text="pw\n/quit\n")
        assert nobody.returncode == 1 and "(a new user needs --register)" in nobody.stdout
        for password_input in (None, "\n"):  # stdin empty, or an empty line
            empty = simzmq("chat", "--data", data, "--user", "carol", "--register", input_text=password_input)
            assert empty.returncode != 0 and "empty password" in empty.stderr
            assert "Traceback" not in empty.stderr + empty.stdout
        (nowhere,) = free_ports(1)
        gone = simzmq("chat", "--data", data, "--user", "alice", "--port", str(nowhere), input_text="right\n")
        assert gone.returncode == 1 and f"cannot reach the gate at 127.0.0.1:{nowhere}" in gone.stderr
        # carol was never created.
        history = simzmq("history", "--data", data, "--user", "carol", "alice", input_text="x\n")
        assert history.returncode != 0 and "auth_failed" in history.stderr
    # A region that is not running: the command says so, once.
    down = simzmq("chat", "--data", data, "--user", "alice", input_text="right\n")
    assert down.returncode == 1 and "cannot reach the gate" in down.stderr and "no region is running" in down.stderr
    assert "Traceback" not in down.stdout + down.stderr


def test_history_of_a_conversation(tmp_path):
    with Region(tmp_path / "data") as region:
        data = str(region.data_dir)
        bob = simzmq("chat", "--data", data, "--user", "bob", "--register", input_text="pw-bob\n/quit\n")
        assert bob.returncode == 0, bob.stdout + bob.stderr
        alice = simzmq("chat", "--data", data, "--user", "alice", "--register",
                       input_text="pw-alice\n/to bob\nfirst\nsecond\nthird\n/quit\n")
        assert alice.returncode == 0 and "-> bob: third" in alice.stdout, alice.stdout + alice.stderr

        def history(user, password, *args):
            out = simzmq("history", "--data", data, "--user", user, *args, input_text=password + "\n")
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout

        lines = history("alice", "pw-alice", "bob").splitlines()
        assert [line.split(": ", 1)[1] for line in lines] == ["first", "second", "third"]
        assert all("-> bob" in line for line in lines)
        assert [line.split(": ", 1)[1] for line in history("bob", "pw-bob", "alice").splitlines()] == \
            ["first", "second", "third"]

        page = json.loads(history("alice", "pw-alice", "bob", "--json"))
        assert [m["sender"] for m in page["messages"]] == ["alice"] * 3 and page["more"] is False
        ids = [m["msg_id"] for m in page["messages"]]  # newest first, as the API gives them

        newest = history("alice", "pw-alice", "bob", "--limit", "2").splitlines()
        assert [line.split(": ", 1)[1] for line in newest[:2]] == ["second", "third"]
        assert newest[2] == f"(older messages: --before {ids[1]})"
        older = history("alice", "pw-alice", "bob", "--before", str(ids[1])).splitlines()
        assert [line.split(": ", 1)[1] for line in older] == ["first"]

        assert history("alice", "pw-alice", "nobody-here") == "no messages\n"

        wrong = simzmq("history", "--data", data, "--user", "alice", "bob", input_text="nope\n")
        assert wrong.returncode != 0 and "auth_failed" in wrong.stderr and "first" not in wrong.stdout
        bad = simzmq("history", "--data", data, "--user", "alice", "bob", "--limit", "1000",
                     input_text="pw-alice\n")
        assert bad.returncode != 0 and "1000" in bad.stderr
