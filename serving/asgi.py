"""`serving.asgi:app`: the serving app for an outside process manager (gunicorn with uvicorn workers).

Why it exists: `python -m serving` is gunicorn configured from the snapshot (serving/__main__.py);
this module lets a plain `gunicorn -k serving.worker.ServingWorker -w N serving.asgi:app` (or
another process manager) serve the same app, as benchmarks/serve_edge.py does to compare the two.
gunicorn imports this module in each worker and reads `app`, so
the app is made on that first read (a module `__getattr__`), from the snapshot config named by
`$LIFECYCLE_SERVING_CONFIG`: importing the module alone (lint, tests) loads no model.
"""

from __future__ import annotations

import os
from typing import Any

CONFIG_ENV = "LIFECYCLE_SERVING_CONFIG"
_app: Any | None = None


def create() -> Any:
    """The app of the snapshot named by `$LIFECYCLE_SERVING_CONFIG` (tabular models: one numeric thread).

    Raises:
        RuntimeError: the variable is not set (gunicorn then reports the worker failed to boot).
    """
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"serving.asgi: set {CONFIG_ENV} to the snapshot's config.json")
    from serving.__main__ import freeze_startup_heap, single_threaded_numerics
    from serving.config import ServingConfig

    config = ServingConfig.read(path)
    single_threaded_numerics(config)  # before numpy and xgboost are imported
    from serving.app import create_app

    app = create_app(config)
    freeze_startup_heap()
    return app


def __getattr__(name: str) -> Any:
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = create()
    return _app
