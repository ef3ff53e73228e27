"""Serving, shared by both target kinds: deployment ids, snapshots, smoke tests, and the Prefect tasks.

Why this shape:
- A deployment is a **snapshot folder** `<workdir>/<deployment id>/` holding the model's two files
  (`booster.json`, `feature_schema.json`, downloaded from the MLflow run) and `config.json`. The
  server needs nothing else: a process server runs from the folder (tasks/process_serving.py), a
  docker image is built from it (tasks/docker_images.py, tasks/docker_serving.py), and a rollback
  restarts an older snapshot or keeps the older container.
- Every rollout proves the new server before it takes traffic: `/health`, then `smoke_test_url`
  (one prediction on a row built from the schema, `/version` naming the new deployment, one search
  when an index is served).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
from prefect import task
from pydantic import SecretStr

from infra_blocks import MlflowTarget, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from lifecycle.records import IndexVersion, ModelVersion, stable_hash
from lifecycle.spec import Task
from serving.config import IndexRef, ServingConfig
from serving.model import BOOSTER_FILE, RUN_ARTIFACT_DIR, SCHEMA_FILE, sample_row
from tasks.policies import retry_unless_user_error

CONFIG_FILE = "config.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What a server runs: a change here means a new deployment. Read as files so that importing this module
# (and so `flows.lifecycle`) does not import FastAPI.
SERVED_SOURCES = ("serving/app.py", "serving/batching.py", "serving/config.py", "serving/model.py",
                  "serving/__main__.py", "lifecycle/features.py")


def base_url(host: str, port: int) -> str:
    """URL a client on this machine uses; a wildcard bind is reached over loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serving_code_version() -> str:
    """A hash of the code a server runs (cf. `lifecycle.records.code_version`)."""
    return stable_hash(*((PROJECT_ROOT / f).read_text() for f in SERVED_SOURCES), length=12)


def deployment_id(model: ModelVersion, index: IndexVersion | None, target: ServingTarget) -> str:
    """Deterministic id: same model, index, target and serving code → same deployment."""
    docker = (target.base_image, target.docker_base_url) if target.kind == "docker" else ()
    workers = (target.workers,) if target.workers != 1 else ()
    return stable_hash(model.id, index.id if index else None, target.kind, target.host, target.port,
                       target.max_body_bytes, serving_code_version(), *docker, *workers)


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
                           max_body_bytes=target.max_body_bytes, host=target.host, port=target.port,
                           workers=target.workers)
    config.write(folder / CONFIG_FILE)
    return folder



# --- proving a server ----------------------------------------------------------------------------


def http_client(config: ServingConfig, timeout: float = 5.0) -> httpx.Client:
    """A client for the server a config describes (its address, its token)."""
    return _http(base_url(config.host, config.port), config.api_token, timeout)


def _http(url: str, token: SecretStr | None, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def smoke_test_url(url: str, token: SecretStr | None, schema: FeatureSchema, deployment: str | None,
                   with_index: bool) -> dict[str, object]:
    """One prediction on a row built from the schema, `/version` naming `deployment`, one search if indexed.

    Raises:
        LifecycleError: naming the endpoint that answered wrong and what it answered.
    """
    with _http(url, token, timeout=30.0) as client:
        resp = client.post("/invocations", json={"dataframe_records": [sample_row(schema)]})
        if resp.status_code != 200:
            raise LifecycleError(f"smoke test: /invocations answered {resp.status_code}: {resp.text[:200]}")
        predictions = resp.json().get("predictions")
        if not isinstance(predictions, list) or len(predictions) != 1:
            raise LifecycleError(f"smoke test: expected one prediction, got {str(predictions)[:200]}")
        label = predictions[0].get("prediction") if isinstance(predictions[0], dict) else None
        if schema.task is Task.regression:
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                raise LifecycleError(f"smoke test: prediction {str(predictions[0])[:200]} is not a number")
        elif label not in schema.classes:
            raise LifecycleError(f"smoke test: prediction {str(predictions[0])[:200]} is not one of the model's classes")
        served = client.get("/version").json().get("deployment_id")
        if served != deployment:
            raise LifecycleError(f"smoke test: {url} serves deployment {served}, not {deployment}")
        result: dict[str, object] = {"prediction": label}
        if with_index:
            resp = client.post("/search", json={"query": "smoke test", "k": 1})
            if resp.status_code != 200 or not isinstance(resp.json().get("results"), list):
                raise LifecycleError(f"smoke test: /search answered {resp.status_code}: {resp.text[:200]}")
            result["search_results"] = len(resp.json()["results"])
    return result


def smoke_test(config: ServingConfig) -> dict[str, object]:
    """`smoke_test_url` for the server a snapshot config describes."""
    schema = FeatureSchema.model_validate_json(Path(config.model_dir, SCHEMA_FILE).read_bytes())
    return smoke_test_url(base_url(config.host, config.port), config.api_token, schema, config.deployment_id,
                          config.index is not None)


# --- whichever kind --------------------------------------------------------------------------------


def check_exposure(target: ServingTarget) -> None:
    """An endpoint reachable beyond this machine must require a token (the local profile binds 127.0.0.1).

    Raises:
        LifecycleError: naming the bind address and the missing `api_token`.
    """
    loopback = target.host in ("127.0.0.1", "localhost", "::1") or target.host.startswith("127.")
    if not loopback and target.api_token is None:
        raise LifecycleError(f"serving target binds {target.host}:{target.port} beyond loopback without an api_token; "
                             "set the block's api_token (LIFECYCLE_API_TOKEN in the prod profile)")



def serving_now(target: ServingTarget, deployment: str) -> Any | None:
    """The live server of the target if it serves `deployment` and answers (token checked), else None."""
    if target.kind == "docker":
        from tasks.docker_serving import serving_now as docker_now

        return docker_now(target, deployment)
    from tasks.process_serving import serving_now as process_now

    return process_now(target, deployment)


def stop_current(target: ServingTarget, grace_s: float = 10.0) -> Any | None:
    """Stop what the target serves (process group, or containers and edge); returns what was recorded."""
    if target.kind == "docker":
        from tasks.docker_serving import stop_current as docker_stop

        return docker_stop(target, grace_s)
    from tasks.process_serving import stop_current as process_stop

    return process_stop(target, grace_s)


# --- Prefect tasks -------------------------------------------------------------------------------


@task(name="prepare-serving-snapshot", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "deploy"])
def prepare_snapshot_task(target: ServingTarget, mlflow: MlflowTarget, model: ModelVersion,
                          index: IndexVersion | None, vectors: VectorStore | None,
                          lineage: dict[str, str | None]) -> Path:
    """Prefect wrapper: retries cover a flaky tracking server; a missing artifact fails at once."""
    return prepare_snapshot(target, mlflow, model, index, vectors, lineage)


@task(name="rollout-process", tags=["lifecycle", "deploy"])
def rollout_task(target: ServingTarget, snapshot: Path) -> Any:
    """Prefect wrapper, no retries: a failed rollout has already restored the previous server."""
    from tasks.process_serving import rollout

    return rollout(target, snapshot)


@task(name="current-deployment", tags=["lifecycle", "deploy"])
def serving_now_task(target: ServingTarget, deployment: str) -> Any | None:
    """Prefect wrapper: is this deployment already up (then the stored record stands)?"""
    return serving_now(target, deployment)
