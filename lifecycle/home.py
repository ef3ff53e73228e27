"""Where lifecycle keeps its local state (sample, lake, SQLite, logs, `lifecycle up`'s process records).

Its own module, free of Prefect: the CLI decides which Prefect server to use from what is recorded here,
and that has to happen before Prefect is imported (Prefect reads its settings once, at import).
"""

from __future__ import annotations

import os
from pathlib import Path


def lifecycle_home() -> Path:
    """`$LIFECYCLE_HOME`, else `.lifecycle` under the current directory."""
    return Path(os.environ.get("LIFECYCLE_HOME") or Path.cwd() / ".lifecycle").resolve()
