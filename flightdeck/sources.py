"""A configuration's datasets as their sources see them, without starting a stack
(for `flightdeck validate`, `flightdeck datasets -c` and `flightdeck cdc cleanup`)."""
from __future__ import annotations

from federation.catalog import Catalog
from federation.changes import ChangeSource
from flightdeck.config import ConfigError, LoadedConfig


def source_problems(loaded: LoadedConfig) -> list[tuple[str, str, str]]:
    """(dataset, source kind, problem) for each dataset whose source cannot be read."""
    catalog = Catalog(loaded.config.dataset_specs(), loaded.base_dir)
    try:
        return [(d.spec.name, d.spec.kind, loaded.redact(d.error))
                for d in catalog.datasets.values() if d.error]
    finally:
        catalog.close()


def dataset_overview(loaded: LoadedConfig, count_rows: bool) -> list[dict]:
    """One row per dataset: name, source kind, state, rows (where cheap to count), schema or problem."""
    catalog = Catalog(loaded.config.dataset_specs(), loaded.base_dir)
    rows = []
    try:
        for dataset in catalog.datasets.values():
            count = None
            if count_rows and dataset.connector is not None:
                count = dataset.connector.row_count(dataset.spec.location)
            schema = ", ".join(f"{f.name} {f.type}" for f in dataset.arrow_schema) \
                if dataset.arrow_schema is not None else loaded.redact(dataset.error or "")
            rows.append({"name": dataset.qualified_name, "kind": dataset.spec.kind, "state": dataset.state,
                         "rows": count, "schema": schema})
    finally:
        catalog.close()
    return rows


def cleanup_changes(loaded: LoadedConfig, names: tuple[str, ...] = ()) -> list[str]:
    """Drop what the sources keep for ``refresh_mode: changes`` datasets (a replication slot,
    a publication): the named ones, or all of them. Returns the datasets cleaned up."""
    following = sorted(spec.dataset for spec in loaded.config.acceleration_specs()
                       if spec.refresh_mode == "changes")
    wanted = [name if name in following or "." in name else f"public.{name}" for name in names] or following
    unknown = [name for name in wanted if name not in following]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a refresh_mode 'changes' dataset of this configuration "
                          f"(those are: {', '.join(following) or 'none'})")
    catalog = Catalog(loaded.config.dataset_specs(), loaded.base_dir)
    try:
        for name in wanted:
            dataset = catalog.datasets[name]
            if dataset.error or not isinstance(dataset.source_connector, ChangeSource):
                raise ConfigError(f"{name}: {loaded.redact(dataset.error or 'its source streams no changes')}")
            dataset.source_connector.cleanup(dataset.spec.location)
    finally:
        catalog.close()
    return wanted
