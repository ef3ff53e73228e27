"""A stop ends `lifecycle run` within seconds, leaves no process of the run and no half-written record,
and the next run resumes: a real `lifecycle run` process, its own temporary Prefect server and Dask
cluster, SIGTERM to its process group (what `timeout`, systemd and Kubernetes send) mid-stage.

Marked slow: up to four runs of the lifecycle on a small sample.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

LIFECYCLE = str(Path(sys.executable).parent / "lifecycle")
# A stage starts when the one before it printed its line (the live status line is drawn only on a terminal).
BEFORE = {"embed": "validate", "train": "index", "deploy": "register"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(LIFECYCLE_HOME=str(home), LIFECYCLE_SERVING_PORT=str(port), PREFECT_HOME=str(home / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    return env


def _run(cwd: Path, env: dict[str, str], stop_in: str | None, timeout_s: float = 600.0):
    """Run `lifecycle run`; with `stop_in`, SIGTERM its process group once that stage has started.

    Returns (exit code, seconds from the signal to the exit, stdout, stderr, every process the run had).
    """
    out, err = cwd / "out.log", cwd / "err.log"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([LIFECYCLE, "run", "--rows", "1500"], cwd=cwd, env=env, stdout=o, stderr=e,
                                start_new_session=True)
    root = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline, signalled = time.monotonic() + timeout_s, None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            seen.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.Error:
            pass
        if stop_in and signalled is None and f"✓ {BEFORE[stop_in]}" in out.read_text():
            time.sleep(1.0)  # well inside the stage
            signalled = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"lifecycle run did not end within {timeout_s:.0f} s:\n{out.read_text()}\n{err.read_text()}")
    took = time.monotonic() - signalled if signalled else 0.0
    return proc.returncode, took, out.read_text(), err.read_text(), list(seen.values())


def _alive(processes: list[psutil.Process], within_s: float = 0.0) -> list[str]:
    """Command lines of the processes still running after up to `within_s` (multiprocessing's resource
    tracker, for one, ignores signals and exits when the pipe of the processes it served closes)."""
    if within_s > 0:
        psutil.wait_procs([p for p in processes if p.is_running()], timeout=within_s)
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    return left


def _records(home: Path, kind: str) -> list[Path]:
    return sorted((home / "lake" / "records" / kind).glob("*.json"))


def test_sigterm_mid_stage_stops_in_seconds_and_the_next_run_resumes(tmp_path):
    home, port = tmp_path / "home", _free_port()
    (home / "prefect").mkdir(parents=True)
    env = _env(home, port)
    try:
        for stage in ("embed", "train", "deploy"):
            code, took, out, err, processes = _run(tmp_path, env, stop_in=stage)
            assert code == 128 + signal.SIGTERM, out + err
            assert took <= 10.0, f"exit {took:.1f} s after SIGTERM during {stage}"
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) <= 2 and f"during {stage}" in err and "Traceback" not in err, err
            left = _alive(processes, within_s=max(0.5, 10.0 - took))  # all gone within 10 s of the signal
            assert not left, f"left running after a stop during {stage}: {left}"
            # What the stopped stage writes last, its record, is not there.
            kind = {"embed": "embeddings", "train": "model", "deploy": "deployment"}[stage]
            assert not _records(home, kind), f"a {kind} record after a stop during {stage}"
        code, _, out, err, _ = _run(tmp_path, env, stop_in=None)
        assert code == 0, out + err
        for stage in ("ingest", "validate", "embed", "index", "train", "register"):
            assert any(line.split()[1:3] == [stage, "cached"] for line in out.splitlines() if "✓" in line), out
        assert any(line.split()[1:3] == ["deploy", "ran"] for line in out.splitlines() if "✓" in line), out
    finally:
        subprocess.run([LIFECYCLE, "down"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
