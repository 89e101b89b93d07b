"""The post-mortem the agent writes: Markdown (timeline, causes with their evidence queries,
impact) and a PNG of latency, errors, connections and replicas with the actions marked."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from showcase.agent import Finding, _time

ACTS = (("alert", "started", "alert"), ("scaled", "at", "scaled to 3"),
        ("exhaustion", "first_error_at", "connection errors"), ("fixed", "at", "transaction mode"))


def _facts(findings: list[Finding]) -> dict[str, Finding]:
    return {f.step: f for f in findings}


def marks(findings: list[Finding]) -> list[tuple[dt.datetime, str]]:
    """The actions and turning points, in time order."""
    by_step = _facts(findings)
    return [(by_step[step].facts[key], label) for step, key, label in ACTS if step in by_step]


def write_markdown(findings: list[Finding], path: Path, plot: Path | None) -> None:
    by_step = _facts(findings)
    lines = ["# Post-mortem: checkout latency, then failed orders (written by the SRE agent)", ""]
    if plot is not None:
        lines += [f"![latency, errors, connections and replicas over time]({plot.name})", ""]
    lines += ["## Timeline", ""]
    for moment, label in marks(findings):
        lines.append(f"- {moment:%H:%M:%S} UTC: {label}")
    if "recovered" in by_step:
        lines.append(f"- recovered: {by_step['recovered'].text}")
    lines += ["", "## Root causes, with the queries that show them", ""]
    for step in ("alert", "saturation", "saturation-orders", "guide-saturation", "recommend-scale", "scaled",
                 "latency-recovered", "alert-errors", "errors", "log-orders-db", "log-pgbouncer", "exhaustion", "guide-pooler",
                 "recommend-pool-mode", "fixed", "recovered"):
        if step in by_step:
            finding = by_step[step]
            lines += [f"**{finding.text}**", "", "```sql", finding.query, "```", ""]
    if "impact" in by_step:
        impact = by_step["impact"]
        lines += ["## Impact", "", impact.text, "", "```sql", impact.query, "```", "",
                  "| customer | email | tier | failed orders |", "|---:|---|---|---:|"]
        lines += [f"| {r['customer_id']} | {r['email']} | {r['tier']} | {r['failed_orders']} |" for r in impact.rows]
    lines += ["", "## Follow-up", "",
              "- Size pools per replica: replicas x pool_size must stay below max_connections.",
              "- Alert on orders-db active_connections / max_connections > 0.8.", ""]
    path.write_text("\n".join(lines))


def write_plot(findings: list[Finding], series: list[dict], path: Path) -> bool:
    """The PNG; False when matplotlib is not installed (the Markdown is written anyway)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import dates
    except ImportError:
        return False
    times = [_time(r["ts"]) for r in series]
    panels = (("p99 latency (ms)", "p99_latency_ms", 1), ("failed orders (%)", "error_rate", 100),
              ("DB connections", "active_connections", 1), ("replicas", "replicas", 1))
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 8), sharex=True)
    for axis, (title, key, factor) in zip(axes, panels):
        axis.plot(times, [(r[key] or 0) * factor for r in series], color="tab:blue", drawstyle="steps-post")
        axis.set_ylabel(title)
        if key == "p99_latency_ms":
            axis.set_yscale("log")
            axis.axhline(1500, color="tab:red", linestyle="--", label="alert threshold")
            axis.legend(loc="upper left")
        if key == "active_connections":
            axis.plot(times, [r["max_connections"] for r in series], color="tab:red", linestyle="--",
                      label="max_connections")
            axis.legend(loc="upper left")
        for moment, label in marks(findings):
            axis.axvline(moment, color="tab:gray", linestyle=":")
    for moment, label in marks(findings):
        axes[0].annotate(label, (moment, axes[0].get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8)
    axes[-1].xaxis.set_major_formatter(dates.DateFormatter("%H:%M"))
    figure.suptitle("Checkout incident: latency, failed orders, connections, replicas")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def write(findings: list[Finding], series: list[dict], folder: Path) -> Path:
    """Writes ``postmortem.md`` (and ``postmortem.png``) in ``folder``; returns the Markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    plot = folder / "postmortem.png"
    drawn = write_plot(findings, series, plot)
    markdown = folder / "postmortem.md"
    write_markdown(findings, markdown, plot if drawn else None)
    return markdown
