"""One writer per run folder: an advisory lock (``flock``) on ``<folder>/.lock`` held while a process uses it.

* A second, independent process that opens the same folder is refused with an error naming the holder (pid,
  host, start time), instead of both writing results unknowingly.
* The lock belongs to the process: a killed process releases it (the kernel drops ``flock`` locks), so a
  resume is never blocked by a stale file; several objects of one process share it (counted).
* ``torchrun`` jobs: only rank 0 takes the lock and records its job id (``TORCHELASTIC_RUN_ID``, or the
  rendezvous ``MASTER_ADDR:MASTER_PORT`` under other launchers); ranks > 0
  of the same job do not lock, they check that the holder is their own job's rank 0 (waiting briefly for it),
  so the ranks of one job share one folder and a rank of another job is refused.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import threading
import time
import weakref
from pathlib import Path

from dori.errors import DoriError

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # resolved folder -> [fd, count]
_guard = threading.Lock()


def _job() -> tuple[str | None, int, int]:
    """(job id, rank, world size) from torchrun's environment (None, 0, 1 outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job is None and world > 1 and os.environ.get("MASTER_PORT"):  # other launchers: the rendezvous address
        job = f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ['MASTER_PORT']}"
    return job, rank, world


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    job = f", torchrun job {info['job']}" if info.get("job") else ""
    return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')}{job})"


class RunLock:
    """This process's hold on one folder; released when every holder object is closed or collected."""

    def __init__(self, folder: str | Path, wait_s: float = 120.0):
        import fcntl

        self.folder = Path(folder)
        self.key = str(self.folder.resolve())
        self.path = self.folder / LOCK_NAME
        self._open = False
        job, rank, world = _job()
        if world > 1 and rank > 0:  # trust rank 0 of this same job; refuse any other holder
            deadline = time.monotonic() + wait_s
            while True:
                info = _holder(self.path)
                if job is not None and info.get("job") == job:
                    return
                if time.monotonic() > deadline:
                    raise DoriError(
                        f"run folder {self.folder} is not held by rank 0 of this torchrun job ({job}): held by "
                        f"{_describe(info)}; use another --out"
                    )
                time.sleep(0.2)
        with _guard:
            if self.key in _held:
                _held[self.key][1] += 1
            else:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as err:
                    raise DoriError(
                        f"cannot write in run folder {self.folder}: {err.strerror or err}"
                    ) from err
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    os.close(fd)
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise DoriError(
                            f"run folder {self.folder} is in use by {_describe(_holder(self.path))}; wait for it "
                            "to finish or use another --out (two processes never write one run folder)"
                        ) from err
                    fd = -1  # the file system has no locks (some network mounts): go on unlocked
                if fd >= 0:
                    info = {"pid": os.getpid(), "host": platform.node(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job": job}  # fmt: skip
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps(info).encode(), 0)
                _held[self.key] = [fd, 1]
        self._open = True
        self._finalizer = weakref.finalize(self, _release, self.key)

    def close(self) -> None:
        """Give up this object's hold (the lock goes when the process's last holder closes)."""
        if self._open:
            self._open = False
            self._finalizer()


def _release(key: str) -> None:
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            if entry[0] >= 0:
                os.close(entry[0])  # closing the descriptor drops the flock
