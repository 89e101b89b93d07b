"""The `runtime:` section of flightdeck.yaml: where the doors listen, who may call, the limits."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flightdeck.grants import Grant

FLIGHT_PORT = 50051
HTTP_PORT = 8090


class Strict(BaseModel):
    """A config section that refuses unknown keys."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Endpoint(Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    enabled: bool = True

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


API_KEY_NAME = "api-key"


class QueryLimitSettings(Strict):
    """Limits a principal may be given its own values of (under its key's ``limits``)."""
    query_timeout_seconds: float | None = Field(default=None, gt=0)   # the whole query, streaming included
    max_result_rows: int | None = Field(default=None, ge=1)
    max_result_bytes: int | None = Field(default=None, ge=1)
    max_concurrent_queries: int | None = Field(default=None, ge=1)  # of this principal
    requests_per_second: float | None = Field(default=None, gt=0)  # requests of this principal, sustained


class Granted(Strict):
    """What a principal may read: datasets by glob over ``schema.table`` (a bare name or glob
    means the ``public`` schema; no ``*`` reaches across the dot, and ``*`` alone is everything), and for some of them the only columns it sees. Everything else
    does not exist for it. ``masks`` show some columns only masked: ``redact`` as NULL, ``hash``
    as a keyed hash (runtime.auth.mask_key), before any filter, join or function sees them."""
    datasets: list[str] = Field(default_factory=lambda: ["*"])
    columns: dict[str, list[str]] = Field(default_factory=dict)  # dataset -> its visible columns
    masks: dict[str, dict[str, Literal["redact", "hash"]]] = Field(default_factory=dict)  # dataset -> column -> mask
    audit: bool = False  # may read every principal's rows of flightdeck.runtime.queries, not only its own
    limits: QueryLimitSettings = Field(default_factory=QueryLimitSettings)

    def grant(self) -> Grant:
        return Grant.of(self.datasets, self.columns, self.masks, self.audit)

    def hashes(self) -> bool:
        """Whether a column is shown hashed (which needs runtime.auth.mask_key)."""
        return any("hash" in kinds.values() for kinds in self.masks.values())

    @model_validator(mode="after")
    def _columns_name_granted_datasets(self) -> "Granted":
        for dataset, columns in self.columns.items():
            if not columns:
                raise ValueError(f"columns of {dataset}: list at least one column (or leave the dataset out)")
        return self


class User(Granted):
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    refresh: bool = True  # may refresh accelerated datasets on demand


class ApiKey(Granted):
    """An API key with a name (shown in logs, never the key), what it may read, and whether it
    may refresh. ``key_sha256`` (hex) instead of ``key`` keeps the secret out of the config."""
    name: str = Field(min_length=1)
    key: str | None = Field(default=None, min_length=1)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    refresh: bool = False  # may refresh accelerated datasets on demand

    @model_validator(mode="after")
    def _one_secret(self) -> "ApiKey":
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"api key {self.name}: give exactly one of key and key_sha256")
        return self


class Auth(Strict):
    api_keys: list[str | ApiKey] = Field(default_factory=list)  # a plain string: a key that may do everything
    users: list[User] = Field(default_factory=list)
    # The key of `hash` masks (e.g. "${env:FLIGHTDECK_MASK_KEY}"): one key, so hashed keys join across datasets.
    mask_key: str | None = Field(default=None, min_length=16)

    def keys(self) -> list[ApiKey]:
        return [k if isinstance(k, ApiKey) else ApiKey(name=API_KEY_NAME, key=k, refresh=True)
                for k in self.api_keys if (isinstance(k, ApiKey) or k)]

    @model_validator(mode="after")
    def _names_unique(self) -> "Auth":
        names = [k.name for k in self.api_keys if isinstance(k, ApiKey)] + [u.username for u in self.users]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"runtime.auth: each key and user needs its own name ({', '.join(repeated)} "
                             "is given twice): the name is whose queries and handles are whose")
        hashing = [k.name for k in self.keys() if k.hashes()] + [u.username for u in self.users if u.hashes()]
        if hashing and not self.mask_key:
            raise ValueError(f"runtime.auth: {', '.join(hashing)} shows columns hashed (masks: hash): set "
                             "runtime.auth.mask_key (at least 16 characters, e.g. \"${env:FLIGHTDECK_MASK_KEY}\")")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.users)


class Limits(Strict):
    max_batch_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=15 * 1024 * 1024)
    batch_rows: int = Field(default=65_536, ge=1024, le=1_048_576)
    prepared_statement_ttl_seconds: int = Field(default=3600, ge=1)
    plan_cache_entries: int = Field(default=512, ge=0, le=100_000)  # statements kept planned (0: none)
    query_timeout_seconds: float | None = Field(default=300.0, gt=0)
    max_result_rows: int | None = Field(default=None, ge=1)
    max_result_bytes: int | None = Field(default=None, ge=1)
    max_concurrent_queries: int = Field(default=32, ge=1)                # in all
    max_concurrent_queries_per_principal: int = Field(default=8, ge=1)
    admission_wait_seconds: float = Field(default=2.0, ge=0)  # how long a query waits for a place
    requests_per_second: float | None = Field(default=None, gt=0)  # per principal, sustained (None: no limit)
    # The engine's memory for sorts, joins and aggregates (bytes, or "4GB", "512MiB"): over it a
    # query fails with LIMIT_EXCEEDED; each DuckDB copy gets the same ceiling.
    memory_limit: int = Field(default=4 * 2**30, ge=64 * 2**20)

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _memory_size(cls, value: object) -> object:
        return parse_bytes(value) if isinstance(value, str) else value
    max_sql_length: int = Field(default=100_000, ge=100)      # characters of one statement


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """A size such as "2GB", "512MiB" or "1073741824" in bytes; raises ValueError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 4GB, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


class Audit(Strict):
    """Every query's record: kept in ``flightdeck.runtime.queries`` (the last ``capacity``) and,
    with ``log`` set, as JSON lines in that file (rotated at ``max_bytes``, ``backups`` kept)."""
    log: str | None = None            # relative to the config file
    capacity: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=10 * 2**20, ge=4096)
    backups: int = Field(default=5, ge=0)
    parameters: bool = False          # record bound parameter values (by default only their count)


class Mcp(Strict):
    """MCP tool results sized for a model's context (a result over a cap comes back cut, marked
    ``truncated`` with a notice), and the Host headers its HTTP endpoint accepts besides loopback."""
    max_rows: int = Field(default=1000, ge=1, le=100_000)
    max_chars: int = Field(default=50_000, ge=1000, le=10_000_000)
    allowed_hosts: list[str] = Field(default_factory=list)  # e.g. "flightdeck.internal:8090"


class Tls(Strict):
    """Flight SQL and HTTP over TLS (PEM files, relative to the config file). With ``client_ca``
    every client must present a certificate signed by it (mutual TLS)."""
    cert: str = Field(min_length=1)       # the server's certificate chain
    key: str = Field(min_length=1)        # its private key
    client_ca: str | None = None          # the CA that signs client certificates

    def files(self, base_dir: Path) -> "TlsFiles":
        """These files resolved against the config's folder, each checked to be a readable PEM
        file; raises ValueError naming the setting whose file is not."""
        resolved: dict[str, Path | None] = {}
        for setting in ("cert", "key", "client_ca"):
            value = getattr(self, setting)
            if value is None:
                resolved[setting] = None
                continue
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base_dir / path
            try:
                if b"-----BEGIN " not in path.read_bytes():
                    raise ValueError(f"runtime.tls.{setting}: {value} is not a PEM file")
            except OSError as error:
                raise ValueError(f"runtime.tls.{setting}: cannot read {value}: {error.strerror}") from None
            resolved[setting] = path
        return TlsFiles(**resolved)


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files a door serves with: its certificate and key, and with ``client_ca`` (mutual
    TLS) the CA every client certificate must chain to."""
    cert: Path
    key: Path
    client_ca: Path | None


class RuntimeConfig(Strict):
    data_dir: str = ".flightdeck"  # file-mode copies and model caches, relative to the config file
    flight: Endpoint = Field(default_factory=lambda: Endpoint(port=FLIGHT_PORT))
    http: Endpoint = Field(default_factory=lambda: Endpoint(port=HTTP_PORT))
    auth: Auth = Field(default_factory=Auth)
    limits: Limits = Field(default_factory=Limits)
    mcp: Mcp = Field(default_factory=Mcp)
    audit: Audit = Field(default_factory=Audit)
    tls: Tls | None = None
    # A dataset whose source cannot be opened (at startup, or at each try since) is tried again
    # this often; null: never.
    retry_unavailable_seconds: float | None = Field(default=30.0, gt=0)
    # The tables of datasets read where they are, in databases (PostgreSQL, MySQL, SQLite), are
    # described again this often; a dataset whose columns changed is read afresh. null: never.
    schema_check_seconds: float | None = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> "RuntimeConfig":
        for name in ("flight", "http"):
            endpoint = getattr(self, name)
            if endpoint.enabled and not endpoint.is_loopback() and not self.auth.enabled:
                raise ValueError(
                    f"runtime.{name}.host binds beyond loopback: set runtime.auth "
                    "(api_keys or users) first")
        return self

    def with_overrides(self, host: str | None = None, flight_port: int | None = None,
                       http_port: int | None = None) -> "RuntimeConfig":
        """This section with command-line choices applied and checked again (a host beyond
        loopback still needs auth); raises ValueError."""
        flight = self.flight.model_copy(update={k: v for k, v in (("host", host), ("port", flight_port))
                                                if v is not None})
        http = self.http.model_copy(update={k: v for k, v in (("host", host), ("port", http_port))
                                            if v is not None})
        try:
            return RuntimeConfig.model_validate({**self.model_dump(), "flight": flight.model_dump(),
                                                 "http": http.model_dump()})
        except ValidationError as error:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None
