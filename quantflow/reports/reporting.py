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


def performance_lines(perf: dict, chart_name: str | None) -> list[str]:
    lines = ["", "## Serving performance (vLLM bench serve, same settings for both)", "",
             f"{perf['settings']['num_prompts']} random prompts per level, {perf['settings']['input_len']} "
             f"tokens in, {perf['settings']['output_len']} out; baseline "
             + ("from the cache" if perf["baseline"].get("cached") else "measured in this run") + ".", "",
             "| concurrency | output tok/s (base → quant, ×) | req/s × | p99 TTFT ms (base → quant) | "
             "p99 TPOT ms (base → quant) |", "|---|---|---|---|---|"]
    for b, q, r in zip(perf["baseline"]["levels"], perf["quantized"]["levels"], perf["ratios"]):
        lines.append(f"| {b['concurrency']} | {_fmt(b['output_throughput'])} → {_fmt(q['output_throughput'])} "
                     f"(×{_fmt(r['output_throughput_ratio'])}) | ×{_fmt(r['request_throughput_ratio'])} | "
                     f"{_fmt(b['p99_ttft_ms'])} → {_fmt(q['p99_ttft_ms'])} | "
                     f"{_fmt(b['p99_tpot_ms'])} → {_fmt(q['p99_tpot_ms'])} |")
    lines += ["", f"Model load {_fmt(perf['baseline']['load_s'])} s → {_fmt(perf['quantized']['load_s'])} s; "
              f"weights {_fmt(perf['baseline'].get('weights_gib'))} → {_fmt(perf['quantized'].get('weights_gib'))} GiB "
              "(as vLLM logs them; GPU only); "
              f"server memory {_fmt(perf['baseline'].get('server_rss_gib'))} → "
              f"{_fmt(perf['quantized'].get('server_rss_gib'))} GiB RSS; "
              f"KV cache {_fmt(perf['baseline'].get('kv_cache_tokens'))} → "
              f"{_fmt(perf['quantized'].get('kv_cache_tokens'))} tokens."]
    if chart_name:
        lines += ["", f"![serving performance]({chart_name})"]
    return lines


def checks_rows(checks: list[dict]) -> list[str]:
    """The checks table in Markdown, header included (the report and the model card share it)."""
    return ["| check | metric | baseline | quantized | Δ% | rule | result |", "|---|---|---|---|---|---|---|",
            *(f"| {row['check']} | {row['metric']} | {_fmt(row['baseline'])} | {_fmt(row['quantized'])} | "
            f"{row['delta_pct']:+.2f} | {row['rule']} | {row['result']} |" for row in checks_table(checks))]


def render_markdown(report: dict, chart_name: str | None, perf_chart: str | None = None) -> str:
    verdict = "PASS" if report["overall_pass"] else "FAIL"
    lines = [f"# Validation report: {report['model']} → {report['label']}", "",
             f"**Verdict: {verdict}**" + (f" — failed: {', '.join(report['failed_checks'])}"
                                          if report["failed_checks"] else ""), "",
             f"Quantized checkpoint sha256: `{report['checkpoint_sha256']}`", "",
             *checks_rows(report["checks"])]
    lines += measurement_lines(report)
    gens = report.get("generations")
    if gens:
        lines += ["", "## Greedy generations (baseline vs quantized)", ""]
        for p, b, q in zip(gens["prompts"], gens["baseline"], gens["quantized"]):
            same = "same" if b == q else "differs"
            lines.append(f"- `{p!r}` → baseline `{b!r}` / quantized `{q!r}` ({same})")
    if chart_name:
        lines += ["", f"![baseline vs quantized]({chart_name})"]
    if report.get("performance"):
        lines += performance_lines(report["performance"], perf_chart)
    return "\n".join(lines) + "\n"


def measurement_lines(report: dict) -> list[str]:
    """Which loader measured each model (an MoE checkpoint transformers cannot load is measured
    through its per-expert layout) and how many calibration tokens each expert was routed."""
    lines = []
    by = report.get("measured_by") or {}
    if by.get("quantized"):
        lines += ["", "Measured by: " + "; ".join(f"{side} — {doc['path']}" for side, doc in by.items() if doc)]
        why = by["quantized"].get("fallback_from")
        if why:
            lines.append(f"(transformers' own load of the quantized model was refused: {why.splitlines()[0]})")
    cov = report.get("expert_coverage")
    if cov:
        r = cov["routed_tokens"]
        lines += ["", "## Expert calibration", "",
                  f"Calibration tokens routed to each expert ({cov['layers']} layers × {cov['experts_per_layer']} "
                  f"experts): min {r['min']}, median {_fmt(r['median'])}, max {r['max']}. "
                  f"{len(cov['under_threshold'])} expert(s) under {cov['threshold']} tokens"
                  + (f": {'; '.join(cov['under_threshold'][:8])}" if cov["under_threshold"] else "") + "."]
    return lines


def png_bytes(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


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
    return png_bytes(fig)


def render_performance_chart(perf: dict) -> bytes:
    """Output tokens/s and p99 TTFT per load level, baseline beside quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [str(lv["concurrency"]) for lv in perf["baseline"]["levels"]]
    x = range(len(levels))
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, key, label in ((axes[0], "output_throughput", "output tokens/s"),
                           (axes[1], "p99_ttft_ms", "p99 TTFT (ms)")):
        for offset, (name, color) in zip((-0.2, 0.2), (("baseline", "#90a4ae"), ("quantized", "#1565c0"))):
            ax.bar([i + offset for i in x], [lv[key] or 0 for lv in perf[name]["levels"]], width=0.4,
                   color=color, label=name)
        ax.set_xticks(list(x), levels)
        ax.set_xlabel("concurrency", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    return png_bytes(fig)
