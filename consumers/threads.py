"""The worker's vital threads: if one dies, the worker must stop, because a worker without
its render or delivery thread would otherwise live on and hold its partitions doing nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def vital_thread(
    name: str, loop: Callable[[], None], on_crash: Callable[[], None]
) -> threading.Thread:
    """A daemon thread (not started) that runs `loop`. Should `loop` ever raise, `on_crash`
    runs in the dying thread, inside its `except` block, so it can log the traceback."""

    def guarded() -> None:
        try:
            loop()
        except BaseException:
            on_crash()

    return threading.Thread(target=guarded, name=name, daemon=True)
