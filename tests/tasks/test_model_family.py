"""`train.model: xgboost | linear | auto`: the family chosen, registered, blessed and served.

The rule itself is tested as a pure function; then the train and register flows run on a real
`mlflow server` (SQLite) and local Dask: text-driven labels (the linear model must win), numeric
interactions (xgboost must win), xgboost forced on the text-driven data (registered, not promoted,
and the summary says why); and both registered families answer `/invocations` of the lean app
exactly as `mlflow.pyfunc.load_model(...).predict` does, nulls and unseen categories included.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lifecycle.errors import LifecycleError
from lifecycle.records import TrainedModel
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec
from tasks.model_family import choose_family
from tasks.registry import bless, versus_baseline


def _spec(**train):
    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", "train": train})


# --- the rule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, model, base, margin, family", [
    ("auto", 0.80, 0.77, 0.0, "xgboost"),
    ("auto", 0.77, 0.77, 0.0, "linear"),   # a tie: the simpler model, which the baseline gate would keep anyway
    ("auto", 0.70, 0.77, 0.0, "linear"),
    ("auto", 0.80, 0.77, 0.05, "linear"),  # better, but not by the margin the gate asks for
    ("xgboost", 0.70, 0.77, 0.0, "xgboost"),
    ("linear", 0.90, 0.77, 0.0, "linear"),
])
def test_auto_picks_xgboost_only_where_it_would_pass_the_baseline_gate(mode, model, base, margin, family):
    spec = _spec(model=mode, baseline_margin=margin)
    choice = choose_family(spec, "accuracy", True, {"accuracy": model}, {"accuracy": base})
    assert choice.family == family and choice.mode == mode
    assert choice.tags() == {"lifecycle.model.family": family, "lifecycle.model.choice": mode,
                             "lifecycle.model.reason": choice.reason}
    if mode == "auto":
        assert choice.reason.startswith(f"auto: xgboost accuracy {model:.4f} vs linear {base:.4f}")
    else:
        assert choice.reason == f"train.model: {mode}"


def test_lower_is_better_and_a_missing_linear_model():
    spec = _spec()
    assert choose_family(spec, "logloss", False, {"logloss": 0.3}, {"logloss": 0.4}).family == "xgboost"
    assert choose_family(spec, "logloss", False, {"logloss": 0.5}, {"logloss": 0.4}).family == "linear"
    alone = choose_family(spec, "accuracy", True, {"accuracy": 0.5}, None)
    assert alone.family == "xgboost" and "no linear model could be fit" in alone.reason
    with pytest.raises(LifecycleError, match="train.model is linear but no linear model could be fit"):
        choose_family(_spec(model="linear"), "accuracy", True, {"accuracy": 0.5}, None)


def test_defaults_are_auto_and_the_gate_on():
    assert (_spec().train.model, _spec().train.require_beats_baseline) == ("auto", True)


def _trained(family: str, value: float, base: float) -> TrainedModel:
    return TrainedModel(id="t1", dataset="tickets", dataset_version="d1", run_id="r", model_uri="models:/m-1",
                        metrics={"accuracy": value}, primary_metric="accuracy", greater_is_better=True,
                        baseline_metrics={"accuracy": base}, family=family)


def test_a_linear_model_is_the_baseline_and_may_be_promoted():
    linear = _trained("linear", 0.83, 0.83)
    assert versus_baseline(linear, 0.0) == (None, 0.83, "is the baseline (linear, accuracy 0.8300)")
    promote, text = bless(_spec(), linear, True, "promoted: no champion yet (accuracy=0.8300)")
    assert promote and text == "promoted: no champion yet (accuracy=0.8300); is the baseline (linear, accuracy 0.8300)"
    # The same numbers from xgboost are a tie: not good enough to earn a place.
    promote, text = bless(_spec(), _trained("xgboost", 0.83, 0.83), True, "promoted: no champion yet")
    assert not promote and text.startswith("not promoted: does not beat baseline (accuracy 0.8300 vs 0.8300)")


def test_export_refuses_what_the_scorer_cannot_reproduce_or_does_not_match(tmp_path):
    from lifecycle.features import build_schema
    from lifecycle.sample import generate_tickets
    from tasks import linear_export
    from tasks.baseline import BaselineResult, encode, make_pipeline, prepare

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", "train": {"use_text_embeddings": True}})
    frame = generate_tickets(300, seed=5)
    schema = build_schema(spec, {c: frame[c].unique().tolist() for c in spec.categorical_features},
                          sorted(frame[spec.label_column].unique()))
    pipeline = make_pipeline(spec)
    pipeline.set_params(features__text__stop_words="english")
    pipeline.fit(prepare(frame, spec), encode(frame[spec.label_column], spec.task, schema.classes))
    raw = np.zeros((20, 4))
    result = BaselineResult(family="logistic_regression", features="", metrics={}, y_true=np.zeros(20), raw=raw,
                            pipeline=pipeline, check_rows=frame.head(20))
    with pytest.raises(LifecycleError, match="TF-IDF settings cannot be served: {'stop_words': 'english'}"):
        linear_export.export_linear(result, schema, tmp_path)
    pipeline.set_params(features__text__stop_words=None)
    pipeline.fit(prepare(frame, spec), encode(frame[spec.label_column], spec.task, schema.classes))
    with pytest.raises(LifecycleError, match="disagrees with the fitted pipeline"):  # raw: not what it predicts
        linear_export.export_linear(result, schema, tmp_path)
    result.raw = pipeline.predict_proba(prepare(frame.head(20), spec))
    served = linear_export.export_linear(result, schema, tmp_path)
    assert (served.family, served.raw_text, served.embedding_dim) == ("linear", True, 0)
    assert served.input_columns == [*schema.input_columns, "text"]


# --- end to end on a real MLflow server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server):
    from infra_blocks import ObjectStore
    from lifecycle.records import ValidationReport

    tmp = tmp_path_factory.mktemp("family")
    report = ValidationReport(id="report-ok", dataset="x", dataset_version="x", success=True, evaluated=1)
    return dict(tmp=tmp, store=ObjectStore(url=f"file://{tmp / 'lake'}"), mlflow=mlflow_server.target(),
                report=report)


def text_frame(rows: int = 600) -> pd.DataFrame:
    """Labels drawn from the text's words; the numerics and the category carry nothing."""
    rng = np.random.default_rng(11)
    vocab = {"refund": ["invoice", "refund", "charge"], "crash": ["error", "crash", "timeout"],
             "login": ["password", "login", "locked"]}
    labels = rng.choice(list(vocab), size=rows)
    return pd.DataFrame({"id": np.arange(rows), "label": labels,
                         "text": [" ".join(rng.choice(vocab[v], size=2)) + " please help" for v in labels],
                         "x1": rng.normal(size=rows), "x2": rng.normal(size=rows),
                         "tier": rng.choice(["a", "b", "c"], size=rows)})


def interaction_frame(rows: int = 800) -> pd.DataFrame:
    rng = np.random.default_rng(12)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    return pd.DataFrame({"id": np.arange(rows), "x1": x1, "x2": x2, "x3": rng.normal(size=rows),
                         "tier": rng.choice(["a", "b"], size=rows),
                         "label": np.where(x1 * x2 > 0, "same", "opposite")})  # XOR: no linear model sees it


def _train_register(world, local_compute, name: str, frame: pd.DataFrame, text: bool, **train):
    from flows.register import register
    from flows.train import train as train_flow
    from tests.flows.test_train_register import _noise_embeddings, _own_dataset

    numeric = [c for c in frame.columns if c.startswith("x")]
    spec, dataset, report = _own_dataset(
        world, name, frame, task="multiclass" if text else "binary", numeric_features=numeric,
        categorical_features=["tier"], **({"text_column": "text"} if text else {}),
        train={"use_text_embeddings": text, "num_boost_round": 30, **train})
    embeddings = _noise_embeddings(world, dataset, frame) if text else None
    trained = train_flow(spec, dataset, report, world["store"], local_compute, world["mlflow"], embeddings)
    return spec, trained, register(spec, trained, world["store"], world["mlflow"])


@pytest.fixture(scope="module")
def text_auto(world, local_compute):
    return _train_register(world, local_compute, "textauto", text_frame(), text=True)


@pytest.fixture(scope="module")
def interactions_auto(world, local_compute):
    return _train_register(world, local_compute, "xorauto", interaction_frame(), text=False,
                           baseline_margin=0.1)


def test_auto_registers_the_linear_model_where_the_text_drives_the_label(text_auto, world):
    from cli.models import registered_fact

    _, trained, record = text_auto
    assert trained.family == "linear" and record.family == "linear"
    assert trained.metrics == trained.baseline_metrics and trained.metrics["accuracy"] > 0.95
    assert trained.xgboost_metrics["accuracy"] + 0.2 < trained.metrics["accuracy"]
    assert trained.family_reason.startswith("auto: xgboost accuracy") and "xgboost not better" in trained.family_reason
    assert record.promoted and record.aliases == ["challenger", "champion"] and record.beats_baseline is None
    verdict = f"is the baseline (linear, accuracy {trained.metrics['accuracy']:.4f})"
    assert record.baseline_verdict == verdict and record.decision.endswith(f"; {verdict}")
    assert registered_fact(record) == f"textauto v1 · champion · {verdict}"
    client = world["mlflow"].client()
    run = client.get_run(trained.run_id).data
    assert run.tags["lifecycle.model.family"] == "linear" and run.tags["lifecycle.model.choice"] == "auto"
    assert run.tags["lifecycle.model.reason"] == trained.family_reason
    assert run.metrics["accuracy"] == trained.metrics["accuracy"] == run.metrics["baseline_accuracy"]
    assert run.metrics["xgboost_accuracy"] == trained.xgboost_metrics["accuracy"]
    files = {f.path for d in ("lifecycle", "candidates", "plots") for f in client.list_artifacts(trained.run_id, d)}
    assert {"lifecycle/linear_model.npz", "lifecycle/feature_schema.json", "candidates/booster.json",
            "plots/confusion_matrix.png", "plots/baseline_confusion_matrix.png"} <= files
    assert "lifecycle/booster.json" not in files  # what serving loads is the registered family only
    assert client.get_model_version("textauto", "1").tags["lifecycle.family"] == "linear"


def test_auto_registers_xgboost_where_numeric_interactions_drive_the_label(interactions_auto):
    _, trained, record = interactions_auto
    assert trained.family == record.family == "xgboost" and trained.metrics == trained.xgboost_metrics
    assert trained.metrics["accuracy"] > 0.85 and trained.baseline_metrics["accuracy"] < 0.65
    assert "xgboost better by" in trained.family_reason
    assert record.promoted and record.beats_baseline and record.baseline_verdict.startswith("beats baseline by ")


def test_xgboost_forced_on_text_is_registered_not_promoted_and_says_why(world, local_compute):
    from cli.models import registered_fact

    _, trained, record = _train_register(world, local_compute, "textforced", text_frame(), text=True,
                                         model="xgboost")
    assert trained.family == "xgboost" and trained.family_reason == "train.model: xgboost"
    assert record.version == "1" and not record.promoted and record.aliases == ["challenger"]
    verdict = (f"does not beat baseline (accuracy {trained.metrics['accuracy']:.4f} vs "
               f"{trained.baseline_metrics['accuracy']:.4f})")
    assert record.beats_baseline is False and record.baseline_verdict == verdict
    assert record.decision.startswith(f"not promoted: {verdict}; champion check: no champion yet")
    assert registered_fact(record) == f"textforced v1 · challenger (not promoted) · {verdict}"
    assert dict(world["mlflow"].client().get_registered_model("textforced").aliases) == {"challenger": "1"}


def _odd_rows(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    rows = frame.head(25).copy()
    rows.loc[1, "tier"] = "never-seen"
    rows.loc[2, "tier"] = None
    rows.loc[3, "x1"] = None
    if "text" in rows:
        rows.loc[4, "text"] = None
        rows.loc[5, "text"] = "nothing in the vocabulary ÄÖÜ 🎉"
    return rows[columns].astype(object).where(rows[columns].notna(), None).to_dict("records")


@pytest.mark.parametrize("which", ["text_auto", "interactions_auto"])
def test_both_families_answer_invocations_as_the_mlflow_pyfunc(which, request, world, tmp_path):
    """The deploy snapshot of the champion (downloaded from its run) served by the lean app, against
    `mlflow.pyfunc.load_model(models:/name@champion).predict` on the same rows."""
    import mlflow.pyfunc
    import orjson
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.config import ServingConfig
    from serving.model import load_model
    from tasks.serving import download_model_files

    spec, trained, record = request.getfixturevalue(which)
    folder = download_model_files(world["mlflow"], trained.run_id, tmp_path / "snapshot")
    served = load_model(folder)
    assert served.schema.family == trained.family
    world["mlflow"].apply_env()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{record.model_name}@champion")
    frame = text_frame() if which == "text_auto" else interaction_frame()
    rows = _odd_rows(frame, served.schema.input_columns)
    client = TestClient(create_app(ServingConfig(model_dir=str(folder), lineage={"deployment_id": "t"})))
    for proba in (False, True):
        resp = client.post("/invocations", content=orjson.dumps({"dataframe_records": rows,
                                                                 "params": {"probabilities": proba}}),
                           headers={"Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text
        expected = pd.DataFrame(pyfunc.predict(pd.DataFrame(rows), params={"probabilities": proba}))
        got = resp.json()["predictions"]
        if trained.family == "linear":  # the same scorer on both sides: the same JSON
            assert got == expected.to_dict("records")
        assert [r["prediction"] for r in got] == expected["prediction"].tolist()
        if proba:
            assert np.allclose(pd.DataFrame(got)[expected.columns[1:]].to_numpy(dtype=float),
                               expected[expected.columns[1:]].to_numpy(dtype=float), rtol=1e-6, atol=1e-7)
