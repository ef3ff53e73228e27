"""VectorStore: the LanceDB database that holds one table per dataset."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class VectorStore(Block):
    """A LanceDB database (a local folder or an object-store prefix).

    Attributes:
        uri: LanceDB URI, e.g. `/abs/.lifecycle/lancedb` or `s3://bucket/lancedb`.
        storage_options: Lance object-store options (endpoint, region, allow_http, …).
        access_key_id: S3 access key id (merged into storage options).
        secret_access_key: S3 secret key (merged into storage options).
        table_prefix: Table name = prefix + dataset name.
    """

    _block_type_name = "Lifecycle Vector Store"
    _block_type_slug = "lifecycle-vector-store"
    _description = "LanceDB database holding the embedding index of each dataset."

    uri: str = Field(..., description="LanceDB URI (folder or s3://…).")
    storage_options: dict[str, str] = Field(default_factory=dict, description="Lance storage options.")
    access_key_id: str | None = Field(None, description="S3 access key id.")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    table_prefix: str = Field("", description="Prefix of table names.")

    def table_name(self, dataset: str) -> str:
        return f"{self.table_prefix}{dataset}"

    def lance_storage_options(self) -> dict[str, str]:
        opts = dict(self.storage_options)
        if self.access_key_id:
            opts["aws_access_key_id"] = self.access_key_id
        if self.secret_access_key:
            opts["aws_secret_access_key"] = self.secret_access_key.get_secret_value()
        return opts

    def connect(self):
        """A `lancedb.DBConnection` to this database."""
        import lancedb

        return lancedb.connect(self.uri, storage_options=self.lance_storage_options() or None)
