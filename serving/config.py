"""The serving app's configuration: one JSON file per deployment snapshot.

The deploy task writes `config.json` into the snapshot folder next to the model files and starts
`python -m serving --config FILE`; a rollback restarts an older snapshot from its own file. The file is
the whole contract between the deploy stage and the server, so the server needs neither MLflow nor
Prefect nor the object store to start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from lifecycle.client_limits import ClientLimits
from lifecycle.errors import LifecycleError

__all__ = ["ClientLimits", "IndexRef", "ServingConfig"]  # ClientLimits lives in core (the block carries it too)


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
    batch_collect_ms: float = Field(
        1.0, ge=0, le=50,
        description="After an encoder batch shared by several requests (/invocations of text models, /search), "
        "wait this long for the clients it answered to send their next requests before taking the queue. 0: "
        "take what is queued at once. A lone client (batches of one) never waits.",
    )
    encoder_threads: int | None = Field(
        1, ge=1, le=256,
        description="torch threads of the text encoder. 1: under load, batching (not intra-op threads) gives the "
        "throughput, and a second thread waiting for a busy core stalls every op (measured with wrk at 8 "
        "connections on 2 cores: 167 req/s with 1 thread, 93 with 2). None: torch's default.",
    )

    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="The workers' event loop. asyncio: answers in arrival order when the worker is saturated "
        "(one process, 64 connections, one-row /invocations: p99 33 ms, max 53 ms). uvloop reads new requests "
        "before it resumes the ones in progress (uvloop#123), so the saturated tail grew to p99 275-445 ms, max "
        "1 s, for ~12 % more req/s below saturation (2,318 against 2,046 at 8 connections).",
    )
    search_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights of the /search query encoder. auto: bfloat16 where the CPU has Intel AMX (8 queries "
        "13.8 ms against 20 ms, 64 queries 47 against 118 ms, one thread; vectors within cosine 0.99994 of "
        "float32), else float32. The index's own vectors are float32 whatever this says.",
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
