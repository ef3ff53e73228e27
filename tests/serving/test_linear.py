"""The served linear model: sklearn's TF-IDF reproduced bit for bit, the exported pipeline scored as
sklearn scores it, and the lean server answering exactly as the MLflow pyfunc does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema, build_schema
from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from lifecycle.spec import Task, parse_spec
from serving.linear import LINEAR_FILE, LinearModel, LinearSettings, TextSettings
from serving.model import SCHEMA_FILE, load_model, missing_files, sample_row

LONG = " ".join(["Café-Crème", "naïve", "x", "don't", "2024-01-05", "日本語テキスト", "ok_ok", "🎉"] * 4000)
TRICKY = ["", "   ", "Hello, World! hello... HELLO?!", "naïve café — Ünïcödé ÄÖÜ ß STRASSE straße",
          "日本語のテキスト 東京 東京", "emoji 🎉🎉 party_time!! a b c", "x", "under_score snake_case CamelCase",
          "tabs\tand\nnewlines\r\nand\x00nul", "1234 56 7 0.5 3,14 1e9", "don't can't won't o'clock",
          "repeat repeat repeat repeat repeat", "Ⅻ ⅻ ǅ ǆ İstanbul ΣΊΣΥΦΟΣ", "punctuation...only!!! ???", LONG]
SETTINGS = [dict(ngram_range=(1, 2), sublinear_tf=True),  # what the baseline uses
            dict(ngram_range=(1, 3), lowercase=False, sublinear_tf=False, norm=None),
            dict(ngram_range=(2, 2), sublinear_tf=True, use_idf=False)]


def _tfidf_only(vectorizer) -> LinearModel:
    """A linear model holding just the fitted vectorizer (zero weights): its `tfidf` is under test."""
    vocabulary = [str(t) for t in vectorizer.get_feature_names_out()]
    text = TextSettings(column="text", lowercase=vectorizer.lowercase, token_pattern=vectorizer.token_pattern,
                        ngram_range=vectorizer.ngram_range, sublinear_tf=vectorizer.sublinear_tf,
                        use_idf=vectorizer.use_idf, norm=vectorizer.norm)
    arrays = {"coef": np.zeros((len(vocabulary), 1)), "intercept": np.zeros(1)}
    if vectorizer.use_idf:
        arrays["idf"] = vectorizer.idf_
    schema = FeatureSchema(task=Task.regression, label_column="y", id_column="id", numeric=[], categorical={},
                           text_column="text", family="linear", raw_text=True)
    return LinearModel(schema, LinearSettings(kind="ridge", text=text, vocabulary_size=len(vocabulary)),
                       vocabulary, arrays)


@pytest.mark.parametrize("settings", SETTINGS, ids=["baseline", "trigrams-raw", "bigrams-tf"])
@pytest.mark.parametrize("max_features", [None, 40])
def test_tfidf_equals_sklearn_bit_for_bit_on_tricky_text(settings, max_features):
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = [*TRICKY[:-1], *generate_tickets(200, seed=1)["text"]]
    vectorizer = TfidfVectorizer(max_features=max_features, **settings).fit(corpus)
    model = _tfidf_only(vectorizer)
    docs = [*TRICKY, *generate_tickets(50, seed=2)["text"], "unseen words only zzz qqq"]
    want = vectorizer.transform(docs).tocsr()
    want.sort_indices()
    for i, doc in enumerate(docs):
        idx, values = model.tfidf(doc)
        start, end = want.indptr[i], want.indptr[i + 1]
        assert idx == want.indices[start:end].tolist(), doc[:40]
        assert np.array_equal(np.asarray(values), want.data[start:end]), doc[:40]  # equal, not close
    # None and NaN read as the empty document (the baseline's fillna("")), on both paths.
    empty = model.predict_columns({"text": [""]}, 1)
    assert model.predict_columns({"text": [None]}, 1) == empty
    assert model.predict(pd.DataFrame({"text": [None, float("nan")]})) == empty * 2


# --- a model exported from the baseline pipeline ------------------------------------------------------

def _spec(task: str = "multiclass", text: bool = True):
    overrides: dict = {"train": {"use_text_embeddings": text}}
    if task == "regression":
        overrides.update(task="regression", label_column="prior_tickets", expectations={},
                         numeric_features=["account_age_days", "response_minutes", "sentiment"])
    elif task == "binary":
        overrides.update(task="binary", expectations={})
    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", **overrides})


def _frame(task: str, rows: int, seed: int) -> pd.DataFrame:
    frame = generate_tickets(rows, seed=seed)
    if task == "binary":
        frame["category"] = np.where(frame["category"] == "technical", "technical", "other")
    return frame


def write_linear_dir(path: Path, task: str = "multiclass", text: bool = True, rows: int = 600) -> Path:
    """Fit the baseline pipeline on the sample and export it as the train stage does (schema + model file)."""
    from tasks.linear_export import fit_and_export

    spec, frame = _spec(task, text), _frame(task, rows, 3)
    cats = {c: frame[c].dropna().astype(str).unique().tolist() for c in spec.categorical_features}
    classes = [] if spec.task is Task.regression else sorted(frame[spec.label_column].astype(str).unique())
    fit_and_export(spec, frame, build_schema(spec, cats, classes), path)
    return path


def odd_rows(schema: FeatureSchema, rows: int = 30) -> list[dict]:
    """Sample rows with a null numeric, a null and an unseen category, None/empty/very long text."""
    frame = generate_tickets(rows, seed=11)
    frame.loc[2, "plan"] = "platinum"
    frame.loc[4, "channel"] = None
    frame.loc[5, "sentiment"] = None
    frame.loc[6, "text"] = None
    frame.loc[7, "text"] = ""
    frame.loc[8, "text"] = LONG
    return frame[schema.input_columns].astype(object).where(frame.notna(), None).to_dict("records")


@pytest.fixture(scope="module", params=["multiclass", "binary", "regression", "multiclass-no-text"])
def linear_dir(request, tmp_path_factory) -> Path:
    task, _, no_text = request.param.partition("-")
    return write_linear_dir(tmp_path_factory.mktemp(request.param), task, text=not no_text)


def test_exported_model_scores_as_the_sklearn_pipeline(linear_dir):
    """Probabilities (or values) equal sklearn's on rows with nulls, unseen levels and odd text."""
    from tasks.baseline import make_pipeline, prepare

    model = load_model(linear_dir)
    assert isinstance(model, LinearModel) and not model.needs_text
    task = model.schema.task.value
    spec = _spec(task, text=model.schema.raw_text)
    frame = _frame(task, 600, 3)
    pipeline = make_pipeline(spec)
    from tasks.baseline import encode

    pipeline.fit(prepare(frame, spec), encode(frame[spec.label_column], spec.task, model.schema.classes))
    rows = pd.DataFrame(odd_rows(model.schema))
    got = model.raw(*model.read_frame(rows), len(rows))
    if spec.task is Task.regression:
        assert np.allclose(got, pipeline.predict(prepare(rows, spec)), rtol=1e-10, atol=1e-10)
    else:
        assert np.allclose(got, pipeline.predict_proba(prepare(rows, spec)), rtol=1e-10, atol=1e-12)
    assert model.schema.input_columns == [*spec.numeric_features, *spec.categorical_features,
                                          *(["text"] if model.schema.raw_text else [])]


def test_fast_path_equals_the_reference_path(linear_dir):
    model = load_model(linear_dir)
    rows = odd_rows(model.schema)
    columns = {c: [r[c] for r in rows] for c in model.schema.input_columns}
    for proba in (False, True):
        assert model.predict_columns(columns, len(rows), proba) == model.predict(pd.DataFrame(rows), proba)
    row = sample_row(model.schema)
    odd = [row, {**row, "prior_tickets": "3"}, {**row, "plan": 1}, {**row, "account_age_days": float("nan")}]
    columns = {c: [r[c] for r in odd] for c in row}
    assert model.predict_columns(columns, len(odd)) == model.predict(pd.DataFrame(odd))
    with pytest.raises(LifecycleError, match="must be numeric"):
        model.predict_columns({**columns, "sentiment": ["high"] * 4}, 4)
    with pytest.raises(LifecycleError, match="missing input column\\(s\\): plan"):
        model.predict_columns({c: v for c, v in columns.items() if c != "plan"}, 4)


def save_linear_pyfunc(model_dir: Path, dest: Path) -> Path:
    """The linear model as train logs it (serving.pyfunc.LifecycleModel with a `linear` artifact)."""
    import mlflow.pyfunc

    from serving.pyfunc import LifecycleModel, code_paths, load_predictor, model_signature, pip_requirements

    predictor = load_predictor(model_dir)
    example = generate_tickets(5, seed=2)[predictor.schema.input_columns]
    signature = model_signature(example, predictor.predict(example), predictor.schema.numeric)
    mlflow.pyfunc.save_model(str(dest / "pyfunc"), python_model=LifecycleModel(), code_paths=code_paths(dest),
                             artifacts={"linear": str(model_dir / LINEAR_FILE),
                                        "feature_schema": str(model_dir / SCHEMA_FILE)},
                             signature=signature, pip_requirements=pip_requirements(False))
    return dest / "pyfunc"


def test_invocations_equal_the_mlflow_pyfunc(linear_dir, tmp_path):
    """Same JSON from the lean app as `mlflow.pyfunc.load_model(...).predict`, probabilities included."""
    import mlflow.pyfunc

    from serving.app import create_app
    from serving.config import ServingConfig

    pyfunc = mlflow.pyfunc.load_model(str(save_linear_pyfunc(linear_dir, tmp_path)))
    client = TestClient(create_app(ServingConfig(model_dir=str(linear_dir), lineage={"deployment_id": "t"})))
    rows = odd_rows(load_model(linear_dir).schema)
    frame = pd.DataFrame(rows)
    for proba in (False, True):
        resp = client.post("/invocations", content=orjson.dumps({"dataframe_records": rows,
                                                                 "params": {"probabilities": proba}}),
                           headers={"Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text
        expected = pd.DataFrame(pyfunc.predict(frame, params={"probabilities": proba})).to_dict("records")
        assert resp.json() == {"predictions": expected}
    one = client.post("/invocations", content=orjson.dumps({"inputs": rows[6]}),  # the row with text None
                      headers={"Content-Type": "application/json"})
    assert one.json() == {"predictions": pd.DataFrame(pyfunc.predict(frame.iloc[6:7])).to_dict("records")}


def test_a_real_server_process_serves_the_linear_model(tmp_path):
    """`python -m serving` on a linear snapshot: loads it by its schema, answers as the pyfunc."""
    import httpx

    from tests.serving.servers import running

    folder = write_linear_dir(tmp_path / "model")
    rows = odd_rows(load_model(folder).schema, 8)
    expected = load_model(folder).predict(pd.DataFrame(rows), True)
    with running(folder) as (url, _, _):
        resp = httpx.post(f"{url}/invocations", json={"dataframe_records": rows, "params": {"probabilities": True}},
                          timeout=30)
        version = httpx.get(f"{url}/version", timeout=10).json()
    assert resp.status_code == 200 and resp.json() == {"predictions": expected}
    assert version["inputs"][-1] == "text"


def test_snapshot_needs_the_schema_and_one_model_file(tmp_path):
    assert missing_files(["feature_schema.json", "booster.json"]) == []
    assert missing_files(["feature_schema.json", LINEAR_FILE]) == []
    assert missing_files(["feature_schema.json"]) == ["booster.json or linear_model.npz"]
    folder = write_linear_dir(tmp_path / "m", rows=200)
    (folder / LINEAR_FILE).write_bytes(b"not a model")
    with pytest.raises(LifecycleError, match="not a valid linear model"):
        load_model(folder)
    (folder / LINEAR_FILE).unlink()
    with pytest.raises(LifecycleError, match="model file not found"):
        load_model(folder)
