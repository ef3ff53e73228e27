"""The plain baseline every trained model is measured against, fit in the same run on the same split.

Why this shape:
- On a real 64k-row catalogue the registered champion (xgboost on MiniLM embeddings, accuracy 0.702)
  lost to TF-IDF + logistic regression on the text alone (0.772), and nothing said so. A ten-line
  linear model is the floor a model must clear to earn its place (TFX's Evaluator blesses a model
  only against thresholds and a baseline; Rules of ML #1: start from a simple baseline).
- The baseline sees the raw columns the model sees, through the simplest encoders that work:
  TF-IDF (1-2-grams) of the text column when the model uses the text, one-hot categoricals, scaled
  numerics (median-imputed). A spec's text column also feeds search; a model that was not asked to
  train on the text is not measured against a text model (that would refuse every tabular model of a
  dataset that merely has a searchable column).
- Same id-hash holdout as the model (`train_data.holdout_mask`), so the two metrics are on the same
  rows. Over `train.baseline_max_rows`, both sides are an id-hash sample (a second salted hash, so
  the sample is independent of the split and the same on every run) and the run says so.
- The baseline is also a candidate: `train.model: linear`, or `auto` where xgboost does not beat it,
  registers this very pipeline (exported for serving by `tasks.linear_export`), so it keeps the
  fitted pipeline and a few holdout rows to check the export against.
- Rows are read part by part from the version's Parquet files (`train_parts`: all, or `train.window`'s) here: the
  sample bound is what keeps it small, and sklearn needs no cluster.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from infra_blocks import ObjectStore
from lifecycle.records import DatasetVersion
from lifecycle.spec import DatasetSpec, SplitConfig, Task
from tasks.train_data import HASH_BUCKETS, holdout_buckets, holdout_mask, train_parts
from tasks.train_metrics import holdout_metrics

SAMPLE_SALT = "/baseline-sample"
TFIDF_MAX_FEATURES = 200_000
MAX_ITER = 300
CHECK_ROWS = 200  # holdout rows kept to check the exported (served) linear model against the pipeline


def family(task: Task) -> str:
    return "ridge" if task is Task.regression else "logistic_regression"


def text_column(spec: DatasetSpec) -> str | None:
    """The text column the baseline encodes: only when the model itself trains on the text."""
    return spec.text_column if spec.text_column and spec.train.use_text_embeddings else None


def sample_fraction(spec: DatasetSpec, rows: int) -> float:
    """Share of the version's rows the baseline uses: 1.0 unless its train side exceeds the bound."""
    expected_train = rows * (1.0 - spec.split.holdout_fraction)
    cap = spec.train.baseline_max_rows
    return 1.0 if expected_train <= cap else cap / expected_train


def sample_mask(ids: pd.Series, split: SplitConfig, fraction: float) -> np.ndarray:
    """True for the rows in the id-hash sample (independent of the holdout hash by its own salt)."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    salted = SplitConfig(holdout_fraction=split.holdout_fraction, salt=split.salt + SAMPLE_SALT)
    return holdout_buckets(ids, salted) < max(1, int(round(fraction * HASH_BUCKETS)))


def read_rows(store: ObjectStore, spec: DatasetSpec, parts: list[str],
              fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, holdout rows) of the parts training reads, sampled by id hash when `fraction` < 1."""
    import pyarrow.parquet as pq

    text = text_column(spec)
    cols = list(dict.fromkeys([spec.id_column, spec.label_column, *spec.numeric_features,
                               *spec.categorical_features, *([text] if text else [])]))
    pafs = store.pyarrow_filesystem()
    train, hold = [], []
    for key in parts:
        part = pq.read_table(store.path(key), filesystem=pafs, columns=cols).to_pandas()
        part = part[part[spec.label_column].notna()]
        part = part[sample_mask(part[spec.id_column], spec.split, fraction)]
        held = holdout_mask(part[spec.id_column], spec.split)
        train.append(part[~held])
        hold.append(part[held])
    return pd.concat(train, ignore_index=True), pd.concat(hold, ignore_index=True)


def prepare(frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """Plain dtypes the encoders accept: floats (NaN for missing), strings ("" for missing)."""
    out = pd.DataFrame(index=frame.index)
    for col in spec.numeric_features:
        out[col] = pd.to_numeric(frame[col], errors="coerce").astype(np.float64)
    for col in spec.categorical_features:
        out[col] = frame[col].astype("string").fillna("").astype(object)
    text = text_column(spec)
    if text:
        out[text] = frame[text].astype("string").fillna("").astype(object)
    return out


def make_pipeline(spec: DatasetSpec) -> Any:
    """TF-IDF(text) + one-hot(categoricals) + scaled numerics → logistic regression / ridge."""
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts: list[tuple[str, Any, Any]] = []
    text = text_column(spec)
    if text:
        parts.append(("text", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                              max_features=TFIDF_MAX_FEATURES), text))
    if spec.categorical_features:
        parts.append(("categorical", OneHotEncoder(handle_unknown="ignore"), list(spec.categorical_features)))
    if spec.numeric_features:
        numeric = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
        parts.append(("numeric", numeric, list(spec.numeric_features)))
    model: Any = (Ridge(alpha=1.0) if spec.task is Task.regression
                  else LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=spec.train.seed))
    return Pipeline([("features", ColumnTransformer(parts, sparse_threshold=1.0)), ("model", model)])


def describe(spec: DatasetSpec) -> str:
    """The baseline's inputs in a few words (tagged on the run)."""
    text = text_column(spec)
    pieces = ([f"tfidf({text})"] if text else []) + \
        ([f"onehot({len(spec.categorical_features)})"] if spec.categorical_features else []) + \
        ([f"scaled({len(spec.numeric_features)})"] if spec.numeric_features else [])
    return f"{family(spec.task)} on {' + '.join(pieces)}"


@dataclass
class BaselineResult:
    """The baseline's holdout scores and predictions (in the model's class order), before logging."""

    family: str
    features: str
    metrics: dict[str, float]
    y_true: np.ndarray
    raw: np.ndarray
    rows: dict[str, int] = field(default_factory=dict)
    fraction: float = 1.0
    seconds: float = 0.0
    pipeline: Any = None  # the fitted sklearn pipeline (tasks.linear_export serves it without sklearn)
    check_rows: pd.DataFrame | None = None  # raw holdout rows whose `raw` the exported model must reproduce

    @property
    def sampled(self) -> bool:
        return self.fraction < 1.0

    def summary(self) -> str:
        """One line for the record and the run: what was fit, on how many rows."""
        where = (f"id-hash sample of {self.fraction:.1%} of the rows ({self.rows['train']} train rows)"
                 if self.sampled else f"{self.rows['train']} train rows")
        return f"{self.features}, fit on {where}, scored on {self.rows['holdout']} holdout rows"

    def tags(self, prefix: str = "lifecycle.baseline.") -> dict[str, str]:
        return {f"{prefix}family": self.family, f"{prefix}features": self.features,
                f"{prefix}sampled": str(self.sampled).lower(), f"{prefix}summary": self.summary()[:500]}

    def params(self) -> dict[str, Any]:
        return {"baseline_train_rows": self.rows["train"], "baseline_holdout_rows": self.rows["holdout"],
                "baseline_sample_fraction": round(self.fraction, 6)}


def encode(labels: pd.Series, task: Task, classes: list[str]) -> np.ndarray:
    """Labels in the model's encoding: class indices (classes unseen by the model → dropped by caller)."""
    if task is Task.regression:
        return pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float64)
    return np.asarray(pd.Categorical(labels.astype("string"), categories=classes).codes, dtype=np.int64)


def fit_baseline(spec: DatasetSpec, store: ObjectStore, dataset: DatasetVersion,
                 classes: list[str]) -> BaselineResult | None:
    """Fit the baseline on the train side, score it on the holdout with the model's metrics.

    Args:
        classes: the model's label classes in index order (the baseline's probabilities follow it).

    Returns:
        None when a side is empty or the train side has one class only (nothing to compare with).
    """
    start = time.perf_counter()
    parts, rows = train_parts(store, spec, dataset)  # every file, or train.window's (one Delta log read)
    fraction = sample_fraction(spec, rows)
    train, hold = read_rows(store, spec, parts, fraction)
    y_train = encode(train[spec.label_column], spec.task, classes)
    y_hold = encode(hold[spec.label_column], spec.task, classes)
    if spec.task is not Task.regression:  # rows of classes the model never saw cannot be scored alike
        train, y_train = train[y_train >= 0], y_train[y_train >= 0]
        hold, y_hold = hold[y_hold >= 0], y_hold[y_hold >= 0]
    if len(train) == 0 or len(hold) == 0 or (spec.task is not Task.regression and len(np.unique(y_train)) < 2):
        return None
    pipeline = make_pipeline(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: still a fair, bounded baseline
        pipeline.fit(prepare(train, spec), y_train)
    X_hold = prepare(hold, spec)
    if spec.task is Task.regression:
        raw = np.asarray(pipeline.predict(X_hold), dtype=np.float64)
    else:
        proba = pipeline.predict_proba(X_hold)
        raw = np.zeros((len(hold), len(classes)), dtype=np.float64)
        raw[:, pipeline.classes_.astype(int)] = proba
    return BaselineResult(family=family(spec.task), features=describe(spec),
                          metrics=holdout_metrics(spec.task, y_hold, raw), y_true=y_hold, raw=raw,
                          rows={"train": len(train), "holdout": len(hold)}, fraction=fraction,
                          seconds=time.perf_counter() - start, pipeline=pipeline,
                          check_rows=hold.head(CHECK_ROWS).reset_index(drop=True))
