"""What asyncio tasks leave behind."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def drop_cancellation(task: asyncio.Task[Any]) -> None:
    """A done callback for a task that may be cancelled: a cancelled task keeps its
    CancelledError, whose traceback holds the task's frames, and one of them may hold the
    task (a flight, a connection's proxy, holding the task that runs it): a cycle only the
    full collection frees, which the exporter runs rarely. Taken once, it is let go."""
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
