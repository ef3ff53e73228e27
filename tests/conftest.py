"""Shared fixtures: an isolated Prefect API, a file lake in tmp, the sample dataset and its spec."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixture modules for real servers, one module per system.
pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.dask_mlflow", "tests.fixtures.prefect_server",
                  "tests.fixtures.docker", "tests.fixtures.haproxy"]

# Tests never reach a model hub: the encoder is the package-bundled MiniLM.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """One temporary Prefect server for the whole session (ephemeral mode costs ~4 s per start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def lake(tmp_path: Path):
    """An ObjectStore block on a fresh local file lake."""
    from infra_blocks import ObjectStore

    return ObjectStore(url=f"file://{tmp_path / 'lake'}")


@pytest.fixture
def sample_files(tmp_path: Path) -> tuple[Path, Path]:
    """The bundled sample (600 rows) as CSV + spec YAML in tmp; returns (csv, spec)."""
    from lifecycle.sample import write_sample

    return write_sample(tmp_path / "raw", rows=600)


@pytest.fixture
def sample_spec(sample_files):
    from lifecycle.spec import load_spec

    return load_spec(sample_files[1])


@pytest.fixture
def dataset_version(lake, sample_spec):
    """The sample ingested into the lake: a DatasetVersion record (pure function, no flow)."""
    from tasks.ingest import ingest_dataset

    return ingest_dataset(lake, sample_spec)


@pytest.fixture(scope="session")
def local_compute():
    """A real 2-process local Dask cluster, shared by the session's tests."""
    from infra_blocks import DaskCompute
    from infra_blocks.dask_compute import close_local_clusters

    yield DaskCompute(mode="local", n_workers=2, threads_per_worker=1)
    close_local_clusters()
