"""Holdout metrics shared by the tree model and the linear baseline, and which way each one is better.

Kept apart from `tasks.training` so the baseline (tasks/baseline.py) scores with exactly the same code
without importing the xgboost training module (and training can import the baseline).
"""

from __future__ import annotations

import numpy as np

from lifecycle.errors import LifecycleError
from lifecycle.spec import DatasetSpec, Task

# Direction of every metric we report; the primary (promotion) metric must be one of these.
GREATER_IS_BETTER: dict[str, bool] = {
    "accuracy": True, "f1_macro": True, "roc_auc": True, "r2": True,
    "logloss": False, "rmse": False, "mae": False,
}
TASK_METRICS: dict[Task, tuple[str, ...]] = {
    Task.binary: ("accuracy", "f1_macro", "logloss", "roc_auc"),
    Task.multiclass: ("accuracy", "f1_macro", "logloss"),
    Task.regression: ("rmse", "mae", "r2"),
}


def greater_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (decides promotion and early-stopping sense)."""
    try:
        return GREATER_IS_BETTER[metric]
    except KeyError:
        known = ", ".join(sorted(GREATER_IS_BETTER))
        raise LifecycleError(f"train.metric: unknown metric {metric!r} (known: {known})") from None


def primary_metric(spec: DatasetSpec) -> str:
    """The promotion metric, checked against the task (e.g. rmse makes no sense for a classifier)."""
    metric = spec.train.primary_metric(spec.task)
    if metric not in TASK_METRICS[spec.task]:
        raise LifecycleError(
            f"train.metric: {metric!r} is not reported for task {spec.task.value} "
            f"(choose one of {', '.join(TASK_METRICS[spec.task])})"
        )
    return metric


def as_probabilities(raw: np.ndarray) -> np.ndarray:
    """Booster output of a classifier as an (n, k) probability matrix."""
    raw = np.asarray(raw, dtype=np.float64)
    return np.column_stack([1.0 - raw, raw]) if raw.ndim == 1 else raw


def holdout_metrics(task: Task, y_true: np.ndarray, raw: np.ndarray) -> dict[str, float]:
    """Holdout metrics from encoded labels (class indices or values) and the booster's output."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true)
    if task is Task.regression:
        pred = np.asarray(raw, dtype=np.float64)
        err = pred - y_true
        return {
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
            "r2": float(skm.r2_score(y_true, pred)),
        }
    proba = np.clip(as_probabilities(raw), 1e-15, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)  # float32 rounding: log_loss wants rows summing to 1
    labels = list(range(proba.shape[1]))
    y = y_true.astype(int)
    pred = proba.argmax(axis=1)
    out = {
        "accuracy": float(np.mean(pred == y)),
        "f1_macro": float(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        "logloss": float(skm.log_loss(y, proba, labels=labels)),
    }
    if task is Task.binary and len(np.unique(y)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y, proba[:, 1]))
    return out
