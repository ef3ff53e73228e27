"""`python -m serving`'s process setup: the heap left by startup is frozen, request garbage still goes."""

from __future__ import annotations

import gc
import weakref

from serving.__main__ import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_startup_heap_is_frozen_and_later_garbage_is_still_collected():
    survivor = _Node()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0  # what startup loaded is out of the collector's sight
        garbage = _Node()
        gone = weakref.ref(garbage)
        del garbage
        gc.collect()
        assert gone() is None  # a request's cycles are still collected
        assert survivor.me is survivor
    finally:
        gc.unfreeze()


def test_workers_run_the_configured_event_loop():
    """asyncio unless the snapshot asks for uvloop: uvloop's saturated tail was 10x asyncio's (ServingConfig)."""
    import os

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from serving.config import ServingConfig
    from serving.worker import ServingWorker

    class Arbiter:  # what a worker reads from its application: the snapshot config
        def __init__(self, config: ServingConfig) -> None:
            self.serving_config = config

    def loop_of(config: ServingConfig) -> str:
        cfg = Config()
        worker = ServingWorker(0, os.getpid(), [], Arbiter(config), 30, cfg, Logger(cfg))
        return worker.config.loop

    assert loop_of(ServingConfig(model_dir="m")) == "asyncio"
    assert loop_of(ServingConfig(model_dir="m", event_loop="uvloop")) == "uvloop"
