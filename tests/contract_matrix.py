"""The connector contract suite's matrix (connector × capability), gathered from test reports.

A contract test marks itself with ``user_properties`` ("contract", kind, capability); conftest's
hooks hand each report here and print the matrix at the end of the run."""
from __future__ import annotations

CELLS: dict[tuple[str, str], str] = {}
SYMBOLS = {"passed": "pass", "gap": "gap", "n/a": "n/a", "failed": "FAIL", "skipped": "skip"}


def record(report) -> None:
    marks = [value for name, value in report.user_properties if name == "contract"]
    if not marks:
        return
    kind, capability = marks[0]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail") and report.skipped:
            outcome = "gap"
        elif report.skipped:
            reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
            outcome = "n/a" if "n/a:" in reason else "skipped"
        else:
            outcome = report.outcome
        previous = CELLS.get((kind, capability))
        if previous in (None, "passed") or outcome == "failed":
            CELLS[(kind, capability)] = outcome


def table(capabilities: list[str], kinds: list[str]) -> list[str]:
    """The matrix as Markdown table lines."""
    lines = ["| connector | " + " | ".join(capabilities) + " |",
             "| --- |" + " --- |" * len(capabilities)]
    for kind in kinds:
        row = [SYMBOLS.get(CELLS.get((kind, c), ""), "") for c in capabilities]
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    return lines


def summary() -> list[str]:
    if not CELLS:
        return []
    kinds = list(dict.fromkeys(k for k, _ in CELLS))
    capabilities = list(dict.fromkeys(c for _, c in CELLS))
    return table(capabilities, kinds)
