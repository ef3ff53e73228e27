"""Micro-batching of text requests through the real MiniLM encoder (serving/batching.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from lifecycle.spec import parse_spec
from serving.app import create_app
from serving.config import ServingConfig
from serving.model import BOOSTER_FILE, SCHEMA_FILE, ServingModel


def write_text_model(path: Path, rows: int = 300) -> Path:
    """A small booster on tabular + MiniLM features of the ticket text, saved as train saves it."""
    import xgboost as xgb

    from lifecycle.encoder import EMBED_DIM, encode, prepare_texts
    from lifecycle.features import build_schema, encode_labels, feature_matrix

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv"})
    frame = generate_tickets(rows, seed=4)
    cats = {c: frame[c].dropna().unique().tolist() for c in spec.categorical_features}
    schema = build_schema(spec, cats, sorted(frame[spec.label_column].unique()), embedding_dim=EMBED_DIM)
    emb = encode(prepare_texts(frame[spec.text_column], 2000))
    dtrain = xgb.DMatrix(feature_matrix(frame, schema, emb), encode_labels(frame[spec.label_column], schema),
                         feature_names=schema.feature_names, feature_types=schema.feature_types,
                         enable_categorical=True)
    booster = xgb.train({"objective": "multi:softprob", "num_class": len(schema.classes), "max_depth": 3,
                         "nthread": 1}, dtrain, num_boost_round=10)
    path.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path / BOOSTER_FILE))
    (path / SCHEMA_FILE).write_text(schema.model_dump_json())
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> tuple[Path, ServingModel]:
    folder = write_text_model(tmp_path_factory.mktemp("text-model"))
    return folder, ServingModel.load(folder)


def test_concurrent_text_requests_share_encoder_batches_and_keep_their_own_answers(text_model):
    from lifecycle.encoder import encoded_counts
    from serving.pyfunc import BoosterPredictor

    folder, model = text_model
    app = create_app(ServingConfig(model_dir=str(folder)), model=model)
    frame = generate_tickets(24, seed=8)[model.schema.input_columns]
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    bad = {**rows[0], "sentiment": "very"}

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving") as client:
            calls = [client.post("/invocations",
                                 json={"dataframe_records": [r], "params": {"probabilities": i % 2 == 0}})
                     for i, r in enumerate(rows)]
            calls.append(client.post("/invocations", json={"dataframe_records": [bad]}))
            return await asyncio.gather(*calls)

    before = encoded_counts()["calls"]
    answers = asyncio.run(fire())
    encoder_calls = encoded_counts()["calls"] - before
    batcher = app.state.batcher
    assert batcher.requests == len(rows)  # the bad one is refused before it queues (serving.requests)
    assert encoder_calls < len(rows) // 2 and batcher.batches < len(rows) // 2  # shared batches, not one per request

    reference = BoosterPredictor(model.booster, model.schema)
    for i, (row, answer) in enumerate(zip(rows, answers)):
        assert answer.status_code == 200, answer.text
        (got,) = answer.json()["predictions"]
        want = reference.predict(pd.DataFrame([row]), probabilities=i % 2 == 0).iloc[0].to_dict()
        assert got.keys() == want.keys() and got["prediction"] == want["prediction"]
        probs = [k for k in got if k.startswith("proba_")]
        np.testing.assert_allclose([got[k] for k in probs], [want[k] for k in probs], atol=1e-4)
    assert answers[-1].status_code == 400 and "sentiment" in answers[-1].json()["message"]


def test_concurrent_search_queries_share_encoder_batches(text_model):
    """/search: queries that arrive together are embedded in one encoder call; each keeps its own k and filter."""
    from tests.serving.test_app import FakeSearcher

    folder, model = text_model
    fake = FakeSearcher()
    app = create_app(ServingConfig(model_dir=str(folder)), model=model, searcher=fake)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving") as client:
            return await asyncio.gather(*[
                client.post("/search", json={"query": f"q{i}", "k": 1 + i % 3, "filter": {"category": f"c{i}"}})
                for i in range(16)])

    answers = asyncio.run(fire())
    assert all(a.status_code == 200 for a in answers)
    assert [len(a.json()["results"]) for a in answers] == [1 + i % 3 for i in range(16)]
    assert sorted(q for batch in fake.embedded for q in batch) == sorted(f"q{i}" for i in range(16))
    assert len(fake.embedded) < 8 and app.state.queries.queries == 16  # shared batches, not one per query
    assert sorted(fake.calls) == sorted((1 + i % 3, f"(category = 'c{i}')") for i in range(16))


def test_search_waits_for_stragglers_only_after_a_shared_batch():
    """After a batch of several queries, a query arriving within `collect_s` joins the one before it
    (the answered clients come back a moment later); a lone client's query never waits."""
    from serving.batching import QueryBatcher
    from tests.serving.test_app import FakeSearcher

    fake = FakeSearcher()
    queries = QueryBatcher(fake, collect_s=30.0)

    async def scenario() -> None:
        await asyncio.wait_for(queries.search("lone", 1, None), 10)  # would take 30 s if it waited
        await asyncio.wait_for(queries.search("alone again", 1, None), 10)
        await asyncio.gather(*[queries.search(f"q{i}", 1, None) for i in range(3)])  # queued together
        queries.collect_s = 0.05

        async def later() -> list[dict]:
            await asyncio.sleep(0.001)  # fires before the batcher's own 50 ms timer
            return await queries.search("straggler", 1, None)

        await asyncio.wait_for(asyncio.gather(queries.search("first", 1, None), later()), 10)

    asyncio.run(scenario())
    assert fake.embedded == [["lone"], ["alone again"], ["q0", "q1", "q2"], ["first", "straggler"]]


class _RecordingModel:
    """Stands in for a text model: records each batch's texts, one prediction per row."""

    class schema:  # noqa: N801 - the attribute ServingModel carries
        input_columns = ["text"]

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def predict_columns(self, columns, rows, probabilities):
        self.batches.append(list(columns["text"]))
        return [{"prediction": t} for t in columns["text"]]


def test_invocations_wait_for_stragglers_only_after_a_shared_batch():
    """As /search: after a batch of several requests, one arriving within `collect_s` joins the next
    batch's first; a lone client's request never waits."""
    from serving.batching import Batcher

    model = _RecordingModel()
    batcher = Batcher(model, collect_s=30.0)  # type: ignore[arg-type]

    def ask(text: str):
        return batcher.predict({"text": [text]}, 1, False)

    async def scenario() -> None:
        await asyncio.wait_for(ask("lone"), 10)  # would take 30 s if it waited
        await asyncio.wait_for(ask("alone again"), 10)
        await asyncio.gather(*[ask(f"r{i}") for i in range(3)])  # queued together
        batcher.collect_s = 0.05

        async def later() -> list[dict]:
            await asyncio.sleep(0.001)  # before the batcher's own 50 ms timer
            return await ask("straggler")

        first, second = await asyncio.wait_for(asyncio.gather(ask("first"), later()), 10)
        assert first == [{"prediction": "first"}] and second == [{"prediction": "straggler"}]

    asyncio.run(scenario())
    assert model.batches == [["lone"], ["alone again"], ["r0", "r1", "r2"], ["first", "straggler"]]


def test_batch_collect_ms_sets_the_wait_of_both_batchers(text_model):
    from tests.serving.test_app import FakeSearcher

    folder, model = text_model
    app = create_app(ServingConfig(model_dir=str(folder), batch_collect_ms=0), model=model, searcher=FakeSearcher())
    assert app.state.batcher.collect_s == 0 and app.state.queries.collect_s == 0
    app = create_app(ServingConfig(model_dir=str(folder)), model=model, searcher=FakeSearcher())
    assert app.state.batcher.collect_s == app.state.queries.collect_s == 0.001
