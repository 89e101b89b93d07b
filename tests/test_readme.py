"""The README's Python snippets run against the demo server."""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
CURLS = re.findall(r"```sh\n(curl .*?)```", README, re.DOTALL)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(server, snippet, capsys):
    code = snippet.replace("grpc://127.0.0.1:50051", server.url).replace("http://127.0.0.1:8090", server.http_url)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    if "fetchall()" in code:
        assert "('completed', 28858)" in capsys.readouterr().out
    for name in ("table", "impacted", "errors"):
        if name in namespace:
            assert len(namespace[name]) > 0


@pytest.mark.parametrize("command", CURLS, ids=[f"curl{i}" for i in range(len(CURLS))])
def test_readme_curl_runs(server, command):
    command = command.replace("http://127.0.0.1:8090", server.http_url).replace("curl ", "curl --fail ", 1)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
