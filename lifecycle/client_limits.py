"""What one client may cost an endpoint: the bounds both serving targets enforce, set in one place.

Why in core: the `ServingTarget` block (infra_blocks) carries them so platform engineers set them in
the block document, the server (serving) enforces them from its snapshot config, and the docker
target's HAProxy edge (tasks) renders its timeouts, head limit and client cap from them. infra_blocks
and serving may not import each other, so the one model lives below both.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ClientLimits(BaseModel):
    """What one client may cost a server: bytes and seconds per request phase, connections, rows.

    Why each bound: probed as an adversarial client would (issue 16), an unbounded server kept 150
    silent connections open for 70 s+, took 20,000 until its file descriptors ran out, grew 540 MB
    of RSS on 20 unfinished 25 MB headers, and answered a 520k-row request with 89 MB in 6.3 s while
    `/health` stalled. The bounds are enforced per worker process by `serving.limits` (the HTTP
    protocol), `max_rows` by the app, and on the docker target also by the edge (tasks/docker_serving.py).
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
