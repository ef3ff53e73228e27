"""ObjectStore: where datasets, embeddings, records and Data Docs live.

One block for a local file lake (`file:///…`), S3, MinIO or Ceph RGW (`s3://bucket/prefix` with an
`endpoint_url`). All I/O goes through fsspec (and pyarrow's filesystem for Parquet), so stages never
branch on the kind of store: pointing the block at another URL is the only change production needs.

Credentials stay in the credentials block: with a prefect-aws `AwsCredentials`, every client (s3fs,
pyarrow, delta-rs/LanceDB options) is built from what its boto3 session resolved (keys, session
token, profile, assumed role, region) and from its client parameters (endpoint, TLS), so a profile or
temporary credentials work exactly as they do for the block's own boto3 clients.
"""

from __future__ import annotations

import functools
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import fsspec
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr

from lifecycle.errors import LifecycleError, StoreUnavailableError

# pyarrow's and delta-rs's S3 clients report an unreachable endpoint as a plain OSError; these mean "retry".
_PYARROW_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|REQUEST_TIMEOUT|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|INTERNAL_FAILURE)"
    r"|curlCode: (6|7|28|52|55|56)\b|client error \(Connect\)|error sending request"  # the last two: delta-rs
)


@functools.lru_cache(maxsize=1)
def _transient_types() -> tuple[type[BaseException], ...]:
    """Client exception classes that mean the endpoint did not answer (imported lazily: optional extras)."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("botocore.exceptions", ("ConnectionError", "HTTPClientError")),
                          ("aiohttp", ("ClientConnectionError", "ServerTimeoutError")),
                          ("fsspec.exceptions", ("FSTimeoutError",))):
        try:
            found += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def is_unreachable(exc: BaseException) -> bool:
    """True when an exception (or what caused it) means the store could not be reached.

    Refused, reset and timed-out connections are transient: a retry may succeed once the endpoint is
    back. Bad requests, missing objects and denied access are not, and neither is a LifecycleError
    (already a verdict on the user's input) unless it says so itself.
    """
    types = _transient_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LifecycleError):
            return bool(getattr(current, "transient", False))
        if isinstance(current, types):
            return True
        if _PYARROW_TRANSIENT.search(str(current)):  # pyarrow's OSError, delta-rs's DeltaError: text only
            return True
        current = current.__cause__ or current.__context__
    return False


def unreachable_error(where: str, endpoint: str | None, exc: BaseException) -> StoreUnavailableError:
    """The one-line error for an unreachable store: where, which endpoint, and the client's reason."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    text = re.sub(r"\x1b\[[0-9;]*m|↳", "", str(exc))  # delta-rs reports a chain of causes, one per line
    reason = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return StoreUnavailableError(f"{where}: cannot reach the object store at {endpoint or 'the default S3 endpoint'} "
                                 f"({reason})")


class S3Access(NamedTuple):
    """What every S3 client of a store is built from, resolved once per call from the block's settings."""

    key: str | None = None
    secret: str | None = None
    token: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    verify: bool | str | None = None  # False: no certificate check; a path: CA bundle; None: client default
    use_ssl: bool = True
    config: dict[str, Any] = {}  # botocore config (retries, timeouts, pool size)
    anonymous: bool = False


@functools.lru_cache(maxsize=16)
def _session_credentials(creds: AwsCredentials) -> tuple[Any, str | None]:
    """(botocore credentials, region) of the block's boto3 session, cached per block settings.

    A session costs ~35 ms to build, and stores build clients per object. The credentials object is kept,
    not its values: `get_frozen_credentials()` refreshes temporary ones (assumed role, SSO) when due.
    """
    session = creds.get_boto3_session()
    return session.get_credentials(), session.region_name


class ObjectStore(Block):
    """An object store root (file lake or S3-compatible bucket prefix) used for all lifecycle data.

    Attributes:
        url: Root of the store, e.g. `file:///srv/lake` or `s3://ml-lake/lifecycle`.
        endpoint_url: S3 API endpoint for MinIO / Ceph RGW / a test server; None for AWS.
        region: S3 region name.
        aws_credentials: A prefect-aws `AwsCredentials` block; its session's credentials replace the keys
            below, its region and client parameters apply where `region` / `endpoint_url` are unset.
        access_key_id: Access key id when not using `aws_credentials`.
        secret_access_key: Secret key when not using `aws_credentials`.
        max_attempts: Attempts per S3 request inside the clients (botocore, s3fs, pyarrow).
        connect_timeout: Seconds to wait for a connection to the S3 endpoint.
        delta_commit_safety: How delta-rs makes concurrent commits to a Delta table safe on S3.
        delta_lock_table: DynamoDB table of delta-rs's commit lock (`delta_commit_safety: dynamodb`).
    """

    _block_type_name = "Lifecycle Object Store"
    _block_type_slug = "lifecycle-object-store"
    _description = "Root of the lifecycle's data lake: a local folder or an S3-compatible bucket prefix."

    url: str = Field(..., description="Store root: file:///abs/path or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph RGW); None for AWS.")
    region: str | None = Field(None, description="S3 region.")
    aws_credentials: AwsCredentials | None = Field(
        None, description="prefect-aws AwsCredentials block: its session's credentials (keys, token, profile, "
        "role) replace the key fields; its region and client parameters apply where the store sets none."
    )
    access_key_id: str | None = Field(None, description="S3 access key id.")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    max_attempts: int | None = Field(
        None, ge=1, description="Attempts per S3 request inside the S3 clients; None keeps their defaults. "
        "Task retries come on top of these."
    )
    connect_timeout: float | None = Field(
        None, gt=0, description="Seconds to wait for a connection to the S3 endpoint; None keeps the defaults."
    )

    delta_commit_safety: Literal["etag", "dynamodb", "unsafe_rename"] = Field(
        "etag", description="How concurrent Delta commits stay safe on S3: `etag` (conditional put: AWS S3, "
        "MinIO, Ceph RGW, moto), `dynamodb` (delta-rs's lock table), or `unsafe_rename` (single writer only)."
    )
    delta_lock_table: str | None = Field(
        None, description="DynamoDB table of the delta-rs commit lock when delta_commit_safety is dynamodb."
    )

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    def _endpoint(self) -> str | None:
        """The S3 endpoint in use: the store's own, else the credentials' client parameters' (no session)."""
        if self.endpoint_url or self.aws_credentials is None:
            return self.endpoint_url
        return self.aws_credentials.aws_client_parameters.endpoint_url

    def s3_access(self) -> S3Access:
        """Credentials, region, endpoint and TLS settings for this store's S3 clients.

        With `aws_credentials`: the keys its boto3 session resolved (explicit keys, session token,
        profile, assumed role or the environment), the store's region or else the session's, the
        store's endpoint or else the client parameters', and their `verify`/`use_ssl`/`config`.
        """
        creds = self.aws_credentials
        if creds is None:
            secret = self.secret_access_key.get_secret_value() if self.secret_access_key else None
            return S3Access(key=self.access_key_id, secret=secret, region=self.region, endpoint_url=self.endpoint_url)
        resolved, session_region = _session_credentials(creds)
        frozen = resolved.get_frozen_credentials() if resolved is not None else None
        params = creds.aws_client_parameters
        config = dict(params.config or {})
        anonymous = str(config.get("signature_version", "")).lower() == "unsigned"
        if anonymous:
            config.pop("signature_version")
        return S3Access(
            key=frozen.access_key if frozen else None, secret=frozen.secret_key if frozen else None,
            token=frozen.token if frozen else None, region=self.region or session_region,
            endpoint_url=self._endpoint(),
            verify=str(params.verify_cert_path) if params.verify_cert_path else (
                str(params.verify) if params.verify not in (None, True, False) else params.verify),
            use_ssl=params.use_ssl, config=config, anonymous=anonymous,
        )

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this store (for s3fs, dask, pandas)."""
        if self.protocol != "s3":
            return {}
        access = self.s3_access()
        client_kwargs: dict[str, Any] = {}
        if access.endpoint_url:
            client_kwargs["endpoint_url"] = access.endpoint_url
        if access.region:
            client_kwargs["region_name"] = access.region
        if access.verify is not None:
            client_kwargs["verify"] = access.verify
        # No listings cache: objects written through pyarrow or by other processes (Dask workers) would
        # otherwise stay invisible to `exists`/`find` on a cached listing.
        opts: dict[str, Any] = {"client_kwargs": client_kwargs, "use_listings_cache": False}
        config: dict[str, Any] = dict(access.config)
        if self.max_attempts:
            config["retries"] = {"max_attempts": self.max_attempts, "mode": "standard"}
        if self.connect_timeout:
            config["connect_timeout"] = self.connect_timeout
        if config:
            opts["config_kwargs"] = config
        if not access.use_ssl:
            opts["use_ssl"] = False
        if access.anonymous:
            opts["anon"] = True
        elif access.key:
            opts.update(key=access.key, secret=access.secret)
            if access.token:
                opts["token"] = access.token
        return opts

    def object_store_options(self) -> dict[str, str]:
        """Storage options for Rust object_store clients (LanceDB; `aws_*` keys, strings)."""
        if self.protocol != "s3":
            return {}
        access = self.s3_access()
        values = {"aws_access_key_id": access.key, "aws_secret_access_key": access.secret,
                  "aws_session_token": access.token, "aws_region": access.region, "aws_endpoint": access.endpoint_url}
        opts = {k: v for k, v in values.items() if v}
        if access.anonymous:
            opts = {k: v for k, v in opts.items() if k in ("aws_region", "aws_endpoint")}
            opts["aws_skip_signature"] = "true"
        if (access.endpoint_url or "").startswith("http://") or (not access.endpoint_url and not access.use_ssl):
            opts["allow_http"] = "true"
        if access.verify is False:
            opts["allow_invalid_certificates"] = "true"
        return opts

    def delta_storage_options(self) -> dict[str, str]:
        """Storage options for delta-rs: `object_store_options` under delta-rs's names, the client retry
        and timeout settings, and the commit-safety option. Why the last: a Delta commit is "create
        `_delta_log/<n>.json` unless it exists", which S3 offers only as a conditional put (AWS S3,
        MinIO, Ceph RGW, moto); without it two writers could both write version n, one commit lost.
        """
        if self.protocol != "s3":
            return {}
        names = {"aws_endpoint": "AWS_ENDPOINT_URL", "allow_http": "AWS_ALLOW_HTTP",
                 "allow_invalid_certificates": "AWS_ALLOW_INVALID_CERTIFICATES"}
        opts = {names.get(k, k.upper()): v for k, v in self.object_store_options().items()}
        opts.setdefault("AWS_REGION", "us-east-1")
        opts.update({"max_retries": str(self.max_attempts - 1)} if self.max_attempts else {})
        opts.update({"connect_timeout": f"{self.connect_timeout:g}s"} if self.connect_timeout else {})
        if self.delta_commit_safety == "etag":
            opts["conditional_put"] = "etag"
        elif self.delta_commit_safety == "dynamodb":
            opts["AWS_S3_LOCKING_PROVIDER"] = "dynamodb"
            opts.update({"DELTA_DYNAMO_TABLE_NAME": self.delta_lock_table} if self.delta_lock_table else {})
        else:
            opts["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
        return opts

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem of the store (fsspec caches one instance per set of options)."""
        fs = fsspec.filesystem(self.protocol, **self.storage_options())
        if self.max_attempts and hasattr(fs, "retries"):
            fs.retries = self.max_attempts  # s3fs's own retry loop around botocore's
        return fs

    @contextmanager
    def unreachable_as_error(self, key: str = "") -> Iterator[None]:
        """Turn "the endpoint did not answer" into a one-line StoreUnavailableError (which tasks retry).

        Other errors pass through unchanged: a missing object or a denied request is not transient.
        """
        try:
            yield
        except LifecycleError:
            raise
        except Exception as exc:
            if is_unreachable(exc):
                raise unreachable_error(self.uri(key), self._endpoint(), exc) from exc
            raise

    def _root(self) -> str:
        root = self.url.split("://", 1)[1] if "://" in self.url else self.url
        return root.rstrip("/")

    def path(self, key: str) -> str:
        """Filesystem path (no scheme) of a key, refusing keys that escape the root."""
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise LifecycleError(f"{key}: object keys may not contain '..'")
        return posixpath.join(self._root(), *parts) if parts else self._root()

    def uri(self, key: str = "") -> str:
        """Full URI of a key, e.g. for MLflow or LanceDB."""
        return f"{self.protocol}://{self.path(key)}"

    def exists(self, key: str) -> bool:
        target = self.path(key)
        with self.unreachable_as_error(key):
            return self.filesystem().exists(target)

    def read_bytes(self, key: str) -> bytes:
        target = self.path(key)
        try:
            with self.unreachable_as_error(key):
                return self.filesystem().cat_file(target)
        except FileNotFoundError as exc:
            raise LifecycleError(f"{self.uri(key)}: not found in the object store") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object so that readers see the old object or the whole new one, never a part."""
        target = self.path(key)
        with self.unreachable_as_error(key):
            fs = self.filesystem()
            if self.protocol == "file":
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex}"
                fs.pipe_file(tmp, data)
                fs.mv(tmp, target)
            else:
                fs.pipe_file(target, data)

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of all objects under a prefix, relative to the store root, sorted."""
        base = self.path(prefix)
        with self.unreachable_as_error(prefix):
            try:
                found = self.filesystem().find(base)
            except FileNotFoundError:
                return []
        root = self._root() + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in found)

    def delete(self, prefix: str) -> None:  # type: ignore[override]  # the store API; Block.delete is a classmethod
        target = self.path(prefix)
        with self.unreachable_as_error(prefix):
            fs = self.filesystem()
            if fs.exists(target):
                fs.rm(target, recursive=True)

    def move(self, sources: list[str], targets: list[str]) -> None:
        """Move objects: renames in a file lake; on S3, server-side copies in parallel, then one bulk delete."""
        if len(sources) != len(targets):
            raise ValueError("move: sources and targets differ in length")
        if not sources:
            return
        src, dst = [self.path(k) for k in sources], [self.path(k) for k in targets]
        with self.unreachable_as_error(posixpath.commonpath(targets)):
            fs = self.filesystem()
            if self.protocol == "file":
                for a, b in zip(src, dst):
                    fs.makedirs(posixpath.dirname(b), exist_ok=True)
                    fs.mv(a, b)
            else:
                fs.copy(src, dst)
                fs.rm(src)

    def pyarrow_filesystem(self) -> Any:
        """A pyarrow filesystem for Parquet I/O, with paths from `path()` (one per settings, reused).

        pyarrow has no switch to skip certificate checks: `verify=False` is not honoured here (a CA
        bundle path is).
        """
        from pyarrow import fs as pafs

        if self.protocol != "s3":
            return pafs.LocalFileSystem()
        a = self.s3_access()
        endpoint = a.endpoint_url or ""
        scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ("https" if a.use_ssl else "http")
        return _pyarrow_s3(a.key, a.secret, a.token, endpoint.split("://", 1)[-1] or None, scheme,
                           a.region or "us-east-1", a.verify if isinstance(a.verify, str) else None, a.anonymous,
                           self.max_attempts, self.connect_timeout)


@functools.lru_cache(maxsize=16)
def _pyarrow_s3(key: str | None, secret: str | None, token: str | None, endpoint: str | None, scheme: str,
                region: str, ca_file: str | None, anonymous: bool, max_attempts: int | None,
                connect_timeout: float | None) -> Any:
    """A pyarrow S3FileSystem, cached: building one costs ~70 ms, and stages ask for it per part."""
    from pyarrow import fs as pafs

    extra: dict[str, Any] = {}
    if max_attempts:
        extra["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
    if connect_timeout:
        extra["connect_timeout"] = connect_timeout
    if ca_file:
        extra["tls_ca_file_path"] = ca_file
    if anonymous:
        extra["anonymous"] = True
    else:
        extra.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=region, **extra)
