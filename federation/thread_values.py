"""Values set for the length of a block on one thread: what a query's work started on that thread
finds (its cancellation, its patience for a load budget's slot, its pinned reads)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def set_for_block(local: threading.local, name: str, value: Any) -> Iterator[Any]:
    """``local.<name>`` is ``value`` on this thread inside the block, and what it was after."""
    previous = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield value
    finally:
        setattr(local, name, previous)
