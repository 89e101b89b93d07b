"""The `runtime:` section of flightdeck.yaml: where the doors listen, who may call, the limits."""
from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class User(Strict):
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    refresh: bool = True  # may refresh accelerated datasets on demand


class ApiKey(Strict):
    """An API key with a name (shown in logs, never the key) and what it may do beyond reading."""
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)
    refresh: bool = False  # may refresh accelerated datasets on demand


class Auth(Strict):
    api_keys: list[str | ApiKey] = Field(default_factory=list)  # a plain string: a key that may do everything
    users: list[User] = Field(default_factory=list)

    def keys(self) -> list[ApiKey]:
        return [k if isinstance(k, ApiKey) else ApiKey(name=API_KEY_NAME, key=k, refresh=True)
                for k in self.api_keys if (k.key if isinstance(k, ApiKey) else k)]

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.users)


class Limits(Strict):
    max_batch_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=15 * 1024 * 1024)
    batch_rows: int = Field(default=65_536, ge=1024, le=1_048_576)
    prepared_statement_ttl_seconds: int = Field(default=3600, ge=1)
    plan_cache_entries: int = Field(default=512, ge=0, le=100_000)  # statements kept planned (0: none)


class Mcp(Strict):
    """MCP tool results sized for a model's context (a result over a cap comes back cut, marked
    ``truncated`` with a notice), and the Host headers its HTTP endpoint accepts besides loopback."""
    max_rows: int = Field(default=1000, ge=1, le=100_000)
    max_chars: int = Field(default=50_000, ge=1000, le=10_000_000)
    allowed_hosts: list[str] = Field(default_factory=list)  # e.g. "flightdeck.internal:8090"


class RuntimeConfig(Strict):
    data_dir: str = ".flightdeck"  # file-mode copies and model caches, relative to the config file
    flight: Endpoint = Field(default_factory=lambda: Endpoint(port=FLIGHT_PORT))
    http: Endpoint = Field(default_factory=lambda: Endpoint(port=HTTP_PORT))
    auth: Auth = Field(default_factory=Auth)
    limits: Limits = Field(default_factory=Limits)
    mcp: Mcp = Field(default_factory=Mcp)

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
