"""The server's TLS files, as the doors take them: read once, at start, with a precise error."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flightdeck.runtime_config import Tls


@dataclass(frozen=True)
class TlsFiles:
    """``runtime.tls`` resolved against the config's folder, its PEM contents checked readable."""
    cert: Path
    key: Path
    client_ca: Path | None

    @property
    def mutual(self) -> bool:
        """Every client must present a certificate signed by ``client_ca``."""
        return self.client_ca is not None


def tls_files(tls: Tls | None, base_dir: Path) -> TlsFiles | None:
    """The TLS files ``runtime.tls`` names, or None when TLS is off; raises ValueError naming
    the setting whose file is missing or unreadable."""
    if tls is None:
        return None
    resolved = {}
    for setting in ("cert", "key", "client_ca"):
        value = getattr(tls, setting)
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
