"""ObjectStore on a file lake and on a real S3 endpoint (moto server): the same calls, the same results,
keys that cannot escape the root, and an unreachable endpoint reported as one transient line."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra_blocks import ObjectStore
from infra_blocks.object_store import is_unreachable
from lifecycle.errors import LifecycleError, StoreUnavailableError
from tasks.policies import retry_unless_user_error
from tests.fixtures.s3 import BUCKET, S3_KEY, S3_SECRET


@pytest.fixture(params=["file", "s3"])
def store(request, lake):
    return lake if request.param == "file" else request.getfixturevalue("s3_lake")


def _bucket_keys(endpoint: str, bucket: str = BUCKET) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_round_trip_list_move_delete(store):
    store.write_bytes("a/one.txt", b"1")
    store.write_bytes("a/b/two.txt", b"22")
    assert store.read_bytes("a/b/two.txt") == b"22"
    assert store.exists("a/one.txt") and not store.exists("a/none.txt")
    assert store.list_keys("a") == ["a/b/two.txt", "a/one.txt"]
    assert store.list_keys("nothing/here") == []

    store.move(["a/one.txt", "a/b/two.txt"], ["moved/one.txt", "moved/deep/two.txt"])
    assert store.list_keys("a") == []
    assert store.list_keys("moved") == ["moved/deep/two.txt", "moved/one.txt"]
    assert store.read_bytes("moved/deep/two.txt") == b"22"

    store.delete("moved")
    assert store.list_keys("moved") == []
    with pytest.raises(LifecycleError, match=r"moved/one\.txt: not found in the object store"):
        store.read_bytes("moved/one.txt")


def test_objects_written_by_pyarrow_are_seen_at_once(store):
    """No stale listing: Parquet parts written through pyarrow (or by Dask workers) are visible to the
    fsspec side immediately, even after that prefix was listed."""
    assert store.list_keys("parts") == [] and not store.exists("parts/p.parquet")
    store.filesystem().makedirs(store.path("parts"), exist_ok=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), store.path("parts/p.parquet"), filesystem=store.pyarrow_filesystem())
    assert store.exists("parts/p.parquet")
    assert store.list_keys("parts") == ["parts/p.parquet"]


@pytest.mark.parametrize("key", ["../escape.txt", "datasets/../../escape.txt", "a/./../../escape.txt"])
def test_keys_with_dotdot_are_refused_and_nothing_is_written(store, tmp_path, key):
    calls = [
        lambda: store.write_bytes(key, b"x"),
        lambda: store.read_bytes(key),
        lambda: store.exists(key),
        lambda: store.list_keys(key),
        lambda: store.delete(key),
        lambda: store.move(["ok.txt"], [key]),
        lambda: store.uri(key),
    ]
    for call in calls:
        with pytest.raises(LifecycleError) as err:
            call()
        assert str(err.value) == f"{key}: object keys may not contain '..'"
    assert not list(tmp_path.rglob("escape.txt"))
    if store.protocol == "s3":
        assert not [k for k in _bucket_keys(store.endpoint_url) if k.endswith("escape.txt")]


def test_aws_credentials_block_is_used(s3_lake):
    from prefect_aws import AwsCredentials

    creds = AwsCredentials(aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
    store = s3_lake.model_copy(update={"access_key_id": None, "secret_access_key": None, "aws_credentials": creds})
    options = store.storage_options()
    assert (options["key"], options["secret"]) == (S3_KEY, S3_SECRET)
    store.write_bytes("creds/x.txt", b"via AwsCredentials")
    assert s3_lake.read_bytes("creds/x.txt") == b"via AwsCredentials"


def test_client_retry_and_timeout_settings_reach_both_clients(s3_lake):
    store = s3_lake.model_copy(update={"max_attempts": 2, "connect_timeout": 1.5})
    config = store.storage_options()["config_kwargs"]
    assert config == {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1.5}
    assert store.filesystem().retries == 2
    assert "config_kwargs" not in s3_lake.storage_options()  # unset: the clients' own defaults
    assert store.pyarrow_filesystem() is not None


def test_unreachable_endpoint_is_a_one_line_transient_error(stoppable_s3):
    stoppable_s3.create_bucket("unreachable-test")
    store = ObjectStore(url="s3://unreachable-test/lake", endpoint_url=stoppable_s3.endpoint, region="us-east-1",
                        access_key_id=S3_KEY, secret_access_key=S3_SECRET, max_attempts=1, connect_timeout=1)
    store.write_bytes("k.txt", b"before")
    stoppable_s3.stop()

    began = time.perf_counter()
    for call in (lambda: store.write_bytes("k.txt", b"x"), lambda: store.read_bytes("k.txt"),
                 lambda: store.list_keys(""), lambda: store.exists("k.txt")):
        with pytest.raises(StoreUnavailableError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        assert f"cannot reach the object store at {stoppable_s3.endpoint}" in message
        assert message.startswith("s3://unreachable-test/lake")
    assert time.perf_counter() - began < 30, "short client retries keep the failure fast"

    with pytest.raises(OSError) as raw:  # pyarrow's client says it in its own words; we still recognise it
        pq.write_table(pa.table({"x": [1]}), store.path("p.parquet"), filesystem=store.pyarrow_filesystem())
    assert is_unreachable(raw.value)

    stoppable_s3.start()  # same port, same (in-process) data: the endpoint is back
    assert store.read_bytes("k.txt") == b"before"


def test_only_connection_failures_count_as_unreachable():
    assert is_unreachable(ConnectionRefusedError(111, "Connection refused"))
    assert is_unreachable(OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7"))
    assert is_unreachable(StoreUnavailableError("s3://b: cannot reach the object store"))
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = TimeoutError("timed out")
    assert is_unreachable(wrapped)
    assert not is_unreachable(FileNotFoundError("s3://b/k"))
    assert not is_unreachable(PermissionError("Access Denied"))
    assert not is_unreachable(LifecycleError("bad.csv: empty file"))
    assert not is_unreachable(OSError("AWS Error ACCESS_DENIED during PutObject operation"))


def test_retry_policy_retries_an_unreachable_store_not_bad_input():
    from prefect.states import Failed

    def state_of(exc: BaseException):
        return Failed(data=exc)

    assert retry_unless_user_error(None, None, state_of(StoreUnavailableError("s3://b: cannot reach"))) is True
    assert retry_unless_user_error(None, None, state_of(LifecycleError("bad.csv: empty file"))) is False
    assert retry_unless_user_error(None, None, state_of(ConnectionResetError())) is True
