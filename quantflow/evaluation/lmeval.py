"""Task accuracy through lm-evaluation-harness (hf, vllm or local-completions backends)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from quantflow.config import LmEvalCheck, LmEvalTask
from quantflow.progress import report


def _quiet() -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval.evaluator

    # Skip `git describe` and torch's collect_env (slow, and noise in the logs).
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    lm_eval.evaluator.add_env_info = lambda results: None


def local_task_names(include_path: str | None) -> set[str]:
    names: set[str] = set()
    if not include_path:
        return names
    for f in Path(include_path).rglob("*.yaml"):
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.add(doc["task"])
    return names


def metric_key(task: LmEvalTask) -> str:
    return f"{task.metric},{task.filter}"


def _model_and_args(backend: str, model, tokenizer, model_dir: str, check: LmEvalCheck,
                    max_length: int | None, endpoint: dict | None) -> tuple[Any, Any]:
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        kwargs: dict[str, Any] = {"batch_size": check.batch_size}
        if max_length:
            kwargs["max_length"] = max_length
        return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs), None
    if backend == "vllm":
        args = {"pretrained": model_dir, "dtype": "auto", "batch_size": "auto"}
        if max_length:
            args["max_length"] = max_length
        return "vllm", args
    assert endpoint is not None, "local-completions needs a running server"
    args = {"base_url": endpoint["base_url"] + "/v1/completions", "model": endpoint["served_model_name"],
            "tokenizer": model_dir, "tokenizer_backend": "huggingface", "tokenized_requests": True,
            "num_concurrent": 4, "max_retries": 3, "batch_size": 1, "timeout": 300}
    if max_length:
        # vLLM scores max_length - 2 tokens per rolling window; HF scores max_length.
        args["max_length"] = max_length + 2
    return "local-completions", args


def run_lm_eval(check: LmEvalCheck, model=None, tokenizer=None, model_dir: str = "",
                max_length: int | None = None, endpoint: dict | None = None) -> dict[str, dict]:
    """{task name: {metric key: value}} for every task in the check, with identical arguments
    whichever model is passed, so baseline and candidate numbers compare."""
    _quiet()
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [t.name for t in check.tasks]
    local = local_task_names(check.include_path)
    manager = TaskManager(include_path=check.include_path,
                          include_defaults=not set(names) <= local)
    lm, model_args = _model_and_args(check.backend, model, tokenizer, model_dir, check,
                                     max_length, endpoint)
    results: dict[str, dict] = {}
    # One task per call, so progress can say "task k of n" (a task's metrics do not depend
    # on which tasks share its call: lm-eval seeds and builds each task on its own).
    for i, t in enumerate(check.tasks):
        report("lm-eval", i, len(check.tasks), f"lm-eval task {i + 1} of {len(check.tasks)}: {t.name}")
        out = lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=[t.name],
                                      task_manager=manager, num_fewshot=t.num_fewshot, limit=check.limit,
                                      log_samples=False, bootstrap_iters=0)
        for name, metrics in out["results"].items():
            results[name] = {k: (float(v) if isinstance(v, (int, float)) else v)
                             for k, v in metrics.items() if "_stderr" not in k}
    report("lm-eval", len(check.tasks), len(check.tasks), f"lm-eval: {len(check.tasks)} tasks done")
    return results
