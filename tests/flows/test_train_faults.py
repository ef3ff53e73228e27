"""Faults against real processes: a Dask worker killed mid-training, MLflow down at register, and the
production profile's shape (address-mode Dask, S3 lake, MLflow on PostgreSQL).

Each test uses its own registered-model prefix on the shared `mlflow server`, so their registries do
not meet. They take a minute or more each (real process starts, Prefect retry delays): marked slow,
still run by `make test`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from lifecycle.records import ModelVersion, ValidationReport

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _world(tmp, rows: int, **train):
    from infra_blocks import ObjectStore
    from lifecycle.sample import generate_tickets, write_sample
    from lifecycle.spec import load_spec
    from tasks.ingest import ingest_dataset
    from tasks.records import save_record

    csv, spec_path = write_sample(tmp / "raw", rows=10)
    generate_tickets(rows).to_csv(csv, index=False)
    spec = load_spec(spec_path, overrides={"train": {"metric": "logloss", **train}})
    store = ObjectStore(url=f"file://{tmp / 'lake'}")
    dataset = ingest_dataset(store, spec)
    save_record(store, dataset)
    report = ValidationReport(id=f"report-{dataset.id}", dataset=dataset.dataset, dataset_version=dataset.id,
                              success=True, evaluated=1)
    return spec, store, dataset, report


def _attempts(state, task_prefix: str, timeout: float = 30.0) -> int:
    """Runs of a flow's task (1 + retries), read back from the Prefect API once it has settled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            of_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            runs = [r for r in client.read_task_runs(flow_run_filter=of_run) if r.name.startswith(task_prefix)]
            settled = bool(runs) and runs[0].state is not None and runs[0].state.is_final()
            if settled or time.monotonic() > deadline:
                return runs[0].run_count if runs else 0
            time.sleep(0.5)


class WorkerKiller(threading.Thread):
    """Waits until a worker is inside xgboost's boosting loop, then SIGKILLs that worker's process."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.killed: tuple[str, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from distributed import Client

        with Client(self.address, timeout="20s") as client:
            pids = client.run(os.getpid)
            while not self.stop.is_set() and self.killed is None:
                for worker, tasks in client.call_stack().items():
                    frames = "".join("".join(f) if isinstance(f, list) else str(f) for f in tasks.values())
                    if "/xgboost/training.py" in frames and worker in pids:
                        os.kill(pids[worker], signal.SIGKILL)
                        self.killed = (worker, pids[worker])
                        return
                time.sleep(0.05)


def test_a_worker_killed_mid_training_is_retried_and_leaves_no_half_registered_model(tmp_path, mlflow_server):
    from distributed import Client

    from flows.register import register
    from flows.train import train
    from infra_blocks import DaskCompute
    from tests.fixtures.dask_mlflow import dask_processes

    # Long enough (400 rounds on 20k rows) for the killer to find the boosting loop.
    spec, store, dataset, report = _world(tmp_path, 20_000, num_boost_round=400, early_stopping_rounds=None)
    target = mlflow_server.target(model_name_prefix="kill-", experiment="kill")
    with dask_processes(tmp_path / "dask") as cluster:
        compute = DaskCompute(mode="address", address=cluster.address)
        killer = WorkerKiller(cluster.address)
        killer.start()
        try:
            state = train(spec, dataset, report, store, compute, target, return_state=True)
        finally:
            killer.stop.set()
            killer.join(30)
        assert killer.killed is not None, "the boosting loop was never seen on a worker: nothing was killed"
        trained = state.result()
        assert _attempts(state, "train-model") == 2  # the attempt that lost its worker, then the retry
        with Client(cluster.address) as client:
            workers = client.scheduler_info()["workers"]
        assert killer.killed[0] not in workers  # the nanny replaced the killed process with a new worker
        model = register(spec, trained, store, target)
    client = target.client()
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    # The failed attempt logged nothing: one run, finished, the one the registry version points at.
    assert [(r.info.run_id, r.info.status) for r in runs] == [(trained.run_id, "FINISHED")]
    assert runs[0].data.tags["lifecycle.compute.mode"] == "address"
    assert runs[0].data.tags["lifecycle.compute.scheduler"] == cluster.address
    versions = client.search_model_versions("name='kill-tickets'")
    assert [(v.version, v.run_id) for v in versions] == [("1", trained.run_id)]
    assert model.promoted and model.version == "1"


def test_mlflow_down_at_register_retries_then_fails_in_one_line_and_keeps_the_champion(
        tmp_path, mlflow_server, local_compute, monkeypatch):
    from flows.register import register, register_code_version
    from flows.train import train
    from tasks.promotion import audits
    from tasks.records import find_record
    from tasks.registry import MlflowUnavailableError, model_version_id

    spec, store, dataset, report = _world(tmp_path, 600)
    # Two xgboost models judged by the champion rule alone (family choice and baseline gate: test_model_family).
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"model": "xgboost",
                                                                          "require_beats_baseline": False})})
    weak_spec = spec.model_copy(update={"train": spec.train.model_copy(update={"num_boost_round": 1, "max_depth": 1})})
    target = mlflow_server.target(model_name_prefix="down-", experiment="down")
    champion = register(weak_spec, train(weak_spec, dataset, report, store, local_compute, target), store, target)
    challenger = train(spec, dataset, report, store, local_compute, target)
    # Each MLflow call fails fast (no client-side backoff); the register task's own retries remain.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow_server.stop()
    try:
        started = time.monotonic()
        state = register(spec, challenger, store, target, return_state=True)
        waited = time.monotonic() - started
        with pytest.raises(MlflowUnavailableError) as err:
            state.result()
    finally:
        mlflow_server.start()
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert message == (f"MLflow at {mlflow_server.uri} is unreachable while registering down-tickets "
                       "(Connection refused); nothing was promoted")
    assert _attempts(state, "register-model-version") == 4 and waited >= 2 + 5 + 10  # 3 retries, their delays
    # Nothing half-done: no record, no audit, no registry version; the champion is the one from before.
    record_id = model_version_id(challenger, "down-tickets", spec.train.promotion_margin, register_code_version(),
                                 (spec.train.require_beats_baseline, spec.train.baseline_margin))
    assert find_record(store, ModelVersion, record_id) is None
    assert [a.version for a in audits(store, "down-tickets")] == ["1"]
    client = target.client()
    assert client.get_model_version_by_alias("down-tickets", "champion").version == champion.version == "1"
    assert [v.version for v in client.search_model_versions("name='down-tickets'")] == ["1"]
    # Back up: the same call now registers and promotes.
    again = register(spec, challenger, store, target)
    assert again.promoted and again.version == "2" and again.champion_version == "1"


def test_prod_profile_trains_on_an_address_cluster_and_registers_in_mlflow_on_postgres(
        tmp_path, monkeypatch, mlflow_pg_server, postgres_db, dask_cluster, s3_endpoint):
    """deployments/profiles/prod.yaml with its variables pointed at real local services."""
    from flows.register import register
    from flows.train import train
    from infra_blocks.profiles import load_profile
    from lifecycle.sample import write_sample
    from lifecycle.spec import load_spec
    from tasks.ingest import ingest_dataset
    from tasks.records import save_record
    from tests.fixtures.s3 import BUCKET, S3_KEY, S3_SECRET

    prefix = f"s3://{BUCKET}/prod-{tmp_path.name[-8:]}"
    env = {"LIFECYCLE_HOME": str(tmp_path / "home"), "LIFECYCLE_LAKE_URL": f"{prefix}/lake",
           "LIFECYCLE_S3_ENDPOINT": s3_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_REGION": "us-east-1", "LIFECYCLE_DASK_MODE": "address", "LIFECYCLE_DASK_ADDRESS": dask_cluster.address,
           "MLFLOW_TRACKING_URI": mlflow_pg_server.uri, "LIFECYCLE_MLFLOW_ARTIFACTS": f"{prefix}/mlflow",
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "LIFECYCLE_API_TOKEN": "test-token"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    targets = load_profile("prod")
    assert targets.compute.mode == "address" and targets.store.url.startswith("s3://")
    _, spec_path = write_sample(tmp_path / "raw", rows=600)
    spec = load_spec(spec_path, overrides={"train": {"num_boost_round": 20}})
    dataset = ingest_dataset(targets.store, spec)
    save_record(targets.store, dataset)
    report = ValidationReport(id="report-prod", dataset=dataset.dataset, dataset_version=dataset.id, success=True,
                              evaluated=1)
    trained = train(spec, dataset, report, targets.store, targets.compute, targets.mlflow)
    model = register(spec, trained, targets.store, targets.mlflow)
    assert model.promoted and model.version == "1"
    run = targets.mlflow.client().get_run(trained.run_id)
    assert run.data.tags["lifecycle.compute.workers"] == "2" and run.data.tags["lifecycle.compute.device"] == "cpu"
    assert run.info.artifact_uri.startswith(f"{prefix}/mlflow")
    # The registry really is the PostgreSQL database.
    rows = subprocess.run(["psql", postgres_db, "-tAc",
                           "select m.name, m.version, a.alias from model_versions m join registered_model_aliases a "
                           "on a.name = m.name and a.version = m.version"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert sorted(rows) == ["tickets|1|challenger", "tickets|1|champion"]


@pytest.mark.parametrize("terminate", [0.95, False], ids=["nanny-restarts", "paused-for-ever"])
def test_workers_out_of_memory_end_training_in_one_line_naming_the_limit_never_a_hang(
        tmp_path, mlflow_server, monkeypatch, terminate):
    """250 MiB workers on 100k rows. With Dask's defaults their nannies restart them past 95 % of the
    limit until `KilledWorker`; without that (`terminate: False`, as seen at 300 MiB: both workers paused
    at ~90 % and the stage waiting on them for ever) a worker only pauses and stays paused, and the watch
    restarts it. Either way training completes or fails in one line naming the limit, within a bound
    (here the pause limit is 5 s and `allowed-failures` 1: well under a minute per attempt)."""
    import re

    import dask
    import distributed  # noqa: F401 - its config defaults first: leaving `dask.config.set` restores what was before

    import tasks.worker_memory as worker_memory
    from flows.train import train
    from infra_blocks import DaskCompute
    from infra_blocks.dask_compute import close_local_clusters
    from lifecycle.records import TrainedModel
    from tasks.records import latest_record

    spec, store, dataset, report = _world(tmp_path, 100_000, num_boost_round=20, early_stopping_rounds=None)
    target = mlflow_server.target(model_name_prefix="oom-", experiment="oom")
    compute = DaskCompute(mode="local", n_workers=2, threads_per_worker=1, memory_limit="250MiB")
    monkeypatch.setattr(worker_memory, "PAUSED_LIMIT_S", 5.0)
    started = time.monotonic()
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                              "distributed.worker.memory.terminate": terminate}):
            state = train(spec, dataset, report, store, compute, target, return_state=True)
    finally:
        close_local_clusters(compute)
    took = time.monotonic() - started
    assert took < 240, f"training under memory pressure took {took:.0f} s"
    if state.is_completed():
        return
    with pytest.raises(worker_memory.WorkerMemoryError) as err:
        state.result()
    message = str(err.value)
    assert "\n" not in message and len(message) < 300, message
    assert re.fullmatch(r"a Dask worker exceeded its memory limit \(250 MiB per worker, DaskCompute\.memory_limit\) "
                        r"and was restarted \d+ times? during train \(.+\); raise memory_limit or use fewer, larger "
                        r"workers", message), message
    if terminate is False:
        assert "paused for over 5 s" in message, message
    # Nothing half-done: no model record, no MLflow run.
    assert latest_record(store, TrainedModel, spec.name) is None
    client = target.client()
    experiment = client.get_experiment_by_name("oom")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
