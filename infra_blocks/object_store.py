"""ObjectStore: where datasets, embeddings, records and Data Docs live.

One block for a local file lake (`file:///…`), S3, MinIO or Ceph RGW (`s3://bucket/prefix` with an
`endpoint_url`). All I/O goes through fsspec (and pyarrow's filesystem for Parquet), so stages never
branch on the kind of store: pointing the block at another URL is the only change production needs.
"""

from __future__ import annotations

import functools
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr

from lifecycle.errors import LifecycleError, StoreUnavailableError

# pyarrow's S3 client reports an unreachable endpoint as a plain OSError; these mean "try again later".
_PYARROW_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|REQUEST_TIMEOUT|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|INTERNAL_FAILURE)"
    r"|curlCode: (6|7|28|52|55|56)\b"
)


@functools.lru_cache(maxsize=1)
def _transient_types() -> tuple[type[BaseException], ...]:
    """Client exception classes that mean the endpoint did not answer (imported lazily: optional extras)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        found += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ServerTimeoutError

        found += [ClientConnectionError, ServerTimeoutError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        found.append(FSTimeoutError)
    except ImportError:
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
        if isinstance(current, OSError) and _PYARROW_TRANSIENT.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def unreachable_error(where: str, endpoint: str | None, exc: BaseException) -> StoreUnavailableError:
    """The one-line error for an unreachable store: where, which endpoint, and the client's reason."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return StoreUnavailableError(f"{where}: cannot reach the object store at {endpoint or 'the default S3 endpoint'} "
                                 f"({reason})")


class ObjectStore(Block):
    """An object store root (file lake or S3-compatible bucket prefix) used for all lifecycle data.

    Attributes:
        url: Root of the store, e.g. `file:///srv/lake` or `s3://ml-lake/lifecycle`.
        endpoint_url: S3 API endpoint for MinIO / Ceph RGW / a test server; None for AWS.
        region: S3 region name.
        aws_credentials: A prefect-aws `AwsCredentials` block; takes precedence over the keys below.
        access_key_id: Access key id when not using `aws_credentials`.
        secret_access_key: Secret key when not using `aws_credentials`.
        max_attempts: Attempts per S3 request inside the clients (botocore, s3fs, pyarrow).
        connect_timeout: Seconds to wait for a connection to the S3 endpoint.
    """

    _block_type_name = "Lifecycle Object Store"
    _block_type_slug = "lifecycle-object-store"
    _description = "Root of the lifecycle's data lake: a local folder or an S3-compatible bucket prefix."

    url: str = Field(..., description="Store root: file:///abs/path or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph RGW); None for AWS.")
    region: str | None = Field(None, description="S3 region.")
    aws_credentials: AwsCredentials | None = Field(
        None, description="prefect-aws AwsCredentials block; overrides the key fields when set."
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

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    def _keys(self) -> tuple[str | None, str | None]:
        creds = self.aws_credentials
        if creds is not None:
            secret = creds.aws_secret_access_key
            return creds.aws_access_key_id, secret.get_secret_value() if secret else None
        secret = self.secret_access_key.get_secret_value() if self.secret_access_key else None
        return self.access_key_id, secret

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this store (for s3fs, dask, pandas)."""
        if self.protocol != "s3":
            return {}
        key, secret = self._keys()
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        # No listings cache: objects written through pyarrow or by other processes (Dask workers) would
        # otherwise stay invisible to `exists`/`find` on a cached listing.
        opts: dict[str, Any] = {"client_kwargs": client_kwargs, "use_listings_cache": False}
        config: dict[str, Any] = {}
        if self.max_attempts:
            config["retries"] = {"max_attempts": self.max_attempts, "mode": "standard"}
        if self.connect_timeout:
            config["connect_timeout"] = self.connect_timeout
        if config:
            opts["config_kwargs"] = config
        if key:
            opts.update(key=key, secret=secret)
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
                raise unreachable_error(self.uri(key), self.endpoint_url, exc) from exc
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

    def delete(self, prefix: str) -> None:
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
        src = [self.path(k) for k in sources]
        dst = [self.path(k) for k in targets]
        with self.unreachable_as_error(posixpath.commonpath(targets)):
            fs = self.filesystem()
            if self.protocol == "file":
                for a, b in zip(src, dst):
                    fs.makedirs(posixpath.dirname(b), exist_ok=True)
                    fs.mv(a, b)
            else:
                fs.copy(src, dst)
                fs.rm(src)

    def pyarrow_filesystem(self):
        """A pyarrow filesystem for Parquet I/O, with paths from `path()` (one per settings, reused)."""
        from pyarrow import fs as pafs

        if self.protocol != "s3":
            return pafs.LocalFileSystem()
        key, secret = self._keys()
        return _pyarrow_s3(key, secret, self.endpoint_url, self.region or "us-east-1", self.max_attempts,
                           self.connect_timeout)


@functools.lru_cache(maxsize=16)
def _pyarrow_s3(key: str | None, secret: str | None, endpoint_url: str | None, region: str,
                max_attempts: int | None, connect_timeout: float | None):
    """A pyarrow S3FileSystem, cached: building one costs ~70 ms, and stages ask for it per part."""
    from pyarrow import fs as pafs

    extra: dict[str, Any] = {}
    if max_attempts:
        extra["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
    if connect_timeout:
        extra["connect_timeout"] = connect_timeout
    return pafs.S3FileSystem(
        access_key=key,
        secret_key=secret,
        endpoint_override=(endpoint_url or "").split("://", 1)[-1] or None,
        scheme="http" if (endpoint_url or "").startswith("http://") else "https",
        region=region,
        **extra,
    )
