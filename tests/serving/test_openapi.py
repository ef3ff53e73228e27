"""The served OpenAPI document, and schemathesis against it on a real server: no 5xx, no schema violations.

Bounded: a fixed number of generated cases per operation (positive data from the document), no example
database, so the test takes seconds and is the same on every machine.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from infra_blocks import VectorStore
from serving.config import IndexRef
from tests.flows.test_deploy import small_index
from tests.serving.servers import running
from tests.serving.test_app import write_model_dir

TOKEN = "openapi-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi")
    vectors = VectorStore(uri=str(root / "lancedb"))
    record = small_index(vectors)
    index = IndexRef(uri=vectors.uri, table=record.table, version=record.table_version)
    with running(write_model_dir(root / "model"), timeout_s=120, index=index, api_token=TOKEN) as served:
        yield served


def test_the_document_is_served_behind_the_token(server):
    url, _, _ = server
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    doc = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
    assert doc["openapi"].startswith("3.1") and set(doc["paths"]) >= {"/invocations", "/search", "/health"}
    search = doc["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(search["properties"]["filter"]["properties"]) == {"category"}  # the index's metadata columns


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server):
    url, _, log = server
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json", headers=AUTH).json())
    checks = [schemathesis.checks.not_a_server_error, response_schema_conformance, status_code_conformance,
              content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=url, headers=AUTH, checks=checks)
            statuses.setdefault(case.operation.path, set()).add(response.status_code)

        run()
    assert len(statuses) == len(operations)
    assert 200 in statuses["/invocations"] and 200 in statuses["/search"], statuses  # real answers, not only 4xx
    assert "Traceback" not in log.read_text()
