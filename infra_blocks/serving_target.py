"""ServingTarget: where the deploy stage runs the serving app (a local process or a Docker host)."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from lifecycle.client_limits import ClientLimits


class ServingTarget(Block):
    """A serving target.

    Attributes:
        kind: `process` (a gunicorn arbiter with uvicorn workers on this machine) or `docker` (a
            container on a Docker host, behind the HAProxy edge).
        host: Address the endpoint binds to; 127.0.0.1 unless you mean to expose it.
        port: Published port of the endpoint.
        workdir: Where process serving keeps model snapshots, logs and PID files.
        docker_base_url: Docker API URL, e.g. unix:///var/run/docker.sock or tcp://host:2376.
        base_image: Base image for serving images (must provide python3 and venv).
        api_token: Bearer token required by the endpoint; None allows anonymous requests.
        max_body_bytes: Largest request body accepted (413 above it).
        limits: What one client may cost the endpoint (head size and time, body time, idle time,
            connections per worker, rows per request); the server enforces them on both kinds, and
            the docker edge renders its timeouts, 431 head limit and client cap from the same values.
        health_timeout_s: How long a new server may take to become healthy.
        workers: Worker processes per deployment under one gunicorn arbiter, which replaces a worker
            that dies (2 doubles tabular throughput on 2 cores; text models batch through one encoder,
            keep 1: a crashed single worker is back after one model load).
    """

    _block_type_name = "Lifecycle Serving Target"
    _block_type_slug = "lifecycle-serving-target"
    _description = "Where the model and index are served: a local process or a Docker host."

    kind: Literal["process", "docker"] = Field("process", description="process or docker.")
    host: str = Field("127.0.0.1", description="Bind address of the endpoint.")
    port: int = Field(8765, ge=1, le=65535, description="Published port.")
    workdir: str = Field(".lifecycle/serving", description="Local folder for snapshots, logs, PID files.")
    docker_base_url: str | None = Field(None, description="Docker API URL (docker kind).")
    base_image: str = Field("lifecycle-base:bookworm", description="Base image for serving images.")
    api_token: SecretStr | None = Field(None, description="Bearer token the endpoint requires.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Request size limit in bytes.")
    health_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for a healthy server.")
    workers: int = Field(1, ge=1, le=64, description="Server processes sharing the port (SO_REUSEPORT).")
    limits: ClientLimits = Field(default_factory=ClientLimits,
                                 description="Bounds on every client: head bytes/time, body time, idle time, "
                                 "connections per worker, rows per request (the docker edge uses them too).")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"
