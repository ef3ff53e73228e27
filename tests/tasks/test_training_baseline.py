"""The linear baseline: its inputs, its id-hash sample over `train.baseline_max_rows`, its scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lifecycle.spec import SplitConfig, parse_spec
from tasks import baseline


def _spec(**overrides):
    from lifecycle.sample import SAMPLE_SPEC

    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", **overrides})


@pytest.fixture
def tickets(tmp_path):
    from infra_blocks import ObjectStore
    from lifecycle.sample import generate_tickets
    from tasks.ingest import ingest_dataset

    def make(rows: int = 2000, **overrides):
        csv = tmp_path / f"tickets-{rows}.csv"
        generate_tickets(rows).to_csv(csv, index=False)
        spec = _spec(source=str(csv), **overrides)
        store = ObjectStore(url=f"file://{tmp_path / 'lake'}")
        return spec, store, ingest_dataset(store, spec)

    return make


def test_inputs_are_the_models_text_only_when_it_trains_on_text():
    assert baseline.describe(_spec()) == "logistic_regression on onehot(2) + scaled(4)"
    with_text = _spec(train={"use_text_embeddings": True})
    assert baseline.describe(with_text) == "logistic_regression on tfidf(text) + onehot(2) + scaled(4)"
    regression = _spec(task="regression", label_column="prior_tickets", expectations={},
                       numeric_features=["account_age_days", "sentiment"])
    assert baseline.describe(regression) == "ridge on onehot(2) + scaled(2)"


def test_sample_is_a_stable_id_hash_fraction_independent_of_the_split():
    spec = _spec(train={"baseline_max_rows": 1000})
    assert baseline.sample_fraction(spec, 1000) == 1.0
    assert baseline.sample_fraction(spec, 12_500) == pytest.approx(0.1)
    ids = pd.Series(np.arange(50_000))
    kept = baseline.sample_mask(ids, spec.split, 0.1)
    assert abs(kept.mean() - 0.1) < 0.01 and np.array_equal(kept, baseline.sample_mask(ids, spec.split, 0.1))
    from tasks.train_data import holdout_mask

    held = holdout_mask(ids, spec.split)
    assert abs(kept[held].mean() - 0.1) < 0.015  # the sample cuts both sides of the split alike
    assert not np.array_equal(kept, baseline.sample_mask(ids, SplitConfig(salt="other"), 0.1))


def test_text_drives_the_label_the_tfidf_baseline_reads_it(tickets):
    spec, store, dataset = tickets(train={"use_text_embeddings": True})
    classes = sorted(spec.expectations.allowed_labels or [])
    tabular = baseline.fit_baseline(_spec(source=spec.source), store, dataset, classes)
    text = baseline.fit_baseline(spec, store, dataset, classes)
    assert text.metrics["accuracy"] > 0.98 > tabular.metrics["accuracy"]  # the text carries the label
    assert text.rows == tabular.rows and text.rows["train"] + text.rows["holdout"] == 2000
    assert text.raw.shape == (text.rows["holdout"], 4)
    assert np.allclose(text.raw.sum(axis=1), 1.0)


def test_over_the_bound_it_fits_a_sample_and_says_so(tickets):
    spec, store, dataset = tickets(3000, train={"baseline_max_rows": 600})
    result = baseline.fit_baseline(spec, store, dataset, sorted(spec.expectations.allowed_labels or []))
    assert result.sampled and result.fraction == pytest.approx(0.25)
    assert 480 < result.rows["train"] < 720 and 100 < result.rows["holdout"] < 200
    assert "id-hash sample of 25.0% of the rows" in result.summary()
    assert result.tags()["lifecycle.baseline.sampled"] == "true"
    assert result.params()["baseline_sample_fraction"] == 0.25


def test_regression_baseline_is_ridge_scored_with_the_models_metrics(tickets):
    spec, store, dataset = tickets(1000, task="regression", label_column="prior_tickets", expectations={},
                                   numeric_features=["account_age_days", "response_minutes", "sentiment"])
    result = baseline.fit_baseline(spec, store, dataset, [])
    assert result.family == "ridge" and set(result.metrics) == {"rmse", "mae", "r2"}
    assert result.metrics["rmse"] < float(np.std(result.y_true))  # sentiment carries the label: beats the mean
