"""The fitted baseline pipeline → the served linear model file (`serving.linear`), checked before it ships.

Why this shape:
- Serving must not need sklearn or pandas on its hot path, so the pipeline's fitted state (TF-IDF
  vocabulary, idf and settings, one-hot levels, imputer medians, scaler mean/scale, coef/intercept,
  class order) is written as plain arrays that `serving.linear.LinearModel` scores with numpy.
- Only the settings the scorer reproduces are accepted (word analyzer, no stop words, accents or
  custom callables): anything else fails here, at training, rather than serving different features.
- The exported model is loaded back and scored on holdout rows next to the pipeline's own
  probabilities; a disagreement fails the run instead of registering a model that serves
  something other than what was measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from lifecycle.spec import DatasetSpec, Task
from serving.linear import LINEAR_FILE, LinearModel, LinearSettings, TextSettings, pack
from tasks.baseline import BaselineResult, describe, encode, family, make_pipeline, prepare

TOLERANCE = 1e-9


def _text_settings(vectorizer: Any, column: str) -> TextSettings:
    unsupported = {k: getattr(vectorizer, k) for k in ("preprocessor", "tokenizer", "stop_words", "strip_accents")
                   if getattr(vectorizer, k) is not None}
    if vectorizer.analyzer != "word" or vectorizer.binary or vectorizer.input != "content":
        unsupported["analyzer/binary/input"] = (vectorizer.analyzer, vectorizer.binary, vectorizer.input)
    if vectorizer.norm not in ("l2", None):
        unsupported["norm"] = vectorizer.norm
    if unsupported:
        raise LifecycleError(f"the linear model's TF-IDF settings cannot be served: {unsupported}")
    return TextSettings(column=column, lowercase=vectorizer.lowercase, token_pattern=vectorizer.token_pattern,
                        ngram_range=tuple(vectorizer.ngram_range), sublinear_tf=vectorizer.sublinear_tf,
                        use_idf=vectorizer.use_idf, norm=vectorizer.norm)


def export_linear(baseline: BaselineResult, schema: FeatureSchema, folder: Path) -> FeatureSchema:
    """Write `folder/linear_model.npz` from the baseline's pipeline; returns the schema to serve it with.

    Raises:
        LifecycleError: the pipeline holds a setting the scorer cannot reproduce, or the exported
            model disagrees with the pipeline on the holdout rows.
    """
    if baseline.pipeline is None:
        raise LifecycleError("the baseline kept no fitted pipeline to export")
    features, model = baseline.pipeline.named_steps["features"], baseline.pipeline.named_steps["model"]
    fitted = {name: (trans, cols) for name, trans, cols in features.transformers_ if name != "remainder"}
    order = [name for name in fitted]
    if order != [n for n in ("text", "categorical", "numeric") if n in fitted]:
        raise LifecycleError(f"unexpected baseline column order {order}")
    arrays: dict[str, np.ndarray] = {}
    text, vocabulary = None, []
    if "text" in fitted:
        vectorizer, column = fitted["text"]
        text = _text_settings(vectorizer, column)
        vocabulary = [str(t) for t in vectorizer.get_feature_names_out()]
        arrays["idf"] = np.asarray(vectorizer.idf_, dtype=np.float64)
    categorical: dict[str, list[str]] = {}
    if "categorical" in fitted:
        encoder, columns = fitted["categorical"]
        if encoder.drop_idx_ is not None or encoder.handle_unknown != "ignore":
            raise LifecycleError("the linear model's one-hot encoder must keep every level and ignore unknowns")
        categorical = {c: [str(v) for v in levels] for c, levels in zip(columns, encoder.categories_)}
    numeric: list[str] = []
    if "numeric" in fitted:
        steps, numeric = fitted["numeric"]
        imputer, scaler = steps.steps[0][1], steps.steps[1][1]
        arrays["median"] = np.asarray(imputer.statistics_, dtype=np.float64)
        arrays["mean"] = np.asarray(scaler.mean_, dtype=np.float64)
        arrays["scale"] = np.asarray(scaler.scale_, dtype=np.float64)
        numeric = list(numeric)
    arrays["coef"] = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64)).T.copy()
    arrays["intercept"] = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64))
    kind = "ridge" if baseline.family == "ridge" else "logistic"
    if kind == "logistic":
        arrays["class_index"] = np.asarray(model.classes_, dtype=np.int64)
    settings = LinearSettings(kind=kind, text=text, categorical=categorical, numeric=numeric,
                              vocabulary_size=len(vocabulary))
    pack(settings, vocabulary, arrays, folder / LINEAR_FILE)
    served = schema.model_copy(update={"family": "linear", "embedding_dim": 0, "raw_text": text is not None})
    check(LinearModel.load(folder / LINEAR_FILE, served), baseline)
    return served


def check(model: LinearModel, baseline: BaselineResult) -> None:
    """The exported model's output on the first holdout rows equals the pipeline's (what was measured).

    Raises:
        LifecycleError: naming the largest difference.
    """
    rows = baseline.check_rows
    if rows is None or len(rows) == 0:
        return
    got = model.raw(*model.read_frame(rows), len(rows))
    want = baseline.raw[: len(rows)]
    worst = float(np.max(np.abs(got - want))) if got.size else 0.0
    if got.shape != want.shape or not worst <= TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
        raise LifecycleError(f"the exported linear model disagrees with the fitted pipeline on the holdout "
                             f"(largest difference {worst:.3g}, shapes {got.shape} vs {want.shape})")


def fit_and_export(spec: DatasetSpec, frame: pd.DataFrame, schema: FeatureSchema, folder: Path) -> FeatureSchema:
    """Fit the baseline pipeline on all of `frame` and write a servable model folder (schema + model file).

    The same pipeline and export as a train run, without a lake or MLflow: how tests and benchmarks
    build a linear model to serve.
    """
    pipeline = make_pipeline(spec)
    y = encode(frame[spec.label_column], spec.task, schema.classes)
    pipeline.fit(prepare(frame, spec), y)
    rows = frame.head(200).reset_index(drop=True)
    if spec.task is Task.regression:
        raw = np.asarray(pipeline.predict(prepare(rows, spec)), dtype=np.float64)
    else:
        raw = np.zeros((len(rows), len(schema.classes)))
        raw[:, pipeline.classes_.astype(int)] = pipeline.predict_proba(prepare(rows, spec))
    result = BaselineResult(family=family(spec.task), features=describe(spec), metrics={}, y_true=y[:len(rows)],
                            raw=raw, pipeline=pipeline, check_rows=rows)
    folder.mkdir(parents=True, exist_ok=True)
    served = export_linear(result, schema, folder)
    (folder / "feature_schema.json").write_text(served.model_dump_json(indent=2), encoding="utf-8")
    return served
