"""TRAIN stage: XGBoost on the Dask cluster, logged to MLflow as a pyfunc that takes raw rows.

Why this shape:
- Data loading lives in `tasks.train_data` (store → worker memory, host or GPU, split by id hash).
- `boost` is the training step itself (DaskQuantileDMatrix once, evals on a capped slice of the
  holdout, one xgboost.dask.train call); `fit` wraps it with the preflight, the schema and the holdout
  scoring, and benchmarks time `boost` against bare single-process xgboost on the same data.
- Features come from `lifecycle.features`, the code serving runs, so train and serve cannot drift.
- Nothing reaches MLflow until training has finished: a failed attempt (a worker killed mid-training)
  leaves no run and no model behind, and the retry starts clean.
- Where `boost` runs is chosen from the data (`tasks.train_layout`: one worker with every thread when
  the version fits one worker, xgboost.dask across all workers otherwise), and every run also fits the
  plain linear baseline (`tasks.baseline`) the register stage measures the model against.
- The baseline is the second candidate: `train.model` (`tasks.model_family`) picks the family that
  is registered, and a linear pick is exported for serving without sklearn (`tasks.linear_export`).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from infra_blocks import DaskCompute, MlflowTarget, ObjectStore
from infra_blocks.compute_report import ComputeReport
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema, build_schema
from lifecycle.records import DatasetVersion, EmbeddingSet, TrainedModel, ValidationReport, stable_hash
from lifecycle.spec import DatasetSpec, Task
from tasks.baseline import BaselineResult, fit_baseline
from tasks.model_family import FamilyChoice, choose_family
from tasks.policies import retry_unless_user_error
from tasks.train_data import (  # noqa: F401
    EMBEDDING_COLUMN,
    EVAL_COLUMN,
    EVAL_ROWS,
    HOLDOUT_COLUMN,
    holdout_mask,
    host_arrays,
    input_columns,
    load_frame,
    load_holdout,
    matrix_side,
)
from tasks.train_layout import Layout, boost_single, choose_layout
from tasks.train_metrics import (  # noqa: F401 - the metric API is also imported from here
    GREATER_IS_BETTER,
    TASK_METRICS,
    as_probabilities,
    greater_is_better,
    holdout_metrics,
    primary_metric,
)
from tasks.train_progress import reported_rounds, round_reporter
from tasks.worker_memory import watch_worker_memory

TRAIN_SECTIONS = ("train", "split", "numeric_features", "categorical_features", "label_column", "task")

# XGBoost's per-round eval metrics; the LAST one drives early stopping.
EVAL_METRICS: dict[Task, list[str]] = {
    Task.binary: ["error", "auc", "logloss"],
    Task.multiclass: ["merror", "mlogloss"],
    Task.regression: ["mae", "rmse"],
}


def xgb_params(spec: DatasetSpec, n_classes: int, device: str) -> dict[str, Any]:
    """Booster parameters for the task: objective, eval metrics and the spec's knobs."""
    cfg = spec.train
    params: dict[str, Any] = {
        "tree_method": "hist",
        "device": device,
        "max_depth": cfg.max_depth,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "eval_metric": list(EVAL_METRICS[spec.task]),
    }
    if spec.task is Task.binary:
        params["objective"] = "binary:logistic"
    elif spec.task is Task.multiclass:
        params.update(objective="multi:softprob", num_class=n_classes)
    else:
        params["objective"] = "reg:squarederror"
    return params


def trained_model_id(spec: DatasetSpec, dataset: DatasetVersion, embeddings: EmbeddingSet | None, version: str) -> str:
    return stable_hash(dataset.id, embeddings.id if embeddings else None, spec.section_hash(*TRAIN_SECTIONS), version)


def observe_schema(client: Any, ddf: Any, spec: DatasetSpec, embedding_dim: int,
                   also: list[Any] | None = None) -> tuple[FeatureSchema, list[Any]]:
    """Category levels and label classes seen in the whole version, and the values of `also` (e.g.
    row counts), in ONE pass on the workers: each pass over a wide version costs about a second."""
    wanted = [ddf[c].dropna().astype(str).unique() for c in spec.categorical_features]
    if spec.task is not Task.regression:
        wanted.append(ddf[spec.label_column].astype(str).unique())
    values = client.compute([*wanted, *(also or [])], sync=True)
    values, extra = values[:len(wanted)], values[len(wanted):]
    levels = {c: sorted(v.tolist()) for c, v in zip(spec.categorical_features, values)}
    classes = sorted(values[-1].tolist()) if spec.task is not Task.regression else []
    return build_schema(spec, levels, classes, embedding_dim=embedding_dim), extra


def boost(client: Any, train: tuple[Any, Any], evals: tuple[Any, Any] | None, params: dict[str, Any],
          num_boost_round: int, early_stopping_rounds: int | None = None,
          feature_names: list[str] | None = None, feature_types: list[str] | None = None) -> tuple[Any, dict]:
    """The training step: one DaskQuantileDMatrix per side and one `xgboost.dask.train` call.

    The evaluation matrix shares the training matrix's quantile cuts (`ref`), so it is not sketched
    again; keep it small (see `train_data.EVAL_ROWS`): it is evaluated on every worker every round.

    Returns:
        (booster, per-round history of the evaluation set: metric -> values).
    """
    import xgboost as xgb
    import xgboost.dask  # noqa: F401 - not imported by `import xgboost`

    kw = dict(feature_names=feature_names, feature_types=feature_types, enable_categorical=True)
    dtrain = xgb.dask.DaskQuantileDMatrix(client, *train, **kw)
    watch = None
    if evals is not None:
        watch = [(xgb.dask.DaskQuantileDMatrix(client, *evals, ref=dtrain, **kw), "holdout")]
    with reported_rounds(client):
        out = xgb.dask.train(client, params, dtrain, num_boost_round=num_boost_round, evals=watch,
                             early_stopping_rounds=early_stopping_rounds if watch else None, verbose_eval=False,
                             callbacks=[round_reporter(num_boost_round)])
    history = {m: [float(v) for v in vals] for m, vals in out["history"].get("holdout", {}).items()}
    return out["booster"], history


@dataclass
class FitResult:
    """What training produced, before anything is logged."""

    booster: Any
    schema: FeatureSchema
    params: dict[str, Any]
    history: dict[str, list[float]]
    metrics: dict[str, float]
    best_iteration: int
    y_true: np.ndarray
    raw: np.ndarray
    example: pd.DataFrame
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    compute: ComputeReport | None = None
    layout: Layout | None = None


def fit(spec: DatasetSpec, dataset: DatasetVersion, store: ObjectStore, compute: DaskCompute,
        embeddings: EmbeddingSet | None = None, eval_rows: int = EVAL_ROWS) -> FitResult:
    """Preflight the cluster, train with early stopping on the holdout, score the whole holdout.

    The booster is cut at its best round and handed back set to run on the CPU (the client may have
    no GPU); holdout predictions are copied to host memory on the workers before they are gathered.

    Raises:
        LifecycleError: the workers lack what the compute block asks for (e.g. no GPU for cuda), one
            class only, an empty side of the split, or missing embeddings.
    """
    import xgboost as xgb
    import xgboost.dask  # noqa: F401

    if spec.train.use_text_embeddings and embeddings is None:
        raise LifecycleError(f"{spec.name}: train.use_text_embeddings needs the embed stage's EmbeddingSet")
    start = time.perf_counter()
    emb_dim = embeddings.dim if (embeddings is not None and spec.train.use_text_embeddings) else 0
    device = compute.resolved_device
    # xgboost.dask calls distributed.get_client() even when handed a client: make ours current.
    # Memory pressure on the workers ends here in one line naming the limit, before Prefect's retry sees it.
    with compute.get_client(check=False) as client, client.as_current(), watch_worker_memory(client, "train"):
        report = compute.preflight(client)
        ddf = client.persist(load_frame(store, spec, dataset, embeddings, eval_rows))
        counts = [ddf[HOLDOUT_COLUMN].size, ddf[HOLDOUT_COLUMN].sum(), ddf[EVAL_COLUMN].sum()]
        if emb_dim:
            counts.append(ddf[EMBEDDING_COLUMN].isna().sum())
        schema, (total, held, evaluated, *lacking) = observe_schema(client, ddf, spec, emb_dim, counts)
        if lacking and lacking[0] and embeddings is not None:
            raise LifecycleError(f"embedding set {embeddings.id} lacks vectors for {int(lacking[0])} row(s) "
                                 f"of dataset version {dataset.id}")
        rows = {"train": int(total - held), "holdout": int(held), "eval": int(evaluated)}
        empty = [k for k in ("train", "holdout") if rows[k] == 0]
        if empty:
            raise LifecycleError(f"{spec.name}: the {empty[0]} side of the split is empty "
                                 f"({dataset.rows} rows, split.holdout_fraction={spec.split.holdout_fraction})")
        # Persisted once: the DMatrix and the holdout predictions share them.
        train = client.persist(list(matrix_side(ddf, ~ddf[HOLDOUT_COLUMN], schema, spec.label_column, device)))
        hold = client.persist(list(matrix_side(ddf, ddf[HOLDOUT_COLUMN], schema, spec.label_column, device)))
        evals = hold
        if rows["eval"] < rows["holdout"]:
            evals = client.persist(list(matrix_side(ddf, ddf[EVAL_COLUMN], schema, spec.label_column, device)))
        params = xgb_params(spec, len(schema.classes), device)
        layout = choose_layout(rows["train"], len(schema.feature_names), len(schema.classes), report, device,
                               compute.train_layout)
        knobs = (params, spec.train.num_boost_round, spec.train.early_stopping_rounds, schema.feature_names,
                 schema.feature_types)
        if layout.kind == "single":
            booster, history = boost_single(client, layout, tuple(train), tuple(evals), *knobs)
        else:
            booster, history = boost(client, tuple(train), tuple(evals), *knobs)
        best = booster.best_iteration if spec.train.early_stopping_rounds else booster.num_boosted_rounds() - 1
        if best + 1 < booster.num_boosted_rounds():
            booster = booster[: best + 1]
        predicted = xgb.dask.inplace_predict(client, booster, hold[0])
        raw, y_true = client.compute(host_arrays(predicted, hold[1]), sync=True)
        example = ddf[input_columns(spec)].head(5, npartitions=-1)
    booster.set_param({"device": "cpu"})
    return FitResult(booster=booster, schema=schema, params=params, history=history,
                     metrics=holdout_metrics(spec.task, y_true, raw), best_iteration=int(best),
                     y_true=np.asarray(y_true), raw=np.asarray(raw), example=example.reset_index(drop=True),
                     rows=rows, seconds=time.perf_counter() - start, compute=report, layout=layout)


def pick_family(spec: DatasetSpec, result: FitResult, baseline: BaselineResult | None) -> FamilyChoice:
    """`train.model` applied to this run's two candidates (tasks.model_family)."""
    metric = primary_metric(spec)
    return choose_family(spec, metric, greater_is_better(metric), result.metrics,
                         baseline.metrics if baseline is not None else None)


def log_training_run(target: MlflowTarget, spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport,
                     embeddings: EmbeddingSet | None, result: FitResult, store: ObjectStore, record_id: str,
                     version: str, baseline: BaselineResult | None = None,
                     choice: FamilyChoice | None = None) -> tuple[str, str]:
    """Log params, per-round and holdout metrics, lineage tags, plots, raw model files and the pyfunc;
    the baseline's metrics (`baseline_*`), plot and sampling beside the model's.

    The unprefixed metrics and the files under `lifecycle/` (what serving and the pyfunc load) are the
    registered family's (`choice`, default: `pick_family`); xgboost's metrics are also `xgboost_*`, and
    the booster of a run that registers the linear model is kept under `candidates/`.

    Returns:
        (run id, model URI). A failure inside marks the run FAILED; no model is registered here.
    """
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import Metric

    from serving.linear import LINEAR_FILE
    from serving.pyfunc import (
        BOOSTER_FILE,
        RUN_ARTIFACT_DIR,
        SCHEMA_FILE,
        LifecycleModel,
        code_paths,
        load_predictor,
        model_signature,
        pip_requirements,
    )
    from tasks.linear_export import export_linear
    from tasks.plots import log_figures

    choice = choice if choice is not None else pick_family(spec, result, baseline)
    metrics = baseline.metrics if choice.family == "linear" and baseline is not None else result.metrics

    target.apply_env()
    experiment_id = target.experiment_id()
    tags = {"lifecycle.dataset": spec.name, "lifecycle.dataset_version": dataset.id,
            "lifecycle.validation_report": report.id, "lifecycle.embedding_set": embeddings.id if embeddings else "",
            "lifecycle.trained_model": record_id, "lifecycle.code_version": version,
            **(result.compute.tags() if result.compute is not None else {}),
            **(result.layout.tags() if result.layout is not None else {}),
            **(baseline.tags() if baseline is not None else {"lifecycle.baseline.family": "none"}),
            **choice.tags()}
    params = {k: v for k, v in result.params.items() if k != "eval_metric"}
    params.update(num_boost_round=spec.train.num_boost_round, early_stopping_rounds=spec.train.early_stopping_rounds,
                  best_iteration=result.best_iteration, holdout_fraction=spec.split.holdout_fraction,
                  split_salt=spec.split.salt, train_rows=result.rows["train"], holdout_rows=result.rows["holdout"],
                  eval_rows=result.rows.get("eval", result.rows["holdout"]),
                  features=len(result.schema.feature_names), use_text_embeddings=spec.train.use_text_embeddings,
                  **(baseline.params() if baseline is not None else {}))
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
        experiment_id=experiment_id, run_name=f"{spec.name}-{dataset.id[:8]}-{record_id[:8]}", tags=tags
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(params)
        now = int(time.time() * 1000)
        rounds = [Metric(f"holdout_{name}", value, now, step)
                  for name, values in result.history.items() for step, value in enumerate(values)]
        client = target.client()
        for i in range(0, len(rounds), 1000):
            client.log_batch(run_id, metrics=rounds[i:i + 1000])
        mlflow.log_metrics(metrics)
        mlflow.log_metrics({f"xgboost_{k}": v for k, v in result.metrics.items()})
        if baseline is not None:
            mlflow.log_metrics({f"baseline_{k}": v for k, v in baseline.metrics.items()})
        with warnings.catch_warnings(action="ignore", category=UserWarning):  # "source resolves 2 ways"
            sample = from_pandas(result.example, source=store.uri(dataset.path),
                                 name=f"{spec.name}@{dataset.id}", digest=dataset.id[:8])
        mlflow.log_input(sample, context="training", tags={"rows": str(dataset.rows), "version": dataset.id})
        log_figures(result.booster, spec.task, result.y_true, result.raw, result.schema.classes)
        if baseline is not None:
            log_figures(None, spec.task, baseline.y_true, baseline.raw, result.schema.classes, prefix="baseline_")
        files, candidates = Path(tmp) / RUN_ARTIFACT_DIR, Path(tmp) / "candidates"
        files.mkdir()
        candidates.mkdir()
        if choice.family == "linear" and baseline is not None:
            schema = export_linear(baseline, result.schema, files)
            artifacts = {"linear": str(files / LINEAR_FILE)}
            result.booster.save_model(str(candidates / BOOSTER_FILE))
            mlflow.log_artifacts(str(candidates), "candidates")
        else:
            schema = result.schema
            result.booster.save_model(str(files / BOOSTER_FILE))
            artifacts = {"booster": str(files / BOOSTER_FILE)}
        (files / SCHEMA_FILE).write_text(schema.model_dump_json(indent=2), encoding="utf-8")
        mlflow.log_artifacts(str(files), RUN_ARTIFACT_DIR)
        predictor = load_predictor(files, spec.embed.max_chars)
        signature = model_signature(result.example, predictor.predict(result.example), spec.numeric_features)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=LifecycleModel(), signature=signature, input_example=result.example,
            artifacts={**artifacts, "feature_schema": str(files / SCHEMA_FILE)},
            code_paths=code_paths(Path(tmp)), pip_requirements=pip_requirements(bool(schema.embedding_dim)),
            model_config={"text_max_chars": spec.embed.max_chars},
        )
    return run_id, info.model_uri


def train_model(spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport, store: ObjectStore,
                compute: DaskCompute, mlflow: MlflowTarget, record_id: str, version: str,
                embeddings: EmbeddingSet | None = None) -> TrainedModel:
    """Fit, log the run and the pyfunc to MLflow, and return the (unpublished) TrainedModel record."""
    metric = primary_metric(spec)
    embeddings = embeddings if spec.train.use_text_embeddings else None  # lineage names only what was used
    result = fit(spec, dataset, store, compute, embeddings)
    baseline = fit_baseline(spec, store, dataset, result.schema.classes)
    choice = pick_family(spec, result, baseline)
    run_id, model_uri = log_training_run(mlflow, spec, dataset, report, embeddings, result, store, record_id, version,
                                         baseline, choice)
    inputs = {"dataset": dataset.id, "validation": report.id}
    if embeddings is not None:
        inputs["embeddings"] = embeddings.id
    return TrainedModel(
        id=record_id, dataset=spec.name, code_version=version, inputs=inputs, dataset_version=dataset.id,
        embedding_set=embeddings.id if embeddings is not None else None, run_id=run_id, model_uri=model_uri,
        metrics=baseline.metrics if choice.family == "linear" and baseline is not None else result.metrics,
        primary_metric=metric,
        greater_is_better=greater_is_better(metric), family=choice.family, family_reason=choice.reason,
        xgboost_metrics=result.metrics,
        device=compute.resolved_device, train_seconds=round(result.seconds, 3),
        baseline_metrics=baseline.metrics if baseline is not None else {},
        baseline=baseline.summary() if baseline is not None else "",
        layout=result.layout.kind if result.layout is not None else "", rows=dict(result.rows),
    )


@task(name="train-model", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "train"])
def train_task(spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport, store: ObjectStore,
               compute: DaskCompute, mlflow: MlflowTarget, record_id: str, version: str,
               embeddings: EmbeddingSet | None = None) -> TrainedModel:
    """Prefect wrapper: one retry covers a lost worker or a dropped tracking connection."""
    return train_model(spec, dataset, report, store, compute, mlflow, record_id, version, embeddings)
