"""The Runtime: one process wiring configuration, catalog, engine and front doors."""
from __future__ import annotations

import logging
import signal
import threading

from federation.catalog import Catalog
from federation.engine import EngineSettings, QueryEngine
from flight.auth import AuthPolicy
from flight.config import LoadedConfig
from flight.server import FlightSqlServer

log = logging.getLogger("flightdeck.runtime")


class Runtime:
    def __init__(self, loaded: LoadedConfig, flight_port: int | None = None,
                 flight_host: str | None = None):
        config = loaded.config
        runtime = config.runtime
        self.loaded = loaded
        self.catalog = Catalog(config.dataset_specs(), loaded.base_dir)
        self.engine = QueryEngine(self.catalog, EngineSettings(batch_rows=runtime.limits.batch_rows))
        host = flight_host or runtime.flight.host
        port = runtime.flight.port if flight_port is None else flight_port
        auth = AuthPolicy(runtime.auth.api_keys, {u.username: u.password for u in runtime.auth.users})
        self.server = FlightSqlServer(
            self.engine, f"grpc://{host}:{port}", auth,
            max_batch_bytes=runtime.limits.max_batch_bytes,
            handle_ttl_seconds=runtime.limits.prepared_statement_ttl_seconds,
            redact=loaded.redact)
        self.flight_url = f"grpc://{host}:{self.server.port}"
        self._stopped = threading.Event()

    def serve(self) -> None:
        """Serve until SIGINT/SIGTERM (or shutdown()); then release every backend."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.server.serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def _on_signal(self, signum, frame) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        # shutdown() waits for in-flight calls, so it must not run on the serving thread.
        threading.Thread(target=self.shutdown, daemon=True).start()

    def shutdown(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self.server.shutdown()

    def close(self) -> None:
        self.catalog.close()
