"""Specs kept in the store: the registered spec of a dataset and the exact spec of each version."""

from __future__ import annotations

import pytest

from lifecycle.errors import LifecycleError
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec
from tasks.specs import register_spec, registered_spec, save_spec_version, spec_for, version_key


def test_registered_spec_with_the_landed_source(lake):
    register_spec(lake, parse_spec({**SAMPLE_SPEC, "source": lake.uri("landing/tickets")}))
    spec = registered_spec(lake, "tickets", source="s3://b/landing/tickets/a.csv")
    assert spec.source == "s3://b/landing/tickets/a.csv" and spec.label_column == "category"


def test_unknown_dataset_fails_in_one_line(lake):
    with pytest.raises(LifecycleError, match=r"dataset 'nope': no spec registered at .*specs/nope/current.json"):
        registered_spec(lake, "nope")


def test_a_version_keeps_the_spec_it_was_ingested_with(lake, dataset_version, sample_spec):
    save_spec_version(lake, sample_spec)
    register_spec(lake, parse_spec({**SAMPLE_SPEC, "source": "elsewhere", "train": {"num_boost_round": 7}}))
    assert lake.exists(version_key("tickets", dataset_version.spec_hash))
    assert spec_for(lake, dataset_version) == sample_spec  # not the registered one, changed since


def test_spec_for_falls_back_to_the_registered_spec(lake, dataset_version):
    with pytest.raises(LifecycleError, match="no spec registered"):
        spec_for(lake, dataset_version)
    register_spec(lake, parse_spec({**SAMPLE_SPEC, "source": "x"}))
    assert spec_for(lake, dataset_version).source == dataset_version.source
