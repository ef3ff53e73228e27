"""Process serving: run a snapshot as a detached server process, switch, roll back.

Why this shape:
- The server is `python -m serving --config …` in its **own process group** (it outlives the flow
  run); `<workdir>/current.json` records its PID and start time. We only ever signal a PID we
  recorded, whose start time is the recorded one (a reused PID is someone else) and whose command
  line is our server's, and we signal its group (SIGTERM, then SIGKILL after a grace period), which
  also stops its worker processes when `workers > 1`. psutil reads command lines, start times and
  children the same way on Linux and macOS.
- Rollout on one port: stop the old, start the new, wait for `/health`, smoke-test it (one prediction,
  one search when an index is served, `/version` naming the new deployment). On any failure the new
  server is stopped, the previous snapshot restarted, and a LifecycleError carries the reason and
  the tail of the new server's log. (One port, one process: the switch has a gap of one model load;
  the docker target avoids it with an edge in front, tasks/docker_serving.py.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from infra_blocks import ServingTarget
from lifecycle.errors import LifecycleError
from lifecycle.records import utcnow
from serving.config import ServingConfig
from tasks.processes import wait_until_ok
from tasks.serving_common import (
    CONFIG_FILE,
    PROJECT_ROOT,
    RunningServer,
    ServingImage,
    http_client,
    smoke_test,
    target_lock,
)

__all__ = ["CONFIG_FILE", "PROJECT_ROOT", "ProcessBackend", "RunningServer", "rollout", "serving_now", "stop_current"]

LOG_FILE = "server.log"
CURRENT_FILE = "current.json"
START_MARK = "--- lifecycle: starting server"
_CHILDREN: dict[int, subprocess.Popen] = {}  # servers this process started, so they can be reaped


def _process(pid: int) -> psutil.Process | None:
    """The live process `pid` (a zombie counts as gone), or None."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:  # poll() reaps our exited child (no zombie left)
        del _CHILDREN[pid]
        return None
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # someone else's process: alive, and never ours
        return psutil.Process(pid)


def _alive(pid: int) -> bool:
    return _process(pid) is not None


def start_time(pid: int) -> float | None:
    """The process's start time (psutil `create_time`), or None when it is gone."""
    proc = _process(pid)
    try:
        return proc.create_time() if proc is not None else None
    except psutil.Error:
        return None


def is_our_server(pid: int, create_time: float | None = None) -> bool:
    """True for a live process that leads its own group and runs `-m serving --config` (not a reused PID).

    `create_time`, when given, must be the process's start time too: a PID recorded long ago may now
    belong to another process with the same command line.
    """
    proc = _process(pid) if pid > 1 else None
    if proc is None:
        return False
    try:
        args = proc.cmdline()
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False
        ours = any(a == "-m" and b == "serving" for a, b in zip(args, args[1:])) and "--config" in args
        return ours and os.getpgid(pid) == pid
    except (psutil.Error, ProcessLookupError):
        return False


def stop_server(pid: int, grace_s: float = 10.0, create_time: float | None = None) -> bool:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`; False if it was not ours/alive.

    Waits for the leader and every process under it (workers), not only the leader: a port is free
    only when the last listener exits.
    """
    if not is_our_server(pid, create_time):
        return False
    leader = psutil.Process(pid)
    try:
        procs = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = [leader]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _alive(pid)  # reaps the leader when it is our child
            procs = [p for p in procs if _is_running(p)]
            if not procs:
                return True
            time.sleep(0.05)
    raise LifecycleError(f"server PID {pid} survived SIGKILL")


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def log_tail(snapshot: Path, lines: int = 20) -> str:
    """The last lines the server wrote since its latest start."""
    try:
        text = (snapshot / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "(no server log)"
    text = text.rsplit(START_MARK, 1)[-1].split("\n", 1)[-1]
    return "\n".join(text.strip().splitlines()[-lines:]) or "(server log is empty)"


def start_server(snapshot: Path) -> int:
    """Start `python -m serving` on a snapshot in its own session; returns the PID (= process group id)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_TOKEN", None)  # the server has no business with the tracking server
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    with open(snapshot / LOG_FILE, "ab") as log:
        log.write(f"{START_MARK} at {utcnow().isoformat()}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "serving", "--config", str(snapshot / CONFIG_FILE)],
                                cwd=snapshot, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return proc.pid


def wait_healthy(config: ServingConfig, pid: int, timeout_s: float) -> None:
    """Poll /health until 200; fail early if the process exits."""
    with http_client(config, timeout=2.0) as client:
        wait_until_ok(lambda: client.get("/health"),
                      lambda: None if _alive(pid) else "server exited before becoming healthy",
                      timeout_s, f"server not healthy after {timeout_s:.0f} s", interval_s=0.1)


def launch(snapshot: Path, timeout_s: float) -> RunningServer:
    """Start a snapshot's server and prove it works; on failure stop it and raise with its log tail."""
    config = ServingConfig.read(snapshot / CONFIG_FILE)
    pid = start_server(snapshot)
    try:
        wait_healthy(config, pid, timeout_s)
        smoke_test(config)
    except BaseException as exc:  # whatever happens, a server that did not prove itself is stopped
        stop_server(pid)
        if not isinstance(exc, (LifecycleError, httpx.HTTPError, ValueError)):
            raise
        tail = log_tail(snapshot).replace("\n", "\n    ")
        raise LifecycleError(f"deployment {config.deployment_id}: {exc}\n"
                             f"  server log ({snapshot / LOG_FILE}):\n    {tail}") from exc
    return RunningServer(kind="process", pid=pid, create_time=start_time(pid), host=config.host, port=config.port,
                         deployment_id=str(config.deployment_id), snapshot=str(snapshot), lineage=config.lineage)


# --- current deployment --------------------------------------------------------------------------


def read_current(target: ServingTarget) -> RunningServer | None:
    """The server recorded in `<workdir>/current.json`, or None (it may have died since)."""
    path = Path(target.workdir).resolve() / CURRENT_FILE
    try:
        return RunningServer.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def write_current(target: ServingTarget, server: RunningServer | None) -> None:
    path = Path(target.workdir).resolve() / CURRENT_FILE
    if server is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CURRENT_FILE}.tmp-{os.getpid()}")
    tmp.write_text(server.model_dump_json(indent=2))
    os.replace(tmp, path)


def serving_now(target: ServingTarget, deployment: str) -> RunningServer | None:
    """The current server if it is ours, alive, healthy and serves `deployment` (token checked too)."""
    current = read_current(target)
    if current is None or current.deployment_id != deployment or current.pid is None or current.snapshot is None \
            or not is_our_server(current.pid, current.create_time):
        return None
    try:
        config = ServingConfig.read(Path(current.snapshot) / CONFIG_FILE)
        with http_client(config.model_copy(update={"api_token": target.api_token}), timeout=2.0) as client:
            healthy = client.get("/health").status_code == 200
            version = client.get("/version")
        ok = healthy and version.status_code == 200 and version.json().get("deployment_id") == deployment
    except (LifecycleError, httpx.HTTPError, ValueError):
        return None
    return current if ok else None


def stop_current(target: ServingTarget, grace_s: float = 10.0) -> RunningServer | None:
    """Stop the recorded server (if it is still ours) and forget it; returns what was recorded."""
    current = read_current(target)
    if current is not None:
        if current.pid is not None:
            stop_server(current.pid, grace_s, current.create_time)
        write_current(target, None)
    return current


def _require_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LifecycleError(f"serving port {host}:{port} is in use by a process the lifecycle did not start "
                                 f"({exc.strerror})") from exc


def rollout(target: ServingTarget, snapshot: Path, grace_s: float = 10.0) -> tuple[RunningServer, str | None]:
    """Switch the target's port to `snapshot`; returns (new server, previous deployment id or None).

    Keeps the running server when it already serves this deployment. On failure restores the previous
    snapshot (when there was one) and raises.

    Raises:
        LifecycleError: the new server failed to start, become healthy or pass the smoke test.
    """
    with target_lock(target):
        return _rollout(target, snapshot, grace_s)


def _rollout(target: ServingTarget, snapshot: Path, grace_s: float) -> tuple[RunningServer, str | None]:
    config = ServingConfig.read(snapshot / CONFIG_FILE)
    kept = serving_now(target, str(config.deployment_id))
    if kept is not None:
        return kept, None
    previous = stop_current(target, grace_s)
    _require_port_free(config.host, config.port)
    try:
        server = launch(snapshot, target.health_timeout_s)
    except LifecycleError as exc:
        restored = _restore(target, previous, snapshot)
        raise LifecycleError(f"{exc}\n  {restored}") from exc
    write_current(target, server)
    return server, previous.deployment_id if previous else None


def _restore(target: ServingTarget, previous: RunningServer | None, failed: Path) -> str:
    """Restart the previous snapshot after a failed rollout; returns a line saying what happened."""
    if previous is None or previous.snapshot is None or Path(previous.snapshot) == failed:
        return "no previous deployment to restore; nothing is serving"
    try:
        server = launch(Path(previous.snapshot), target.health_timeout_s)
    except LifecycleError as exc:
        return f"restoring previous deployment {previous.deployment_id} failed too: {str(exc).splitlines()[0]}"
    write_current(target, server)
    return f"previous deployment {previous.deployment_id} restored (PID {server.pid})"


class ProcessBackend:
    """`ServingBackend` for `kind: process`: a process group on this machine, one port."""

    kind = "process"

    def prepare(self, target: ServingTarget, snapshot: Path) -> ServingImage | None:
        """Nothing to build: the server runs straight from the snapshot folder and this checkout."""
        return None

    def rollout(self, target: ServingTarget, snapshot: Path, image: ServingImage | None,
                grace_s: float = 10.0) -> tuple[RunningServer, str | None]:
        return rollout(target, snapshot, grace_s)

    def serving_now(self, target: ServingTarget, deployment: str) -> RunningServer | None:
        return serving_now(target, deployment)

    def stop_current(self, target: ServingTarget, grace_s: float = 10.0) -> RunningServer | None:
        return stop_current(target, grace_s)
