"""Overall deadlines for network work: a call that must finish within a wall-clock budget, whatever its own
per-read timeouts do (a server that accepts and never answers, or trickles a byte every few seconds)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from dori.errors import DoriError

T = TypeVar("T")

DOWNLOAD_DEADLINE_S = float(os.environ.get("DORI_DOWNLOAD_DEADLINE_S", 3600))
"""Budget of one ``--download`` of hub weights (environment ``DORI_DOWNLOAD_DEADLINE_S``; default one hour)."""


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Run ``fn()`` in a worker thread and return its result, or raise when ``seconds`` pass first.

    The worker is a daemon thread: when the deadline passes it is left behind (it holds no lock of dori's)
    and the caller gets a :class:`DoriError` naming ``what`` and the budget; the process can exit.

    Raises:
        DoriError: the deadline passed. Exceptions of ``fn`` are re-raised as they are.
    """
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=work, name=f"dori-deadline:{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DoriError(f"{what} did not finish within its {seconds:g} s deadline; the server may be stalled")
    if "error" in box:
        raise box["error"]
    return box["value"]
