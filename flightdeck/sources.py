"""A configuration's datasets as their sources see them, without starting a stack
(for `flightdeck validate` and `flightdeck datasets -c`)."""
from __future__ import annotations

from federation.catalog import Catalog
from flightdeck.config import LoadedConfig


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
