"""Diagnostic figures for a training run, logged to MLflow as artifacts.

Feature importance for the tree model; a confusion matrix for classifiers, residuals for regression, for the
model and (prefixed `baseline_`) for the linear baseline fit in the same run.

Built on `matplotlib.figure.Figure` directly (no pyplot), so no GUI backend is ever selected and
nothing global changes: the flows run in worker threads and headless containers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def feature_importance_figure(booster: Any, top: int = 20) -> Any:
    """Total gain per feature, largest first: what the trees actually split on."""
    from matplotlib.figure import Figure

    scores = booster.get_score(importance_type="total_gain")
    items = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:top]
    fig = Figure(figsize=(7, 0.35 * max(len(items), 3) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    if items:
        names, values = zip(*reversed(items))
        ax.barh(names, values, color="#3b75af")
    ax.set_xlabel("total gain")
    ax.set_title(f"Feature importance (top {len(items)})")
    return fig


def confusion_matrix_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> Any:
    """Counts of true (rows) vs predicted (columns) classes on the holdout."""
    from matplotlib.figure import Figure

    k = len(classes)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    fig = Figure(figsize=(1.0 * k + 2.5, 1.0 * k + 2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = counts.max() / 2 if counts.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > limit else "black")
    ax.set_title("Holdout confusion matrix")
    return fig


def residuals_figure(y_true: np.ndarray, y_pred: np.ndarray) -> Any:
    """Residuals against predictions, and their distribution: bias and heteroscedasticity at a glance."""
    from matplotlib.figure import Figure

    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    resid = y_true - y_pred
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.scatter(y_pred, resid, s=6, alpha=0.5)
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_xlabel("predicted")
    left.set_ylabel("true - predicted")
    left.set_title("Residuals vs predicted")
    right.hist(resid, bins=40, color="#3b75af")
    right.set_xlabel("true - predicted")
    right.set_title("Residual distribution")
    return fig


def log_figures(booster: Any, task: Any, y_true: np.ndarray, raw: np.ndarray, classes: list[str],
                prefix: str = "") -> list[str]:
    """Log the run's figures under `plots/` of the active MLflow run; returns their artifact paths.

    Args:
        booster: the tree model (its feature importance is plotted), or None for the linear baseline.
        prefix: file-name prefix, e.g. `baseline_`: the baseline's plots sit beside the model's.
    """
    import mlflow

    from lifecycle.spec import Task

    figures = {"plots/feature_importance.png": feature_importance_figure(booster)} if booster is not None else {}
    title = "Baseline holdout" if prefix else "Holdout"
    if task is Task.regression:
        fig = residuals_figure(y_true, raw)
        figures[f"plots/{prefix}residuals.png"] = fig
    else:
        proba = np.asarray(raw)
        pred = (proba > 0.5).astype(int) if proba.ndim == 1 else proba.argmax(axis=1)
        fig = confusion_matrix_figure(y_true, pred, classes)
        fig.axes[0].set_title(f"{title} confusion matrix")
        figures[f"plots/{prefix}confusion_matrix.png"] = fig
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)
    return list(figures)
