"""Profiles build the five blocks; environment variables fill in paths and secrets."""

from __future__ import annotations

import pytest

from infra_blocks.profiles import apply_profile, load_profile, load_targets
from lifecycle.errors import LifecycleError


def test_local_profile_is_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path))
    targets = load_profile("local")
    assert targets.store.url == f"file://{tmp_path}/lake"
    assert targets.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert targets.compute.mode == "local"
    assert targets.serving.kind == "process" and targets.serving.host == "127.0.0.1"


def test_prod_profile_takes_secrets_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", "tok")
    targets = load_profile("prod")
    assert targets.store.protocol == "s3"
    assert targets.store.secret_access_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in targets.store.model_dump_json()
    assert targets.compute.mode == "cuda" and targets.compute.protocol == "ucx"
    assert targets.serving.kind == "docker"


def test_prod_profile_without_secrets_names_the_variable(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(LifecycleError, match="AWS_ACCESS_KEY_ID is not set"):
        load_profile("prod")


def test_unknown_profile():
    with pytest.raises(LifecycleError, match="no such profile"):
        load_profile("staging")


def test_apply_then_load_round_trips_through_the_api(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path))
    names = apply_profile("local")
    assert names["store"] == "local-store"
    loaded = load_targets("local")
    assert loaded.store.url == f"file://{tmp_path}/lake"
    assert loaded.serving.port == load_profile("local").serving.port
