"""Helper processes of `lifecycle up`: started in their own group, stopped by group, never a stranger's PID."""

from __future__ import annotations

import os
import sys
import time

import pytest

from lifecycle.errors import LifecycleError
from tasks.processes import Started, is_running, start_process, stop_process, wait_http

SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
           "'import time; time.sleep(60)']); time.sleep(60)"]


def test_a_group_is_started_and_stopped_with_its_children(tmp_path):
    proc = start_process("sleeper", SLEEPER, env={}, log=tmp_path / "logs" / "sleeper.log")
    assert is_running(proc) and proc.create_time > 0
    assert stop_process(proc, grace_s=5)
    assert not is_running(proc)
    assert not stop_process(proc)  # already stopped: nothing to do


def test_a_recycled_pid_is_not_ours(tmp_path):
    proc = start_process("sleeper", SLEEPER, env={}, log=tmp_path / "sleeper.log")
    stranger = Started(name="old", pid=proc.pid, create_time=proc.create_time - 1, log=proc.log)
    try:
        assert not is_running(stranger) and not stop_process(stranger)
        assert is_running(proc)  # left alone
    finally:
        stop_process(proc, grace_s=5)


def test_a_server_that_dies_at_start_up_fails_at_once_with_its_log(tmp_path):
    proc = start_process("broken", [sys.executable, "-c", "raise SystemExit('port already in use')"], env={},
                         log=tmp_path / "broken.log")
    with pytest.raises(LifecycleError, match="broken exited during start-up") as err:
        wait_http(proc, "http://127.0.0.1:9/health", timeout_s=30)
    assert "port already in use" in str(err.value)


def test_a_descendant_in_a_session_of_its_own_is_stopped_with_the_tree(tmp_path):
    import psutil

    escaper = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)"]
    proc = start_process("escaper", escaper, env={}, log=tmp_path / "escaper.log")
    leader = psutil.Process(proc.pid)
    deadline = time.monotonic() + 20
    while not leader.children() and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = leader.children()
    assert os.getpgid(child.pid) != proc.pid  # out of the group: killpg alone would miss it
    assert stop_process(proc, grace_s=5)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
