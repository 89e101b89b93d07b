"""Datasets whose sources could not be opened are tried again in the background: a sidecar
started while a database restarts serves it once it is back, without a restart of its own."""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("flightdeck.stack")


class LateDatasets:
    """Every ``every`` seconds, ``bring_in(name)`` for each of ``unopened()`` (None: never)."""

    def __init__(self, unopened: Callable[[], list[str]], bring_in: Callable[[str], bool],
                 every: float | None):
        self.unopened = unopened
        self.bring_in = bring_in
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retry unavailable datasets", daemon=True)

    def start(self) -> None:
        if self.every is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for name in self.unopened():
                if self._stop.is_set():
                    return
                try:
                    self.bring_in(name)
                except Exception as error:  # must not end the retries of every other dataset
                    log.error("dataset %s: trying its source again failed (%s)", name, type(error).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
