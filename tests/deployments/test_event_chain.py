"""The orchestration surface against a real `prefect server` and a real process worker.

One stack for the module (tests/fixtures/prefect_server.py): deployed with `prefect deploy --all` from a
clean copy of the repository, the lake on the moto S3 endpoint, the e2e profile as the server's default.
The tests run in file order; the chain test leaves a deployed model the later tests build on.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from typer.testing import CliRunner

from lifecycle.records import DatasetVersion, Deployment, EmbeddingSet, ModelVersion, TrainedModel, ValidationReport
from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from tests.fixtures.prefect_server import is_final, runs_of, runs_report, started_runs, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EXPECTED = {"lifecycle/nightly", "lifecycle/gpu-docker", "lifecycle/gpu-k8s", "watch-landing/watch-landing",
            "landed/landed", "ingest-validate/ingest-validate", "build/build", "stage-ingest/ingest",
            "stage-validate/validate", "stage-embed/embed", "stage-index/index", "stage-train/train",
            "stage-register/register", "stage-deploy/deploy"}
CHAIN_BOUND_S = 420


@pytest.fixture(scope="module")
def stack(lifecycle_stack, tmp_path_factory):
    """The stack with the tickets spec registered (`lifecycle register`) for its landing zone; few boosting
    rounds, for speed."""
    import yaml

    from cli.app import app
    from tasks.specs import registered_spec

    store = lifecycle_stack.targets.store
    spec = tmp_path_factory.mktemp("spec") / "tickets.yaml"
    spec.write_text(yaml.safe_dump({**SAMPLE_SPEC, "source": store.uri("landing/tickets"),
                                    "train": {"num_boost_round": 20}}))
    result = CliRunner(env={"PREFECT_API_URL": lifecycle_stack.api_url}).invoke(app, ["register", str(spec)])
    assert result.exit_code == 0, result.output
    assert registered_spec(store, "tickets").train.num_boost_round == 20
    return lifecycle_stack


def records(store, cls) -> list:
    from lifecycle.records import parse_record

    return [parse_record(cls, store.read_bytes(k)) for k in store.list_keys(f"records/{cls.kind}")]


def put_csv(store, key: str, rows: int, seed: int, first_id: int = 1) -> str:
    """Sample rows as a CSV object; ids from `first_id` (landings append: an id already in the table is
    refused)."""
    frame = generate_tickets(rows, seed=seed)
    frame["ticket_id"] += first_id - 1
    store.write_bytes(key, frame.to_csv(index=False).encode())
    return store.uri(key)


def versions_from(store, uri: str) -> list[DatasetVersion]:
    return [d for d in records(store, DatasetVersion) if d.source == uri]


def events(prefix: str) -> list[dict]:
    """Events the server stored whose name starts with `prefix` (the last hour's)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.request("POST", "/events/filter", json={"filter": {"event": {"prefix": [prefix]}},
                                                               "limit": 50}).json()
    return found["events"]


def deployments_on_server() -> dict:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}


def test_deploy_all_from_a_clean_copy_gives_typed_deployments_triggers_and_a_nightly_schedule(stack):
    from prefect.client.orchestration import get_client

    deployments = deployments_on_server()
    assert set(deployments) == EXPECTED
    for name, dep in deployments.items():
        assert dep.enforce_parameter_schema, name
        assert dep.parameter_openapi_schema["properties"], name
        if not name.startswith("lifecycle/gpu"):
            [step] = dep.pull_steps
            assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(stack.repo)
    spec_schema = deployments["lifecycle/nightly"].parameter_openapi_schema
    assert spec_schema["definitions"]["DatasetSpec"]["properties"]["task"]  # a typed form in the UI

    with get_client(sync_client=True) as client:
        automations = {a.name for a in client.read_automations()}
        schedules = client.read_deployment_schedules(deployments["lifecycle/nightly"].id)
    assert automations == {"landed file → ingest-validate", "validated → build", "promoted → deploy"}
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in schedules] == [("0 2 * * *", "UTC", True)]

    scheduled = wait_until(lambda: [r for r in runs_of("lifecycle/nightly") if r.state_type.value == "SCHEDULED"],
                           60, "the server to schedule nightly runs")
    assert all((r.expected_start_time.hour, r.expected_start_time.minute) == (2, 0) for r in scheduled)
    assert len({r.expected_start_time.date() for r in scheduled}) == len(scheduled)  # one a night


def test_a_run_started_through_the_api_with_parameters_is_completed_by_the_worker(stack):
    from prefect.deployments import run_deployment

    uri = put_csv(stack.targets.store, "raw/tickets-api.csv", rows=200, seed=3, first_id=100_001)
    run = run_deployment("stage-ingest/ingest", parameters={"dataset": "tickets", "source": uri}, timeout=240,
                         poll_interval=1)
    assert run.state_type.value == "COMPLETED", f"{run.state.message}\n{runs_report()}"
    [version] = versions_from(stack.targets.store, uri)  # no profile given: the server's default (e2e) was used
    assert version.rows == 200 and version.added_rows == 200  # one commit of the dataset's Delta table
    assert stack.targets.store.exists(f"datasets/tickets/_delta_log/{version.table_version:020d}.json")


SPEC = {**SAMPLE_SPEC, "source": "s3://x/y.csv"}


@pytest.mark.parametrize("deployment, parameters", [
    ("stage-validate/validate", {"dataset_version": 123}),
    ("stage-validate/validate", {"dataset_version": "../../etc/passwd"}),
    ("build/build", {"validation": "0123456789abcdef", "profile": 7}),
    ("stage-ingest/ingest", {"dataset": "Not A Dataset"}),
    ("stage-ingest/ingest", {}),
    ("lifecycle/nightly", {"spec": {**SPEC, "task": "clustering"}}),
    ("lifecycle/nightly", {"spec": {**SPEC, "name": "Tickets!"}}),
    ("lifecycle/nightly", {"spec": {**SPEC, "train": {"num_boost_round": "many"}}}),
], ids=["wrong-type", "bad-id", "profile-type", "bad-dataset-name", "missing", "bad-task", "bad-spec-name",
        "nested-type"])
def test_bad_parameters_are_refused_before_a_run_exists(stack, deployment, parameters):
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    before = len(runs_of(deployment))
    with pytest.raises(PrefectHTTPStatusError) as err:
        run_deployment(deployment, parameters=parameters, timeout=0)
    assert err.value.response.status_code == 409
    assert "Validation failed" in err.value.response.text
    assert len(runs_of(deployment)) == before


def test_unknown_profile_or_dataset_fails_at_once_in_one_line(stack):
    from prefect.deployments import run_deployment

    before = len(records(stack.targets.store, DatasetVersion))
    runs = [run_deployment("stage-validate/validate", timeout=0,
                           parameters={"dataset_version": "0123456789abcdef", "profile": "nope"}),
            run_deployment("stage-ingest/ingest", parameters={"dataset": "unknown-set"}, timeout=0)]
    ids = [r.id for r in runs]

    def both_final():
        now = [_read(i) for i in ids]
        return now if all(is_final(r) for r in now) else None

    finished = wait_until(both_final, 180, "both runs to fail", explain=runs_report)
    messages = [r.state.message for r in finished]
    assert [r.state_type.value for r in finished] == ["FAILED", "FAILED"], messages
    assert "profile 'nope': blocks not found" in messages[0]
    assert "dataset 'unknown-set': no spec registered" in messages[1]
    assert all(r.total_run_time < timedelta(seconds=20) for r in finished)
    assert len(records(stack.targets.store, DatasetVersion)) == before


def _read(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _set_watcher_interval(seconds: float | None) -> None:
    """The watcher runs every minute; the test makes it every few seconds (None: pause it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import IntervalSchedule

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("watch-landing/watch-landing")
        [schedule] = client.read_deployment_schedules(dep.id)
        if seconds is None:
            client.update_deployment_schedule(dep.id, schedule.id, active=False)
        else:
            client.update_deployment_schedule(dep.id, schedule.id, schedule=IntervalSchedule(
                interval=timedelta(seconds=seconds)))


def test_a_csv_landing_in_s3_ends_as_a_served_model_with_no_further_action(stack):
    store = stack.targets.store
    _set_watcher_interval(8)
    t0 = time.monotonic()
    uri = put_csv(store, "landing/tickets/batch-001.csv", rows=300, seed=11)
    try:
        wait_until(lambda: started_runs("landed/landed"), 120, "the watcher to announce the file", explain=runs_report)
    finally:
        _set_watcher_interval(None)  # every 8 s costs a process start each time: once is enough here
    wait_until(lambda: any(r.state_type.value == "COMPLETED" for r in runs_of("stage-deploy/deploy")),
               CHAIN_BOUND_S, "landed → ingest-validate → build → deploy", interval_s=2, explain=runs_report)
    print(f"landing → serving: {time.monotonic() - t0:.1f}s")

    [version] = versions_from(store, uri)
    [report] = [r for r in records(store, ValidationReport) if r.dataset_version == version.id]
    assert report.success
    [model] = [m for m in records(store, ModelVersion)]
    assert model.promoted and "champion" in model.aliases
    [deployment] = records(store, Deployment)
    assert deployment.status == "serving" and deployment.model_version == model.version
    lineage = httpx.get(f"{deployment.endpoint}/version", timeout=10).json()
    assert lineage["dataset_version"] == version.id and lineage["model_record"] == model.id
    for name in ("ingest-validate/ingest-validate", "build/build", "stage-deploy/deploy"):
        runs = started_runs(name)
        assert [r.state_type.value for r in runs] == ["COMPLETED"], f"{name}\n{runs_report()}"
    assert started_runs("ingest-validate/ingest-validate")[0].parameters["uri"] == uri
    assert "lifecycle-chain" in started_runs("ingest-validate/ingest-validate")[0].tags
    assert [e["resource"]["prefect.resource.id"] for e in events("lifecycle.dataset.landed")] == [uri]
    # A trigger whose parameters fail to render starts no run and says so only in this event.
    assert events("prefect.automation.action.failed") == []


def notification(store, key: str) -> dict:
    """The S3 event notification a bucket sends for an object (URL-encoded key, ETag from the server)."""
    from urllib.parse import quote_plus

    fs = store.filesystem()
    info = fs.info(store.path(key))
    bucket, path = store.path(key).split("/", 1)
    return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "eventTime": "2026-05-01T12:00:00.000Z",
                         "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(path), "size": info["size"],
                                                                       "eTag": info["ETag"].strip('"')}}}]}


def test_the_same_object_announced_again_and_again_is_ingested_once(stack, tmp_path):
    from prefect.deployments import run_deployment

    from cli.app import app

    store = stack.targets.store
    chain_uri = store.uri("landing/tickets/batch-001.csv")
    landed_before = len(started_runs("landed/landed"))
    runner = CliRunner(env={"PREFECT_API_URL": stack.api_url})
    # The chain's object once more, twice, the way the bucket would re-send it.
    (tmp_path / "again.json").write_text(json.dumps(notification(store, "landing/tickets/batch-001.csv")))
    for _ in range(2):
        result = runner.invoke(app, ["notify", str(tmp_path / "again.json")])
        assert result.exit_code == 0 and "landed " + chain_uri in result.output, result.output
    # A new object: notified, plus two redeliveries straight to the landed deployment (as after a restart,
    # when the server no longer remembers the event id), racing each other.
    uri = put_csv(store, "landing/tickets/batch-002.csv", rows=60, seed=5)  # ids already in the table
    event = notification(store, "landing/tickets/batch-002.csv")
    (tmp_path / "new.json").write_text(json.dumps(event))
    assert runner.invoke(app, ["notify", str(tmp_path / "new.json")]).exit_code == 0
    etag = event["Records"][0]["s3"]["object"]["eTag"]
    for _ in range(2):
        run_deployment("landed/landed", parameters={"uri": uri, "etag": etag}, timeout=0)

    def settled():
        landed = started_runs("landed/landed")
        ingest = [r for r in started_runs("ingest-validate/ingest-validate") if r.parameters["uri"] == uri]
        return (len(landed) >= landed_before + 3 and all(is_final(r) for r in landed) and ingest
                and all(is_final(r) for r in ingest))

    wait_until(settled, 240, "the announcements to settle", interval_s=2, explain=runs_report)
    ingests = started_runs("ingest-validate/ingest-validate")
    assert len([r for r in ingests if r.parameters["uri"] == chain_uri]) == 1
    [new] = [r for r in ingests if r.parameters["uri"] == uri]
    assert new.state_type.value == "FAILED" and "failed validation" in new.state.message  # quarantined, once
    assert all(r.state_type.value == "COMPLETED" for r in started_runs("landed/landed")[landed_before:])
    assert versions_from(store, uri) == []  # write–audit–publish: it never became a version of the table
    [report] = [r for r in records(store, ValidationReport) if not r.success]
    assert store.exists(f"quarantine/tickets/{report.dataset_version}/report.json")
    assert len(started_runs("build/build")) == 1  # a quarantined version starts nothing


def test_a_stage_triggered_again_for_the_same_record_does_the_work_once(stack):
    from tasks.orchestration import CHAIN_TAG, send_events

    store = stack.targets.store
    [report] = [r for r in records(store, ValidationReport) if r.success]
    counts = {cls.kind: len(records(store, cls)) for cls in (EmbeddingSet, TrainedModel, ModelVersion, Deployment)}
    builds_before = len(started_runs("build/build"))
    chain = [{"prefect.resource.id": f"prefect.tag.{CHAIN_TAG}", "prefect.resource.role": "tag"}]
    send_events([{"event": ValidationReport.event, "resource": report.event_payload(), "id": uuid.uuid4(),
                  "payload": {"record": report.model_dump(mode="json")}, "related": chain}])
    builds = wait_until(lambda: len(r := started_runs("build/build")) > builds_before
                        and all(is_final(x) for x in r) and r, 240, "a second build run", interval_s=2,
                        explain=runs_report)
    assert [r.state_type.value for r in builds] == ["COMPLETED", "COMPLETED"]
    assert {cls.kind: len(records(store, cls)) for cls in (EmbeddingSet, TrainedModel, ModelVersion, Deployment)} \
        == counts
    assert len(started_runs("stage-deploy/deploy")) == 1  # a cached registration announces nothing


def test_work_on_one_dataset_never_overlaps_but_other_datasets_do_not_wait(stack):
    """The lock every entry point holds (a one-slot global concurrency limit per dataset), on the server."""
    import contextvars
    import threading

    from tasks.orchestration import dataset_lock

    spans: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    a_inside, b_done = threading.Event(), threading.Event()

    def hold_a() -> None:
        with dataset_lock("lock-a"):
            start = time.monotonic()
            a_inside.set()
            b_done.wait(30)  # the first holder keeps the lock until the other dataset's work is done
            time.sleep(0.5)
            spans["a"].append((start, time.monotonic()))

    def hold_b() -> None:
        a_inside.wait(30)
        with dataset_lock("lock-b"):
            spans["b"].append((time.monotonic(), time.monotonic()))
        b_done.set()

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(fn,)) for fn in (hold_a, hold_a, hold_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    (s1, e1), (s2, e2) = sorted(spans["a"])
    assert s2 >= e1, "two holders of one dataset's lock overlapped"
    [(sb, eb)] = spans["b"]
    assert s1 < sb and eb < e1, "another dataset waited for this one"


def _flow_name(run) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow(run.flow_id).name


def _running_subflow(parent_id, name: str):
    """A running stage flow (`train`, …) under the flow run `parent_id`, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterStateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]),
            state=dict(type=FlowRunFilterStateType(any_=["RUNNING"]))))
    return next((r for r in runs if _flow_name(r) == name), None)


def test_a_run_cancelled_through_the_api_during_train_ends_cancelled_and_leaves_nothing_running(stack):
    """What the UI's Cancel does: the run's state is set to Cancelling; the worker stops the run's process."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from cli.server import read_state

    uri = put_csv(stack.targets.store, "raw/cancelled.csv", rows=2000, seed=21)
    spec = {k: v for k, v in SAMPLE_SPEC.items() if k != "text_column"}
    spec.update(name="cancelled", source=uri, train={"num_boost_round": 100_000, "early_stopping_rounds": None})
    run = run_deployment("lifecycle/nightly", parameters={"spec": spec}, timeout=0)
    wait_until(lambda: _running_subflow(run.id, "train"), 300, "the run to reach train", interval_s=2,
               explain=runs_report)
    [worker] = [p for p in read_state(stack.home).processes if p.name == "prefect-worker"]
    # The stage's local cluster takes a while to spawn its workers on a busy machine: wait for the run's
    # process and its Dask workers, then a little more, well inside the boosting.
    children = wait_until(lambda: (c := psutil.Process(worker.pid).children(recursive=True))[1:] and c, 120,
                          "the run's Dask workers to start", interval_s=1, explain=runs_report)
    time.sleep(3)
    children = psutil.Process(worker.pid).children(recursive=True)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"), force=True)
    t0 = time.monotonic()
    final = wait_until(lambda: (r := _read(run.id)).state_type.value == "CANCELLED" and r, 30,
                       "the run to end Cancelled", explain=runs_report)
    print(f"cancel → Cancelled: {time.monotonic() - t0:.1f}s")
    left = wait_until(lambda: not [c for c in children if c.is_running()] or None, 10,
                      "the run's processes to end", explain=lambda: str([c for c in children if c.is_running()]))
    assert left and final.state_type.value == "CANCELLED"
    assert psutil.Process(worker.pid).is_running()  # the worker itself goes on taking runs
    assert not [m for m in records(stack.targets.store, TrainedModel) if m.dataset == "cancelled"]


def test_landings_append_and_the_model_after_the_last_is_trained_on_every_row(stack, tmp_path):
    """Two more files land after the first: each is one more commit, the model built after the last one
    is trained on the rows of all three (its record and its MLflow run say so), and the earlier versions
    still read back exactly (delta-rs time travel, no lifecycle code)."""
    import mlflow
    from deltalake import DeltaTable

    from cli.app import app
    from tasks.ingest import read_dataset
    from tasks.lake import table_state, table_uri

    store = stack.targets.store
    runner = CliRunner(env={"PREFECT_API_URL": stack.api_url})
    first = store.uri("landing/tickets/batch-001.csv")
    keys = ["landing/tickets/batch-003.csv", "landing/tickets/batch-004.csv"]
    uris = [put_csv(store, keys[0], rows=80, seed=31, first_id=10_001),
            put_csv(store, keys[1], rows=70, seed=32, first_id=20_001)]
    for i, (key, uri) in enumerate(zip(keys, uris)):
        (tmp_path / f"n{i}.json").write_text(json.dumps(notification(store, key)))
        assert runner.invoke(app, ["notify", str(tmp_path / f"n{i}.json")]).exit_code == 0
        wait_until(lambda u=uri: versions_from(store, u), 240, f"{uri} to be committed", interval_s=2,
                   explain=runs_report)

    [last] = versions_from(store, uris[-1])

    def registered():
        trained = [m for m in records(store, TrainedModel) if m.dataset_version == last.id]
        done = trained and any(v.trained_model == trained[0].id for v in records(store, ModelVersion))
        runs = started_runs("build/build") + started_runs("stage-deploy/deploy")
        return done and all(is_final(r) for r in runs) and trained[0]

    model = wait_until(registered, CHAIN_BOUND_S, "a model of the last version", interval_s=2, explain=runs_report)
    [v1] = versions_from(store, first)
    [v2] = versions_from(store, uris[0])
    assert (v2.table_version, last.table_version) == (v1.table_version + 1, v1.table_version + 2)
    assert (v2.rows, last.rows) == (v1.rows + 80, v1.rows + 150) and last.table_version == table_state(
        store, "tickets").version
    assert model.rows["train"] + model.rows["holdout"] == last.rows
    mlflow.set_tracking_uri(stack.targets.mlflow.tracking_uri)
    params = mlflow.get_run(model.run_id).data.params
    assert int(params["train_rows"]) + int(params["holdout_rows"]) == last.rows
    for version, added in ((v1, range(1, 301)), (v2, range(10_001, 10_081))):
        table = DeltaTable(table_uri(store, "tickets"), version=version.table_version,
                           storage_options=store.delta_storage_options())
        ids = sorted(table.to_pyarrow_dataset().to_table(columns=["ticket_id"]).column(0).to_pylist())
        assert ids == sorted(read_dataset(store, version)["ticket_id"]) and len(ids) == version.rows
        assert set(added) <= set(ids) and not set(ids) & set(range(20_001, 20_071))
