"""Train/serve skew: a model trained on text embeddings is served with the text preparation it was trained on.

The spec cuts texts at 50 characters (`embed.max_chars: 50`); the embed stage's vectors of a long
text are those of its first 50 characters. The schema the train stage saves records that, and both
the lean server (`serving.model`) and the MLflow pyfunc (`serving.pyfunc`) cut request texts alike.
Real MiniLM (one load, ~7 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lifecycle.encoder import EMBED_DIM, encode, prepare_texts
from lifecycle.features import FeatureSchema, build_schema, encode_labels, feature_matrix
from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from lifecycle.spec import parse_spec
from serving.model import BOOSTER_FILE, SCHEMA_FILE, ServingModel

SPEC = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", "embed": {"max_chars": 50},
                   "train": {"use_text_embeddings": True}})
LONG = ("My invoice was charged twice this month and I need a refund. " * 3
        + "Also the app crashes on login whenever I open settings and the screen goes black.")


def training_embeddings(texts: list[str]) -> np.ndarray:
    """The vectors the embed stage stores for these texts (tasks/embeddings.embed_unit: prepare, encode)."""
    return encode(prepare_texts(texts, SPEC.embed.max_chars))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A booster trained on tabular + text features, saved the way the train stage saves it."""
    import xgboost as xgb

    frame = generate_tickets(60, seed=5)
    cats = {c: frame[c].unique().tolist() for c in SPEC.categorical_features}
    schema = build_schema(SPEC, cats, sorted(frame[SPEC.label_column].unique().tolist()), embedding_dim=EMBED_DIM)
    emb = training_embeddings(frame[SPEC.text_column].tolist())
    dtrain = xgb.DMatrix(feature_matrix(frame, schema, emb), encode_labels(frame[SPEC.label_column], schema),
                         feature_names=schema.feature_names, feature_types=schema.feature_types,
                         enable_categorical=True)
    booster = xgb.train({"objective": "multi:softprob", "num_class": len(schema.classes), "max_depth": 3,
                         "nthread": 1}, dtrain, num_boost_round=5)
    path = tmp_path_factory.mktemp("text-model")
    booster.save_model(str(path / BOOSTER_FILE))
    (path / SCHEMA_FILE).write_text(schema.model_dump_json())
    return path


def test_the_schema_records_the_specs_text_preparation(model_dir):
    schema = FeatureSchema.model_validate_json((model_dir / SCHEMA_FILE).read_bytes())
    assert (schema.text_max_chars, schema.text_model, schema.embedding_dim) == (50, "all-MiniLM-L6-v2", EMBED_DIM)


def test_the_server_embeds_requests_as_the_model_was_trained(model_dir):
    model = ServingModel.load(model_dir)
    served = model.text_features([LONG])
    assert served is not None
    np.testing.assert_allclose(served, training_embeddings([LONG]), atol=1e-5)
    # the test has teeth: the 2000-character cut gives another vector
    assert not np.allclose(served, encode(prepare_texts([LONG], 2000)), atol=1e-3)

    row = {**{c: [v] for c, v in generate_tickets(1, seed=9).iloc[0].items()}, SPEC.text_column: [LONG]}
    frame = generate_tickets(1, seed=9).assign(**{SPEC.text_column: [LONG]})
    expected = model.booster.inplace_predict(feature_matrix(frame, model.schema, training_embeddings([LONG])))
    got = model.predict_columns(row, rows=1, probabilities=True)[0]
    np.testing.assert_allclose([got[f"proba_{c}"] for c in model.schema.classes], np.asarray(expected)[0], atol=1e-5)


def test_the_mlflow_pyfunc_embeds_requests_as_the_model_was_trained(model_dir):
    import pandas as pd

    from serving.pyfunc import BoosterPredictor

    predictor = BoosterPredictor.from_files(model_dir / BOOSTER_FILE, model_dir / SCHEMA_FILE)
    assert predictor.text_max_chars == 50
    frame = pd.DataFrame({SPEC.text_column: [LONG]})
    np.testing.assert_allclose(predictor._embeddings(frame), training_embeddings([LONG]), atol=1e-5)
    # a model logged before schemas recorded the cut still gets the value its MLflow model config holds
    legacy = FeatureSchema.model_validate(predictor.schema.model_dump(exclude={"text_max_chars"}))
    assert BoosterPredictor(predictor.booster, legacy, 70).text_max_chars == 70
    assert BoosterPredictor(predictor.booster, predictor.schema, 70).text_max_chars == 50
