"""Process serving for real: servers started as processes on free ports, stopped by PID, rolled back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from infra_blocks import MlflowTarget, ServingTarget
from lifecycle.client_limits import ClientLimits
from lifecycle.errors import LifecycleError
from lifecycle.records import ModelVersion, stable_hash
from serving.config import ServingConfig
from serving.model import BOOSTER_FILE, RUN_ARTIFACT_DIR, SCHEMA_FILE
from tasks import process_serving as srv
from tasks import serving
from tests.serving.test_app import write_model_dir

TOKEN = "t0ken-for-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gone(pid: int) -> bool:
    """No such process, or only a zombie nobody has reaped yet (it runs nothing)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"


_MLFLOW_RUNS: dict[int, tuple[MlflowTarget, str]] = {}


def mlflow_run(tmp_path_factory) -> tuple[MlflowTarget, str]:
    """One SQLite MLflow per session with a run holding the model files as train logs them (creating it: 6 s)."""
    key = id(tmp_path_factory)
    if key not in _MLFLOW_RUNS:
        _MLFLOW_RUNS[key] = _new_mlflow_run(tmp_path_factory)
    return _MLFLOW_RUNS[key]


def _new_mlflow_run(tmp_path_factory) -> tuple[MlflowTarget, str]:
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    target = MlflowTarget(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_location=f"file://{root / 'art'}")
    model_dir = write_model_dir(root / "model")
    target.apply_env()
    decoy = root / "decoy"  # a file of the same name elsewhere in the run must not be picked
    decoy.mkdir()
    (decoy / BOOSTER_FILE).write_text("not this one")
    with mlflow.start_run(experiment_id=target.experiment_id()) as run:
        mlflow.log_artifact(str(decoy / BOOSTER_FILE))
        mlflow.log_artifacts(str(model_dir), artifact_path=RUN_ARTIFACT_DIR)
    return target, run.info.run_id


def model_version(run_id: str, version: str = "1") -> ModelVersion:
    return ModelVersion(id=f"mv{version}", dataset="tickets", model_name="tickets", version=version, run_id=run_id,
                        trained_model="tm1", aliases=["challenger"], promoted=True, decision="first model",
                        metric="accuracy", challenger_value=0.9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def target(tmp_path) -> ServingTarget:
    return ServingTarget(port=free_port(), workdir=str(tmp_path / "serving"), api_token=TOKEN, health_timeout_s=30)


@pytest.fixture(autouse=True)
def no_stray_servers():
    """Whatever a test leaves running is stopped, and the test fails if it had to be."""
    before = set(srv._CHILDREN)
    yield
    strays = [pid for pid in set(srv._CHILDREN) - before if srv.stop_server(pid, grace_s=2)]
    assert not strays, f"test left servers running: {strays}"


def make_snapshot(target: ServingTarget, model_dir: Path, deployment: str) -> Path:
    """A snapshot as prepare_snapshot writes it, from local files (the MLflow part is tested below)."""
    folder = Path(target.workdir) / deployment
    folder.mkdir(parents=True)
    for name in (BOOSTER_FILE, SCHEMA_FILE):
        shutil.copy(model_dir / name, folder / name)
    ServingConfig(model_dir=str(folder), lineage={"deployment_id": deployment, "model_version": deployment},
                  api_token=target.api_token, host=target.host, port=target.port,
                  workers=target.workers).write(folder / srv.CONFIG_FILE)
    return folder


def test_prepare_snapshot_downloads_the_model_files_and_writes_the_config(tmp_path_factory, target):
    mlflow, run_id = mlflow_run(tmp_path_factory)
    lineage = {"deployment_id": "d1", "model_version": "1"}
    folder = serving.prepare_snapshot(target, mlflow, model_version(run_id), None, None, lineage)
    assert folder == Path(target.workdir).resolve() / "d1"
    assert sorted(p.name for p in folder.iterdir()) == [BOOSTER_FILE, srv.CONFIG_FILE, SCHEMA_FILE]
    config = ServingConfig.read(folder / srv.CONFIG_FILE)
    assert config.lineage == lineage and config.port == target.port and config.index is None
    assert config.api_token.get_secret_value() == TOKEN and config.model_dir == str(folder)
    assert (folder / BOOSTER_FILE).read_bytes() == (Path(mlflow.tracking_uri.removeprefix("sqlite:///")).parent
                                                    / "model" / BOOSTER_FILE).read_bytes()
    with pytest.raises(LifecycleError, match="feature_schema.json, booster.json or linear_model.npz not found"):
        other = ServingTarget(workdir=target.workdir)
        serving.download_model_files(mlflow, _empty_run(mlflow), Path(other.workdir) / "d2")


LIMITS = ClientLimits(max_header_bytes=8192, header_timeout_s=3.0, body_timeout_s=90.0, keep_alive_s=2.0,
                      max_connections=50, max_rows=500)


@pytest.mark.parametrize("kind", ["process", "docker"])
def test_the_snapshot_config_carries_the_targets_client_limits(tmp_path_factory, target, kind):
    mlflow, run_id = mlflow_run(tmp_path_factory)
    limited = target.model_copy(update={"kind": kind, "limits": LIMITS})
    folder = serving.prepare_snapshot(limited, mlflow, model_version(run_id), None, None, {"deployment_id": kind})
    config = ServingConfig.read(folder / srv.CONFIG_FILE)
    assert config.limits == LIMITS and config.max_body_bytes == target.max_body_bytes
    if kind == "docker":  # the config put into the container keeps them
        from tasks.docker_serving import container_config

        assert container_config(config, "sha256:image", has_token=True).limits == LIMITS
    else:  # and the server started from the snapshot enforces them: a 10 KB head is over 8 KB
        srv.rollout(limited, folder)
        try:
            with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_240 + b"\r\n\r\n")
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
            assert answer.startswith(b"HTTP/1.1 431 ") and b"larger than 8192 bytes" in answer, answer[:200]
        finally:
            srv.stop_current(limited, grace_s=5)


def test_a_changed_limit_is_a_new_deployment_and_the_defaults_keep_older_ids():
    model = model_version("run-1")
    default = serving.deployment_id(model, None, ServingTarget())
    assert serving.deployment_id(model, None, ServingTarget(limits=ClientLimits())) == default
    assert default == stable_hash(model.id, None, "process", "127.0.0.1", 8765, 1_048_576,
                                  serving.serving_code_version())  # as before the block had limits
    changed = {serving.deployment_id(model, None, ServingTarget(limits=LIMITS.model_copy(update=update)))
               for update in ({}, {"keep_alive_s": 3.0}, {"max_connections": 51})}
    assert len(changed) == 3 and default not in changed


def _empty_run(mlflow: MlflowTarget) -> str:
    import mlflow as mlflow_lib

    mlflow.apply_env()
    with mlflow_lib.start_run(experiment_id=mlflow.experiment_id()) as run:
        pass
    return run.info.run_id


def test_server_started_elsewhere_is_served_and_stopped_by_pid(target, model_dir):
    """Like a server started by an earlier flow run: not our child, found by PID, stopped with its group."""
    snapshot = make_snapshot(target, model_dir, "dep-a")
    code = ("import sys; from pathlib import Path; from tasks.process_serving import start_server; "
            "print(start_server(Path(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(snapshot)], capture_output=True, text=True, check=True,
                         cwd=srv.PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(srv.PROJECT_ROOT)})
    pid = int(out.stdout.strip().splitlines()[-1])
    try:
        config = ServingConfig.read(snapshot / srv.CONFIG_FILE)
        srv.wait_healthy(config, pid, timeout_s=30)
        assert srv.smoke_test(config)["prediction"] in ("account", "billing", "shipping", "technical")
        assert srv.is_our_server(pid) and not srv.is_our_server(os.getpid())
        assert srv.stop_server(os.getpid()) is False  # never signals a process that is not our server
        started = srv.start_time(pid)
        assert started is not None and srv.is_our_server(pid, started)
        # the same PID with another start time is another process (a reused PID): never ours, never signalled
        assert not srv.is_our_server(pid, started - 60) and srv.stop_server(pid, 1, started - 60) is False
    finally:
        stopped = srv.stop_server(pid, grace_s=5)
    assert stopped and gone(pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{target.endpoint}/health", timeout=2)


def test_rollout_keeps_a_healthy_server_and_rolls_back_a_broken_one(target, model_dir):
    good = make_snapshot(target, model_dir, "dep-a")
    first, previous = srv.rollout(target, good)
    assert previous is None and srv.read_current(target) == first
    assert (first.kind, first.container, first.handle) == ("process", None, str(first.pid))
    assert first.create_time == srv.start_time(first.pid)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{target.endpoint}/version", headers=auth).json()["deployment_id"] == "dep-a"

    again, _ = srv.rollout(target, good)
    assert again.pid == first.pid  # same deployment, still healthy: kept, not restarted

    broken = make_snapshot(target, model_dir, "dep-b")
    (broken / BOOSTER_FILE).write_text('{"learner": ')
    with pytest.raises(LifecycleError) as err:
        srv.rollout(target, broken)
    message = str(err.value)
    assert message.startswith("deployment dep-b: server exited before becoming healthy")
    assert "not a valid XGBoost model" in message  # the new server's log tail
    assert "previous deployment dep-a restored" in message
    assert gone(first.pid)

    restored = srv.read_current(target)
    assert restored.deployment_id == "dep-a" and restored.pid != first.pid
    assert httpx.get(f"{target.endpoint}/version", headers=auth).json()["deployment_id"] == "dep-a"
    assert srv.serving_now(target, "dep-a") == restored
    assert srv.serving_now(target.model_copy(update={"api_token": SecretStr("rotated")}), "dep-a") is None

    assert serving.serving_now(target, "dep-a") == restored  # through the registry, by the target's kind
    assert serving.stop_current(target, grace_s=5) == restored
    assert gone(restored.pid) and srv.read_current(target) is None


def test_rollout_refuses_a_port_held_by_someone_else(target, model_dir):
    snapshot = make_snapshot(target, model_dir, "dep-a")
    with socket.socket() as squatter:
        squatter.bind((target.host, target.port))
        squatter.listen()
        with pytest.raises(LifecycleError, match=f"port 127.0.0.1:{target.port} is in use by a process"):
            srv.rollout(target, snapshot)
    assert srv.read_current(target) is None


def test_two_worker_processes_share_the_port_and_stop_together(target, model_dir):
    """workers=2: two server processes, each with its own SO_REUSEPORT listener, under one supervisor."""
    two = target.model_copy(update={"workers": 2})
    server, _ = srv.rollout(two, make_snapshot(two, model_dir, "dep-w"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pids = set()
    for _ in range(40):  # a fresh connection each time: the kernel spreads them over both listeners
        with httpx.Client(headers=auth, timeout=10) as client:
            pids.add(client.get(f"{two.endpoint}/version").json()["worker_pid"])
    assert len(pids) == 2 and server.pid not in pids
    srv.stop_current(two, grace_s=5)
    assert all(gone(pid) for pid in (server.pid, *pids))


def test_an_endpoint_beyond_loopback_needs_a_token():
    serving.check_exposure(ServingTarget(host="127.0.0.1"))  # local profile: anonymous is fine
    serving.check_exposure(ServingTarget(host="0.0.0.0", api_token="t"))
    with pytest.raises(LifecycleError, match=r"binds 0.0.0.0:8765 beyond loopback without an api_token"):
        serving.check_exposure(ServingTarget(host="0.0.0.0"))


def test_the_registry_picks_the_backend_of_the_targets_kind():
    from tasks.docker_serving import DockerBackend
    from tasks.process_serving import ProcessBackend

    assert isinstance(serving.backend_for(ServingTarget(kind="process")), ProcessBackend)
    assert isinstance(serving.backend_for(ServingTarget(kind="docker")), DockerBackend)
    odd = ServingTarget().model_copy(update={"kind": "kubernetes"})
    with pytest.raises(LifecycleError, match=r"kind 'kubernetes' has no backend \(known: docker, process\)"):
        serving.backend_for(odd)
