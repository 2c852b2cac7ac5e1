"""The quantized checkpoint's README.md: a Hugging Face model card generated from the
validation report (never written by hand), bound to it by sha256 in the validate manifest.

The card is left out of the checkpoint's file digest (hashing.tree_sha256 skips it): the
weights are validated by the quantize manifest, the card by the validate manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quantflow.storage.manifests import CheckpointManifest, QuantizedManifest
from quantflow.reports.reporting import checks_rows

CARD = "README.md"


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "—" if v is None else str(v)


def base_license(model_dir: str | None) -> str | None:
    """The base model's license from its own card's front matter, when it has one."""
    if not model_dir:
        return None
    card = Path(model_dir) / CARD
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def front_matter(quantized: QuantizedManifest, checkpoint: CheckpointManifest,
                 scheme: str | None) -> dict:
    tags = ["quantflow", "llm-compressor", "compressed-tensors", "quantized", quantized.method]
    if quantized.quantization_format:
        tags.append(str(quantized.quantization_format))
    if scheme:  # "W4A16 (int, group 128, sym)" -> "w4a16"
        tags += [part.split(" ", 1)[0].lower() for part in scheme.split(" + ")]
    meta: dict[str, Any] = {"base_model": checkpoint.model.id, "library_name": "transformers",
                            "tags": list(dict.fromkeys(tags)), "pipeline_tag": "text-generation"}
    license_ = base_license(checkpoint.local_path)
    if license_:
        meta["license"] = license_
    return meta


def performance_rows(perf: dict | None) -> list[str]:
    if not perf:
        return ["Not measured (validation.performance.enabled is false)."]
    rows = ["| concurrency | model | output tok/s | req/s | p50 TTFT ms | p99 TTFT ms | p99 TPOT ms | p99 ITL ms |",
            "|---|---|---|---|---|---|---|---|"]
    for b, q in zip(perf["baseline"]["levels"], perf["quantized"]["levels"]):
        for label, lv in (("baseline", b), ("quantized", q)):
            rows.append(f"| {lv['concurrency']} | {label} | {_num(lv['output_throughput'])} | "
                        f"{_num(lv['request_throughput'])} | {_num(lv['p50_ttft_ms'])} | "
                        f"{_num(lv['p99_ttft_ms'])} | {_num(lv['p99_tpot_ms'])} | {_num(lv['p99_itl_ms'])} |")
    rows += ["", f"Model load: baseline {_num(perf['baseline']['load_s'])} s, quantized "
             f"{_num(perf['quantized']['load_s'])} s. Weights: baseline {_num(perf['baseline'].get('weights_gib'))} GiB, "
             f"quantized {_num(perf['quantized'].get('weights_gib'))} GiB (as vLLM logs them; GPU only). "
             f"Server memory (RSS): baseline {_num(perf['baseline'].get('server_rss_gib'))} GiB, quantized "
             f"{_num(perf['quantized'].get('server_rss_gib'))} GiB. KV cache: "
             f"{_num(perf['quantized'].get('kv_cache_tokens'))} tokens."]
    return rows


def render_card(report: dict, quantized: QuantizedManifest, checkpoint: CheckpointManifest,
                report_sha256: str, scheme: str | None = None) -> str:
    meta = front_matter(quantized, checkpoint, scheme)
    verdict = "PASS" if report["overall_pass"] else "FAIL"
    size = report["size"]
    versions = report.get("versions", {})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(checkpoint.model.id).name} — {quantized.label}", "",
             f"A {quantized.method} quantization of `{checkpoint.model.id}` made with quantflow "
             f"(llm-compressor, saved as compressed-tensors). Validation verdict: **{verdict}**"
             + (f" ({report['summary']})" if not report["overall_pass"] else "") + ".", "",
             f"Size: {size['quantized_bytes'] / 1e6:.2f} MB (baseline {size['baseline_bytes'] / 1e6:.2f} MB, "
             f"ratio {size['ratio']}).", "",
             "## Quantization", "",
             f"- method: `{quantized.method}`; format: `{quantized.quantization_format}`"
             + (f"; scheme: {scheme}" if scheme else ""),
             f"- checkpoint sha256: `{report['checkpoint_sha256']}`", ""]
    if quantized.recipe:
        lines += ["Recipe:", "", "```yaml", quantized.recipe.strip(), "```", ""]
    lines += ["## Validation against the baseline", "", *checks_rows(report["checks"]), "",
              "## Serving performance (vLLM, same settings for both)", "",
              *performance_rows(report.get("performance")), "",
              "## Serve it with vLLM", "", "```bash",
              f"vllm serve ./{Path(quantized.uri).name} --served-model-name {quantized.label}",
              "```", "",
              "## Provenance", "",
              f"Generated by quantflow from validation_report.json (sha256 `{report_sha256}`); "
              "do not edit: the deploy gate refuses a card that differs from the one validate wrote.", "",
              "| tool | version |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in sorted(versions.items())], ""]
    return "\n".join(lines)
