"""The gunicorn worker of the serving app: uvicorn's worker with our bounded protocol (`serving.limits`).

Why gunicorn: its arbiter replaces a worker that dies (a segfault in a native library took the whole
endpoint down while our own supervisor only stopped everything), and it measured within 10 % of
our SO_REUSEPORT supervisor (0.97x req/s, benchmarks/serve_edge.py), so by issue 13's rule the
kept component wins. gunicorn sets TCP_NODELAY on its TCP listener (gunicorn/sock.py), which the
accepted connections inherit, so keep-alive responses do not wait for delayed ACKs.

The worker class is uvicorn's (`uvicorn.workers`, deprecated in favour of the `uvicorn-worker`
package, which is not in the lock; the module is 100 lines and stable); the only change is the
protocol class, the keep-alive timeout and the event loop, read from the snapshot config the
application carries.
"""

from __future__ import annotations

import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from uvicorn.workers import UvicornWorker

from serving.config import ClientLimits
from serving.limits import bounded_protocol


class ServingWorker(UvicornWorker):
    """UvicornWorker with `serving.limits.BoundedProtocol` for the limits of the served config."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = getattr(self.app, "serving_config", None)
        limits = config.limits if config is not None else ClientLimits()
        self.config.http = bounded_protocol(limits)
        self.config.timeout_keep_alive = limits.keep_alive_s  # type: ignore[assignment]  # call_later takes floats
        self.config.server_header = False
        self.config.access_log = False
        self.config.loop = config.event_loop if config is not None else "asyncio"  # see ServingConfig.event_loop
