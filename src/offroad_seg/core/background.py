"""A small thread pool with back-pressure, for writes that overlap computation."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class BoundedPool:
    """Runs submitted calls on `threads` threads with at most `max_pending` in flight: a
    submit waits for the oldest call when full, so memory stays bounded, and a failed call
    raises in the submitting thread at its next submit or at `drain`."""

    def __init__(self, threads: int, max_pending: int, name: str = "writer") -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending

    def submit(self, fn: Callable, *args) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every submitted call (raising the first failure) and stop the threads."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)
