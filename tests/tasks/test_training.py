"""Training: the pure pieces (split, params, metrics) and a real run on the sample (Dask + SQLite MLflow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lifecycle.errors import LifecycleError
from lifecycle.records import ValidationReport
from lifecycle.spec import SplitConfig, Task, parse_spec
from tasks import training


def _spec(**overrides):
    from lifecycle.sample import SAMPLE_SPEC

    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", **overrides})


def _mlflow_target(tmp: Path):
    from infra_blocks import MlflowTarget

    return MlflowTarget(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=f"file://{tmp}/artifacts")


def _report(dataset) -> ValidationReport:
    return ValidationReport(id=f"report-{dataset.id}", dataset=dataset.dataset, dataset_version=dataset.id,
                            success=True, evaluated=1)


# --- pure functions -------------------------------------------------------------------------------

def test_holdout_mask_is_deterministic_and_close_to_the_fraction():
    ids = pd.Series(np.arange(20_000, dtype=np.int64))
    split = SplitConfig(holdout_fraction=0.2, salt="s1")
    first = training.holdout_mask(ids, split)
    assert first.dtype == bool
    assert np.array_equal(first, training.holdout_mask(ids, split))
    assert abs(first.mean() - 0.2) < 0.015
    # Membership depends on the id alone: order, chunking and int-vs-text ids do not matter.
    shuffled = ids.sample(frac=1.0, random_state=3)
    assert np.array_equal(training.holdout_mask(shuffled, split), first[shuffled.to_numpy()])
    assert np.array_equal(training.holdout_mask(ids.astype(str), split), first)
    assert np.array_equal(np.concatenate([training.holdout_mask(ids[:7000], split),
                                          training.holdout_mask(ids[7000:], split)]), first)


def test_holdout_mask_moves_with_the_salt_and_fraction():
    ids = pd.Series(np.arange(20_000))
    base = training.holdout_mask(ids, SplitConfig(holdout_fraction=0.2, salt="a"))
    other = training.holdout_mask(ids, SplitConfig(holdout_fraction=0.2, salt="b"))
    assert 0.15 < (base & other).sum() / base.sum() < 0.25  # independent draws: ~20 % of one is in the other
    bigger = training.holdout_mask(ids, SplitConfig(holdout_fraction=0.5, salt="a"))
    assert abs(bigger.mean() - 0.5) < 0.02
    assert not (base & ~bigger).any()  # same salt: a larger holdout contains the smaller one


def test_params_follow_the_task():
    multi = training.xgb_params(_spec(), n_classes=4, device="cpu")
    assert multi["objective"] == "multi:softprob" and multi["num_class"] == 4
    assert multi["tree_method"] == "hist" and multi["device"] == "cpu"
    assert multi["eval_metric"][-1] == "mlogloss"  # the last metric drives early stopping
    binary = training.xgb_params(_spec(task="binary"), n_classes=2, device="cuda")
    assert binary["objective"] == "binary:logistic" and "num_class" not in binary
    assert binary["device"] == "cuda" and binary["eval_metric"][-1] == "logloss"
    reg = training.xgb_params(_spec(task="regression", train={"max_depth": 3, "learning_rate": 0.3}), 0, "cpu")
    assert reg["objective"] == "reg:squarederror" and reg["eval_metric"][-1] == "rmse"
    assert (reg["max_depth"], reg["learning_rate"]) == (3, 0.3)


def test_metric_direction_and_primary_metric():
    assert training.greater_is_better("accuracy") and training.greater_is_better("roc_auc")
    assert training.greater_is_better("r2")
    assert not training.greater_is_better("rmse") and not training.greater_is_better("logloss")
    with pytest.raises(LifecycleError, match="unknown metric 'auc'"):
        training.greater_is_better("auc")
    assert training.primary_metric(_spec()) == "accuracy"
    assert training.primary_metric(_spec(task="regression")) == "rmse"
    assert training.primary_metric(_spec(train={"metric": "logloss"})) == "logloss"
    with pytest.raises(LifecycleError, match="'rmse' is not reported for task multiclass"):
        training.primary_metric(_spec(train={"metric": "rmse"}))


def test_holdout_metrics_on_known_values():
    y = np.array([0, 1, 1, 0])
    binary = training.holdout_metrics(Task.binary, y, np.array([0.1, 0.8, 0.4, 0.3]))
    assert binary["accuracy"] == 0.75 and binary["roc_auc"] == 1.0
    assert math.isclose(binary["logloss"], -np.mean(np.log([0.9, 0.8, 0.4, 0.7])), rel_tol=1e-6)
    multi = training.holdout_metrics(Task.multiclass, np.array([0, 1, 2]), np.eye(3)[[0, 1, 1]])
    assert math.isclose(multi["accuracy"], 2 / 3) and set(multi) == {"accuracy", "f1_macro", "logloss"}
    reg = training.holdout_metrics(Task.regression, np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert math.isclose(reg["rmse"], math.sqrt(4 / 3)) and math.isclose(reg["mae"], 2 / 3)
    assert math.isclose(reg["r2"], 1 - 4 / 2)


# --- a real training run on the sample ------------------------------------------------------------

def _ingest(tmp: Path, frame: pd.DataFrame, **spec_overrides):
    from infra_blocks import ObjectStore
    from tasks.ingest import ingest_dataset

    tmp.mkdir(parents=True, exist_ok=True)
    frame.to_csv(tmp / "tickets.csv", index=False)
    spec = _spec(source=str(tmp / "tickets.csv"), **spec_overrides)
    store = ObjectStore(url=f"file://{tmp / 'lake'}")
    return spec, store, ingest_dataset(store, spec)


@pytest.fixture(scope="module")
def run(tmp_path_factory, local_compute):
    """One multiclass training on the 600-row sample, logged to a file-backed SQLite MLflow."""
    from lifecycle.sample import generate_tickets

    tmp = tmp_path_factory.mktemp("train")
    spec, store, dataset = _ingest(tmp, generate_tickets(600), train={"model": "xgboost"})  # the booster's run
    target = _mlflow_target(tmp)
    result = training.fit(spec, dataset, store, local_compute)
    from tasks.baseline import fit_baseline

    baseline = fit_baseline(spec, store, dataset, result.schema.classes)
    run_id, model_uri = training.log_training_run(target, spec, dataset, _report(dataset), None, result, store,
                                                  "trained-1", "code-1", baseline)
    return dict(tmp=tmp, spec=spec, store=store, dataset=dataset, target=target, result=result, run_id=run_id,
                model_uri=model_uri, baseline=baseline)


def test_training_beats_chance_on_the_holdout(run):
    result, dataset = run["result"], run["dataset"]
    assert result.rows["train"] + result.rows["holdout"] == dataset.rows == 600
    assert 0.12 < result.rows["holdout"] / 600 < 0.28
    majority = np.bincount(result.y_true.astype(int)).max() / len(result.y_true)
    assert result.metrics["accuracy"] > majority + 0.05
    assert result.metrics["logloss"] < math.log(4)  # better than the uniform guess
    assert result.schema.classes == ["account", "billing", "shipping", "technical"]
    assert result.schema.categorical == {"channel": ["chat", "email", "phone", "web"],
                                         "plan": ["enterprise", "free", "pro"]}
    # The booster was cut at its best round: its size matches the eval history up to there.
    assert result.booster.num_boosted_rounds() == result.best_iteration + 1
    assert len(result.history["mlogloss"]) >= result.best_iteration + 1


def test_run_logs_params_history_lineage_and_artifacts(run):
    client = run["target"].client()
    logged = client.get_run(run["run_id"])
    assert logged.data.params["objective"] == "multi:softprob"
    assert logged.data.params["best_iteration"] == str(run["result"].best_iteration)
    assert math.isclose(logged.data.metrics["accuracy"], run["result"].metrics["accuracy"])
    history = client.get_metric_history(run["run_id"], "holdout_mlogloss")
    assert [m.step for m in history] == list(range(len(run["result"].history["mlogloss"])))
    assert logged.data.tags["lifecycle.dataset_version"] == run["dataset"].id
    assert logged.data.tags["lifecycle.validation_report"] == f"report-{run['dataset'].id}"
    assert logged.data.tags["lifecycle.trained_model"] == "trained-1"
    assert [d.dataset.name for d in logged.inputs.dataset_inputs] == [f"tickets@{run['dataset'].id}"]
    files = {f.path for d in ("plots", "lifecycle") for f in client.list_artifacts(run["run_id"], d)}
    assert files == {"plots/feature_importance.png", "plots/confusion_matrix.png",
                     "plots/baseline_confusion_matrix.png", "lifecycle/booster.json", "lifecycle/feature_schema.json"}


def test_run_logs_the_baseline_beside_the_model(run):
    """Same holdout rows, same metrics, logged in the same run with what it was fit on."""
    baseline, result = run["baseline"], run["result"]
    assert baseline.rows == {"train": result.rows["train"], "holdout": result.rows["holdout"]}
    assert np.array_equal(baseline.y_true, result.y_true)  # the same holdout rows, in the same order
    assert set(baseline.metrics) == set(result.metrics) and not baseline.sampled
    logged = run["target"].client().get_run(run["run_id"]).data
    assert math.isclose(logged.metrics["baseline_accuracy"], baseline.metrics["accuracy"])
    assert logged.tags["lifecycle.baseline.family"] == "logistic_regression"
    assert logged.tags["lifecycle.baseline.features"] == "logistic_regression on onehot(2) + scaled(4)"
    assert logged.tags["lifecycle.baseline.sampled"] == "false"
    assert logged.params["baseline_train_rows"] == str(result.rows["train"])


def test_pyfunc_predicts_labels_from_raw_rows(run):
    import mlflow.pyfunc

    from lifecycle.sample import generate_tickets

    model = mlflow.pyfunc.load_model(run["model_uri"])
    rows = generate_tickets(40, seed=99)
    assert model.metadata.get_input_schema().input_names() == [
        "account_age_days", "prior_tickets", "response_minutes", "sentiment", "channel", "plan"]
    labels = model.predict(rows.drop(columns=["category", "ticket_id", "text"]))
    assert list(labels.columns) == ["prediction"] and len(labels) == 40
    assert set(labels["prediction"]) <= {"account", "billing", "shipping", "technical"}
    proba = model.predict(rows, params={"probabilities": True})
    assert np.allclose(proba.filter(like="proba_").sum(axis=1), 1.0, atol=1e-5)
    # The raw run artifacts give the same answers without MLflow (what a lean server loads).
    import mlflow.artifacts

    from serving.pyfunc import BoosterPredictor

    folder = Path(mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="lifecycle",
                                                      dst_path=str(run["tmp"] / "dl")))
    lean = BoosterPredictor.from_files(folder / "booster.json", folder / "feature_schema.json")
    assert lean.predict(rows)["prediction"].tolist() == labels["prediction"].tolist()
    model_dir = Path(mlflow.artifacts.download_artifacts(run["model_uri"], dst_path=str(run["tmp"] / "model")))
    requirements = (model_dir / "requirements.txt").read_text()
    assert "xgboost" in requirements and "torch" not in requirements


def test_pyfunc_loads_outside_the_repo(run, tmp_path):
    """The model carries `lifecycle` and `serving.pyfunc`: a process without this repo loads it."""
    import mlflow.artifacts

    model_dir = mlflow.artifacts.download_artifacts(run["model_uri"], dst_path=str(tmp_path / "model"))
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        # Hide an editable install of this project: only the model's own copy may be found.
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path[:] = [p for p in sys.path if "__editable__" not in p]
        assert importlib.util.find_spec("lifecycle") is None and importlib.util.find_spec("serving") is None
        import mlflow.pyfunc
        import pandas as pd
        model = mlflow.pyfunc.load_model({model_dir!r})
        rows = pd.DataFrame({{"account_age_days": [10.0, 900.0], "prior_tickets": [0.0, 6.0],
                              "response_minutes": [5.0, 60.0], "sentiment": [0.5, -0.8],
                              "channel": ["email", "fax"], "plan": ["pro", None]}})
        print(json.dumps(model.predict(rows)["prediction"].tolist()))
        print(sys.modules["lifecycle"].__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    *_, predicted, origin = out.stdout.strip().splitlines()
    assert origin.startswith(str(tmp_path / "model"))  # the copy shipped in the model's code/ folder
    labels = json.loads(predicted)
    assert len(labels) == 2 and set(labels) <= {"account", "billing", "shipping", "technical"}


def test_regression_reports_error_metrics_and_residuals(tmp_path, local_compute):
    from lifecycle.sample import generate_tickets
    from tasks.plots import residuals_figure

    spec, store, dataset = _ingest(
        tmp_path, generate_tickets(600), task="regression", label_column="prior_tickets",
        numeric_features=["account_age_days", "response_minutes", "sentiment"], expectations={},
        train={"num_boost_round": 30},
    )
    result = training.fit(spec, dataset, store, local_compute)
    assert set(result.metrics) == {"rmse", "mae", "r2"}
    assert result.metrics["rmse"] < float(np.std(result.y_true))  # better than predicting the mean
    assert result.schema.classes == []
    assert residuals_figure(result.y_true, result.raw).axes[0].get_xlabel() == "predicted"


def test_one_class_fails_in_one_line_and_logs_no_model(tmp_path, local_compute):
    """Ingest already refuses one class; training checks again (a record may come from elsewhere)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra_blocks import ObjectStore
    from lifecycle.records import DatasetVersion
    from lifecycle.sample import generate_tickets

    store = ObjectStore(url=f"file://{tmp_path / 'lake'}")
    frame = generate_tickets(200).assign(category="billing", prior_tickets=lambda f: f.prior_tickets.astype(float))
    key = "datasets/tickets/one-class/part-00000.parquet"
    store.write_bytes(key, b"")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), store.path(key))
    dataset = DatasetVersion(id="one-class", dataset="tickets", source="generated", path="datasets/tickets/one-class",
                             parts=[key], rows=200, bytes=1, schema={}, spec_hash="x")
    target = _mlflow_target(tmp_path)
    with pytest.raises(LifecycleError, match=r"label column 'category' has one class \(billing\)") as err:
        training.train_model(_spec(), dataset, _report(dataset), store, local_compute, target, "t-1", "c-1")
    assert "\n" not in str(err.value)
    client = target.client()
    experiment = client.get_experiment_by_name(target.experiment)
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def _fake_embeddings(store, dataset, frame: pd.DataFrame, rows: np.ndarray):
    """An embedding set in the embed stage's layout (`id`, fixed-size `vector`) whose vectors are the
    one-hot label, written in an order unrelated to the dataset's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lifecycle.records import EmbeddingSet

    classes = sorted(frame["category"].unique())
    onehot = np.eye(8, dtype=np.float32)[frame["category"].map(classes.index).to_numpy()][rows]
    table = pa.table({"id": frame["ticket_id"].to_numpy()[rows],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(onehot.ravel()), 8)})
    key = f"embeddings/tickets/fake-{len(rows)}/part-00000.parquet"
    store.write_bytes(key, b"")
    pq.write_table(table, store.path(key))
    return EmbeddingSet(id=f"fake-{len(rows)}", dataset="tickets", dataset_version=dataset.id, model="test", dim=8,
                        rows=len(rows), parts=[key], encoded_rows=len(rows))


def test_text_embeddings_are_joined_by_id(tmp_path, local_compute):
    from lifecycle.sample import generate_tickets

    frame = generate_tickets(600)
    spec, store, dataset = _ingest(tmp_path, frame, train={"use_text_embeddings": True, "num_boost_round": 20})
    shuffled = np.random.default_rng(1).permutation(600)
    result = training.fit(spec, dataset, store, local_compute, _fake_embeddings(store, dataset, frame, shuffled))
    assert result.schema.embedding_dim == 8 and result.schema.feature_names[-1] == "emb_7"
    assert result.metrics["accuracy"] == 1.0  # only if every row got its own vector
    with pytest.raises(LifecycleError, match=r"embedding set fake-500 lacks vectors for 100 row\(s\)"):
        training.fit(spec, dataset, store, local_compute, _fake_embeddings(store, dataset, frame, shuffled[:500]))
    with pytest.raises(LifecycleError, match="needs the embed stage's EmbeddingSet"):
        training.fit(spec, dataset, store, local_compute, None)


def test_binary_task_reports_auc(tmp_path, local_compute):
    from lifecycle.sample import generate_tickets

    frame = generate_tickets(600).assign(category=lambda f: np.where(f.category == "technical", "yes", "no"))
    spec, store, dataset = _ingest(tmp_path, frame, task="binary", expectations={}, train={"num_boost_round": 30})
    result = training.fit(spec, dataset, store, local_compute)
    assert result.schema.classes == ["no", "yes"] and result.raw.ndim == 1
    assert set(result.metrics) == {"accuracy", "f1_macro", "logloss", "roc_auc"}
    assert result.metrics["roc_auc"] > 0.6


# --- per-round evaluation slice, the GPU path's configuration, the preflight --------------------------

def test_eval_slice_is_a_capped_sample_nested_in_the_holdout():
    from tasks.train_data import EVAL_ROWS, eval_threshold, holdout_buckets, holdout_threshold

    split = SplitConfig(holdout_fraction=0.2)
    assert eval_threshold(split, 600) == holdout_threshold(split) == 2000  # small data: the whole holdout
    bound = eval_threshold(split, 10_000_000)  # 2M holdout rows → about EVAL_ROWS of them per round
    assert bound == 200 and abs(10_000_000 * bound / 10_000 - EVAL_ROWS) < 1
    buckets = holdout_buckets(pd.Series(np.arange(200_000)), split)
    held, evaluated = buckets < 2000, buckets < bound
    assert not (evaluated & ~held).any() and abs(evaluated.sum() / held.sum() - 0.1) < 0.01


def test_fit_on_cuda_stops_at_the_preflight_when_the_workers_have_no_gpu(tmp_path, local_compute):
    from lifecycle.sample import generate_tickets

    spec, store, dataset = _ingest(tmp_path, generate_tickets(200))
    cuda = local_compute.model_copy(update={"device": "cuda"})
    with pytest.raises(LifecycleError, match=r"device=cuda but 2 of 2 worker\(s\) see no GPU"):
        training.fit(spec, dataset, store, cuda)


def test_run_is_tagged_with_what_the_cluster_had(run):
    logged = run["target"].client().get_run(run["run_id"])
    tags, params = logged.data.tags, logged.data.params
    assert tags["lifecycle.compute.mode"] == "local" and tags["lifecycle.compute.workers"] == "2"
    assert tags["lifecycle.compute.device"] == "cpu" and tags["lifecycle.compute.gpu_workers"] == "0"
    assert params["eval_rows"] == params["holdout_rows"] == str(run["result"].rows["holdout"])
    assert run["result"].compute.threads == 2
    # 480 rows fit one worker: trained there with both threads of the host, no all-reduce.
    assert tags["lifecycle.layout.kind"] == "single" and tags["lifecycle.layout.nthread"] == "2"
    assert tags["lifecycle.layout.dmatrix"] == "QuantileDMatrix on one worker"
    assert "fits one worker" in tags["lifecycle.layout.reason"]


def test_single_and_distributed_layouts_train_the_same_model(run, local_compute):
    """The layout changes where the trees are built, not which trees: same params, same metrics."""
    spread = local_compute.model_copy(update={"train_layout": "distributed"})
    other = training.fit(run["spec"], run["dataset"], run["store"], spread)
    assert other.layout.kind == "distributed" and other.layout.workers == 2
    assert other.best_iteration == run["result"].best_iteration
    for name, value in run["result"].metrics.items():
        assert math.isclose(other.metrics[name], value, rel_tol=1e-5), name


def test_boost_is_the_step_the_benchmarks_time(local_compute):
    """Arrays already in worker memory, fixed rounds, with and without an evaluation set."""
    import dask.array as da

    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.float32)
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 3, "eval_metric": ["logloss"]}
    with local_compute.get_client() as client, client.as_current():
        train = client.persist([da.from_array(X[:3000], chunks=1500), da.from_array(y[:3000], chunks=1500)])
        held = client.persist([da.from_array(X[3000:], chunks=500), da.from_array(y[3000:], chunks=500)])
        booster, history = training.boost(client, tuple(train), tuple(held), params, 20)
        bare, none = training.boost(client, tuple(train), None, params, 20)
    assert booster.num_boosted_rounds() == bare.num_boosted_rounds() == 20
    assert len(history["logloss"]) == 20 and history["logloss"][-1] < history["logloss"][0] < math.log(2) + 0.01
    assert none == {}


def test_train_window_reads_only_the_latest_commits_for_model_baseline_and_holdout(tmp_path, local_compute):
    """Three appends; `train.window: {commits: 2}` trains on the rows of the last two (time travel to the
    version's own commits), and so do the baseline and the holdout a champion is scored on."""
    from infra_blocks import ObjectStore
    from lifecycle.sample import generate_tickets
    from tasks.baseline import fit_baseline
    from tasks.ingest import ingest_dataset
    from tasks.lake import Commit, table_state
    from tasks.train_data import load_holdout, train_parts

    store = ObjectStore(url=f"file://{tmp_path / 'lake'}")
    sizes = (500, 300, 200)
    for i, rows in enumerate(sizes):
        csv = tmp_path / f"landing-{i}.csv"
        generate_tickets(rows, seed=i).assign(ticket_id=range(i * 10_000, i * 10_000 + rows)).to_csv(csv, index=False)
        dataset = ingest_dataset(store, _spec(source=str(csv), expectations={}))
    spec = _spec(source=str(csv), expectations={}, train={"model": "xgboost", "num_boost_round": 5,
                                                          "window": {"commits": 2}})
    parts, rows = train_parts(store, spec, dataset)
    assert rows == 500 and set(parts) < set(dataset.parts)
    result = training.fit(spec, dataset, store, local_compute)
    assert result.rows["train"] + result.rows["holdout"] == 500
    assert load_holdout(store, spec, dataset)[spec.id_column].min() >= 10_000
    base = fit_baseline(spec, store, dataset, result.schema.classes)
    assert (base.rows["train"], base.rows["holdout"]) == (result.rows["train"], result.rows["holdout"])

    everything = _spec(source=str(csv), expectations={}, train={"window": {"commits": 5}})
    assert train_parts(store, everything, dataset) == (list(dataset.parts), 1000)

    # Days count back from the version's head commit time, never from the clock.
    state = table_state(store, "tickets")
    day = 86_400_000
    state.commits = [Commit(version=c.version, files=c.files, added_rows=c.added_rows, added_hash=c.added_hash,
                            content_hash=c.content_hash, base=c.base, labels=c.labels, fields=c.fields,
                            timestamp=t) for c, t in zip(state.commits, (0, 5 * day, 6 * day))]
    assert len(state.window(days=1.5)) == len(state.window(commits=2)) and state.window(days=10) == state.keys()
    with pytest.raises(LifecycleError, match="train.window: .*exactly one of `commits` or `days`"):
        _spec(train={"window": {"commits": 1, "days": 2}})
