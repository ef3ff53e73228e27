"""Process serving: run a snapshot as a detached server process, switch, roll back.

Why this shape:
- The server is `python -m serving --config …` in its **own process group** (it outlives the flow
  run); `<workdir>/current.json` records its PID. We only ever signal a PID we recorded and whose
  command line is our server's, and we signal its group (SIGTERM, then SIGKILL after a grace period),
  which also stops its worker processes when `workers > 1`.
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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from infra_blocks import ServingTarget
from lifecycle.errors import LifecycleError
from tasks.processes import wait_until_ok
from lifecycle.records import utcnow
from serving.config import ServingConfig
from tasks.serving import CONFIG_FILE, PROJECT_ROOT, base_url, http_client, smoke_test

LOG_FILE = "server.log"
CURRENT_FILE = "current.json"
START_MARK = "--- lifecycle: starting server"
_CHILDREN: dict[int, subprocess.Popen] = {}  # servers this process started, so they can be reaped


class RunningServer(BaseModel):
    """What `current.json` records about the server we started last."""

    pid: int
    host: str
    port: int
    deployment_id: str
    snapshot: str = Field(..., description="Snapshot folder the server runs from.")
    lineage: dict[str, str | None] = Field(default_factory=dict)
    started_at: datetime = Field(default_factory=utcnow)

    @property
    def endpoint(self) -> str:
        return base_url(self.host, self.port)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # no /proc (macOS)
        return subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True).stdout.split()


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:  # poll() reaps our exited child, which would otherwise linger as a zombie
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def is_our_server(pid: int) -> bool:
    """True for a live process that leads its own group and runs `-m serving --config` (not a reused PID)."""
    if pid <= 1 or not _alive(pid):
        return False
    args = _cmdline(pid)
    ours = any(a == "-m" and b == "serving" for a, b in zip(args, args[1:])) and "--config" in args
    try:
        return ours and os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def stop_server(pid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`; False if it was not ours/alive."""
    if not is_our_server(pid):
        return False
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.05)
    raise LifecycleError(f"server PID {pid} survived SIGKILL")


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
        raise LifecycleError(f"deployment {config.deployment_id}: {exc}\n  server log ({snapshot / LOG_FILE}):\n    {tail}") from exc
    return RunningServer(pid=pid, host=config.host, port=config.port, deployment_id=str(config.deployment_id),
                         snapshot=str(snapshot), lineage=config.lineage)



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
    if current is None or current.deployment_id != deployment or not is_our_server(current.pid):
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
        stop_server(current.pid, grace_s)
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


@contextmanager
def _target_lock(target: ServingTarget) -> Iterator[None]:
    """One rollout per target at a time: event triggers are at-least-once, so two deploys can overlap."""
    import fcntl

    path = Path(target.workdir).resolve() / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def rollout(target: ServingTarget, snapshot: Path, grace_s: float = 10.0) -> tuple[RunningServer, str | None]:
    """Switch the target's port to `snapshot`; returns (new server, previous deployment id or None).

    Keeps the running server when it already serves this deployment. On failure restores the previous
    snapshot (when there was one) and raises.

    Raises:
        LifecycleError: the new server failed to start, become healthy or pass the smoke test.
    """
    with _target_lock(target):
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
    if previous is None or Path(previous.snapshot) == failed:
        return "no previous deployment to restore; nothing is serving"
    try:
        server = launch(Path(previous.snapshot), target.health_timeout_s)
    except LifecycleError as exc:
        return f"restoring previous deployment {previous.deployment_id} failed too: {str(exc).splitlines()[0]}"
    write_current(target, server)
    return f"previous deployment {previous.deployment_id} restored (PID {server.pid})"

