"""ServingTarget carries the client limits: set in a block document or a profile, saved and loaded intact."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from infra_blocks import ServingTarget
from infra_blocks.profiles import PROFILE_DIR, load_profile
from lifecycle.client_limits import ClientLimits
from lifecycle.errors import LifecycleError
from serving.config import ClientLimits as ServedLimits

CUSTOM = ClientLimits(max_header_bytes=8192, header_timeout_s=3.0, body_timeout_s=90.0, keep_alive_s=2.0,
                      max_connections=50, max_rows=500)


def test_limits_default_to_the_servers_and_are_one_model_with_serving_config():
    assert ServingTarget().limits == ClientLimits() and ServedLimits is ClientLimits
    partial = ServingTarget.model_validate({"kind": "docker", "limits": {"header_timeout_s": 3}})
    assert partial.limits == ClientLimits(header_timeout_s=3.0)  # unset limits keep their defaults
    with pytest.raises(ValidationError, match="max_header_byte"):
        ServingTarget.model_validate({"limits": {"max_header_byte": 8192}})  # a typo is refused, not ignored
    with pytest.raises(ValidationError, match="max_header_bytes"):
        ServingTarget(limits={"max_header_bytes": 100})  # below the 1 KB floor


def test_limits_round_trip_through_a_saved_block_document():
    ServingTarget(kind="docker", port=8181, limits=CUSTOM).save("limits-round-trip", overwrite=True)
    loaded = ServingTarget.load("limits-round-trip")
    assert isinstance(loaded.limits, ClientLimits) and loaded.limits == CUSTOM
    assert loaded.kind == "docker" and loaded.port == 8181 and loaded.max_body_bytes == 1_048_576


def test_a_profile_sets_limits_without_code(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path))
    monkeypatch.setenv("HEAD_S", "4")
    local = yaml.safe_load((PROFILE_DIR / "local.yaml").read_text())
    profile = tmp_path / "edge.yaml"
    local["serving"]["limits"] = {"header_timeout_s": "${HEAD_S}", "max_connections": 200}
    profile.write_text(yaml.safe_dump(local))
    assert load_profile(str(profile)).serving.limits == ClientLimits(header_timeout_s=4.0, max_connections=200)
    local["serving"]["limits"] = {"keep_alive_s": 0}
    profile.write_text(yaml.safe_dump(local))
    with pytest.raises(LifecycleError, match=r"edge.yaml: ServingTarget limits.keep_alive_s: Input should be greater"):
        load_profile(str(profile))
