"""The rooms: doors call the core, the core calls the engine, never the other way round."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("flight", "flightdeck", "federation", "accel", "inference")
ENGINE = {"federation", "accel", "inference"}
# What a door may take from the core: the Service and the types and errors it exposes.
CORE_FOR_DOORS = {"flightdeck", "flightdeck.service", "flightdeck.errors", "flightdeck.auth",
                  "flightdeck.runtime_config"}
PROTOCOL = {"pyarrow.flight", "grpc", "google.protobuf", "click", "flight"}
PROTOCOL_PACKAGES = ("grpc", "flight", "mcp", "starlette", "uvicorn")
# Which packages each package may import (DESIGN's arrows: flight -> flightdeck -> engine, accel -> federation).
ALLOWED = {"flight": {"flightdeck"}, "flightdeck": ENGINE, "accel": {"federation"},
           "federation": set(), "inference": set()}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_packages_exist():
    assert (REPO / "flightdeck" / "service.py").exists() and (REPO / "flight" / "flightsql" / "server.py").exists()
    assert not (REPO / "flight" / "config.py").exists() and not (REPO / "flight" / "runtime.py").exists()


@pytest.mark.parametrize("path", modules("flight"), ids=_name)
def test_no_door_imports_the_engine(path):
    engine = {m for m in imports(path) if m.split(".")[0] in ENGINE}
    assert not engine, f"{_name(path)} imports the engine directly: {sorted(engine)}"


@pytest.mark.parametrize("path", modules("flight/flightsql") + modules("flight/http") + modules("flight/mcp"), ids=_name)
def test_a_door_takes_only_the_service_from_the_core(path):
    core = {m for m in imports(path) if m.split(".")[0] == "flightdeck"}
    assert core <= CORE_FOR_DOORS, f"{_name(path)} imports {sorted(core - CORE_FOR_DOORS)}"


@pytest.mark.parametrize("path", modules("flightdeck"), ids=_name)
def test_the_core_has_no_protocol_code(path):
    protocol = {m for m in imports(path) if m in PROTOCOL or m.split(".")[0] in PROTOCOL_PACKAGES
                or m.startswith(("pyarrow.flight", "google.protobuf"))}
    assert not protocol, f"{_name(path)} imports protocol code: {sorted(protocol)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_arrows_point_one_way(package):
    for path in modules(package):
        used = {m.split(".")[0] for m in imports(path)} & set(PACKAGES) - {package}
        assert used <= ALLOWED[package], f"{_name(path)} imports {sorted(used - ALLOWED[package])}"


def _sources() -> list[Path]:
    here = Path(__file__).resolve()
    return [p for top in (*PACKAGES, "bench", "tests") for p in modules(top) if p.resolve() != here]


def test_one_class_per_name_that_matters():
    runtimes = [f"{_name(p)}:{n.lineno}" for p in _sources() for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.ClassDef) and n.name == "Runtime"]
    assert not runtimes, runtimes
    assert not (REPO / "flightdeck" / "search.py").exists()  # inference/search.py is the index layer


def test_no_comment_points_outside_the_repository():
    """No file names notes the repository does not hold, nor a tracker's issue number."""
    pointer = re.compile(r"\b(?:NOTES|DESIGN)\.md\b|\bissues?\s+#?\d+\b", re.IGNORECASE)
    found = [f"{_name(path)}:{number}: {line.strip()}"
             for path in _sources()
             for number, line in enumerate(path.read_text().splitlines(), start=1) if pointer.search(line)]
    assert not found, "\n".join(found)
