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
from contextlib import suppress
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


def _pty_run(cwd: Path, env: dict[str, str], spec: Path, stop_when: bytes, timeout_s: float = 600.0):
    """`lifecycle run --spec` on a pseudo-terminal; Ctrl-C typed into it once `stop_when` is on the screen.

    The terminal sends SIGINT to its whole foreground process group, the CLI and every child it started
    there (the Dask workers included), as a user's Ctrl-C does. Returns (exit code, seconds from the
    keystroke to the exit, the screen's bytes, every process the run had).
    """
    import pty

    pid, master = pty.fork()
    if pid == 0:  # the child: a session of its own with the pty as its controlling terminal
        os.chdir(cwd)
        os.execve(LIFECYCLE, [LIFECYCLE, "run", "--spec", str(spec)], env)
    root = psutil.Process(pid)
    screen, seen, typed = b"", {}, None
    deadline = time.monotonic() + timeout_s
    os.set_blocking(master, False)
    status = None
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
            screen += chunk
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:  # EIO: the terminal's last writer is gone
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        try:
            seen.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.Error:
            pass
        if typed is None and stop_when in screen:
            time.sleep(1.0)
            typed = time.monotonic()
            os.write(master, b"\x03")
    else:
        os.killpg(pid, signal.SIGKILL)
        pytest.fail(f"lifecycle run did not end within {timeout_s:.0f} s:\n{screen.decode(errors='replace')}")
    with suppress(OSError):
        screen += os.read(master, 65536)
    os.close(master)
    took = time.monotonic() - typed if typed else 0.0
    return os.waitstatus_to_exitcode(status), took, screen, list(seen.values())


def test_ctrl_c_in_a_terminal_during_train_shows_rounds_then_one_line(tmp_path):
    """Ctrl-C typed on a terminal mid-train: the screen showed the round counter (never xgboost's
    "got rank" lines), then one line naming the stage; exit 130 within 10 s; nothing left running."""
    import re

    import yaml

    from lifecycle.sample import write_sample

    home, port = tmp_path / "home", _free_port()
    (home / "prefect").mkdir(parents=True)
    env = {**_env(home, port), "TERM": "xterm"}
    _, spec = write_sample(tmp_path / "data", rows=1500)
    raw = yaml.safe_load(spec.read_text())
    raw["train"] = {"num_boost_round": 100_000, "early_stopping_rounds": None}
    spec.write_text(yaml.safe_dump(raw))
    code, took, screen, processes = _pty_run(tmp_path, env, spec, stop_when=b"/100000 rounds")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert code == 128 + signal.SIGINT, text
    assert took <= 10.0, f"exit {took:.1f} s after Ctrl-C"
    assert re.search(r"train .*\d+/100000 rounds", text), text
    assert "got rank" not in text and "Traceback" not in text, text
    after = text[text.rfind("rounds"):]
    stop_lines = [line for line in after.splitlines() if "stopped" in line]
    assert len(stop_lines) == 1 and "during train" in stop_lines[0], after
    left = _alive(processes, within_s=max(0.5, 10.0 - took))
    assert not left, f"left running after Ctrl-C: {left}"
