"""A stop ends `lifecycle run` within seconds, leaves no process of the run and no half-written record,
and the next run resumes: a real `lifecycle run` process, its own temporary Prefect server and Dask
cluster, SIGTERM to its process group (what `timeout`, systemd and Kubernetes send) mid-stage.

Ingest and validate take well under a second on the small sample, so they are stopped in a lifecycle of
their own on a generated version large enough for each to run for seconds (no text column: no embedding).

Marked slow: eight runs of the lifecycle, four on the small sample and four on the large version.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

LIFECYCLE = str(Path(sys.executable).parent / "lifecycle")
# A stage starts when the one before it printed its line (the live status line is drawn only on a terminal);
# ingest, the first, when its first Parquet part appears in the table's location.
BEFORE = {"validate": "ingest", "embed": "validate", "train": "index", "deploy": "register"}
KINDS = {"ingest": "dataset", "validate": "validation", "embeddings": "embeddings", "embed": "embeddings",
         "train": "model", "deploy": "deployment"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(LIFECYCLE_HOME=str(home), LIFECYCLE_SERVING_PORT=str(port), PREFECT_HOME=str(home / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    return env


def _started(stage: str, out: str, home: Path) -> bool:
    if stage == "ingest":
        return any((home / "lake" / "datasets").glob("*/part-*.parquet"))
    return f"✓ {BEFORE[stage]}" in out


def _run(cwd: Path, env: dict[str, str], stop_in: str | None, args: tuple[str, ...] = ("--rows", "1500"),
         timeout_s: float = 600.0, command: str = "run", stop_when: Callable[[str], bool] | None = None,
         settle_s: float = 1.0):
    """Run `lifecycle <command>`; with `stop_in`, SIGTERM its process group once that stage has started
    (or, with `stop_when`, once its stdout says so), `settle_s` later.

    Returns (exit code, seconds from the signal to the exit, stdout, stderr, every process the run had).
    """
    out, err = cwd / "out.log", cwd / "err.log"
    home = Path(env["LIFECYCLE_HOME"])
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([LIFECYCLE, command, *args], cwd=cwd, env=env, stdout=o, stderr=e,
                                start_new_session=True)
    root = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline, signalled = time.monotonic() + timeout_s, None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            seen.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.Error:
            pass
        due = stop_when(out.read_text()) if stop_when else bool(stop_in) and _started(stop_in, out.read_text(), home)
        if signalled is None and due:
            time.sleep(settle_s)  # well inside the stage
            signalled = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"lifecycle {command} did not end within {timeout_s:.0f} s:\n{out.read_text()}\n{err.read_text()}")
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


def _stopped(home: Path, stage: str, run) -> str:
    """The checks on a run SIGTERMed during `stage`: the exit, the one line, the PID tree; its stdout."""
    code, took, out, err, processes = run
    assert code == 128 + signal.SIGTERM, out + err
    assert took <= 10.0, f"exit {took:.1f} s after SIGTERM during {stage}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 2 and f"during {stage}" in err and "Traceback" not in err, err
    left = _alive(processes, within_s=max(0.5, 10.0 - took))  # all gone within 10 s of the signal
    assert not left, f"left running after a stop during {stage}: {left}"
    return out


def _statuses(out: str) -> dict[str, str]:
    """Each stage's word on its ✓ line (ran, cached, skipped)."""
    return {line.split()[1]: line.split()[2] for line in out.splitlines() if "✓" in line and len(line.split()) > 2}


def test_sigterm_mid_stage_stops_in_seconds_and_the_next_run_resumes(tmp_path):
    home, port = tmp_path / "home", _free_port()
    (home / "prefect").mkdir(parents=True)
    env = _env(home, port)
    try:
        for stage in ("embed", "train", "deploy"):
            _stopped(home, stage, _run(tmp_path, env, stop_in=stage))
            # What the stopped stage writes last, its record, is not there.
            assert not _records(home, KINDS[stage]), f"a {KINDS[stage]} record after a stop during {stage}"
        code, _, out, err, _ = _run(tmp_path, env, stop_in=None)
        assert code == 0, out + err
        statuses = _statuses(out)
        assert all(statuses.get(s) == "cached" for s in ("ingest", "validate", "embed", "index", "train", "register")
                   ), out
        assert statuses.get("deploy") == "ran", out
    finally:
        subprocess.run([LIFECYCLE, "down"], cwd=tmp_path, env=env, capture_output=True, timeout=60)


LARGE_ROWS = 200_000  # ingest ~5 s, validate ~4 s (GX's import included) in a run on two cores


def _large_spec(directory: Path, **expectations) -> Path:
    """The sample spec on a generated version of LARGE_ROWS rows without its text column (no embedding:
    what follows the stopped stages stays cheap), a short training; `expectations` change the suite."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import yaml

    from lifecycle.sample import SAMPLE_SPEC, generate_tickets

    directory.mkdir(parents=True, exist_ok=True)
    csv, spec = directory / "tickets.csv", directory / "tickets.yaml"
    if not csv.exists():
        block = generate_tickets(50_000).drop(columns=["text"])
        frame = block.loc[np.tile(block.index, LARGE_ROWS // len(block))].reset_index(drop=True)
        frame["ticket_id"] = np.arange(len(frame))  # unique, as the suite expects
        pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), csv)
    raw = {**{k: v for k, v in SAMPLE_SPEC.items() if k != "text_column"}, "source": csv.name,
           "train": {"num_boost_round": 5, "early_stopping_rounds": None},
           "expectations": {**SAMPLE_SPEC["expectations"], **expectations}}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


def test_sigterm_mid_ingest_or_validate_leaves_no_version_and_the_next_run_resumes(tmp_path):
    """Ingest stopped: no table version, no record (its uncommitted parts are invisible to readers).
    Validate stopped (a changed suite: the audit's report no longer applies): no report; the next run
    finds ingest cached and validates again."""
    from deltalake import DeltaTable

    home, port = tmp_path / "home", _free_port()
    (home / "prefect").mkdir(parents=True)
    env = _env(home, port)
    table = home / "lake" / "datasets" / "tickets"
    spec = _large_spec(tmp_path / "data")
    try:
        _stopped(home, "ingest", _run(tmp_path, env, stop_in="ingest", args=("--spec", str(spec))))
        assert not (table / "_delta_log").exists() or not any((table / "_delta_log").glob("*.json")), \
            "a Delta commit after a stop during ingest"
        assert not _records(home, "dataset"), "a dataset record after a stop during ingest"
        left = {p.name for p in table.glob("*.parquet")}  # parts no commit names (removed on the way out, if time)
        # The stopped ingest runs again; this run is stopped in train (after validate) to keep it short.
        out = _stopped(home, "train", _run(tmp_path, env, stop_in="train", args=("--spec", str(spec))))
        assert _statuses(out).get("ingest") == "ran", out
        committed = DeltaTable(str(table))
        assert committed.version() == 0 and len(_records(home, "validation")) == 1
        # Readers see exactly the rows of the one commit, none of the stopped ingest's parts.
        assert not left & {Path(f).name for f in committed.file_uris()}
        assert committed.to_pyarrow_dataset().count_rows() == LARGE_ROWS
        spec = _large_spec(tmp_path / "data", min_rows=101)
        _stopped(home, "validate", _run(tmp_path, env, stop_in="validate", args=("--spec", str(spec))))
        assert len(_records(home, "validation")) == 1, "a validation record after a stop during validate"
        code, _, out, err, _ = _run(tmp_path, env, stop_in=None, args=("--spec", str(spec)))
        assert code == 0, out + err
        statuses = _statuses(out)
        assert statuses.get("ingest") == "cached" and statuses.get("validate") == "ran", out
        assert statuses.get("train") == "ran" and statuses.get("deploy") == "ran", out
        assert DeltaTable(str(table)).version() == 0 and len(_records(home, "validation")) == 2
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


def test_sigterm_during_lifecycle_up_stops_what_it_had_started(tmp_path):
    """`lifecycle up` stopped while it deploys (its servers already up): it exits within 10 s with one
    line, and the Prefect and MLflow servers it had started are gone (they run in sessions of their own,
    so only `up` itself can stop them); nothing claims to be up afterwards."""
    from cli.server import STATE_FILE

    home = tmp_path / "home"
    (home / "prefect").mkdir(parents=True)
    env = _env(home, _free_port())
    ports = ("--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port()))
    code, took, out, err, processes = _run(tmp_path, env, None, ports, timeout_s=300, command="up",
                                           stop_when=lambda out: "MLflow server" in out, settle_s=0.0)
    try:
        assert code == 128 + signal.SIGTERM and 0 < took <= 10.0, (code, took, out + err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) <= 2 and "Traceback" not in err, err
        left = _alive(processes, within_s=max(0.5, 10.0 - took))
        assert not left, f"left running after a stop of lifecycle up: {left}"
        assert not (home / STATE_FILE).exists()  # nothing claims to be up
    finally:
        for p in processes:
            with suppress(psutil.Error):
                p.kill()
