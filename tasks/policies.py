"""Task policies shared by every stage."""

from __future__ import annotations

from typing import Any

from lifecycle.errors import LifecycleError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (network, a lost worker), never bad input: no retry can fix that."""
    try:
        state.result(raise_on_failure=True)
    except LifecycleError as exc:
        return getattr(exc, "transient", False)  # e.g. StoreUnavailableError: the endpoint may come back
    except BaseException:  # noqa: BLE001 - any other failure may be transient
        return True
    return True
