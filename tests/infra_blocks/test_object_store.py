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


# --- AwsCredentials: clients built from the block's own session and client parameters -----------------

def _round_trip(store: ObjectStore, key: str) -> None:
    """Write and read back through both clients (s3fs and pyarrow) on the real endpoint."""
    store.write_bytes(f"{key}/x.txt", b"through the credentials block")
    assert store.read_bytes(f"{key}/x.txt") == b"through the credentials block"
    pafs = store.pyarrow_filesystem()
    pq.write_table(pa.table({"x": [1, 2]}), store.path(f"{key}/p.parquet"), filesystem=pafs)
    assert pq.read_table(store.path(f"{key}/p.parquet"), filesystem=pafs).column("x").to_pylist() == [1, 2]


def _pyarrow_settings(store: ObjectStore) -> dict:
    return store.pyarrow_filesystem().__reduce__()[1][0]


def test_session_token_and_region_reach_every_client(s3_lake):
    from prefect_aws import AwsCredentials

    creds = AwsCredentials(aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                           aws_session_token="session-token-1", region_name="eu-west-1")
    store = s3_lake.model_copy(update={"access_key_id": None, "secret_access_key": None, "region": None,
                                       "aws_credentials": creds})
    _round_trip(store, "token")
    client = store.filesystem().s3  # the s3fs client that just served the round trip
    assert client._request_signer._credentials.token == "session-token-1"
    assert client.meta.region_name == "eu-west-1"
    arrow = _pyarrow_settings(store)
    assert (arrow["access_key"], arrow["session_token"], arrow["region"]) == (S3_KEY, "session-token-1", "eu-west-1")
    assert store.object_store_options() == {
        "aws_access_key_id": S3_KEY, "aws_secret_access_key": S3_SECRET, "aws_session_token": "session-token-1",
        "aws_region": "eu-west-1", "aws_endpoint": s3_lake.endpoint_url, "allow_http": "true"}
    own_region = s3_lake.model_copy(update={"region": "us-east-1", "aws_credentials": creds})
    assert own_region.s3_access().region == "us-east-1"  # the store's own region wins


def test_a_profile_from_the_aws_config_files_is_honoured(s3_lake, tmp_path, monkeypatch):
    from prefect_aws import AwsCredentials

    (tmp_path / "config").write_text("[profile lifecycle-profile-test]\nregion = eu-central-1\n")
    (tmp_path / "credentials").write_text("[lifecycle-profile-test]\naws_access_key_id = profile-key\n"
                                          "aws_secret_access_key = profile-secret\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    creds = AwsCredentials(profile_name="lifecycle-profile-test")
    store = s3_lake.model_copy(update={"access_key_id": None, "secret_access_key": None, "region": None,
                                       "aws_credentials": creds})
    options = store.storage_options()
    assert (options["key"], options["secret"]) == ("profile-key", "profile-secret")
    assert options["client_kwargs"]["region_name"] == "eu-central-1"
    _round_trip(store, "profile")
    arrow = _pyarrow_settings(store)
    assert (arrow["access_key"], arrow["region"]) == ("profile-key", "eu-central-1")


def test_client_parameters_endpoint_and_tls_settings_are_used(s3_lake):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    creds = AwsCredentials(aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                           aws_client_parameters=AwsClientParameters(endpoint_url=s3_lake.endpoint_url))
    store = ObjectStore(url=s3_lake.url, aws_credentials=creds)  # no endpoint of its own
    assert store.storage_options()["client_kwargs"]["endpoint_url"] == s3_lake.endpoint_url
    _round_trip(store, "client-params")
    assert s3_lake.read_bytes("client-params/x.txt") == b"through the credentials block"
    assert _pyarrow_settings(store)["endpoint_override"] == s3_lake.endpoint_url.split("://", 1)[1]

    plain = AwsCredentials(aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                           aws_client_parameters=AwsClientParameters(use_ssl=False, verify=False,
                                                                     config={"max_pool_connections": 4}))
    insecure = ObjectStore(url="s3://bucket/p", aws_credentials=plain)
    options = insecure.storage_options()
    assert options["use_ssl"] is False and options["client_kwargs"]["verify"] is False
    assert options["config_kwargs"] == {"max_pool_connections": 4}
    assert _pyarrow_settings(insecure)["scheme"] == "http"
    assert insecure.object_store_options()["allow_http"] == "true"
    assert insecure.object_store_options()["allow_invalid_certificates"] == "true"


def test_object_store_options_open_a_lancedb_table_on_the_store(s3_lake):
    """The options Rust clients take (LanceDB here; delta-rs reads the same keys) work on the real endpoint."""
    import lancedb
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    creds = AwsCredentials(aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, aws_session_token="t-2",
                           region_name="us-east-1",
                           aws_client_parameters=AwsClientParameters(endpoint_url=s3_lake.endpoint_url))
    store = ObjectStore(url=s3_lake.url, aws_credentials=creds)
    db = lancedb.connect(store.uri("lancedb"), storage_options=store.object_store_options())
    db.create_table("rows", pa.table({"x": [1, 2, 3]}))
    assert db.open_table("rows").to_arrow().column("x").to_pylist() == [1, 2, 3]
    assert any(k.startswith("lancedb/rows.lance/") for k in s3_lake.list_keys("lancedb"))


def test_delta_storage_options_carry_every_credential_the_endpoint_and_commit_safety(s3_lake):
    from prefect_aws import AwsCredentials

    assert s3_lake.delta_storage_options() == {
        "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_lake.endpoint_url, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
    creds = AwsCredentials(aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, aws_session_token="tok-3",
                           region_name="eu-west-1")
    via_block = s3_lake.model_copy(update={"access_key_id": None, "secret_access_key": None, "region": None,
                                           "aws_credentials": creds, "endpoint_url": "https://s3.example.com"})
    options = via_block.delta_storage_options()
    assert (options["AWS_SESSION_TOKEN"], options["AWS_REGION"]) == ("tok-3", "eu-west-1")
    assert "AWS_ALLOW_HTTP" not in options  # https endpoint
    locked = s3_lake.model_copy(update={"delta_commit_safety": "dynamodb", "delta_lock_table": "delta-locks"})
    assert {k: v for k, v in locked.delta_storage_options().items() if "DYNAMO" in k or "LOCK" in k} == {
        "AWS_S3_LOCKING_PROVIDER": "dynamodb", "DELTA_DYNAMO_TABLE_NAME": "delta-locks"}
    assert "conditional_put" not in locked.delta_storage_options()
    assert ObjectStore(url="file:///tmp/lake").delta_storage_options() == {}


def test_delta_storage_options_open_a_delta_table_on_the_store(s3_lake):
    """delta-rs writes, commits and time-travels on the real endpoint (moto in its own process)."""
    from deltalake import DeltaTable, write_deltalake

    uri, options = s3_lake.uri("delta/t"), s3_lake.delta_storage_options()
    write_deltalake(uri, pa.table({"x": [1, 2]}), storage_options=options)
    write_deltalake(uri, pa.table({"x": [3]}), mode="append", storage_options=options)
    table = DeltaTable(uri, storage_options=options)
    assert table.version() == 1 and len(table.history()) == 2
    assert sorted(DeltaTable(uri, version=0, storage_options=options).to_pyarrow_dataset().to_table()
                  .column("x").to_pylist()) == [1, 2]
    assert any(k.startswith("delta/t/_delta_log/") for k in s3_lake.list_keys("delta"))
