"""End to end: the whole lifecycle through the CLI on real parts, then bad input through the same door.

Marked slow: it runs every stage (Dask cluster, MiniLM, LanceDB, MLflow, a serving process).
"""

from __future__ import annotations

import json
import socket

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LIFECYCLE_SERVING_PORT", str(_free_port()))
    yield tmp_path / "home"
    CliRunner().invoke(app, ["down"])


def _churn_files(tmp_path, rows: int = 400, one_class: bool = False):
    """A user's dataset with another schema: binary churn with a free-text note."""
    rng = np.random.default_rng(3)
    tenure = rng.integers(1, 72, rows)
    charges = rng.normal(70, 20, rows).round(2)
    contract = rng.choice(["monthly", "yearly", "two-year"], rows)
    churned = np.where((tenure < 12) & (contract == "monthly") | (charges > 95), "yes", "no")
    if one_class:
        churned[:] = "no"
    notes = np.where(churned == "yes", "customer unhappy wants to cancel", "customer satisfied renewing plan")
    frame = pd.DataFrame({"customer": [f"c{i:05d}" for i in range(rows)], "tenure_months": tenure,
                          "monthly_charges": charges, "contract": contract, "note": notes, "churned": churned})
    csv = tmp_path / "churn.csv"
    frame.to_csv(csv, index=False)
    spec = {"name": "churn", "source": str(csv), "id_column": "customer", "label_column": "churned",
            "task": "binary", "numeric_features": ["tenure_months", "monthly_charges"],
            "categorical_features": ["contract"], "text_column": "note",
            "train": {"num_boost_round": 30}}
    path = tmp_path / "churn.yaml"
    path.write_text(yaml.safe_dump(spec))
    return frame, path


def _table_versions(home, name):
    """The commits of the dataset's Delta table (one JSON file per version in its log)."""
    log = home / "lake" / "datasets" / name / "_delta_log"
    return sorted(log.glob("*.json")) if log.exists() else []


def test_run_on_a_users_csv_then_rerun_is_cached(home, tmp_path):
    frame, spec = _churn_files(tmp_path)
    runner = CliRunner()
    first = runner.invoke(app, ["run", "--spec", str(spec)])
    assert first.exit_code == 0, first.output
    for stage in ("ingest", "validate", "embed", "index", "train", "register", "deploy"):
        assert stage in first.output
    assert "cached" not in first.output

    current = json.loads((home / "serving" / "current.json").read_text())
    endpoint = f"http://127.0.0.1:{current['port']}"
    rows = frame.drop(columns=["churned"]).head(3)
    payload = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    answer = httpx.post(f"{endpoint}/invocations", json=payload)
    assert answer.status_code == 200, answer.text
    assert all(p["prediction"] in ("yes", "no") for p in answer.json()["predictions"])
    hits = httpx.post(f"{endpoint}/search", json={"query": "wants to cancel", "k": 3}).json()["results"]
    assert len(hits) == 3 and all("cancel" in h["text"] for h in hits)
    assert httpx.get(f"{endpoint}/version").json()["dataset_version"]

    second = runner.invoke(app, ["run", "--spec", str(spec)])
    assert second.exit_code == 0, second.output
    assert second.output.count("cached") >= 6
    assert len(_table_versions(home, "churn")) == 1


@pytest.mark.parametrize("problem", ["missing_column", "unreadable", "empty", "one_class"])
def test_bad_input_one_line_error_no_new_versions(home, tmp_path, problem):
    frame, spec_path = _churn_files(tmp_path, one_class=problem == "one_class")
    spec = yaml.safe_load(spec_path.read_text())
    if problem == "missing_column":
        spec["numeric_features"].append("lifetime_value")
    elif problem == "unreadable":
        spec["source"] = str(tmp_path / "does-not-exist.csv")
    elif problem == "empty":
        (tmp_path / "empty.csv").write_text("")
        spec["source"] = str(tmp_path / "empty.csv")
    spec_path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["run", "--spec", str(spec_path)])
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    expected = {"missing_column": "lifetime_value", "unreadable": "does-not-exist.csv", "empty": "empty",
                "one_class": "one class"}[problem]
    assert expected in error_lines[0]
    assert _table_versions(home, "churn") == []
    assert not (home / "lake" / "records" / "model_version").exists()
