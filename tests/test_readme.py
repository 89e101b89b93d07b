"""The README's Python snippets run against the demo server."""
from __future__ import annotations

import re

import pytest

from conftest import REPO

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(server, snippet, capsys):
    code = snippet.replace("grpc://127.0.0.1:50051", server.url)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    if "fetchall()" in code:
        assert "('completed', 28858)" in capsys.readouterr().out
    for name in ("table", "impacted", "errors"):
        if name in namespace:
            assert len(namespace[name]) > 0
