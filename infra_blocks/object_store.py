"""ObjectStore: where datasets, embeddings, records and Data Docs live.

One block for a local file lake (`file:///…`), S3, MinIO or Ceph RGW (`s3://bucket/prefix` with an
`endpoint_url`). All I/O goes through fsspec (and pyarrow's filesystem for Parquet), so stages never
branch on the kind of store: pointing the block at another URL is the only change production needs.
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr

from lifecycle.errors import LifecycleError


class ObjectStore(Block):
    """An object store root (file lake or S3-compatible bucket prefix) used for all lifecycle data.

    Attributes:
        url: Root of the store, e.g. `file:///srv/lake` or `s3://ml-lake/lifecycle`.
        endpoint_url: S3 API endpoint for MinIO / Ceph RGW / a test server; None for AWS.
        region: S3 region name.
        aws_credentials: A prefect-aws `AwsCredentials` block; takes precedence over the keys below.
        access_key_id: Access key id when not using `aws_credentials`.
        secret_access_key: Secret key when not using `aws_credentials`.
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
        opts: dict[str, Any] = {"client_kwargs": client_kwargs}
        if key:
            opts.update(key=key, secret=secret)
        return opts

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem of the store (a fresh, uncached instance is not needed)."""
        return fsspec.filesystem(self.protocol, **self.storage_options())

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
        return self.filesystem().exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.filesystem().cat_file(self.path(key))
        except FileNotFoundError as exc:
            raise LifecycleError(f"{self.uri(key)}: not found in the object store") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object so that readers see the old object or the whole new one, never a part."""
        fs = self.filesystem()
        target = self.path(key)
        if self.protocol == "file":
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            fs.pipe_file(tmp, data)
            fs.mv(tmp, target)
        else:
            fs.pipe_file(target, data)

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of all objects under a prefix, relative to the store root, sorted."""
        fs = self.filesystem()
        base = self.path(prefix)
        try:
            found = fs.find(base)
        except FileNotFoundError:
            return []
        root = self._root() + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in found)

    def delete(self, prefix: str) -> None:
        fs = self.filesystem()
        target = self.path(prefix)
        if fs.exists(target):
            fs.rm(target, recursive=True)

    def pyarrow_filesystem(self):
        """A pyarrow filesystem for Parquet I/O, with paths from `path()`."""
        from pyarrow import fs as pafs

        if self.protocol != "s3":
            return pafs.LocalFileSystem()
        key, secret = self._keys()
        scheme = "http" if (self.endpoint_url or "").startswith("http://") else "https"
        endpoint = (self.endpoint_url or "").split("://", 1)[-1] or None
        return pafs.S3FileSystem(
            access_key=key,
            secret_key=secret,
            endpoint_override=endpoint,
            scheme=scheme,
            region=self.region or "us-east-1",
        )
