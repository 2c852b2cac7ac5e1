"""search_report.{json,md} and the Pareto chart: every candidate, why it was dropped,
failed or chosen, and which ones no other candidate beats on both quality and size."""

from __future__ import annotations

from typing import Any

STATUS_ORDER = ("chosen", "passed", "failed", "error", "dropped", "not_run")


def quality_loss(outcome: dict) -> float | None:
    """Lower is better: KL divergence from the baseline when measured, else the perplexity
    increase in percent. One search uses one of them for every candidate (same config)."""
    return outcome.get("kl") if outcome.get("kl") is not None else outcome.get("ppl_delta_pct")


def pareto_front(outcomes: list[dict], use_speed: bool = False) -> list[str]:
    """Names of evaluated candidates no other evaluated candidate dominates: at least as
    small, at least as accurate (and as fast, when speed is measured), better in one."""
    def axes(o: dict) -> tuple[float, ...]:
        values = [float(o["size_bytes"]), float(quality_loss(o))]
        if use_speed:
            values.append(-float(o.get("throughput_ratio") or 0.0))
        return tuple(values)

    scored = [o for o in outcomes if o.get("size_bytes") is not None and quality_loss(o) is not None]
    front = []
    for o in scored:
        a = axes(o)
        dominated = any(all(x <= y for x, y in zip(axes(p), a)) and axes(p) != a for p in scored)
        if not dominated:
            front.append(o["name"])
    return front


def render_pareto_chart(outcomes: list[dict], front: list[str], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantflow.reports.reporting import png_bytes

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    scored = [o for o in outcomes if o.get("size_bytes") is not None and quality_loss(o) is not None]
    for o in scored:
        color = "#2e7d32" if o["status"] in ("chosen", "passed") else "#c62828"
        ax.scatter(o["size_bytes"] / 1e6, quality_loss(o), color=color, s=60 if o["status"] == "chosen" else 30,
                   marker="*" if o["status"] == "chosen" else "o", zorder=3)
        ax.annotate(o["name"], (o["size_bytes"] / 1e6, quality_loss(o)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    line = sorted((o for o in scored if o["name"] in front), key=lambda o: o["size_bytes"])
    if line:
        ax.plot([o["size_bytes"] / 1e6 for o in line], [quality_loss(o) for o in line],
                color="#1565c0", linewidth=1, zorder=2, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("checkpoint size (MB)", fontsize=9)
    ax.set_ylabel(metric, fontsize=9)
    ax.set_title("candidates: quality loss vs size (green passed the gate, red failed)", fontsize=9)
    ax.tick_params(labelsize=8)
    return png_bytes(fig)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def candidate_rows(outcomes: list[dict]) -> list[list[str]]:
    rows = [["candidate", "result", "size (MB)", "Δ perplexity", "KL", "time (s)", "why"]]
    for o in outcomes:
        rows.append([o["name"], o["status"].upper() if o["status"] == "chosen" else o["status"],
                     _fmt(o.get("size_bytes") and o["size_bytes"] / 1e6, ".2f"),
                     _fmt(o.get("ppl_delta_pct"), "+.2f") + ("%" if o.get("ppl_delta_pct") is not None else ""),
                     _fmt(o.get("kl"), ".5f"), _fmt(o.get("wall_s"), ".1f"), o.get("reason") or ""])
    return rows


def render_search_markdown(report: dict, chart: str | None, sensitivity_chart: str | None) -> str:
    head = (f"# Search: {report['name']} ({report['mode']}, objective {report['objective']})\n\n"
            f"Model `{report['model']}`. ")
    chosen = report.get("chosen")
    head += (f"Chosen: **{chosen}**." if chosen else "**No candidate passed the gate**; nothing deployed.")
    header, *rows = [[c.replace("|", "/").replace("\n", " ") for c in r]
                     for r in candidate_rows(report["candidates"])]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    parts = [head, "", table, "",
             f"Pareto front (quality loss = {report['quality_metric']} vs size"
             + (", and throughput" if report.get("speed_measured") else "") + "): "
             + (", ".join(report["pareto_front"]) or "none"), ""]
    for o in report["candidates"]:
        if o.get("kept_layers"):
            parts.append(f"- {o['name']}: kept decoder layers {o['kept_layers']} in full precision "
                         f"(the fewest of the ranking {o.get('ranking')} that passed)")
    if chart:
        parts += ["", f"![Pareto chart]({chart})"]
    if sensitivity_chart:
        parts += ["", f"![Layer sensitivity]({sensitivity_chart})"]
    return "\n".join(parts) + "\n"


def print_search_table(report: dict, markdown_uri: str) -> None:
    rows = candidate_rows(report["candidates"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    print(f"\n=== quantflow search: {report['name']} — {report['mode']}, objective {report['objective']} ===")
    for r in rows:
        why = r[-1] if len(r[-1]) <= 110 else r[-1][:107] + "..."
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + why)
    print(f"  pareto front {', '.join(report['pareto_front']) or 'none'}")
    print(f"  report       {markdown_uri}")
