"""`lifecycle up --profile prod` on PostgreSQL runs one lifecycle; `lifecycle down` stops what `up` started.

Production's shape on one machine: Prefect server and MLflow server on this machine's PostgreSQL (fresh
databases), the lake, the LanceDB tables and MLflow's artifacts on the S3 endpoint, secrets from the
environment, a token on the endpoint. Dask runs locally (no GPU here) and serving is a process (no
Docker daemon in CI): both through the prod profile's environment variables.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import httpx
import pytest
from typer.testing import CliRunner

from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from tests.fixtures.prefect_server import PG_DSN, runs_report
from tests.fixtures.s3 import BUCKET, S3_KEY, S3_SECRET, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]


async def _query(database: str, sql: str) -> list:
    import asyncpg

    conn = await asyncpg.connect(f"{PG_DSN}/{database}", timeout=5)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


def query(database: str, sql: str) -> list:
    return asyncio.run(_query(database, sql))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_on_postgresql_runs_one_lifecycle_with_the_prod_profile_and_down_stops_it(
        tmp_path, monkeypatch, s3_endpoint, postgres_database):
    pytest.importorskip("psycopg", reason="MLflow's PostgreSQL driver (psycopg[binary] in pyproject)")
    from prefect.deployments import run_deployment

    from cli.app import app
    from cli.server import api_context, read_state
    from infra_blocks.profiles import load_targets
    from lifecycle.records import Deployment
    from tasks.processes import is_running
    from tasks.records import latest_record

    prefect_db, mlflow_db = postgres_database("prefect"), postgres_database("mlflow")
    prefix, home = uuid.uuid4().hex[:8], tmp_path / "home"
    prefect_port, mlflow_port, serving_port = free_port(), free_port(), free_port()
    for key, value in {
        "LIFECYCLE_HOME": str(home), "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_REGION": "us-east-1", "LIFECYCLE_LAKE_URL": f"s3://{BUCKET}/{prefix}/lake",
        "LIFECYCLE_S3_ENDPOINT": s3_endpoint, "LIFECYCLE_S3_ALLOW_HTTP": "true",
        "LIFECYCLE_LANCEDB_URI": f"s3://{BUCKET}/{prefix}/lancedb", "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "LIFECYCLE_MLFLOW_ARTIFACTS": "mlflow-artifacts:/lifecycle",
        "LIFECYCLE_DASK_MODE": "local", "LIFECYCLE_DASK_PROTOCOL": "tcp", "LIFECYCLE_SERVING_KIND": "process",
        "LIFECYCLE_SERVING_PORT": str(serving_port), "LIFECYCLE_API_TOKEN": "prod-secret",
    }.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    up = runner.invoke(app, [
        "up", "--profile", "prod", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port),
        "--prefect-db", f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}",
        "--mlflow-db", f"{PG_DSN}/{mlflow_db}", "--mlflow-artifacts", f"s3://{BUCKET}/{prefix}/mlartifacts",
    ])
    state = read_state(home)
    try:
        assert up.exit_code == 0, up.output
        with api_context(state.prefect_url):
            store = load_targets("prod").store
            store.write_bytes("raw/tickets.csv", generate_tickets(300, seed=21).to_csv(index=False).encode())
            spec = {**SAMPLE_SPEC, "source": store.uri("raw/tickets.csv"), "train": {"num_boost_round": 20}}
            run = run_deployment("lifecycle/nightly", parameters={"spec": spec}, timeout=420, poll_interval=2)
            assert run.state_type.value == "COMPLETED", f"{run.state.message}\n{runs_report()}"
            assert "profile" not in run.parameters  # none given: the server's default profile (prod) was used
            served = latest_record(store, Deployment, "tickets")

        assert ("lifecycle",) in query(prefect_db, "SELECT f.name FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                                                   "WHERE r.state_type = 'COMPLETED'")
        [(profile,)] = query(prefect_db, "SELECT value FROM variable WHERE name = 'lifecycle_profile'")
        assert json.loads(profile) == "prod"
        assert query(mlflow_db, "SELECT name, version FROM model_versions") == [("tickets", 1)]
        assert query(mlflow_db, "SELECT alias FROM registered_model_aliases ORDER BY alias") == [("challenger",),
                                                                                                 ("champion",)]
        assert served.status == "serving" and served.endpoint == f"http://127.0.0.1:{serving_port}"
        assert httpx.get(f"{served.endpoint}/version", timeout=10).status_code == 401
        auth = {"Authorization": "Bearer prod-secret"}
        assert httpx.get(f"{served.endpoint}/version", headers=auth, timeout=10).json()["model_version"] == "1"
    finally:
        down = runner.invoke(app, ["down", "--profile", "prod"])
    assert down.exit_code == 0, down.output
    for name in ("prefect-worker", "mlflow-server", "prefect-server"):
        assert f"stopped {name}" in down.output
    assert not any(is_running(p) for p in state.processes)
    assert not any(port_open(p) for p in (prefect_port, mlflow_port, serving_port))
    assert not (home / "up.json").exists()
