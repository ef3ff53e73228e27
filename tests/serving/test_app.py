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
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def search(self, query: str, k: int = 5, where: str | None = None) -> list[dict]:
        if where == "bad":
            raise ValueError("unknown column 'bad'")
        self.calls.append((query, k, where))
        return [{"ticket_id": i, "category": "billing", "_distance": np.float32(0.5 * i)} for i in range(k)]


def test_search(model_dir, model, client):
    fake = FakeSearcher()
    with_index = make_client(model_dir, model, searcher=fake, api_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = post(with_index, {"query": "refund please", "k": 2, "filter": "plan = 'pro'"}, "/search", **auth)
    assert resp.status_code == 200
    assert resp.json() == {"results": [{"ticket_id": 0, "category": "billing", "_distance": 0.0},
                                       {"ticket_id": 1, "category": "billing", "_distance": 0.5}]}
    assert fake.calls == [("refund please", 2, "plan = 'pro'")]
    assert post(with_index, {"query": "x"}, "/search").status_code == 401
    assert post(with_index, {"query": ""}, "/search", **auth).status_code == 400
    assert post(with_index, {"query": "x", "k": 0}, "/search", **auth).status_code == 400
    bad = post(with_index, {"query": "x", "filter": "bad"}, "/search", **auth)
    assert bad.status_code == 400 and "unknown column 'bad'" in bad.json()["message"]
    assert with_index.get("/health").json()["search"] is True
    no_index = post(client, {"query": "refund"}, "/search")
    assert no_index.status_code == 503 and "no index" in no_index.json()["message"]


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
