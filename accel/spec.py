"""What one dataset's acceleration asks for, in plain values (the config layer builds it)."""
from __future__ import annotations

from dataclasses import dataclass, field

ENGINES = ("duckdb", "sqlite", "arrow")
MODES = ("memory", "file")
REFRESH_MODES = ("full", "append", "changes")
SOURCE_RESET_ACTIONS = ("error", "resnapshot")  # changes: the source truncated or its schema changed
CONFLICT_ACTIONS = ("upsert", "drop")
READY_STATES = ("on_load", "on_registration")
ZERO_RESULT_ACTIONS = ("return_empty", "use_source")


@dataclass(frozen=True)
class AccelerationSpec:
    dataset: str                                  # qualified name, e.g. "public.orders"
    engine: str = "duckdb"
    mode: str = "memory"
    refresh_mode: str = "full"
    refresh_check_interval: float | None = None   # seconds; None: only on demand
    refresh_sql: str | None = None                # the working set, over the dataset's own name
    refresh_data_window: float | None = None      # seconds back from now, on time_column
    refresh_append_overlap: float = 0.0           # seconds re-read before the last seen time
    refresh_retry_enabled: bool = True
    refresh_retry_max_attempts: int = 3
    retention_period: float | None = None         # seconds; older rows are deleted locally
    retention_check_interval: float | None = None
    on_zero_results: str = "return_empty"
    primary_key: tuple[str, ...] = ()
    on_conflict: str = "upsert"
    indexes: tuple[str, ...] = ()
    time_column: str | None = None
    ready_state: str = "on_load"
    ready_timeout: float = 30.0                   # on_load: how long a query waits for the first load
    retry_base_delay: float = 1.0                 # first retry after about this many seconds
    retry_max_delay: float = 60.0
    on_source_reset: str = "error"                # changes: stop with an error, or take a new snapshot
    lag_window: int = 1000                        # changes: batches over which lag percentiles are taken
    extra: dict = field(default_factory=dict, compare=False)

    def problems(self) -> list[str]:
        """What is inconsistent in this spec, as messages naming the key."""
        found = []
        if self.engine == "arrow" and self.mode == "file":
            found.append("engine 'arrow' keeps data in memory only: use mode 'memory', "
                         "or engine 'duckdb'/'sqlite' for mode 'file'")
        if self.refresh_mode == "append" and not self.time_column:
            found.append("refresh_mode 'append' needs the dataset's time_column "
                         "(the last value seen is where the next refresh starts)")
        if self.refresh_append_overlap and not self.primary_key:
            found.append("refresh_append_overlap re-reads rows already copied: set primary_key "
                         "so they are deduplicated")
        if self.refresh_mode == "changes":
            for key in ("refresh_sql", "refresh_data_window", "refresh_check_interval"):
                if getattr(self, key) is not None:
                    found.append(f"{key} does not apply to refresh_mode 'changes': the copy follows "
                                 "every change of the whole table as it commits")
        for key in ("refresh_data_window", "retention_period"):
            if getattr(self, key) is not None and not self.time_column:
                found.append(f"{key} needs the dataset's time_column")
        return found


def changes_unsupported(kind: str) -> str:
    """What is wrong with ``refresh_mode: changes`` on a source of ``kind``, which cannot stream its changes."""
    return (f"refresh_mode 'changes' needs a source that streams its changes; {kind} does not: "
            "use refresh_mode 'full', or 'append' with a time_column")
