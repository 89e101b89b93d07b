"""Datasets whose sources could not be opened are tried again in the background: a sidecar
started while a database restarts serves it once it is back, without a restart of its own."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("flightdeck.stack")

# What one attempt to bring a dataset in came to.
SERVED = "served"
UNAVAILABLE = "unavailable"  # its source still cannot be opened, or it failed to set up: later
REFUSED = "refused"          # it breaks the configuration (its error says how): never again

# The longest wait between two attempts on one dataset, once its attempts have backed off.
LONGEST_WAIT_SECONDS = 300.0


class LateDatasets:
    """Tries ``bring_in(name)`` for each of ``names``, first ``every`` seconds after start, then
    backing off (doubling, up to ``LONGEST_WAIT_SECONDS``) while it says UNAVAILABLE; ``every``
    None: never. Each attempt runs on a thread of its own: a source that hangs delays no other
    dataset's attempts (and never its own next one, which waits for it), nor the stop."""

    def __init__(self, names: list[str], bring_in: Callable[[str], str], every: float | None):
        self.bring_in = bring_in
        self.every = every
        self._lock = threading.Lock()
        self._due = {name: 0.0 for name in names}    # the monotonic time of each one's next attempt
        self._failures = {name: 0 for name in names}
        self._running: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retry unavailable datasets", daemon=True)

    def start(self) -> None:
        if self.every is not None:
            now = time.monotonic()
            self._due = {name: now + self.every for name in self._due}
            self._thread.start()

    def add(self, name: str) -> None:
        """Tries ``name`` again too, from ``every`` seconds on."""
        if self.every is None:
            return
        with self._lock:
            self._due[name] = time.monotonic() + self.every
            self._failures[name] = 0

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._due)

    def _run(self) -> None:
        while not self._stop.wait(min(self.every, 1.0)):
            now = time.monotonic()
            with self._lock:
                due = [name for name, at in self._due.items() if at <= now and name not in self._running]
                self._running.update(due)
            for name in due:
                threading.Thread(target=self._attempt, args=(name,), name=f"retry {name}", daemon=True).start()

    def _attempt(self, name: str) -> None:
        try:
            outcome = self.bring_in(name)
        except Exception as error:  # must not end the retries of this or any other dataset
            log.error("dataset %s: trying its source again failed (%s)", name, type(error).__name__)
            outcome = UNAVAILABLE
        with self._lock:
            self._running.discard(name)
            if outcome != UNAVAILABLE:
                self._due.pop(name, None)
                return
            self._failures[name] += 1
            wait = min(self.every * 2 ** self._failures[name], max(self.every, LONGEST_WAIT_SECONDS))
            self._due[name] = time.monotonic() + wait

    def stop(self) -> None:
        """No attempt starts from now on; one under way is not waited for."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class SchemaChecks:
    """Every ``every`` seconds, ``check(name)`` for each of ``names()`` (None: never), each on a
    thread of its own: a source that hangs holds up no other dataset's check, and its own next
    check waits for it."""

    def __init__(self, names: Callable[[], list[str]], check: Callable[[str], None], every: float | None):
        self.names = names
        self.check = check
        self.every = every
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="check source schemas", daemon=True)

    def start(self) -> None:
        if self.every is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                due = [name for name in self.names() if name not in self._running]
                self._running.update(due)
            for name in due:
                threading.Thread(target=self._check, args=(name,), name=f"check {name}", daemon=True).start()

    def _check(self, name: str) -> None:
        try:
            if not self._stop.is_set():
                self.check(name)
        except Exception as error:  # must not end the checks of this or any other dataset
            log.error("dataset %s: checking its source's columns failed (%s)", name, type(error).__name__)
        finally:
            with self._lock:
                self._running.discard(name)

    def stop(self) -> None:
        """No check starts from now on; one under way is not waited for."""
        self._stop.set()
