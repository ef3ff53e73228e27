"""Registry: the promotion rule, scoring a champion's pyfunc output, record ids and retry policy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lifecycle.errors import LifecycleError
from lifecycle.records import TrainedModel
from lifecycle.spec import Task
from tasks import registry


def test_first_model_is_promoted():
    promoted, text = registry.decide("accuracy", True, 0.71, None, margin=0.05)
    assert promoted and text == "promoted: no champion yet (accuracy=0.7100)"


@pytest.mark.parametrize(
    ("metric", "greater", "challenger", "champion", "margin", "promoted"),
    [
        ("accuracy", True, 0.80, 0.75, 0.0, True),
        ("accuracy", True, 0.80, 0.75, 0.05, True),  # exactly the margin counts
        ("accuracy", True, 0.80, 0.78, 0.05, False),  # better, but not by the margin
        ("accuracy", True, 0.75, 0.75, 0.0, False),  # a tie never moves the alias
        ("accuracy", True, 0.70, 0.75, 0.0, False),
        ("rmse", False, 1.0, 1.2, 0.1, True),  # lower is better
        ("rmse", False, 1.2, 1.0, 0.0, False),
        ("logloss", False, 1.15, 1.2, 0.1, False),
    ],
)
def test_promotion_respects_direction_and_margin(metric, greater, challenger, champion, margin, promoted):
    decided, text = registry.decide(metric, greater, challenger, champion, margin, champion_version="3")
    assert decided is promoted
    assert text.startswith("promoted:" if promoted else "kept champion v3:")
    assert f"{challenger:.4f}" in text and f"{champion:.4f}" in text and f"margin {margin:g}" in text


def test_scores_follow_class_names_not_column_order():
    labels = pd.Series(["b", "a", "b", "c"])
    # The champion lists its classes in its own order and never saw class "c".
    predictions = pd.DataFrame({"prediction": ["b", "a", "a", "b"],
                                "proba_b": [0.9, 0.2, 0.4, 0.7], "proba_a": [0.1, 0.8, 0.6, 0.3]})
    scores = registry.score_predictions(Task.multiclass, labels, predictions)
    assert scores["accuracy"] == 0.5
    assert scores["logloss"] > 5  # the unseen class got probability ~0


def test_scores_for_regression_use_the_prediction_column():
    scores = registry.score_predictions(Task.regression, pd.Series([1.0, 3.0]),
                                        pd.DataFrame({"prediction": [2.0, 3.0]}))
    assert math.isclose(scores["rmse"], math.sqrt(0.5)) and math.isclose(scores["mae"], 0.5)


def _trained(**changes) -> TrainedModel:
    base = dict(id="t1", dataset="tickets", dataset_version="d1", run_id="r1", model_uri="models:/m-1",
                metrics={"accuracy": 0.8}, primary_metric="accuracy", greater_is_better=True)
    return TrainedModel(**{**base, **changes})


def test_record_id_changes_with_model_rule_and_code():
    rule = (False, 0.0)
    base = registry.model_version_id(_trained(), "tickets", 0.0, "c1", rule)
    assert base == registry.model_version_id(_trained(), "tickets", 0.0, "c1", rule)
    others = {registry.model_version_id(_trained(id="t2"), "tickets", 0.0, "c1", rule),
              registry.model_version_id(_trained(), "prod-tickets", 0.0, "c1", rule),
              registry.model_version_id(_trained(), "tickets", 0.01, "c1", rule),
              registry.model_version_id(_trained(primary_metric="logloss"), "tickets", 0.0, "c1", rule),
              registry.model_version_id(_trained(), "tickets", 0.0, "c2", rule),
              registry.model_version_id(_trained(), "tickets", 0.0, "c1", (True, 0.0)),
              registry.model_version_id(_trained(), "tickets", 0.0, "c1", (False, 0.02))}
    assert base not in others and len(others) == 7


def _gate_spec(**train):
    from lifecycle.sample import SAMPLE_SPEC
    from lifecycle.spec import parse_spec

    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", "train": train})


@pytest.mark.parametrize(
    ("metric", "greater", "model", "base", "margin", "beats"),
    [
        ("accuracy", True, 0.80, 0.75, 0.0, True),
        ("accuracy", True, 0.80, 0.75, 0.05, True),  # exactly the margin counts
        ("accuracy", True, 0.80, 0.78, 0.05, False),  # better, but not by the margin
        ("accuracy", True, 0.75, 0.75, 0.0, False),  # a tie does not earn a place
        ("accuracy", True, 0.702, 0.772, 0.0, False),  # the catalogue case of the issue
        ("rmse", False, 1.0, 1.2, 0.1, True),  # lower is better
        ("logloss", False, 0.6, 0.5, 0.0, False),
    ],
)
def test_baseline_verdict_respects_direction_and_margin(metric, greater, model, base, margin, beats):
    trained = _trained(metrics={metric: model}, primary_metric=metric, greater_is_better=greater,
                       baseline_metrics={metric: base})
    decided, value, verdict = registry.versus_baseline(trained, margin)
    assert decided is beats and value == base
    if beats:
        assert verdict.startswith(f"beats baseline by {abs(model - base):.4f}")
    else:
        assert verdict.startswith("does not beat baseline") and f"({metric} {model:.4f} vs {base:.4f})" in verdict


def test_bless_refuses_a_model_the_baseline_beats_unless_turned_off():
    loses = _trained(metrics={"accuracy": 0.70}, baseline_metrics={"accuracy": 0.77})
    wins = _trained(metrics={"accuracy": 0.80}, baseline_metrics={"accuracy": 0.77})
    first = "promoted: no champion yet (accuracy=0.7000)"
    promote, text = registry.bless(_gate_spec(require_beats_baseline=True), loses, True, first)
    assert not promote
    assert text == ("not promoted: does not beat baseline (accuracy 0.7000 vs 0.7700); "
                    "champion check: no champion yet (accuracy=0.7000)")
    promote, text = registry.bless(_gate_spec(require_beats_baseline=True), wins, True, "promoted: x")
    assert promote and text == "promoted: x; beats baseline by 0.0300 (accuracy 0.8000 vs 0.7700)"
    promote, text = registry.bless(_gate_spec(require_beats_baseline=True), loses, False, "kept champion v2: y")
    assert not promote and text.startswith("kept champion v2: y; does not beat baseline")
    # Off: the champion rule alone decides, and the decision still says where the model stands.
    promote, text = registry.bless(_gate_spec(require_beats_baseline=False), loses, True, first)
    assert promote and text.endswith("does not beat baseline (accuracy 0.7000 vs 0.7700) (not required)")
    # A margin over the baseline.
    promote, _ = registry.bless(_gate_spec(require_beats_baseline=True, baseline_margin=0.05), wins, True, "p")
    assert not promote
    # A record from before baselines: nothing to judge by, the champion rule decides.
    old = _trained(metrics={"accuracy": 0.70})
    promote, text = registry.bless(_gate_spec(require_beats_baseline=True), old, True, "promoted: z")
    assert promote and text == "promoted: z; no baseline in the training record"


def test_only_transient_mlflow_failures_are_retried():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert registry.is_transient(requests.ConnectionError("refused"))
    assert registry.is_transient(ConnectionResetError())
    assert registry.is_transient(MlflowException("API request to http://mlflow/api failed with exception x"))
    assert registry.is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not registry.is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not registry.is_transient(MlflowException("a bug"))  # default INTERNAL_ERROR
    assert not registry.is_transient(LifecycleError("bad spec"))
    assert not registry.is_transient(ValueError("bug"))


def test_holdout_metrics_shape_is_what_scoring_compares():
    """score_predictions and training report the same metric names, so the comparison is like for like."""
    from tasks.training import TASK_METRICS

    labels = pd.Series(["x", "y"] * 5)
    preds = pd.DataFrame({"prediction": ["x"] * 10, "proba_x": np.full(10, 0.6), "proba_y": np.full(10, 0.4)})
    assert set(registry.score_predictions(Task.binary, labels, preds)) == set(TASK_METRICS[Task.binary])


def test_an_unreachable_server_becomes_one_transient_line(monkeypatch):
    """A real client against a port nobody listens on: the error users see, and that retries retry."""
    from infra_blocks import MlflowTarget
    from tests.fixtures.dask_mlflow import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    target = MlflowTarget(tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(registry.MlflowUnavailableError) as err:
        with registry.reaching(target, "registering tickets", "nothing was promoted"):
            target.client().get_registered_model("tickets")
    assert str(err.value) == (f"MLflow at {target.tracking_uri} is unreachable while registering tickets "
                              "(Connection refused); nothing was promoted")
    assert registry.is_transient(err.value) and registry.is_transient(err.value.__cause__)
    assert not registry.is_transient(LifecycleError("bad spec"))
    # Anything else passes through untouched: a wrong input is not retried and keeps its own message.
    with pytest.raises(ValueError, match="bug"):
        with registry.reaching(target, "x"):
            raise ValueError("bug")


@pytest.mark.parametrize(("message", "reason"), [
    ("API request to http://h/api failed with exception HTTPConnectionPool(host='h', port=5000): Max retries "
     "exceeded (Caused by NewConnectionError('<x>: Failed to establish a new connection: [Errno 111] Connection "
     "refused'))", "Connection refused"),
    ("API request to http://h/api failed with exception ReadTimeoutError: Read timed out. (read timeout=5)",
     "timed out"),
    ("(psycopg.OperationalError) connection failed: server closed the connection\nunexpectedly",
     "(psycopg.OperationalError) connection failed: server closed the connection"),
])
def test_short_reasons(message, reason):
    assert registry.short_reason(RuntimeError(message)) == reason


def test_a_version_registered_on_a_database_store_is_listed_on_its_logged_model(tmp_path):
    """The local profile talks to SQLite directly: no server adds the logged model's link, so we do, once."""
    import json

    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "a").as_uri()))
        with mlflow.start_run() as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        trained = _trained(run_id=run.info.run_id, model_uri=info.model_uri)
        first = registry._create_version(client, "tickets", trained, {})
        second = registry._create_version(client, "tickets", trained, {})
        registry._link_logged_model(client, info.model_id, "tickets", second.version)  # again: no duplicate
    finally:
        mlflow.set_tracking_uri(None)
    listed = json.loads(client.get_logged_model(info.model_id).tags["mlflow.modelVersions"])
    assert listed == [{"name": "tickets", "version": int(first.version)},
                      {"name": "tickets", "version": int(second.version)}]
