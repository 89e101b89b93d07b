"""flightdeck.yaml: loading, `${env:NAME}` substitution and validation.

Key names follow Spice AI's spicepod where the feature is the same. Errors name
the key by its path (``datasets[1].from``) and say what was expected; they never
repeat a value, so a secret in a bad place is not echoed back.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from accel.spec import AccelerationSpec, changes_unsupported
from flightdeck.runtime_config import RuntimeConfig, Strict
from flightdeck.search_functions import ColumnSearchSpec
from inference.ann import EXPANSION_SEARCH
from federation.catalog import DatasetSpec
from federation.connectors import check_kind, streams_changes
from inference.errors import ModelError
from inference.registry import BUNDLED_MINILM, ModelRegistry

ENV_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
DATASET_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


class ConfigError(ValueError):
    """The configuration is invalid; str() lists every problem, one per line."""


def parse_duration(value: Any) -> float | None:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h``, ``7d`` (a bare number is seconds)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = DURATION.match(str(value))
    if not match:
        raise ValueError("expected a duration such as '30s', '5m', '1h' or '7d'")
    return float(match.group(1)) * DURATION_SECONDS[match.group(2)]


Duration = float | str | None


class Acceleration(Strict):
    """Spice AI's acceleration keys, where the feature is the same."""
    enabled: bool = True
    engine: Literal["duckdb", "sqlite", "arrow"] = "duckdb"
    mode: Literal["memory", "file"] = "memory"
    refresh_mode: Literal["full", "append", "changes"] = "full"
    refresh_check_interval: Duration = None
    refresh_sql: str | None = None
    refresh_data_window: Duration = None
    refresh_append_overlap: Duration = None
    refresh_retry_enabled: bool = True
    refresh_retry_max_attempts: int = Field(default=3, ge=1, le=100)
    retention_period: Duration = None
    retention_check_interval: Duration = None
    on_zero_results: Literal["return_empty", "use_source"] = "return_empty"
    primary_key: str | list[str] | None = None
    on_conflict: Literal["upsert", "drop"] | dict[str, Literal["upsert", "drop"]] = "upsert"
    indexes: dict[str, Literal["enabled", "unique"]] = Field(default_factory=dict)
    ready_timeout: Duration = 30.0
    # refresh_mode changes: when the source table is truncated or its schema changes, stop
    # following it with an error in status, or take a new snapshot and follow on.
    refresh_on_source_reset: Literal["error", "resnapshot"] = "error"

    @field_validator("refresh_check_interval", "refresh_data_window", "refresh_append_overlap",
                     "retention_period", "retention_check_interval", "ready_timeout")
    @classmethod
    def _duration(cls, value: Duration) -> float | None:
        seconds = parse_duration(value)
        if seconds is not None and seconds < 0:
            raise ValueError("a duration cannot be negative")
        return seconds

    def key_columns(self) -> tuple[str, ...]:
        if self.primary_key is None:
            return ()
        if isinstance(self.primary_key, str):
            return tuple(c.strip() for c in self.primary_key.split(",") if c.strip())
        return tuple(self.primary_key)

    def conflict_action(self) -> str:
        # Spice writes `on_conflict: {key: upsert}`; one action applies to the whole key.
        if isinstance(self.on_conflict, dict):
            return next(iter(self.on_conflict.values()), "upsert")
        return self.on_conflict


class Chunking(Strict):
    enabled: bool = True
    target_chunk_size: int = Field(default=800, ge=50, le=100_000)   # characters
    overlap_size: int = Field(default=100, ge=0, le=10_000)


class VectorIndexConfig(Strict):
    # Chunks from which vector search goes through an approximate (HNSW) index; below, it is
    # exact brute force, which is as fast at that size and needs no index.
    approximate_above: int = Field(default=20_000, ge=0)
    # Candidates the index considers per search (HNSW's efSearch): higher finds more of the
    # exact top k, slower.
    ef_search: int = Field(default=EXPANSION_SEARCH, ge=16, le=100_000)


class ColumnEmbedding(Strict):
    from_: str = Field(alias="from")   # the name of an embedding model (`minilm` is always there)
    chunking: Chunking | None = None
    vector_index: VectorIndexConfig = Field(default_factory=VectorIndexConfig)


class FullTextSearch(Strict):
    enabled: bool = True


class ColumnConfig(Strict):
    name: str
    description: str = ""
    embeddings: list[ColumnEmbedding] = Field(default_factory=list, max_length=1)
    full_text_search: FullTextSearch | None = None

    @property
    def searchable(self) -> bool:
        return bool(self.embeddings) or bool(self.full_text_search and self.full_text_search.enabled)


class DatasetConfig(Strict):
    from_: str = Field(alias="from")
    name: str
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    time_column: str | None = None
    ready_state: Literal["on_load", "on_registration"] = "on_load"
    acceleration: Acceleration | None = None
    columns: list[ColumnConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent_acceleration(self) -> "DatasetConfig":
        spec = self.acceleration_spec()
        if spec is not None and spec.problems():
            raise ValueError(f"acceleration: {spec.problems()[0]}")
        kind = self.from_.partition(":")[0]
        if spec is not None and spec.refresh_mode == "changes" and streams_changes(kind) is False:
            raise ValueError(f"acceleration: {changes_unsupported(kind)}")  # told now, not when it first opens
        searchable = [c.name for c in self.columns if c.searchable]
        if searchable and not self.accelerated:
            raise ValueError(f"columns {searchable}: embeddings and full-text search are built when the "
                             "accelerated copy refreshes: enable acceleration on this dataset")
        return self

    def search_specs(self) -> list[ColumnSearchSpec]:
        specs = []
        for column in self.columns:
            if not column.searchable:
                continue
            embedding = column.embeddings[0] if column.embeddings else None
            chunking = embedding.chunking if embedding and embedding.chunking else None
            specs.append(ColumnSearchSpec(
                dataset=self.qualified_name, column=column.name, model=embedding.from_ if embedding else None,
                chunking=bool(chunking and chunking.enabled),
                target_chunk_size=chunking.target_chunk_size if chunking else 800,
                overlap_size=chunking.overlap_size if chunking else 100,
                full_text=bool(column.full_text_search and column.full_text_search.enabled),
                approximate_above=embedding.vector_index.approximate_above if embedding else 0,
                ef_search=embedding.vector_index.ef_search if embedding else EXPANSION_SEARCH))
        return specs

    @property
    def qualified_name(self) -> str:
        return self.spec().qualified_name

    @property
    def accelerated(self) -> bool:
        return self.acceleration is not None and self.acceleration.enabled

    def acceleration_spec(self) -> AccelerationSpec | None:
        if not self.accelerated:
            return None
        a = self.acceleration
        return AccelerationSpec(
            dataset=self.qualified_name, engine=a.engine, mode=a.mode, refresh_mode=a.refresh_mode,
            refresh_check_interval=a.refresh_check_interval, refresh_sql=a.refresh_sql,
            refresh_data_window=a.refresh_data_window,
            refresh_append_overlap=a.refresh_append_overlap or 0.0,
            refresh_retry_enabled=a.refresh_retry_enabled,
            refresh_retry_max_attempts=a.refresh_retry_max_attempts,
            retention_period=a.retention_period, retention_check_interval=a.retention_check_interval,
            on_zero_results=a.on_zero_results, primary_key=a.key_columns(),
            on_conflict=a.conflict_action(), indexes=tuple(a.indexes), time_column=self.time_column,
            ready_state=self.ready_state, ready_timeout=a.ready_timeout,
            on_source_reset=a.refresh_on_source_reset)

    @field_validator("from_")
    @classmethod
    def _known_connector(cls, value: str) -> str:
        kind, separator, location = value.partition(":")
        if not separator or not location:
            raise ValueError("expected '<connector>:<location>', e.g. 'file:data/orders.parquet'")
        problem = check_kind(kind)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not DATASET_NAME.match(value):
            raise ValueError("expected a lowercase name like 'orders' or 'app.orders' "
                             "(letters, digits, underscores; at most one schema)")
        return value

    def spec(self) -> DatasetSpec:
        return DatasetSpec(name=self.name, source=self.from_, params=self.params,
                           description=self.description, accelerated=self.accelerated)


MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _model_name(value: str) -> str:
    if not MODEL_NAME.match(value):
        raise ValueError("expected a name like 'minilm' or 'churn-v2' (letters, digits, '_', '.', '-'); "
                         "SQL calls it by this name, e.g. embed(text, 'minilm')")
    return value


def _check_with_registry(**entries) -> None:
    """The rules that tie keys together (a .onnx file needs a tokenizer, ...) live in the registry."""
    try:
        ModelRegistry(**entries)
    except ModelError as error:  # the location already names the entry
        raise ValueError(re.sub(r"^(embedding )?model '[^']*': ", "", str(error))) from None


class EmbeddingParams(Strict):
    quantization: Literal["none", "int8"] = "none"
    threads: int | None = Field(default=None, ge=1, le=1024)           # onnxruntime intra-op threads
    inter_op_threads: int | None = Field(default=None, ge=1, le=1024)
    batch_size: int | None = Field(default=None, ge=1, le=65_536)      # texts per onnxruntime run
    max_seq_length: int | None = Field(default=None, ge=2, le=8192)    # tokens; longer texts are cut
    tokenizer: str | None = None                                        # tokenizer.json, for .onnx files
    pooling: Literal["mean", "cls", "max"] | None = None               # .onnx files only
    normalize: bool | None = None                                       # .onnx files only

    @field_validator("quantization", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class _NamedModel(Strict):
    name: str
    from_: str = Field(alias="from")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _model_name(value)


class EmbeddingConfig(_NamedModel):
    """`embeddings[]`: a text embedding model, called in SQL as embed(text, 'name');
    `from`: minilm | huggingface:sentence-transformers/all-MiniLM-L6-v2 | file:PATH."""
    params: EmbeddingParams = Field(default_factory=EmbeddingParams)

    @field_validator("from_")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.strip().lower() in BUNDLED_MINILM or value.startswith("file:"):
            return value
        if value.startswith("huggingface:"):
            raise ValueError("only huggingface:sentence-transformers/all-MiniLM-L6-v2 is bundled (there is no "
                             "model hub access); save another model to a folder and use file:path/to/folder")
        raise ValueError("expected minilm, huggingface:sentence-transformers/all-MiniLM-L6-v2, "
                         "file:<sentence-transformers folder> or file:<model>.onnx")

    @model_validator(mode="after")
    def _loadable(self) -> "EmbeddingConfig":
        _check_with_registry(embeddings=[self.registry_entry()])
        return self

    def registry_entry(self) -> dict[str, Any]:
        return {"name": self.name, "from": self.from_,
                "params": self.params.model_dump(exclude_none=True, exclude_defaults=True)}


class ModelParams(Strict):
    threads: int | None = Field(default=None, ge=1, le=1024)
    inter_op_threads: int | None = Field(default=None, ge=1, le=1024)


class ModelConfig(_NamedModel):
    """`models[]`: a tabular ONNX model (e.g. from skl2onnx), called as predict('name', col, ...);
    `from`: file:PATH.onnx."""
    params: ModelParams = Field(default_factory=ModelParams)

    @field_validator("from_")
    @classmethod
    def _onnx_file(cls, value: str) -> str:
        if not value.startswith("file:") or not value.lower().endswith(".onnx"):
            raise ValueError("expected 'file:<path>.onnx' (an ONNX file, e.g. exported with skl2onnx)")
        return value

    def registry_entry(self) -> dict[str, Any]:
        return {"name": self.name, "from": self.from_, "params": self.params.model_dump(exclude_none=True)}


def _unique(entries: list, key: str) -> None:
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if entry.name in seen:
            raise ValueError(f"{key}[{index}].name: '{entry.name}' is already used by {key}[{seen[entry.name]}]")
        seen[entry.name] = index


class FlightdeckConfig(Strict):
    version: str = "v1"
    kind: str = "Flightdeck"
    name: str = "flightdeck"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    datasets: list[DatasetConfig] = Field(default_factory=list)
    # None (no key): only the bundled `minilm`; it is there in any case unless a list names its own.
    embeddings: list[EmbeddingConfig] | None = None
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_model_names(self) -> "FlightdeckConfig":
        _unique(self.embeddings or [], "embeddings")
        _unique(self.models, "models")
        return self

    @model_validator(mode="after")
    def _known_column_models(self) -> "FlightdeckConfig":
        known = {e.name for e in self.embeddings or []} | {"minilm"}  # the bundled one is always there
        for index, dataset in enumerate(self.datasets):
            for column_index, column in enumerate(dataset.columns):
                for embedding in column.embeddings:
                    if embedding.from_ not in known:
                        raise ValueError(
                            f"datasets[{index}].columns[{column_index}].embeddings[0].from: unknown embedding "
                            f"model '{embedding.from_}' (known: {', '.join(sorted(known))})")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "FlightdeckConfig":
        seen: dict[str, int] = {}
        for index, dataset in enumerate(self.datasets):
            qualified = dataset.qualified_name
            if qualified in seen:
                raise ValueError(f"datasets[{index}].name: '{dataset.name}' is already used "
                                 f"by datasets[{seen[qualified]}]")
            seen[qualified] = index
        return self

    def dataset_specs(self) -> list[DatasetSpec]:
        return [d.spec() for d in self.datasets]

    def search_specs(self) -> list[ColumnSearchSpec]:
        return [spec for dataset in self.datasets for spec in dataset.search_specs()]

    def acceleration_specs(self) -> list[AccelerationSpec]:
        return [spec for spec in (d.acceleration_spec() for d in self.datasets) if spec is not None]


class LoadedConfig:
    """A validated config plus where it came from (relative paths resolve against it)."""

    def __init__(self, config: FlightdeckConfig, base_dir: Path, secrets: set[str]):
        self.config = config
        self.base_dir = base_dir
        self.secrets = secrets  # substituted values, to mask wherever text leaves the process

    @property
    def data_dir(self) -> Path:
        path = Path(self.config.runtime.data_dir).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> LoadedConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    return parse_config(raw if raw is not None else {}, path.parent.resolve(), environ)


def parse_config(raw: Any, base_dir: Path, environ: dict[str, str] | None = None) -> LoadedConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a mapping of keys (version, runtime, datasets)")
    secrets: set[str] = set()
    problems: list[str] = []
    substituted = _substitute(raw, environ if environ is not None else dict(os.environ),
                              "", secrets, problems)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        config = FlightdeckConfig.model_validate(substituted)
    except ValidationError as error:
        raise ConfigError("\n".join(_describe(e) for e in error.errors())) from None
    return LoadedConfig(config, base_dir, secrets)


def _substitute(value: Any, environ: dict[str, str], where: str, secrets: set[str],
                problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, environ, f"{where}.{k}" if where else str(k), secrets, problems)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, environ, f"{where}[{i}]", secrets, problems)
                for i, v in enumerate(value)]
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in environ:
                problems.append(f"{where}: environment variable {name} is not set")
                return ""
            secrets.add(environ[name])
            return environ[name]
        return ENV_REFERENCE.sub(replace, value)
    return value


def _describe(error: dict) -> str:
    location = _location(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{location}: unknown key"
    if kind == "missing":
        return f"{location}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def _location(parts: tuple) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + ("from" if part == "from_" else str(part))
    return text
