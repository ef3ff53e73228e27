"""The dataset spec: validation errors are one line naming the field; hashes track the right sections."""

from __future__ import annotations

import pytest
import yaml

from lifecycle.errors import LifecycleError
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import Task, load_spec, parse_spec


def test_sample_spec_parses_and_resolves_relative_source(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SAMPLE_SPEC, "source": "data/t.csv"}))
    spec = load_spec(path)
    assert spec.source == str(tmp_path / "data" / "t.csv")
    assert spec.task is Task.multiclass
    assert spec.required_columns[:2] == ["ticket_id", "category"]
    assert spec.train.primary_metric(spec.task) == "accuracy"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "ranking"}, "task"),
        ({"numeric_features": ["a", "a"]}, "numeric_features"),
        ({"categorical_features": ["ticket_id"]}, "more than one role: ticket_id"),
        ({"numeric_features": [], "categorical_features": []}, "no features"),
        ({"colour": "blue"}, "colour"),
        ({"name": "Bad Name"}, "name"),
    ],
)
def test_invalid_specs_name_the_field(change, message):
    with pytest.raises(LifecycleError) as err:
        parse_spec({**SAMPLE_SPEC, "source": "x.csv", **change}, origin="my.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("my.yaml: invalid spec")
    assert "\n" not in str(err.value)


def test_missing_and_broken_spec_files(tmp_path):
    with pytest.raises(LifecycleError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(LifecycleError, match="not valid YAML"):
        load_spec(bad)


def test_section_hash_changes_only_with_its_section():
    spec = parse_spec({**SAMPLE_SPEC, "source": "x.csv"})
    other = spec.model_copy(update={"train": spec.train.model_copy(update={"max_depth": 3})})
    assert spec.section_hash("train") != other.section_hash("train")
    assert spec.section_hash("embed") == other.section_hash("embed")
