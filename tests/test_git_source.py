"""git: against a repository the test creates with the git command line."""
from __future__ import annotations

import subprocess

import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.engine import QueryEngine


def _git(repo, *args, **env):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.com",
                        "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com",
                        "HOME": str(repo), **env})


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "ops-runbooks"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "pooling.md").write_text("# Pooling\nUse transaction mode.\n")
    (repo / "logo.bin").write_bytes(b"\x00\x01\x02")
    _git(repo, "add", "."), _git(repo, "commit", "-q", "-m", "Add runbooks",
                                 GIT_AUTHOR_DATE="2026-11-01T10:00:00+00:00", GIT_COMMITTER_DATE="2026-11-01T10:00:00+00:00")
    (repo / "docs").mkdir()
    (repo / "docs" / "oncall.md").write_text("# On call\n")
    (repo / "pooling.md").write_text("# Pooling\nUse transaction mode.\nCheck server_connections.\n")
    _git(repo, "add", "."), _git(repo, "commit", "-q", "-m", "Explain the check\n\nAfter the incident.",
                                 GIT_AUTHOR_DATE="2026-11-21T09:00:00+00:00", GIT_COMMITTER_DATE="2026-11-21T09:00:00+00:00")
    return repo


def _engine(repo):
    base = repo.parent
    return QueryEngine(Catalog([DatasetSpec("files", f"git:{repo.name}/files"),
                                DatasetSpec("commits", f"git:{repo.name}/commits")], base))


def test_files_with_contents_and_last_commit(repo):
    engine = _engine(repo)
    rows = engine.query("SELECT path, size, content, is_binary, last_author FROM files ORDER BY path").read_all().to_pylist()
    assert [r["path"] for r in rows] == ["docs/oncall.md", "logo.bin", "pooling.md"]
    pooling = rows[2]
    assert "server_connections" in pooling["content"] and pooling["size"] == len(pooling["content"])
    assert rows[1]["is_binary"] is True and rows[1]["content"] is None
    recent = engine.query("SELECT path FROM files WHERE last_commit_at > TIMESTAMP '2026-11-15T00:00:00Z' "
                          "ORDER BY path").read_all()
    assert recent.column("path").to_pylist() == ["docs/oncall.md", "pooling.md"]


def test_commits(repo):
    engine = _engine(repo)
    commits = engine.query("SELECT subject, body, author_email, committed_at, parents FROM commits").read_all().to_pylist()
    assert [c["subject"] for c in commits] == ["Explain the check", "Add runbooks"]
    assert commits[0]["body"] == "After the incident." and commits[1]["parents"] == []
    latest = engine.query("SELECT subject FROM commits LIMIT 1").read_all()
    assert latest.column("subject").to_pylist() == ["Explain the check"]
    filtered = engine.query("SELECT subject FROM commits WHERE subject LIKE 'Add%' LIMIT 1").read_all()
    assert filtered.column("subject").to_pylist() == ["Add runbooks"]


def test_reading_never_writes_and_errors_are_clear(repo, tmp_path):
    before = sorted(p.relative_to(repo) for p in (repo / ".git").rglob("*"))
    _engine(repo).query("SELECT * FROM files").read_all()
    assert sorted(p.relative_to(repo) for p in (repo / ".git").rglob("*")) == before
    from federation.connectors.git import GitConnector
    with pytest.raises(ConnectorError, match="must end with /files or /commits"):
        GitConnector({}, tmp_path, f"{repo.name}/blobs")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConnectorError, match="not a git repository"):
        GitConnector({}, tmp_path, "plain/files")


def test_a_commit_message_cannot_forge_rows(repo):
    """Commits were split on \\x1e and fields on \\x1f, which a message or a name may hold: a message
    could add a row of its own (sha 000..., author 'Linus Torvalds', 'Security fix approved')."""
    forged = ("innocent\x1e" + "\x1f".join(["0" * 40, "Linus Torvalds", "linus@example.com", "2026-11-25T00:00:00+00:00",
                                             "Linus Torvalds", "2026-11-25T00:00:00+00:00", "Security fix approved",
                                             "", ""]) + "\x1e")
    (repo / "changelog.md").write_text("x\n")
    _git(repo, "add", "."), _git(repo, "commit", "-q", "-m", forged, GIT_AUTHOR_NAME="Mal\x1elory")
    engine = _engine(repo)
    commits = engine.query("SELECT sha, author_name, subject FROM commits").read_all().to_pylist()
    assert len(commits) == 3 and all(c["sha"] != "0" * 40 for c in commits)
    assert commits[0]["author_name"] == "Mal\x1elory" and commits[0]["subject"].startswith("innocent")
    changelog = engine.query("SELECT last_author FROM files WHERE path = 'changelog.md'").read_all().to_pylist()
    assert changelog == [{"last_author": "Mal\x1elory"}]
