"""Work on datasets in the background, each on a thread of its own: datasets whose sources could
not be opened are tried again (a sidecar started while a database restarts serves them once it is
back, without a restart of its own), and the columns of sources that may change are checked."""
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


class DatasetWork:
    """Every ``tick`` seconds (None: never), ``work(name)`` for each dataset ``due()`` names, each on
    a thread of its own: a source that hangs holds up no other dataset's work, and its own next turn
    waits for it. ``done(name, outcome)`` is told each outcome (None: ``work`` raised), under the lock."""

    def __init__(self, label: str, tick: float | None, due: Callable[[], list[str]],
                 work: Callable[[str], str | None]):
        self.label = label  # what the work is, for thread names and the log
        self.tick = tick
        self.due = due
        self.work = work
        self.lock = threading.Lock()
        self._running: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)

    def start(self) -> None:
        if self.tick is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            with self.lock:
                names = [name for name in self.due() if name not in self._running]
                self._running.update(names)
            for name in names:
                threading.Thread(target=self._work, args=(name,), name=f"{self.label}: {name}", daemon=True).start()

    def _work(self, name: str) -> None:
        outcome = None
        try:
            if not self._stop.is_set():
                outcome = self.work(name)
        except Exception as error:  # must not end the work on this or any other dataset
            log.error("dataset %s: %s failed (%s)", name, self.label, type(error).__name__)
        finally:
            with self.lock:
                self._running.discard(name)
                self.done(name, outcome)

    def done(self, name: str, outcome: str | None) -> None:
        pass

    def stop(self) -> None:
        """No work starts from now on; work under way is not waited for."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class LateDatasets(DatasetWork):
    """Tries ``bring_in(name)`` for each of ``names``, first ``every`` seconds after start, then
    backing off (doubling, up to ``LONGEST_WAIT_SECONDS``) while it says UNAVAILABLE; ``every``
    None: never."""

    def __init__(self, names: list[str], bring_in: Callable[[str], str], every: float | None):
        super().__init__("trying its source again", None if every is None else min(every, 1.0), self._due_now,
                         bring_in)
        self.every = every
        self._due = {name: 0.0 for name in names}    # the monotonic time of each one's next attempt
        self._failures = {name: 0 for name in names}

    def start(self) -> None:
        if self.every is not None:
            now = time.monotonic()
            self._due = {name: now + self.every for name in self._due}
        super().start()

    def add(self, name: str) -> None:
        """Tries ``name`` again too, from ``every`` seconds on."""
        if self.every is None:
            return
        with self.lock:
            self._due[name] = time.monotonic() + self.every
            self._failures[name] = 0

    def pending(self) -> list[str]:
        with self.lock:
            return sorted(self._due)

    def _due_now(self) -> list[str]:
        now = time.monotonic()
        return [name for name, at in self._due.items() if at <= now]

    def done(self, name: str, outcome: str | None) -> None:
        if outcome not in (UNAVAILABLE, None):
            self._due.pop(name, None)
            return
        self._failures[name] += 1
        wait = min(self.every * 2 ** self._failures[name], max(self.every, LONGEST_WAIT_SECONDS))
        self._due[name] = time.monotonic() + wait


class SchemaChecks(DatasetWork):
    """Every ``every`` seconds, ``check(name)`` for each of ``names()`` (None: never)."""

    def __init__(self, names: Callable[[], list[str]], check: Callable[[str], None], every: float | None):
        super().__init__("checking its source's columns", every, names, check)
