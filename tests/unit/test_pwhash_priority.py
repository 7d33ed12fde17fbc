"""The password threads run at a lower CPU priority than the request loop."""

import os
import threading

import pytest

from simzmq.im import lower_thread_priority


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priorities here")
def test_only_the_calling_thread_runs_lower():
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def worker():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        lower_thread_priority(5)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        lower_thread_priority(100)  # capped at the lowest priority there is
        seen["last"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["delta"] == min(5, 19 - main_before)
    assert seen["last"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_zero_changes_nothing():
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    lower_thread_priority(0)
    assert os.getpriority(os.PRIO_PROCESS, tid) == before
