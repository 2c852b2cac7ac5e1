"""validation_report.md and its chart, written next to validation_report.json."""

from __future__ import annotations

import io
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def checks_table(checks: list[dict]) -> list[dict]:
    """Rows for a Prefect table artifact (flat, strings and numbers only)."""
    return [{"check": c["check"], "metric": c["metric"], "baseline": round(c["baseline"], 6),
             "quantized": round(c["quantized"], 6), "delta_pct": round(c["delta_pct"], 3),
             "threshold": c["threshold"], "rule": c["rule"],
             "result": ("PASS" if c["passed"] else "FAIL") if c["gating"] else "info"}
            for c in checks]


def render_markdown(report: dict, chart_name: str | None) -> str:
    verdict = "PASS" if report["overall_pass"] else "FAIL"
    lines = [f"# Validation report: {report['model']} → {report['label']}", "",
             f"**Verdict: {verdict}**" + (f" — failed: {', '.join(report['failed_checks'])}"
                                          if report["failed_checks"] else ""), "",
             f"Quantized checkpoint sha256: `{report['checkpoint_sha256']}`", "",
             "| check | metric | baseline | quantized | Δ% | rule | result |",
             "|---|---|---|---|---|---|---|"]
    for row in checks_table(report["checks"]):
        lines.append(f"| {row['check']} | {row['metric']} | {_fmt(row['baseline'])} | "
                     f"{_fmt(row['quantized'])} | {row['delta_pct']:+.2f} | {row['rule']} | "
                     f"{row['result']} |")
    gens = report.get("generations")
    if gens:
        lines += ["", "## Greedy generations (baseline vs quantized)", ""]
        for p, b, q in zip(gens["prompts"], gens["baseline"], gens["quantized"]):
            same = "same" if b == q else "differs"
            lines.append(f"- `{p!r}` → baseline `{b!r}` / quantized `{q!r}` ({same})")
    if chart_name:
        lines += ["", f"![baseline vs quantized]({chart_name})"]
    return "\n".join(lines) + "\n"


def render_chart(checks: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(checks))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.2), squeeze=False)
    for ax, c in zip(axes[0], checks):
        color = "#2e7d32" if c["passed"] else "#c62828"
        ax.bar(["baseline", "quantized"], [c["baseline"], c["quantized"]], color=["#90a4ae", color])
        ax.set_title(c["check"].replace("lm_eval:", ""), fontsize=9)
        ax.set_ylabel(c["metric"], fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
