"""Run every enabled check on one model; used identically for baseline and candidate."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import torch

from quantflow.config import CompletionCheck, DeployConfig, ServedFidelityCheck, ValidationConfig
from quantflow.evaluation.consistency import greedy_from_ids, greedy_generations, next_token_logprobs
from quantflow.evaluation.fidelity import fidelity_windows, model_slice
from quantflow.evaluation.loading import load_for_eval
from quantflow.evaluation.perplexity import perplexity
from quantflow.errors import StageError
from quantflow.progress import report
from quantflow.storage.store import ArtifactStore, read_uri
from quantflow.textdata import joined_text, load_documents

log = logging.getLogger("quantflow.evaluate")


def heldout_text(validation: ValidationConfig, stage: str) -> str:
    docs = load_documents(validation.perplexity.source, stage, "validation.perplexity.source")
    return joined_text(docs)


def golden_answers(model, tok, checks: list[CompletionCheck]) -> list[dict[str, Any]]:
    """The model's greedy answer to each prompt, at each check's length (what a served copy
    is later compared against)."""
    out = []
    for check in checks:
        messages = check.chat()
        if messages is None:
            ids = greedy_generations(model, tok, [check.prompt or ""], check.max_tokens)[0]
        else:  # rendered as vLLM's /v1/chat/completions renders it: template + generation prompt
            ids = greedy_from_ids(model, tok, tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False), check.max_tokens)
        out.append({"prompt": check.key, "max_tokens": check.max_tokens, "messages": messages,
                    "answer": tok.decode(ids, skip_special_tokens=True)})
    return out


def evaluation_phases(validation: ValidationConfig) -> list[str]:
    """The progress phases evaluate_model reports, in order (progress.py)."""
    return [*(["perplexity"] if validation.perplexity.enabled else []),
            *(["lm-eval"] if validation.lm_eval.enabled else [])]


def evaluate_model(model_dir: str | Path, validation: ValidationConfig, store: ArtifactStore,
                   name: str, stage: str, serving: DeployConfig | None = None,
                   trust_remote_code: bool = False,
                   golden_prompts: list[CompletionCheck] | None = None,
                   fidelity: ServedFidelityCheck | None = None) -> dict[str, Any]:
    """Metrics for one model; next-token log-probs go to `{name}_logprobs.pt` in the store;
    with `golden_prompts`, its greedy answers to them under "golden"."""
    metrics: dict[str, Any] = {}
    lm = validation.lm_eval
    if lm.enabled and lm.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise StageError(stage, "validation.lm_eval.backend 'vllm' runs vLLM inside the pipeline "
                         "environment, which has none (its pins conflict with llm-compressor's)",
                         "use backend local-completions: a temporary server from the serving environment")
    loaded = load_for_eval(model_dir, validation.dtype, validation.device, trust_remote_code,
                           stage=stage, what=f"the {name} model")
    model, tok = loaded.model, loaded.tokenizer
    # Which loader measured it: the report says so (loading.py: per-expert MoE fallback).
    metrics["loaded_by"] = {"path": loaded.path, "fallback_from": loaded.fallback_from}
    fidelity = fidelity if fidelity is not None and fidelity.enabled else None
    text = heldout_text(validation, stage) if (validation.perplexity.enabled or fidelity
                                               or validation.consistency.enabled) else ""
    if fidelity:  # the token windows deploy sends to the new server (serving/fidelity.py)
        windows = fidelity_windows(tok, text, fidelity.windows, fidelity.window)
        metrics["served_fidelity"] = {"windows": windows, **model_slice(model, windows)}
    ppl_cfg = validation.perplexity
    if ppl_cfg.enabled:
        log.info("%s: perplexity (window %d, stride %s)", name, ppl_cfg.window, ppl_cfg.stride or "=window")
        res = perplexity(model, tok, [text], window=ppl_cfg.window, stride=ppl_cfg.stride,
                         batch_size=ppl_cfg.batch_size, max_tokens=ppl_cfg.max_tokens,
                         progress=lambda i, n: report("perplexity", i, n, f"perplexity window {i} of {n}"))
        metrics["perplexity"] = res.as_dict()
        log.info("%s: perplexity %.4f over %d tokens", name, res.perplexity, res.tokens)
    cons = validation.consistency
    if cons.enabled:
        gens = greedy_generations(model, tok, cons.prompts, cons.max_new_tokens)
        metrics["generations"] = {"prompts": cons.prompts, "token_ids": gens,
                                  "texts": [tok.decode(g) for g in gens]}
        lp = next_token_logprobs(model, tok, text, cons.kl_tokens, ppl_cfg.window)
        buf = io.BytesIO()
        torch.save(lp, buf)
        rel = f"{name}_logprobs.pt"
        store.write_bytes(rel, buf.getvalue())
        metrics["logprobs"] = {"uri": store.uri(rel), "tokens": lp.shape[0], "vocab": lp.shape[1],
                               "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    if golden_prompts:
        metrics["golden"] = golden_answers(model, tok, golden_prompts)
    if validation.lm_eval.enabled and validation.lm_eval.backend == "hf":
        metrics["lm_eval"] = _lm_eval(model, tok, str(model_dir), validation, serving)
    del model
    free_memory()  # a vLLM engine or the next stage needs the GPU memory back
    if validation.lm_eval.enabled and validation.lm_eval.backend != "hf":
        metrics["lm_eval"] = _lm_eval(None, tok, str(model_dir), validation, serving)
    return metrics


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _lm_eval(model, tok, model_dir: str, validation: ValidationConfig,
             serving: DeployConfig | None) -> dict:
    from quantflow.evaluation.lmeval import run_lm_eval

    check = validation.lm_eval
    max_length = check.max_length
    if check.backend == "local-completions":
        from quantflow.serving.temporary import temporary_server

        # Both models are served alike: the checkpoint's dtype ("auto"; bfloat16 for float32
        # checkpoints on CPU, where vLLM's int4 kernels need it).
        cfg = (serving or DeployConfig()).model_copy(update={"dtype": "auto"})
        _check_servable_for_eval(model_dir, cfg)
        positions = getattr(tok, "model_max_length", None) or 2048
        context = min((max_length or 2048) + 2, positions if positions < 10**6 else 2048)
        with temporary_server(model_dir, cfg, max_model_len=context) as endpoint:
            return run_lm_eval(check, model_dir=model_dir, max_length=max_length, endpoint=endpoint)
    return run_lm_eval(check, model=model, tokenizer=tok, model_dir=model_dir, max_length=max_length)



def _check_servable_for_eval(model_dir: str, cfg: DeployConfig) -> None:
    """local-completions serves the model under test: refuse a scheme this host's vLLM
    cannot run before a server starts and dies on its first request."""
    from quantflow.serving.compatibility import ensure_servable
    from quantflow.serving.schemes import checkpoint_config, scheme_of_checkpoint

    scheme = scheme_of_checkpoint(model_dir)
    if scheme is not None:
        try:
            ensure_servable(scheme, cfg, "validate",
                            "validation.lm_eval.backend local-completions serves a checkpoint that",
                            model_config=checkpoint_config(model_dir))
        except StageError as err:
            raise StageError("validate", err.cause, "use validation.lm_eval.backend: hf on this host, "
                             f"or {err.fix}") from None


def load_logprobs(uri: str, sha256: str | None = None, stage: str = "validate") -> torch.Tensor:
    """Next-token log-probs; with `sha256` (recorded when they were written), refused when
    the file changed since."""
    raw = read_uri(uri)
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise StageError(stage, f"{uri} was modified after it was written (sha256 differs from the "
                         "one recorded in baseline_metrics.json)",
                         "delete baseline_metrics.json and re-run: stage 1 measures the baseline again")
    return torch.load(io.BytesIO(raw))
