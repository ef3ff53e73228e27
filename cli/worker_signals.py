"""A Dask preload for the workers of the local cluster a `lifecycle` command starts: Ctrl-C is the CLI's.

A terminal sends Ctrl-C's SIGINT to its whole foreground process group: the CLI and the worker processes
of its local Dask cluster alike. Each worker would then die on its own with a KeyboardInterrupt traceback
on the user's screen while the CLI is stopping the run in order (one line, work cancelled, cluster
closed). So these workers ignore SIGINT. SIGTERM still ends them, and the CLI's close of the cluster (or
its kill of every child on a second signal) ends them in any case.

Set by `cli.stopping.stop_on_signals` through Dask's config (`distributed.worker.preload`), which a
local cluster's nannies hand to the worker processes they spawn; workers of a remote cluster, started
elsewhere, never see it.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from typing import Any

MODULE = __name__


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT, in a worker process of its own only (a thread worker shares the CLI's process)."""
    if multiprocessing.parent_process() is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
