"""quantflow command line.

    quantflow run --model <hub id or path> --method gptq --bits 4 [--config FILE]
                  [--output-dir DIR] [--no-deploy]
    quantflow demo          build the demo model (once) and run configs/demo.yaml
    quantflow submit ...    the same, as a run of the quantize-pipeline deployment (make up)
    quantflow stop [NAME]   stop one deployment, or what the demo started (vLLM servers,
                            exporter, Prefect server)
    quantflow deployments   list the live deployments
    quantflow rollback NAME [--to REVISION]
                            bring back an earlier revision at the same address
    quantflow doctor        which quantization schemes this host's vLLM serves, and why not
    quantflow fields [PREFIX]
                            every configuration field: type, default, what it does
    quantflow search --config FILE [--mode ladder|sweep] [--no-deploy]
                            try candidate schemes; deploy the smallest that passes

Exit codes of `run`/`demo`/`search`: 0 completed (deployed unless --no-deploy), 2 the
quality gate rejected the model, or every search candidate (nothing deployed), 1 any other
failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import httpx

from quantflow.config import PipelineConfig
from quantflow.config.search import SearchConfig
from quantflow.errors import ConfigError, InputError

EXIT_OK, EXIT_FAILED, EXIT_GATE = 0, 1, 2
# Final state names of rejected runs (quantflow.flows.pipeline), without importing Prefect here.
GATE_STATE, REJECTED_STATE, CANARY_STATE = "QualityGateFailed", "ApprovalRejected", "CanaryRolledBack"
DEMO_CONFIG = Path("configs/demo.yaml")


def _overrides(args: argparse.Namespace) -> dict:
    return {"model.id": args.model, "quant.method": args.method, "quant.bits": args.bits,
            "quant.group_size": args.group_size, "output_dir": args.output_dir, "name": args.name,
            "deploy.enabled": False if args.no_deploy else None,
            "validation.lm_eval.limit": args.limit}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "asyncio", "matplotlib", "datasets",
                  "llmcompressor", "lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # llm-compressor repeats "No accelerator available!" per layer on CPU machines.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "INFO" if verbose else "ERROR")
    if sys.stderr.isatty():
        progress = logging.getLogger("quantflow.progress")
        progress.addHandler(ProgressLine(sys.stderr))
        progress.propagate = False


class ProgressLine(logging.Handler):
    """On a terminal, each stage's progress (quantflow/progress.py) is one line rewritten in
    place and closed at 100%; elsewhere (logs, CI) the throttled records print as lines."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        pct = getattr(record, "quantflow_pct", None)
        self.stream.write(f"\r\x1b[K{record.getMessage()}" + ("\n" if pct is None or pct >= 100 else ""))
        self.stream.flush()


def run_pipeline(config, show_completion: bool = True, note: str | None = None, flow_fn=None) -> int:
    """Run the pipeline flow (or `flow_fn`, e.g. the search flow) and map its outcome to the
    exit code."""
    from quantflow.platform.prefect_server import prefect_api, ui_url
    from quantflow.storage.store import ArtifactStore

    if flow_fn is None:
        from quantflow.flows.pipeline import quantize_pipeline as flow_fn
    with prefect_api() as api_url:
        print(f"Prefect UI: {ui_url(api_url)}", flush=True)
        state = flow_fn(config=config, return_state=True)
    if refused := _folder_in_use(state):  # the folder's summary is the other run's, not ours
        print(f"\nerror: {refused}", file=sys.stderr)
        return EXIT_FAILED
    store = ArtifactStore(config.output_uri)
    summary = store.read_json("pipeline_summary.json") if store.exists("pipeline_summary.json") else {}
    if note and summary:
        summary["scheme_choice"] = note
        store.write_json("pipeline_summary.json", summary)
    if flow_fn.name == "quantize-search" and store.exists("search_report.json"):
        from quantflow.reports.search_report import print_search_table

        print_search_table(store.read_json("search_report.json"), store.uri("search_report.md"))
    _print_summary(summary, state)
    if state.is_completed():
        if show_completion and summary.get("endpoint") and config.deploy.backend == "local":
            try:
                _print_completion(config, summary)
            except httpx.HTTPError as err:  # the run succeeded; the sample is a courtesy
                print(f"  completion   (could not fetch a sample: {err})")
        return EXIT_OK
    if state.name in (GATE_STATE, REJECTED_STATE, CANARY_STATE):
        return EXIT_GATE
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - the message names the stage and the cause
        stage = getattr(err, "stage", None) or summary.get("failed_stage") or "pipeline"
        print(f"\nFAILED in stage {stage}: {err}", file=sys.stderr)
    return EXIT_FAILED


def _folder_in_use(state) -> Exception | None:
    from quantflow.storage.folder_claims import FolderInUse

    if not state.is_failed():
        return None
    try:
        state.result()
    except FolderInUse as err:
        return err
    except Exception:  # noqa: BLE001 - other failures are reported with the summary below
        return None
    return None


def _print_summary(summary: dict, state) -> None:
    if not summary:
        return
    print("\n=== quantflow:", summary.get("name"), "—", summary.get("method"), "===")
    stages = summary.get("stages", {})
    width = max([12, *map(len, stages)])  # a search names its stages candidate:stage
    for stage, rec in stages.items():
        hit = "cached" if rec["cache_hit"] else "ran"
        hit = "failed" if rec.get("state") == "Failed" else hit
        mem = f", peak RSS {rec['peak_rss_mib']:.0f} MiB" if rec.get("peak_rss_mib") else ""
        tries = f", {rec['attempts']} attempts" if rec.get("attempts", 1) > 1 else ""
        print(f"  {stage:<{width}} {hit:<7} {rec['wall_s']:8.2f}s{mem}{tries}")
    ppl = summary.get("perplexity")
    if ppl:
        print(f"  perplexity   baseline {ppl['baseline']:.4f} -> quantized {ppl['quantized']:.4f} "
              f"({ppl['delta_pct']:+.2f}%)")
    size = summary.get("size")
    if size:
        print(f"  size         {size['baseline_bytes'] / 1e6:.2f} MB -> {size['quantized_bytes'] / 1e6:.2f} MB "
              f"({size['ratio']:.2f}x)")
    if summary.get("scheme_choice"):
        print(f"  scheme       {summary['scheme_choice']}")
    verdict = summary.get("verdict")
    if verdict:
        print(f"  verdict      {verdict.upper()}" + ("" if verdict == "pass" else f"  ({state.message})"))
    canary = summary.get("canary")
    if canary:
        print(f"  canary       rolled back at {canary['steps'][-1]['percent']}%: {canary['reason']}; "
              f"revision {canary['live']['revision']} keeps serving {canary['live']['base_url']}")
    if summary.get("endpoint"):
        print(f"  endpoint     {summary['endpoint']}/v1 (model {summary['served_model_name']!r})")
    if summary.get("metrics_url"):
        print(f"  metrics      {summary['metrics_url']}")
    print(f"  outputs      {summary.get('output_uri')}  "
          f"(total {summary.get('total_wall_s', 0):.1f}s, {summary.get('wall_s_excluding_deploy', 0):.1f}s "
          "without deploy)")


def _print_completion(config, summary: dict) -> None:
    import json

    from quantflow.serving.health import CompletionsClient

    check = config.deploy.health.model_copy(update={"max_tokens": 16})
    key = os.environ.get(config.deploy.api_key_env)
    client = CompletionsClient(summary["endpoint"], summary["served_model_name"], key)
    try:
        done = client.ask(check)
    finally:
        client.close()
    print(f"  completion   {check.label} -> {done.text!r}")
    auth = f' -H "Authorization: Bearer ${config.deploy.api_key_env}"' if key else ""
    if check.messages is None:
        route, body = "completions", {"model": summary["served_model_name"], "prompt": check.prompt}
    else:
        route, body = "chat/completions", {"model": summary["served_model_name"], "messages": check.chat()}
    body.update(max_tokens=16, temperature=0)
    print(f"  try it       curl -s {summary['endpoint']}/v1/{route}{auth} -H 'Content-Type: "
          f"application/json' -d '{json.dumps(body)}'")
    print("  stop it      make stop   (or: quantflow stop)")


def cmd_run(args: argparse.Namespace) -> int:
    from quantflow.config import load_config

    config = load_config(args.config, _overrides(args))
    preflight(config, config.quant)
    return run_pipeline(config)


def preflight(config, quant) -> None:
    """Bad inputs end the run here: before Prefect starts, any model loads or any file is written."""
    from quantflow.preflight import check_inputs

    check_inputs(config, quant)


def cmd_search(args: argparse.Namespace) -> int:
    from quantflow.config.search import load_search_config
    from quantflow.flows.search import quantize_search

    overrides = {"model.id": args.model, "output_dir": args.output_dir, "name": args.name,
                 "deploy.enabled": False if args.no_deploy else None, "search.mode": args.mode,
                 "search.objective": args.objective, "search.concurrency": args.concurrency,
                 "validation.lm_eval.limit": args.limit}
    config = load_search_config(args.config, overrides)
    preflight(config, None)
    return run_pipeline(config, flow_fn=quantize_search)


def cmd_demo(args: argparse.Namespace) -> int:
    from quantflow.config import load_config
    from quantflow.demo.assets import build_demo_assets
    from quantflow.demo.scheme_choice import choose_demo_scheme

    build_demo_assets()
    config = load_config(args.config or DEMO_CONFIG, _overrides(args))
    note = None
    if not args.method:  # an explicit --method is the user's choice, not the demo's
        config, note = choose_demo_scheme(config)
        if note:
            print(f"scheme: {note}", flush=True)
    preflight(config, config.quant)
    return run_pipeline(config, note=note)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print this host's serving matrix: every scheme quantflow makes, served or why not."""
    import json

    from quantflow.config import DeployConfig
    from quantflow.serving.compatibility import check_schemes
    from quantflow.serving.environment import cpu_model, describe, serving_python
    from quantflow.serving.schemes import catalog, method_hint, scheme_for
    from quantflow.versions import tool_versions

    deploy = DeployConfig(serving_python=args.serving_python, device=args.device, dtype=args.dtype)
    python = serving_python(deploy.serving_python)
    info = describe(python)
    versions = tool_versions()
    print(f"host           {info.get('isa')} CPU: {cpu_model()}"
          + (f"; GPU: {info['gpu']}" if info.get("gpu") else "; no GPU"))
    print(f"serving env    {python}: {info['flavor']} {info['vllm_version']}, torch {info.get('torch')}, "
          f"compressed-tensors {info.get('compressed-tensors')}")
    print(f"pipeline env   torch {versions.get('torch')}, llmcompressor {versions.get('llmcompressor')}, "
          f"compressed-tensors {versions.get('compressed-tensors')}")
    model_config = None
    if args.model:
        from quantflow.storage.checkpoints import model_config_of
        from quantflow.config import ModelSpec
        from quantflow.quantization.architecture import describe as describe_arch

        model_config = model_config_of(ModelSpec(id=args.model))
        if model_config is None:
            print(f"error: --model: no config.json could be read for {args.model}", file=sys.stderr)
            return EXIT_FAILED
        print(f"architecture   {describe_arch(model_config)} (probed as a one-layer model of it)")
    schemes = catalog()
    names = args.scheme or list(schemes)
    unknown = [n for n in names if n not in schemes]
    if unknown:
        print(f"error: unknown scheme {', '.join(unknown)}; known: {', '.join(schemes)}", file=sys.stderr)
        return EXIT_FAILED
    rows = []
    probed = [scheme_for(schemes[name]) for name in names]
    assert all(probed)
    print(f"probing {len(names)} scheme(s) in one {info['flavor']} process where not cached "
          f"(~15 s, then a few seconds each)", flush=True)
    answers = check_schemes(probed, deploy, refresh=args.refresh, model_config=model_config)
    print(f"\n{'scheme':<12} {'serves':<7} {'what vLLM must run':<52} why not / how to ask for it")
    for name, answer in zip(names, answers):
        rows.append({"name": name, **answer})
        detail = method_hint(name) if answer["serves"] else answer["reason"]
        print(f"{name:<12} {'yes' if answer['serves'] else 'NO':<7} {answer['scheme']:<52} {detail}",
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"host": info, "cpu": cpu_model(), "model": args.model, "schemes": rows}, fh, indent=2)
    print("\nmeasured by generating a token from a tiny checkpoint of each scheme; cached per "
          "serving env, host and scheme (--refresh measures again)")
    return EXIT_OK


def cmd_deployments(args: argparse.Namespace) -> int:
    """One row per live deployment on this machine."""
    import json

    from quantflow.monitoring.deployments import COLUMNS, deployment_rows

    rows = deployment_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no deployments are live here (`quantflow run` or `make demo` deploys one)")
        return EXIT_OK
    cells = [[("n/a" if r[c] is None else f"{r[c]:.2f}" if c == "quality_score" else str(r[c])) for c in COLUMNS]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from quantflow.monitoring.exporter_process import stop_exporter
    from quantflow.platform.prefect_server import stop_local_server
    from quantflow.serving.registry import DeploymentRegistry

    if args.name:  # one deployment; the others, the exporter and Prefect keep running
        from quantflow.monitoring.deployments import stop_deployment

        try:
            record = stop_deployment(args.name)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        via = f", and its nginx at {record['base_url']}" if record.get("proxy") else ""
        print(f"stopped vLLM server {record['name']} ({record.get('upstream_url', record['base_url'])}{via})")
        return EXIT_OK
    for record in DeploymentRegistry().stop_all():
        via = f", and its nginx at {record['base_url']}" if record.get("proxy") else ""
        print(f"stopped vLLM server {record['name']} ({record.get('upstream_url', record['base_url'])}{via})")
    if stop_exporter():
        print("stopped the metrics exporter")
    from quantflow.platform.local import running_platform

    if running_platform():
        print("left the Prefect server running: `make up`'s workers use it (make down stops both)")
    elif not args.keep_prefect and stop_local_server():
        print("stopped the local Prefect server")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    """Bring back an earlier revision at the same address (tasks/rollback.py)."""
    from quantflow.tasks.rollback import rollback_deployment

    record = rollback_deployment(args.name, args.to, args.reason)
    done = record["rollback"]
    came_from = f"revision {done['from_revision']}" if done["from_revision"] else "nothing live"
    print(f"rolled back {args.name}: {came_from} -> revision {done['to_revision']} ({record['label']}), "
          f"live as revision {record['revision']} at {record['base_url']}")
    return EXIT_OK


def cmd_monitor(args: argparse.Namespace) -> int:
    from quantflow.flows.monitoring import quality_monitor
    from quantflow.platform.prefect_server import prefect_api

    with prefect_api():
        state = quality_monitor(deployment=args.deployment, load_requests=args.load,
                                return_state=True)
    result = state.result(raise_on_failure=False)
    if not state.is_completed():
        print(f"monitor failed: {state.message}", file=sys.stderr)
        return EXIT_FAILED
    score = result["quality_score"]
    print(f"{args.deployment}: quality {'n/a' if score is None else f'{score:.2f}'}, "
          f"alerts {len(result['alerts'])}, p99 {result['p99_latency_s']}")
    return EXIT_GATE if result["alerts"] else EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """Create a run of the quantize-pipeline (or quantize-search) deployment through the REST API."""
    from quantflow.config import load_config
    from quantflow.config.search import load_search_config
    from quantflow.platform.prefect_server import configured_api_url, running_local_server
    from quantflow.platform.submit import PrefectREST

    search = args.deployment.split("/")[0] == "quantize-search"
    if search and not args.config:
        print("error: --deployment quantize-search/... needs --config with a search: section", file=sys.stderr)
        return EXIT_FAILED
    config = (load_search_config if search else load_config)(args.config, _overrides(args))
    api_url = configured_api_url() or running_local_server()
    if not api_url:
        print("error: no Prefect API: set PREFECT_API_URL, or start the platform with `make up`",
              file=sys.stderr)
        return EXIT_FAILED
    api = PrefectREST(api_url)
    run = api.create_flow_run(args.deployment, {"config": config.model_dump(mode="json")},
                              idempotency_key=args.idempotency_key)
    print(f"flow run {run['id']} ({run['name']}) created: {api_url.removesuffix('/api')}/runs/flow-run/{run['id']}")
    if not args.wait:
        return EXIT_OK
    final = api.wait(run["id"], timeout_s=args.timeout)
    if final["state_type"] not in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
        print(f"flow run {run['name']} is still {final['state_name']} after {args.timeout:.0f}s; "
              "stopped waiting (the run goes on)", file=sys.stderr)
        return EXIT_FAILED
    print(f"flow run {run['name']} ended {final['state_name']}: {final['state']['message'] or ''}")
    if final["state_type"] == "COMPLETED":
        return EXIT_OK
    return EXIT_GATE if final["state_name"] in (GATE_STATE, REJECTED_STATE, CANARY_STATE) else EXIT_FAILED


# Flags that set one config field each: (flag, field path, argparse options). Their help is
# the field's own description, the text the Prefect run form shows.
RUN_FLAGS = (("--model", "model.id", {}), ("--method", "quant.method", {}), ("--bits", "quant.bits", {"type": int}),
             ("--group-size", "quant.group_size", {"type": int}), ("--name", "name", {}),
             ("--output-dir", "output_dir", {}), ("--limit", "validation.lm_eval.limit", {"type": float}))
SEARCH_FLAGS = (("--model", "model.id", {}),
                ("--mode", "search.mode", {"choices": ["ladder", "sweep"]}),
                ("--objective", "search.objective", {"choices": ["smallest", "fastest"]}),
                ("--concurrency", "search.concurrency", {"type": int}), ("--name", "name", {}),
                ("--output-dir", "output_dir", {}), ("--limit", "validation.lm_eval.limit", {"type": float}))
FIELDS_EPILOG = "Every other setting goes in the --config YAML: `quantflow fields` lists them with their meaning."


def _config_flags(parser: argparse.ArgumentParser, model, flags=RUN_FLAGS) -> None:
    from quantflow.config.reference import field_rows

    described = {row.path: row.description for row in field_rows(model)}
    for flag, path, options in flags:
        parser.add_argument(flag, metavar=path.rsplit(".", 1)[-1].upper(),
                            help=f"{path}: {described[path]}".replace("%", "%%"), **options)


def cmd_fields(args: argparse.Namespace) -> int:
    from quantflow.config.reference import field_rows, render_markdown, render_text, select

    model = SearchConfig if args.search else PipelineConfig
    if args.markdown:
        print(render_markdown(model), end="")
        return EXIT_OK
    print(render_text(select(field_rows(model), args.prefix, model.__name__)), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("run", cmd_run, "run the pipeline in this process"),
                               ("demo", cmd_demo, "build the demo model and run configs/demo.yaml"),
                               ("submit", cmd_submit, "start a run of a deployment via the Prefect API")):
        p = sub.add_parser(name, help=helptext, epilog=FIELDS_EPILOG)
        p.add_argument("--config", help="pipeline YAML (flags below override it)")
        _config_flags(p, PipelineConfig)
        p.add_argument("--no-deploy", action="store_true", help="stop after validation")
        if name == "submit":
            p.add_argument("--deployment", default="quantize-pipeline/quantize-pipeline")
            p.add_argument("--idempotency-key", help="same key twice = the same run, created once")
            p.add_argument("--wait", action="store_true", help="wait for the run and exit with its outcome")
            p.add_argument("--timeout", type=float, default=48 * 3600, help="seconds --wait waits")
        p.set_defaults(fn=fn)
    p = sub.add_parser("search", help="try candidate schemes against the gate; deploy the one chosen",
                       epilog=FIELDS_EPILOG)
    p.add_argument("--config", required=True, help="pipeline YAML with a search: section (configs/demo-search.yaml)")
    _config_flags(p, SearchConfig, SEARCH_FLAGS)
    p.add_argument("--no-deploy", action="store_true", help="choose, but do not deploy")
    p.set_defaults(fn=cmd_search)
    p = sub.add_parser("stop", help="stop one deployment by name, or (no name) every server quantflow started")
    p.add_argument("name", nargs="?", help="the deployment to stop (`quantflow deployments` lists them); "
                   "without it: every server, the exporter and the local Prefect server")
    p.add_argument("--keep-prefect", action="store_true", help="leave the Prefect server running")
    p.set_defaults(fn=cmd_stop)
    p = sub.add_parser("rollback", help="bring back an earlier revision of a deployment at the same address")
    p.add_argument("name", help="the deployment (`quantflow deployments` lists them)")
    p.add_argument("--to", type=int, metavar="REVISION",
                   help="the revision to bring back (default: the newest earlier one with another "
                        "checkpoint that was never rolled back from)")
    p.add_argument("--reason", default="requested by an operator", help="recorded with the new revision")
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("deployments", help="list the live deployments: model, scheme, address, revision, health")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(fn=cmd_deployments)
    p = sub.add_parser("doctor", help="which schemes this host's vLLM serves, and why not")
    p.add_argument("--scheme", action="append", help="check only this scheme (repeatable)")
    p.add_argument("--serving-python", help="Python of the serving environment (default .venv-serve)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    p.add_argument("--json", help="also write the matrix to this JSON file")
    p.add_argument("--model", metavar="PATH",
                   help="probe with this model's architecture (its config.json: MoE, attention type) "
                        "instead of a dense Llama; serving support differs by architecture")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("fields", help="every configuration field: type, default and what it does")
    p.add_argument("prefix", nargs="?", default="", help='a section or field, e.g. "validation.perplexity"')
    p.add_argument("--search", action="store_true", help="SearchConfig's fields (with the search: section)")
    p.add_argument("--markdown", action="store_true", help="the reference as markdown (docs/configuration.md)")
    p.set_defaults(fn=cmd_fields)
    p = sub.add_parser("monitor", help="one monitoring round against a deployment")
    p.add_argument("--deployment", default="demo")
    p.add_argument("--load", type=int, default=0, help="also send N concurrent completions")
    p.set_defaults(fn=cmd_monitor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except InputError as err:
        print(f"error: {err}\n(refused before any stage ran: nothing was written or started)",
              file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - a message for a person; -v shows the traceback
        if args.verbose:
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
