"""Advisory file locks (``fcntl.flock``) that keep several drivers on one machine out of each other's way.

A lock belongs to the open file, so it is released when its holder closes it or dies, ``kill -9`` included: a
crash never leaves a lock behind, and the lock file itself means nothing once nobody holds it. Locks exclude
processes on one machine, and on shared file systems whose ``flock`` works across machines (most NFS v4 and Lustre
mounts); elsewhere they are no-ops between machines. Where ``fcntl`` is missing (Windows) they do nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FileLock:
    """An exclusive lock on ``path`` (created with its folder if missing), taken with ``acquire`` or ``with``.

    Args:
        path: the lock file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock.

        Args:
            blocking: wait for a holder to let go; False returns at once.
            timeout: with ``blocking``, give up after this many seconds (None: wait as long as it takes).

        Returns:
            True once held; False if another holder kept it (``blocking=False``, or past ``timeout``).
        """
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover - Windows
            self._fd = fd
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    # A polling loop rather than a blocking flock when a timeout is asked for: flock has no timeout.
                    flags = fcntl.LOCK_EX if blocking and deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB
                    fcntl.flock(fd, flags)
                    self._fd = fd
                    return True
                except BlockingIOError:
                    if not blocking or (deadline is not None and time.monotonic() >= deadline):
                        os.close(fd)
                        return False
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        """Let go of the lock (closing the file releases it); a no-op when not held."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
