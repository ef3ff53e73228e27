"""REGISTER stage: the MLflow model registry, the `challenger` / `champion` aliases and the promotion rule.

Why this shape:
- Every trained model becomes a version with alias `challenger`; `champion` moves only when the
  challenger beats the current champion by `train.promotion_margin` on the primary metric, measured
  on the SAME holdout (the challenger's dataset version, split by the same id hash). Comparing numbers
  that each model scored on its own data would promote by luck of the split.
- A challenger must also beat the plain baseline fit in its own training run (tasks/baseline.py) by
  `train.baseline_margin` on the same holdout (`train.require_beats_baseline: false` turns it off).
  The verdict ("beats baseline by X" / "does not beat baseline (X vs Y)") is always in the decision,
  so even a model that need not beat it says where it stands. A linear model registered by
  `train.model: auto | linear` is that baseline: its verdict says "is the baseline (linear, …)" and
  the gate lets it through, so the bundled sample (linear 0.830 vs xgboost 0.819) still ships.
- The decision (text, both values) is written on the version as tags and into the ModelVersion record;
  the tag `lifecycle.record` names that record, so "the champion's record" is one alias lookup and one
  read (tasks/promotion.py), not a listing of the store.
- Creating the version is idempotent (a version is found again by its run and trained-model tag), so a
  retry after a dropped connection does not register a second copy.
- An unreachable tracking server becomes `MlflowUnavailableError`: retried by the tasks, and once the
  retries are spent it reaches the user as one line (server, step, cause) with the champion unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from infra_blocks import MlflowTarget, ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, ModelVersion, TrainedModel, stable_hash
from lifecycle.spec import DatasetSpec, Task
from tasks.records import load_record
from tasks.training import holdout_metrics, load_holdout

# `models:/<id>` of a model logged in MLflow 3 (what training's log_model returns), not a registry name.
LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED_EVENT = ModelVersion.promoted_event
TAG = "lifecycle."
# INTERNAL_ERROR is MlflowException's default code (any bug): not a reason to retry by itself.
TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


class MlflowUnavailableError(LifecycleError):
    """The MLflow tracking server (or its database) could not be reached: refused, reset or timed out.

    Transient: the register tasks retry it; after the last retry it is the one-line error users see.
    """

    transient = True


def is_transient(exc: BaseException) -> bool:
    """A failure a retry may fix: the tracking server or its database was briefly unreachable."""
    if isinstance(exc, LifecycleError):
        return bool(getattr(exc, "transient", False))
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.RequestException):
        return True
    if isinstance(exc, MlflowException):
        # mlflow's REST client wraps connection errors and timeouts as "API request to <url> failed …"
        return exc.error_code in TRANSIENT_MLFLOW_CODES or re.match(r"API request to \S+ failed", str(exc)) is not None
    return type(exc).__name__ == "OperationalError"  # sqlalchemy: "database is locked", lost connection


def short_reason(exc: BaseException) -> str:
    """The cause of a connection failure in a few words ("Connection refused", "timed out", a code)."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip()
    if "timed out" in text.lower() or isinstance(exc, TimeoutError):
        return "timed out"
    code = getattr(exc, "error_code", None)
    if code and code != "INTERNAL_ERROR":
        return str(code)
    return (text.splitlines() or [type(exc).__name__])[0][:160]


@contextmanager
def reaching(target: MlflowTarget, doing: str, consequence: str = "the champion is unchanged") -> Iterator[None]:
    """Turn a transient MLflow failure inside the block into one `MlflowUnavailableError` line."""
    try:
        yield
    except LifecycleError:
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise MlflowUnavailableError(f"MLflow at {target.tracking_uri} is unreachable while {doing} "
                                     f"({short_reason(exc)}); {consequence}") from exc


def retry_on_connection_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient MLflow failures, never a wrong input."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - classified below
        return is_transient(exc)
    return False


def model_version_id(trained: TrainedModel, model_name: str, margin: float, version: str,
                     baseline_rule: tuple[bool, float]) -> str:
    """Same trained model, model name, promotion rule (champion margin; baseline required?, its margin)
    and code → same record (the stage is skipped)."""
    return stable_hash(trained.id, model_name, margin, trained.primary_metric, version, *baseline_rule)


def versus_baseline(trained: TrainedModel, margin: float) -> tuple[bool | None, float | None, str]:
    """(beats?, baseline value, verdict) of the model against its run's baseline on the primary metric.

    Beating it means a gain > 0 and >= `margin`, as for the champion: a tie does not earn a place.
    (None, None, ...) when the training record has no baseline (trained before baselines existed);
    (None, value, "is the baseline (linear, …)") when the registered model is the linear model itself,
    which the gate lets through (it cannot lose to itself; the champion check still applies).
    """
    metric = trained.primary_metric
    base = trained.baseline_metrics.get(metric)
    if base is None:
        return None, None, "no baseline in the training record"
    value = float(trained.metrics[metric])
    if trained.family == "linear":  # the registered model is the baseline itself: nothing to beat, nothing lost
        return None, float(base), f"is the baseline (linear, {metric} {value:.4f})"
    gain = value - base if trained.greater_is_better else base - value
    if gain > 0 and gain >= margin:
        return True, float(base), f"beats baseline by {gain:.4f} ({metric} {value:.4f} vs {base:.4f})"
    by = f" by the margin {margin:g}" if margin and gain > 0 else ""
    return False, float(base), f"does not beat baseline{by} ({metric} {value:.4f} vs {base:.4f})"


def bless(spec: DatasetSpec, trained: TrainedModel, promote: bool, text: str) -> tuple[bool, str]:
    """The champion judgement with the baseline gate applied: promoted only if it also beats the baseline."""
    beats, _, verdict = versus_baseline(trained, spec.train.baseline_margin)
    if not spec.train.require_beats_baseline:
        return promote, f"{text}; {verdict} (not required)"
    if beats is False and promote:
        return False, f"not promoted: {verdict}; champion check: {text.removeprefix('promoted: ')}"
    return promote, f"{text}; {verdict}"


def decide(metric: str, greater_is_better: bool, challenger: float, champion: float | None,
           margin: float, champion_version: str | None = None) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger is better by at least `margin` (and > 0).

    A tie never promotes: moving the alias (and redeploying) for no gain only adds risk.
    """
    if champion is None or champion_version is None:
        return True, f"promoted: no champion yet ({metric}={challenger:.4f})"
    gain = challenger - champion if greater_is_better else champion - challenger
    direction = "higher" if greater_is_better else "lower"
    facts = (f"{metric} {challenger:.4f} vs champion v{champion_version} {champion:.4f} "
             f"({direction} is better, gain {gain:+.4f}, margin {margin:g})")
    if gain > 0 and gain >= margin:
        return True, f"promoted: {facts}"
    return False, f"kept champion v{champion_version}: {facts}"


def score_predictions(task_kind: Task, labels: pd.Series, predictions: pd.DataFrame) -> dict[str, float]:
    """Metrics of a pyfunc's output (with `proba_<class>` columns for classifiers) against true labels."""
    from serving.pyfunc import PROBA_PREFIX

    if task_kind is Task.regression:
        return holdout_metrics(task_kind, labels.to_numpy(dtype=float), predictions["prediction"].to_numpy(dtype=float))
    classes = [c[len(PROBA_PREFIX):] for c in predictions.columns if c.startswith(PROBA_PREFIX)]
    truth = labels.astype(str).reset_index(drop=True)
    unseen = sorted(set(truth) - set(classes))  # classes the model never saw: it gave them probability 0
    proba = predictions[[f"{PROBA_PREFIX}{c}" for c in classes]].to_numpy(dtype=float)
    proba = np.hstack([proba, np.zeros((len(proba), len(unseen)))])
    codes = {c: i for i, c in enumerate([*classes, *unseen])}
    return holdout_metrics(task_kind, truth.map(codes).to_numpy(dtype=int), proba)


def champion_value(model_uri: str, spec: DatasetSpec, holdout: pd.DataFrame, metric: str) -> float:
    """The champion's primary metric on the challenger's holdout, through its own pyfunc."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    schema = model.metadata.get_input_schema()
    columns = schema.input_names() if schema is not None else list(holdout.columns)
    missing = [c for c in columns if c not in holdout.columns]
    if missing:
        raise LifecycleError(f"champion needs column(s) this dataset lacks: {', '.join(missing)}")
    predictions = model.predict(holdout[columns], params={"probabilities": True})
    scores = score_predictions(spec.task, holdout[spec.label_column], pd.DataFrame(predictions))
    if metric not in scores:
        raise LifecycleError(f"champion cannot be scored on {metric!r}")
    return scores[metric]


def _find_version(client: Any, name: str, trained: TrainedModel) -> Any | None:
    for mv in client.search_model_versions(f"name='{name}' and run_id='{trained.run_id}'"):
        if mv.tags.get(f"{TAG}trained_model") == trained.id:
            return mv
    return None


def champion_version(client: Any, name: str) -> Any | None:
    """The registry version `champion` points at, or None when there is no champion yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def judge(spec: DatasetSpec, trained: TrainedModel, store: ObjectStore, name: str, version: str,
          current: Any | None) -> tuple[bool, str, float | None]:
    """(promote?, decision text, champion's value) for the challenger `version` against `current` and
    its run's baseline (`bless`)."""
    metric, margin = trained.primary_metric, spec.train.promotion_margin
    challenger = float(trained.metrics[metric])
    if current is None:
        return (*bless(spec, trained, *decide(metric, trained.greater_is_better, challenger, None, margin)), None)
    if str(current.version) == version:
        return True, f"promoted: v{version} is already the champion", None
    # A champion that uses text embeddings encodes the holdout's text itself, as it would in serving.
    holdout = load_holdout(store, spec, load_record(store, DatasetVersion, trained.dataset_version))
    try:
        value = champion_value(f"models:/{name}/{current.version}", spec, holdout, metric)
    except LifecycleError as exc:
        return False, f"kept champion v{current.version}: it cannot be scored on this holdout ({exc})", None
    decided = decide(metric, trained.greater_is_better, challenger, value, margin, str(current.version))
    return (*bless(spec, trained, *decided), value)


def register_version(spec: DatasetSpec, trained: TrainedModel, store: ObjectStore, target: MlflowTarget,
                     record_id: str, version: str) -> ModelVersion:
    """Register (or find) the version, alias it `challenger`, score the champion and decide.

    The `champion` alias is NOT moved here: the flow moves it together with publishing the record,
    so a promoted version never exists without its record.

    Raises:
        MlflowUnavailableError: the tracking server could not be reached (transient: retried).
    """
    metric = trained.primary_metric
    if metric not in trained.metrics:
        raise LifecycleError(f"trained model {trained.id} has no {metric!r} metric to compare on")
    name = target.model_name(spec.name)
    with reaching(target, f"registering {name}", "nothing was promoted"):
        return _register(spec, trained, store, target, record_id, version, name, metric)


def _create_version(client: Any, name: str, trained: TrainedModel, tags: dict[str, str]) -> Any:
    """A new version of `name` (the registered model created if missing) from the trained model.

    The client API rather than `mlflow.register_model`, which prints its progress to stderr straight
    through the CLI's progress display; the version is the same (source, run, logged model), and the
    logged model lists it as `mlflow.register_model` would have (`_link_logged_model`).
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    logged = LOGGED_MODEL_URI.match(trained.model_uri)
    model_id = logged.group(1) if logged else None
    mv = client.create_model_version(name, source=trained.model_uri, run_id=trained.run_id, tags=tags,
                                     model_id=model_id)
    if model_id:
        _link_logged_model(client, model_id, name, mv.version)
    return mv


def _link_logged_model(client: Any, model_id: str, name: str, version: Any) -> None:
    """List the version on its logged model (tag `mlflow.modelVersions`), which MLflow's UI follows.

    An MLflow server adds the entry itself when a version names its logged model; a database store
    (the local profile's SQLite) does not. Added only where it is missing, so never twice.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        existing = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if any(e.get("name") == name and str(e.get("version")) == str(version) for e in existing):
        return
    entries = [*existing, {"name": name, "version": version}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})


def _register(spec: DatasetSpec, trained: TrainedModel, store: ObjectStore, target: MlflowTarget, record_id: str,
              version: str, name: str, metric: str) -> ModelVersion:
    client = target.client()
    tags = {f"{TAG}dataset_version": trained.dataset_version, f"{TAG}run_id": trained.run_id,
            f"{TAG}trained_model": trained.id, f"{TAG}embedding_set": trained.embedding_set or ""}
    mv = _find_version(client, name, trained)
    if mv is None:
        mv = _create_version(client, name, trained, tags)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    challenger = float(trained.metrics[metric])
    current = champion_version(client, name)
    promote, text, champ_value = judge(spec, trained, store, name, str(mv.version), current)
    decision_tags = {"record": record_id, "decision": text, "promoted": str(promote).lower(), "metric": metric,
                     "challenger_value": f"{challenger:.6g}",
                     "champion_value": "" if champ_value is None else f"{champ_value:.6g}",
                     "champion_version": str(current.version) if current is not None else ""}
    beats, base, verdict = versus_baseline(trained, spec.train.baseline_margin)
    decision_tags.update(baseline_value="" if base is None else f"{base:.6g}", baseline_verdict=verdict,
                         family=trained.family)
    for key, value in decision_tags.items():
        client.set_model_version_tag(name, mv.version, f"{TAG}{key}", value)
    return ModelVersion(
        id=record_id, dataset=spec.name, code_version=version, inputs={"model": trained.id},
        model_name=name, version=str(mv.version), run_id=trained.run_id, trained_model=trained.id,
        aliases=[CHALLENGER, CHAMPION] if promote else [CHALLENGER], promoted=promote, decision=text,
        metric=metric, challenger_value=challenger,
        champion_version=str(current.version) if current is not None else None, champion_value=champ_value,
        baseline_value=base, beats_baseline=beats, baseline_verdict=verdict, family=trained.family,
    )


def set_champion(target: MlflowTarget, record: ModelVersion) -> str | None:
    """Point `champion` at the record's version; returns the version it pointed at before (or None)."""
    with reaching(target, f"moving {record.model_name}@{CHAMPION} to v{record.version}"):
        client = target.client()
        previous = champion_version(client, record.model_name)
        client.set_registered_model_alias(record.model_name, CHAMPION, record.version)
    return str(previous.version) if previous is not None else None


def restore_champion(target: MlflowTarget, record: ModelVersion, previous: str | None) -> None:
    """Undo `set_champion` when the record could not be published."""
    fix = (f"`lifecycle promote {record.dataset} {previous} --force` puts it back" if previous is not None
           else "delete the alias in MLflow")
    with reaching(target, f"restoring {record.model_name}@{CHAMPION} to v{previous}",
                  f"{record.model_name}@{CHAMPION} may still point at v{record.version}: {fix}"):
        client = target.client()
        if previous is None:
            client.delete_registered_model_alias(record.model_name, CHAMPION)
        else:
            client.set_registered_model_alias(record.model_name, CHAMPION, previous)


# The retries of every task that talks to MLflow: transient failures only, with growing delays.
MLFLOW_RETRY: dict[str, Any] = dict(retries=3, retry_delay_seconds=[2, 5, 10],
                                    retry_condition_fn=retry_on_connection_error)


@task(name="register-model-version", tags=["lifecycle", "register"], **MLFLOW_RETRY)
def register_task(spec: DatasetSpec, trained: TrainedModel, store: ObjectStore, target: MlflowTarget,
                  record_id: str, version: str) -> ModelVersion:
    return register_version(spec, trained, store, target, record_id, version)


@task(name="set-champion", tags=["lifecycle", "register"], **MLFLOW_RETRY)
def set_champion_task(target: MlflowTarget, record: ModelVersion) -> str | None:
    return set_champion(target, record)


@task(name="restore-champion", tags=["lifecycle", "register"], **MLFLOW_RETRY)
def restore_champion_task(target: MlflowTarget, record: ModelVersion, previous: str | None) -> None:
    restore_champion(target, record, previous)
