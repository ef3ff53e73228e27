"""The serving app on a real booster trained here on the sample data (no MLflow, no mocks of the model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema, build_schema, encode_labels, feature_matrix
from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from lifecycle.spec import parse_spec
from serving.app import create_app
from serving.config import ServingConfig
from serving.model import BOOSTER_FILE, SCHEMA_FILE, ServingModel, sample_row

TOKEN = "s3cret-token"
LINEAGE = {"dataset": "tickets", "dataset_version": "dv1", "model_name": "tickets", "model_version": "3",
           "index_version": None, "deployment_id": "dep1"}


def write_model_dir(path: Path, rows: int = 400) -> Path:
    """Train a small multiclass booster on the sample and save it the way the train stage does."""
    import xgboost as xgb

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv"})
    frame = generate_tickets(rows, seed=3)
    cats = {c: frame[c].unique().tolist() for c in spec.categorical_features}
    schema = build_schema(spec, cats, sorted(frame[spec.label_column].unique().tolist()))
    dtrain = xgb.DMatrix(feature_matrix(frame, schema), encode_labels(frame[spec.label_column], schema),
                         feature_names=schema.feature_names, feature_types=schema.feature_types,
                         enable_categorical=True)
    params = {"objective": "multi:softprob", "num_class": len(schema.classes), "max_depth": 3, "nthread": 1}
    booster = xgb.train(params, dtrain, num_boost_round=15)
    path.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path / BOOSTER_FILE))
    (path / SCHEMA_FILE).write_text(schema.model_dump_json())
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(model_dir) -> ServingModel:
    return ServingModel.load(model_dir)


def make_client(model_dir: Path, model: ServingModel, searcher=None, **overrides) -> TestClient:
    config = ServingConfig(model_dir=str(model_dir), lineage=LINEAGE, **overrides)
    return TestClient(create_app(config, model=model, searcher=searcher))


@pytest.fixture(scope="module")
def client(model_dir, model) -> TestClient:
    return make_client(model_dir, model)


@pytest.fixture(scope="module")
def rows(model) -> list[dict]:
    frame = generate_tickets(30, seed=11)
    frame.loc[2, "plan"] = "platinum"  # unseen level -> missing
    frame.loc[4, "channel"] = None  # null categorical
    frame.loc[5, "sentiment"] = None  # null numeric
    return frame[model.schema.input_columns].astype(object).where(frame.notna(), None).to_dict("records")


def post(client: TestClient, payload, path: str = "/invocations", **headers):
    return client.post(path, content=orjson.dumps(payload), headers={"Content-Type": "application/json", **headers})


def test_all_payload_formats_give_the_reference_predictions(client, model, rows):
    import pandas as pd

    expected = model.predict(pd.DataFrame(rows))  # the feature_matrix path training uses
    cols = list(rows[0])
    payloads = {
        "dataframe_split": {"columns": cols, "data": [[r[c] for c in cols] for r in rows]},
        "dataframe_records": rows,
        "instances": rows,
        "inputs": {c: [r[c] for r in rows] for c in cols},
    }
    for fmt, value in payloads.items():
        resp = post(client, {fmt: value})
        assert resp.status_code == 200, (fmt, resp.text)
        assert resp.headers["content-type"] == "application/json"
        assert resp.json() == {"predictions": expected}, fmt
    labels = {p["prediction"] for p in expected}
    assert labels <= set(model.schema.classes) and len(labels) > 1


def test_answers_equal_the_mlflow_pyfunc(client, model, rows):
    """Same JSON as `mlflow models serve` on the registered pyfunc, probabilities included."""
    import pandas as pd

    from serving.pyfunc import BoosterPredictor

    reference = BoosterPredictor(model.booster, model.schema)
    frame = pd.DataFrame(rows)
    for proba in (False, True):
        resp = post(client, {"dataframe_records": rows, "params": {"probabilities": proba}})
        expected = reference.predict(frame, probabilities=proba).to_dict("records")
        assert resp.json() == {"predictions": expected}
    assert len(resp.json()["predictions"][0]) == 1 + len(model.schema.classes)


def test_fast_path_matches_feature_matrix_on_odd_values(model):
    """Numeric strings and ints as categoricals take pandas' reading; the fast path must agree."""
    import pandas as pd

    row = sample_row(model.schema)
    odd = [row, {**row, "prior_tickets": "3"}, {**row, "plan": 1}, {**row, "account_age_days": float("nan")}]
    columns = {c: [r[c] for r in odd] for c in row}
    assert model.predict_columns(columns, len(odd)) == model.predict(pd.DataFrame(odd))


def test_prediction_of_a_single_row_in_inputs_scalar_form(client, model, rows):
    import pandas as pd

    resp = post(client, {"inputs": rows[0], "params": {"ignored": True}})
    assert resp.json() == {"predictions": model.predict(pd.DataFrame(rows[:1]))}
    assert post(client, {"dataframe_records": []}).json() == {"predictions": []}


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"dataframe_records": [{"channel": "chat"}]}, "missing input column(s): account_age_days"),
        ({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}, "data[0] has 2 values for 1 columns"),
        ({"dataframe_split": [[1, 2]]}, "'columns'"),
        ({"instances": [[1, 2, 3]]}, "instances must be an object of columns"),
        ({"inputs": {"sentiment": [1, 2], "plan": ["pro"]}}, "different lengths"),
        ({"columns": ["a"]}, "exactly one of dataframe_split"),
        ({"dataframe_records": [], "inputs": {}}, "exactly one of"),
        ([1, 2], "JSON object"),
        ({"dataframe_records": [1]}, "dataframe_records[0] must be an object"),
        ({"dataframe_records": [], "params": [1]}, "'params' must be an object"),
    ],
)
def test_wrong_payload_is_400_naming_the_problem(client, rows, payload, needle):
    resp = post(client, payload)
    assert resp.status_code == 400
    assert resp.json()["error_code"] == "BAD_REQUEST"
    assert needle in resp.json()["message"]


def test_missing_column_and_bad_value_are_named(client, rows):
    no_plan = [{k: v for k, v in r.items() if k != "plan"} for r in rows[:2]]
    assert post(client, {"dataframe_records": no_plan}).json()["message"] == "missing input column(s): plan"
    bad = [{**rows[0], "sentiment": "very happy"}]
    resp = post(client, {"dataframe_records": bad})
    assert resp.status_code == 400 and "column 'sentiment' must be numeric" in resp.json()["message"]


def test_malformed_json_and_wrong_content_type(client):
    resp = client.post("/invocations", content=b'{"inputs": [', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["message"].startswith("malformed JSON")
    resp = client.post("/invocations", content=b"a,b\n1,2", headers={"Content-Type": "text/csv"})
    assert resp.status_code == 415 and "application/json" in resp.json()["message"]


def test_bearer_token(model_dir, model, rows):
    client = make_client(model_dir, model, api_token=TOKEN)
    payload = {"dataframe_records": rows[:1]}
    assert post(client, payload).status_code == 401
    assert post(client, payload).headers["www-authenticate"] == "Bearer"
    assert post(client, payload, Authorization="Bearer wrong").status_code == 401
    assert post(client, payload, Authorization=f"Basic {TOKEN}").status_code == 401
    assert post(client, payload, Authorization=f"Bearer {TOKEN}").status_code == 200
    assert client.get("/version").status_code == 401
    assert client.get("/version", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert client.get("/health").status_code == 200  # health stays open for load balancers


def test_request_size_limit(model_dir, model, rows):
    client = make_client(model_dir, model, max_body_bytes=2048)
    small = post(client, {"dataframe_records": rows[:2]})
    assert small.status_code == 200
    big = post(client, {"dataframe_records": rows})
    assert big.status_code == 413 and big.json()["error_code"] == "REQUEST_TOO_LARGE"

    def chunks():  # no Content-Length: the limit must hold on the bytes actually read
        yield b'{"dataframe_records": ['
        for r in rows:
            yield orjson.dumps(r) + b","
        yield b"{}]}"

    streamed = client.post("/invocations", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    lying = client.post("/invocations", content=orjson.dumps({"dataframe_records": rows}),
                        headers={"Content-Type": "application/json", "Content-Length": "abc"})
    assert lying.status_code in (400, 413)


def test_health_and_version(client, model):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True, "search": False}
    version = client.get("/version").json()
    assert {k: version[k] for k in LINEAGE} == LINEAGE
    assert version["inputs"] == model.schema.input_columns and version["task"] == "multiclass"


class FakeSearcher:
    """The searcher protocol the app uses (embed_many, search_vectors, metadata_types), recording calls."""

    def __init__(self) -> None:
        import pyarrow as pa

        self.metadata_types = {"category": pa.string(), "amount": pa.float64(), "tags": pa.list_(pa.string())}
        self.calls: list[tuple] = []
        self.embedded: list[list[str]] = []

    def embed_many(self, queries: list[str]) -> np.ndarray:
        self.embedded.append(list(queries))
        return np.ones((len(queries), 4), dtype=np.float32)

    def search_vectors(self, vectors, k: int = 5, where: str | None = None) -> list[list[dict]]:
        self.calls.extend((k, where) for _ in vectors)
        return [[{"ticket_id": i, "category": "billing", "_distance": np.float32(0.5 * i)} for i in range(k)]
                for _ in vectors]


def test_search(model_dir, model, client):
    fake = FakeSearcher()
    with_index = make_client(model_dir, model, searcher=fake, api_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = post(with_index, {"query": "refund please", "k": 2, "filter": {"category": "billing"}}, "/search", **auth)
    assert resp.status_code == 200
    assert resp.json() == {"results": [{"ticket_id": 0, "category": "billing", "_distance": 0.0},
                                       {"ticket_id": 1, "category": "billing", "_distance": 0.5}]}
    assert fake.calls == [(2, "(category = 'billing')")] and fake.embedded == [["refund please"]]
    assert post(with_index, {"query": "x"}, "/search").status_code == 401
    assert post(with_index, {"query": ""}, "/search", **auth).status_code == 400
    assert post(with_index, {"query": "x", "k": 0}, "/search", **auth).status_code == 400
    assert with_index.get("/health").json()["search"] is True
    no_index = post(client, {"query": "refund"}, "/search")
    assert no_index.status_code == 503 and "no index" in no_index.json()["message"]


@pytest.mark.parametrize(
    ("where", "compiled"),
    [
        ({"category": {"in": ["billing", "it's"]}}, "(category IN ('billing', 'it''s'))"),
        ({"amount": {"gte": 1, "lt": 5}}, "(amount >= 1) AND (amount < 5)"),
        ({"category": None, "amount": {"ne": 2.5}}, "(category IS NULL) AND (amount != 2.5)"),
        ("category = 'billing' AND amount >= 2", "(category = 'billing') AND (amount >= 2)"),
        ({}, None),
    ],
)
def test_structured_filters_compile_to_bounded_lance_predicates(model_dir, model, where, compiled):
    fake = FakeSearcher()
    resp = post(make_client(model_dir, model, searcher=fake), {"query": "q", "k": 1, "filter": where}, "/search")
    assert resp.status_code == 200, resp.text
    assert fake.calls == [(1, compiled)]


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("id = " + "0+" * 999 + "0", "at most 1000 characters"),
        ("(" * 100_000, "at most 1000 characters"),
        ("category = 'a'; DROP TABLE tickets", "outside the supported subset"),
        ("category = 'a' OR 1 = 1", "outside the supported subset"),
        ({"secret_column": "x"}, "'secret_column' is not a filterable metadata column"),
        ({"tags": "x"}, "'tags' is not a filterable"),  # a list column: not filterable
        ({"category": 7}, "holds strings"),
        ({"amount": "7"}, "holds numbers"),
        ({"amount": {"between": [1, 2]}}, "unknown operator 'between'"),
        ({"category": {"in": ["x"] * 1000}}, "at most 64"),
        ({"category": {"in": ["x"] * 100_000}}, "at most 64"),
        ({"category": "x" * 500}, "longer than 200 characters"),
        (["category"], "'filter' must be an object"),
    ],
)
def test_filters_that_could_hurt_the_server_are_400_without_echo(model_dir, model, where, needle):
    fake = FakeSearcher()
    resp = post(make_client(model_dir, model, searcher=fake, max_body_bytes=4_000_000),
                {"query": "q", "filter": where}, "/search")
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    assert needle in message and len(message) < 300
    assert "amount" not in message or "amount" in str(where)  # the schema is never listed
    assert fake.calls == []


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"params": {"probabilities": "false"}}, "params.probabilities must be true or false"),
        ({"params": {"probabilities": 1}}, "params.probabilities must be true or false"),
        ({"row": {"sentiment": ""}}, "column 'sentiment' must be numeric: row 0 is a string"),
        ({"row": {"prior_tickets": "12"}}, "column 'prior_tickets' must be numeric: row 0 is a string"),
        ({"row": {"prior_tickets": True}}, "column 'prior_tickets' must be numeric: row 0 is a boolean"),
        ({"row": {"account_age_days": 1e308}}, "column 'account_age_days': row 0 is out of range"),
    ],
)
def test_parameters_and_numbers_are_strict(client, rows, change, needle, caplog):
    import warnings

    payload = {"dataframe_records": [{**rows[0], **change.get("row", {})}], **({"params": change["params"]}
                                                                           if "params" in change else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (overflow) per request
        resp = post(client, payload)
    assert resp.status_code == 400 and needle in resp.json()["message"], resp.text


def test_max_rows_is_413_naming_the_cap(model_dir, model, rows):
    capped = make_client(model_dir, model, limits={"max_rows": 20})
    assert post(capped, {"dataframe_records": rows[:20]}).status_code == 200
    for payload in ({"dataframe_records": rows[:21]}, {"inputs": {c: [rows[0][c]] * 21 for c in rows[0]}},
                    {"dataframe_split": {"columns": list(rows[0]), "data": [list(rows[0].values())] * 21}}):
        resp = post(capped, payload)
        assert resp.status_code == 413 and "at most max_rows=20" in resp.json()["message"], resp.text


def test_duplicate_headers_are_read_the_same_on_every_route(model_dir, model, rows):
    client = make_client(model_dir, model, searcher=FakeSearcher(), api_token=TOKEN)
    twice = [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong"),
             ("content-type", "application/json")]
    for path, body in (("/invocations", {"dataframe_records": rows[:1]}), ("/search", {"query": "q"})):
        resp = client.post(path, content=orjson.dumps(body), headers=twice)
        assert resp.status_code == 400 and resp.json()["message"] == "more than one Authorization header", path
    assert client.get("/version", headers=twice[:2]).status_code == 400


def test_a_configured_index_that_does_not_exist_stops_the_app(tmp_path, model_dir, model):
    from serving.config import IndexRef

    config = ServingConfig(model_dir=str(model_dir), index=IndexRef(uri=str(tmp_path / "lancedb"), table="nope"))
    with pytest.raises(LifecycleError, match="no index table 'nope'"):
        create_app(config, model=model)


def test_model_load_errors_name_the_file(tmp_path, model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SCHEMA_FILE).write_bytes((model_dir / SCHEMA_FILE).read_bytes())
    with pytest.raises(LifecycleError, match="booster.json: model file not found"):
        ServingModel.load(broken)
    (broken / BOOSTER_FILE).write_text('{"learner": "garbage"')
    with pytest.raises(LifecycleError, match="booster.json: not a valid XGBoost model"):
        ServingModel.load(broken)
    schema = FeatureSchema.model_validate_json((model_dir / SCHEMA_FILE).read_bytes())
    (broken / BOOSTER_FILE).write_bytes((model_dir / BOOSTER_FILE).read_bytes())
    (broken / SCHEMA_FILE).write_text(schema.model_copy(update={"numeric": schema.numeric[:-1]}).model_dump_json())
    with pytest.raises(LifecycleError, match="model has 6 features, feature_schema.json describes 5"):
        ServingModel.load(broken)


def test_config_round_trip_keeps_the_token_private(tmp_path, model_dir):
    config = ServingConfig(model_dir=str(model_dir), lineage=LINEAGE, api_token=TOKEN, port=9000)
    path = config.write(tmp_path / "config.json")
    assert path.stat().st_mode & 0o077 == 0
    again = ServingConfig.read(path)
    assert again.api_token.get_secret_value() == TOKEN and again == config
    assert TOKEN not in repr(again)
    (tmp_path / "bad.json").write_text('{"model_dir": "x", "port": 70000}')
    with pytest.raises(LifecycleError, match="bad.json: invalid serving config: port"):
        ServingConfig.read(tmp_path / "bad.json")
