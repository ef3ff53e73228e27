"""The serving app's configuration: one JSON file per deployment snapshot.

The deploy task writes `config.json` into the snapshot folder next to the model files and starts
`python -m serving --config FILE`; a rollback restarts an older snapshot from its own file. The file is
the whole contract between the deploy stage and the server, so the server needs neither MLflow nor
Prefect nor the object store to start.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from lifecycle.errors import LifecycleError


class IndexRef(BaseModel):
    """Which LanceDB table (and which version of it) `/search` answers from."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(..., description="LanceDB URI (folder or s3://…).")
    table: str = Field(..., description="Table name.")
    tag: str | None = Field(None, description="Table tag to check out (preferred over version).")
    version: int | None = Field(None, description="Table version to check out when no tag is given.")
    storage_options: dict[str, str] = Field(default_factory=dict, description="Lance storage options.")
    distance_type: str = Field("cosine", description="Metric the index was built with.")
    query_params: dict[str, int] = Field(
        default_factory=dict, description="ANN settings the index stage chose (nprobes, refine_factor, ef)."
    )
    max_chars: int = Field(2000, ge=1, description="Queries are cut as the embed stage cut the indexed texts.")


class ClientLimits(BaseModel):
    """What one client may cost a server: bytes and seconds per request phase, connections, rows.

    Why each bound: probed as an adversarial client would (issue 16), an unbounded server kept 150
    silent connections open for 70 s+, took 20,000 until its file descriptors ran out, grew 540 MB
    of RSS on 20 unfinished 25 MB headers, and answered a 520k-row request with 89 MB in 6.3 s while
    `/health` stalled. The bounds are enforced per worker process by `serving.limits` (the HTTP
    protocol), and `max_rows` by the app.
    """

    model_config = ConfigDict(extra="forbid")
    max_header_bytes: int = Field(32_768, ge=1024, le=1_048_576,
                                  description="Largest request head (request line + headers); 431 above it.")
    header_timeout_s: float = Field(10.0, gt=0, description="From a request's first byte to its last header (408).")
    body_timeout_s: float = Field(30.0, gt=0, description="From the last header to the end of the body (408).")
    keep_alive_s: float = Field(5.0, gt=0, description="Idle time allowed before a request, after connecting or "
                                "between requests; the connection is closed after it.")
    max_connections: int = Field(1000, ge=1, description="Open connections per worker; a connection made beyond "
                                 "it gets 503 to its first request and is closed. Earlier ones keep working.")
    max_rows: int = Field(10_000, ge=1, description="Rows per /invocations request (413 above): bounds the answer.")


class ServingConfig(BaseModel):
    """Everything one server process needs: model files, lineage, index, limits and where to bind."""

    model_config = ConfigDict(extra="forbid")
    model_dir: str = Field(..., description="Folder holding booster.json and feature_schema.json.")
    lineage: dict[str, str | None] = Field(
        default_factory=dict,
        description="What is served: dataset version, model name/version, index version, deployment id.",
    )
    index: IndexRef | None = Field(None, description="Vector index for /search; None disables it.")
    api_token: SecretStr | None = Field(None, description="Bearer token required by the endpoints.")
    api_token_file: str | None = Field(
        None, description="File holding the token (containers: put there at create time, never in the image)."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted (413 above).")
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8765, ge=0, le=65535, description="Bind port.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes under one gunicorn arbiter (a dead one is "
                         "replaced).")
    limits: ClientLimits = Field(default_factory=ClientLimits, description="Bounds on every client.")
    batch_rows: int = Field(256, ge=1, le=65536, description="Most rows per encoder batch (text models).")
    encoder_threads: int | None = Field(
        1, ge=1, le=256,
        description="torch threads of the text encoder. 1: under load, batching (not intra-op threads) gives the "
        "throughput, and a second thread waiting for a busy core stalls every op (measured with wrk at 8 "
        "connections on 2 cores: 167 req/s with 1 thread, 93 with 2). None: torch's default.",
    )

    @field_serializer("api_token", when_used="json")
    def _reveal_token(self, token: SecretStr | None) -> str | None:
        # The file is the server's only source of the token; it is written 0600 (see `write`).
        return token.get_secret_value() if token else None

    def token(self) -> SecretStr | None:
        """The bearer token: `api_token`, else the first line of `api_token_file`.

        Raises:
            LifecycleError: the token file is named but cannot be read or is empty.
        """
        if self.api_token is not None or not self.api_token_file:
            return self.api_token
        try:
            value = Path(self.api_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LifecycleError(f"{self.api_token_file}: token file unreadable ({exc.strerror})") from exc
        if not value:
            raise LifecycleError(f"{self.api_token_file}: token file is empty")
        return SecretStr(value)

    @property
    def deployment_id(self) -> str | None:
        return self.lineage.get("deployment_id")

    def write(self, path: str | Path) -> Path:
        """Write the config atomically, readable by the owner only (it may hold the token)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(self.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> ServingConfig:
        """Load a config file.

        Raises:
            LifecycleError: naming the file and the first invalid field.
        """
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise LifecycleError(f"{path}: serving config not found") from exc
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            raise LifecycleError(f"{path}: invalid serving config: {where}: {err['msg']}") from exc
