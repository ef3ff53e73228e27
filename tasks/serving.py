"""Process serving: snapshot a model version, run it as a detached server, switch, roll back.

Why this shape:
- A deployment is a **snapshot folder** `<workdir>/<deployment id>/` holding the model's two files
  (`booster.json`, `feature_schema.json`, downloaded from the MLflow run) and `config.json`. The
  server needs nothing else, and a rollback restarts an older snapshot from its own folder.
- The server is `python -m serving --config …` in its **own process group** (it outlives the flow
  run); `<workdir>/current.json` records its PID. We only ever signal a PID we recorded and whose
  command line is our server's, and we signal its group (SIGTERM, then SIGKILL after a grace period).
- Rollout on one port: stop the old, start the new, wait for `/health`, smoke-test it (one prediction,
  one search when an index is served, `/version` naming the new deployment). On any failure the new
  server is stopped, the previous snapshot restarted, and a LifecycleError carries the reason and
  the tail of the new server's log.
"""

from __future__ import annotations

import os
import shutil
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
from prefect import task
from pydantic import BaseModel, Field

from infra_blocks import MlflowTarget, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from lifecycle.records import IndexVersion, ModelVersion, stable_hash, utcnow
from serving.config import IndexRef, ServingConfig
from serving.model import BOOSTER_FILE, RUN_ARTIFACT_DIR, SCHEMA_FILE, sample_row
from tasks.policies import retry_unless_user_error

CONFIG_FILE = "config.json"
LOG_FILE = "server.log"
CURRENT_FILE = "current.json"
START_MARK = "--- lifecycle: starting server"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What a server runs: a change here means a new deployment. Read as files so that importing this module
# (and so `flows.lifecycle`) does not import FastAPI.
SERVED_SOURCES = ("serving/app.py", "serving/config.py", "serving/model.py", "serving/__main__.py",
                  "lifecycle/features.py")
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


def base_url(host: str, port: int) -> str:
    """URL a client on this machine uses; a wildcard bind is reached over loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serving_code_version() -> str:
    """A hash of the code a server runs (cf. `lifecycle.records.code_version`)."""
    return stable_hash(*((PROJECT_ROOT / f).read_text() for f in SERVED_SOURCES), length=12)


def deployment_id(model: ModelVersion, index: IndexVersion | None, target: ServingTarget) -> str:
    """Deterministic id: same model, index, target and serving code → same deployment."""
    return stable_hash(model.id, index.id if index else None, target.kind, target.host, target.port,
                       target.max_body_bytes, serving_code_version())


# --- snapshot ------------------------------------------------------------------------------------


def _artifact_paths(client, run_id: str) -> dict[str, str]:
    """Where the run holds booster.json / feature_schema.json: `lifecycle/` (as train logs them), else the root."""
    found: dict[str, str] = {}
    for folder in (RUN_ARTIFACT_DIR, None):
        for entry in client.list_artifacts(run_id, folder):
            name = entry.path.rsplit("/", 1)[-1]
            if not entry.is_dir and name in (BOOSTER_FILE, SCHEMA_FILE):
                found.setdefault(name, entry.path)
    missing = [n for n in (BOOSTER_FILE, SCHEMA_FILE) if n not in found]
    if missing:
        raise LifecycleError(f"MLflow run {run_id}: artifact(s) {', '.join(missing)} not found (logged by train)")
    return found


def download_model_files(mlflow: MlflowTarget, run_id: str, dest: Path) -> Path:
    """Copy the run's booster.json and feature_schema.json into `dest` (nothing else is needed)."""
    import mlflow as mlflow_lib

    client = mlflow.client()
    dest.mkdir(parents=True, exist_ok=True)
    for name, artifact_path in _artifact_paths(client, run_id).items():
        local = mlflow_lib.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dest / ".download"),
                                                        tracking_uri=mlflow.tracking_uri)
        os.replace(local, dest / name)
    shutil.rmtree(dest / ".download", ignore_errors=True)
    return dest


def prepare_snapshot(target: ServingTarget, mlflow: MlflowTarget, model: ModelVersion, index: IndexVersion | None,
                     vectors: VectorStore | None, lineage: dict[str, str | None]) -> Path:
    """Write `<workdir>/<deployment id>/` with the model files and config.json; returns the folder."""
    folder = Path(target.workdir).resolve() / str(lineage["deployment_id"])
    if not all((folder / n).exists() for n in (BOOSTER_FILE, SCHEMA_FILE)):
        download_model_files(mlflow, model.run_id, folder)
    ref = None
    if index is not None:
        opts = vectors.lance_storage_options() if vectors is not None else {}
        ref = IndexRef(uri=index.uri or (vectors.uri if vectors else ""), table=index.table, tag=index.tag,
                       version=index.table_version, storage_options=opts,
                       distance_type=index.index_params.get("distance_type", "cosine"),
                       query_params=index.index_params.get("query") or {})
    config = ServingConfig(model_dir=str(folder), lineage=lineage, index=ref, api_token=target.api_token,
                           max_body_bytes=target.max_body_bytes, host=target.host, port=target.port)
    config.write(folder / CONFIG_FILE)
    return folder


# --- processes -----------------------------------------------------------------------------------


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


def _client(config: ServingConfig, timeout: float = 5.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {config.api_token.get_secret_value()}"} if config.api_token else {}
    return httpx.Client(base_url=base_url(config.host, config.port), headers=headers, timeout=timeout)


def wait_healthy(config: ServingConfig, pid: int, timeout_s: float) -> None:
    """Poll /health until 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    with _client(config, timeout=2.0) as client:
        while True:
            if not _alive(pid):
                raise LifecycleError("server exited before becoming healthy")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LifecycleError(f"server not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)


def smoke_test(config: ServingConfig) -> dict[str, object]:
    """One prediction on a row built from the schema, `/version` lineage, and one search if indexed."""
    schema = FeatureSchema.model_validate_json(Path(config.model_dir, SCHEMA_FILE).read_bytes())
    with _client(config, timeout=30.0) as client:
        resp = client.post("/invocations", json={"dataframe_records": [sample_row(schema)]})
        if resp.status_code != 200:
            raise LifecycleError(f"smoke test: /invocations answered {resp.status_code}: {resp.text[:200]}")
        predictions = resp.json().get("predictions")
        if not isinstance(predictions, list) or len(predictions) != 1:
            raise LifecycleError(f"smoke test: expected one prediction, got {str(predictions)[:200]}")
        label = predictions[0].get("prediction") if isinstance(predictions[0], dict) else None
        if label is None or (schema.classes and label not in schema.classes):
            raise LifecycleError(f"smoke test: prediction {predictions[0]!r} is not one of the model's classes")
        served = client.get("/version").json().get("deployment_id")
        if served != config.deployment_id:
            raise LifecycleError(f"smoke test: port {config.port} serves deployment {served}, not {config.deployment_id}")
        result: dict[str, object] = {"prediction": label}
        if config.index is not None:
            resp = client.post("/search", json={"query": "smoke test", "k": 1})
            if resp.status_code != 200 or not isinstance(resp.json().get("results"), list):
                raise LifecycleError(f"smoke test: /search answered {resp.status_code}: {resp.text[:200]}")
            result["search_results"] = len(resp.json()["results"])
    return result


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
        with _client(config.model_copy(update={"api_token": target.api_token}), timeout=2.0) as client:
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


# --- Prefect tasks -------------------------------------------------------------------------------


@task(name="prepare-serving-snapshot", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "deploy"])
def prepare_snapshot_task(target: ServingTarget, mlflow: MlflowTarget, model: ModelVersion,
                          index: IndexVersion | None, vectors: VectorStore | None,
                          lineage: dict[str, str | None]) -> Path:
    """Prefect wrapper: retries cover a flaky tracking server; a missing artifact fails at once."""
    return prepare_snapshot(target, mlflow, model, index, vectors, lineage)


@task(name="rollout-process", tags=["lifecycle", "deploy"])
def rollout_task(target: ServingTarget, snapshot: Path) -> tuple[RunningServer, str | None]:
    """Prefect wrapper, no retries: a failed rollout has already restored the previous server."""
    return rollout(target, snapshot)


@task(name="current-deployment", tags=["lifecycle", "deploy"])
def serving_now_task(target: ServingTarget, deployment: str) -> RunningServer | None:
    """Prefect wrapper: is this deployment already up (then the stored record stands)?"""
    return serving_now(target, deployment)
