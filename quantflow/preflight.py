"""Pre-flight: refuse bad inputs before any stage runs, Prefect starts or a model loads.

Every check is cheap (a stat, a file's first line, a safetensors header, a socket bind, one
tiny object written to and deleted from S3), so a run that cannot succeed fails in seconds
with an error naming the setting or the file, and leaves nothing behind: no output folder,
no manifest, no server. The stages keep their own checks: a run submitted to a work pool is
checked where it runs, and a hub checkpoint is only seen after stage 1 downloads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from quantflow.storage.checkpoints import looks_like_path, read_config, read_safetensors_header, shard_files
from quantflow.config import PipelineConfig, QuantConfig, TextSource
from quantflow.errors import InputError, StageError
from quantflow.quantization.group_size import group_size_problem
from quantflow.textdata import LOCAL_SUFFIXES

# S3's bucket naming rules (3-63 characters; lowercase letters, digits, dots, hyphens).
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
S3_FIX = "write output_dir as s3://<bucket>/<prefix> with an existing bucket"


def check_inputs(config: PipelineConfig, quant: QuantConfig | None = None) -> None:
    """Raise InputError for the first input that cannot work. `quant`: the scheme to check
    (None for a search, whose candidates are checked when each is quantized)."""
    model_dir = check_model(config.model.id)
    if quant is not None:
        check_quant(quant, model_dir)
    if quant is None or quant.needs_calibration:
        check_text(config.calibration.source, "calibration.source")
        if config.calibration.source.format == "chat" and model_dir is not None:
            check_chat_template(model_dir, "calibration.source")
    if config.validation.perplexity.enabled:
        check_text(config.validation.perplexity.source, "validation.perplexity.source")
    lm_eval = config.validation.lm_eval
    if lm_eval.enabled and lm_eval.include_path and not Path(lm_eval.include_path).is_dir():
        raise InputError("validation.lm_eval.include_path", f"{lm_eval.include_path} is not a folder",
                         "point it at the folder holding your lm-eval task YAMLs, or remove it "
                         "to use lm-eval's built-in tasks")
    check_output(config.output_uri, model_dir)
    if config.deploy.enabled and config.deploy.backend == "local":
        check_serving(config)


def check_model(model_id: str) -> Path | None:
    """The local checkpoint folder, checked (config.json parses, every shard's header is
    whole); None for a hub id (stage 1 downloads and checks it)."""
    local = Path(model_id).expanduser()
    if not local.exists() and not looks_like_path(model_id):
        return None
    try:
        if not local.exists():
            raise StageError("checkpoint", f"model path {model_id} does not exist",
                             "pass an existing local folder or a Hugging Face hub id like org/name")
        if not local.is_dir():
            raise StageError("checkpoint", f"model path {local} is a file, not a checkpoint folder",
                             "pass the folder that holds config.json and the *.safetensors shards")
        if not any(local.iterdir()):
            raise StageError("checkpoint", f"model folder {local} is empty",
                             "pass the folder that holds config.json and the *.safetensors shards")
        read_config(local)
        for shard in shard_files(local):
            read_safetensors_header(shard)
    except StageError as err:
        raise InputError("model.id", err.cause, err.fix or "pass a whole checkpoint folder") from None
    return local


def check_quant(quant: QuantConfig, model_dir: Path | None) -> None:
    if quant.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("quant.device", "'cuda' was asked for, and this machine has no usable GPU "
                             "(torch.cuda.is_available() is False)",
                             "run on a GPU machine or work pool, or set quant.device: cpu (or auto)")
    if model_dir is not None:
        problem = group_size_problem(quant, read_config(model_dir), model_dir)
        if problem:
            raise InputError("quant.group_size", *problem)
    if quant.method == "recipe" and quant.recipe:
        check_recipe(quant.recipe)


def check_recipe(path: str) -> None:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError("quant.recipe", f"{path} does not exist",
                         "pass the path of an llm-compressor recipe YAML")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise InputError("quant.recipe", f"{path} is not valid YAML ({err})".replace("\n", " "),
                         "fix the YAML (configs/recipes/ has working examples)") from None
    if not isinstance(doc, dict):
        raise InputError("quant.recipe", f"{path} is not a mapping of recipe stages",
                         "see configs/recipes/ for the layout: <stage>: {<x>_modifiers: {...}}")
    # llm-compressor's own parser names an unknown modifier; importing it costs seconds,
    # paid only by recipe runs (which import it to quantize anyway).
    from llmcompressor.recipe import Recipe

    try:
        Recipe.create_instance(str(p))
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad recipe
        raise InputError("quant.recipe", f"llm-compressor cannot read {path}: {err}",
                         "fix the modifier names and arguments (e.g. GPTQModifier, "
                         "QuantizationModifier, SmoothQuantModifier, AWQModifier)") from None


def check_text(source: TextSource, field: str) -> None:
    """A local text file or folder exists and holds text; JSONL rows carry text_field."""
    path = Path(source.dataset).expanduser()
    if not path.exists():
        if looks_like_path(source.dataset) or path.suffix in LOCAL_SUFFIXES:
            raise InputError(f"{field}.dataset", f"{source.dataset} does not exist",
                             "pass an existing .txt/.jsonl/.json file or folder, or a hub data set name")
        return  # a hub data set: its stage downloads and checks it
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise InputError(f"{field}.dataset", f"{path} holds no .txt/.jsonl/.json files",
                         "point it at a text file, a JSONL file or a folder of them")
    for f in files:
        if f.stat().st_size == 0:
            raise InputError(f"{field}.dataset", f"{f} is empty", "fill it with text, or point at another file")
        if f.suffix != ".jsonl":
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            first = next((line for line in fh if line.strip()), None)
        if first is None:
            raise InputError(f"{field}.dataset", f"{f} holds only blank lines", "fill it with JSON rows")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as err:
            raise InputError(f"{field}.dataset", f"{f}: the first row is not JSON ({err})",
                             "write one JSON object per line") from None
        if source.format == "chat":
            check_conversations(f, source, field)
            continue
        if not isinstance(row, dict) or source.text_field not in row:
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"{field}.text_field", f"the rows of {f} have no {source.text_field!r} "
                             f"field (the first row has: {keys})",
                             f"set {field}.text_field to the field holding the text")


def check_conversations(f: Path, source: TextSource, field: str) -> None:
    """Every row of a chat calibration file is a conversation (the stage renders them all)."""
    from quantflow.textdata import conversation_problem

    with open(f, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(ln for ln in fh if ln.strip()):
            try:
                problem = conversation_problem(json.loads(line), source.messages_field)
            except json.JSONDecodeError as err:
                problem = f"is not JSON ({err})"
            if problem:
                raise InputError(f"{field}.messages_field", f"row {i} of {f} {problem}",
                                 "each row needs a list of {role, content} turns with non-empty content")


def check_chat_template(model_dir: Path, field: str) -> None:
    """format: chat renders conversations with the tokenizer's template: it must have one."""
    config = model_dir / "tokenizer_config.json"
    has = (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file()
    if not has and config.is_file():
        has = bool(json.loads(config.read_text()).get("chat_template"))
    if not has:
        raise InputError(f"{field}.format", f"chat calibration renders conversations with the "
                         f"tokenizer's chat template, and {model_dir} has none (no chat_template in "
                         "tokenizer_config.json, no chat_template.jinja)",
                         f"set {field}.format: text for a base model, or point model.id at the instruct model")


def check_output(uri: str, model_dir: Path | None) -> None:
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        check_s3(uri)
    elif "://" not in uri or uri.startswith("file://"):
        check_local_output(Path(uri.removeprefix("file://")), model_dir)


def check_local_output(out: Path, model_dir: Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("output_dir", f"{out} is a file", "point output_dir at a folder")
    existing = out
    while not existing.exists():  # the folder is created by the first stage, not here
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise InputError("output_dir", f"{existing} is not writable by this user",
                         "point output_dir at a folder you can write")
    # The run writes at least one more copy of the weights (the quantized checkpoint is
    # smaller, the baseline's log-probs and calibration set add to it): refuse a disk that
    # cannot hold the checkpoint's size now rather than fill it hours later.
    need = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) if model_dir else 0
    free = shutil.disk_usage(existing).free
    if free < need:
        raise InputError("output_dir", f"the disk holding {existing} has {_size(free)} free and "
                         f"this run writes about {_size(need)} there (the size of the "
                         "checkpoint's weights)", "free space on that disk, or set output_dir to a "
                         "folder on a disk with room")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n // 1024} KiB"


def check_s3(uri: str) -> None:
    """The URI names a valid bucket that exists and these credentials may write to: one
    empty probe object is written under the prefix and deleted."""
    bucket, _, prefix = uri.split("://", 1)[1].partition("/")
    if not bucket:
        raise InputError("output_dir", f"{uri!r} names no bucket", S3_FIX)
    if not BUCKET.match(bucket) or ".." in bucket:
        raise InputError("output_dir", f"{bucket!r} in {uri!r} is not a valid S3 bucket name "
                         "(3-63 lowercase letters, digits, dots and hyphens, starting and ending "
                         "with a letter or digit)", S3_FIX)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)  # the environment's credentials now
    probe = "/".join(p for p in (bucket, prefix.strip("/"), f".quantflow-preflight-{uuid.uuid4().hex}") if p)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS")
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError:
        raise InputError("output_dir", f"bucket {bucket!r} does not exist at {endpoint}",
                         "create the bucket, or fix its name (and AWS_ENDPOINT_URL for an "
                         "S3-compatible store)") from None
    except PermissionError as err:
        raise InputError("output_dir", f"{endpoint} refused these credentials for s3://{bucket} "
                         f"({err})", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                         "to credentials that may write to the bucket") from None
    except Exception as err:  # noqa: BLE001 - botocore's own classes (no credentials, no endpoint)
        name = type(err).__name__
        if name == "NoCredentialsError":
            raise InputError("output_dir", f"no AWS credentials are set to write to {uri}",
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        raise InputError("output_dir", f"could not write to {uri} at {endpoint} ({name}: {err})",
                         "check AWS_ENDPOINT_URL, the network and the credentials") from None


def check_serving(config: PipelineConfig) -> None:
    """The API key a public server needs is set, and the ports a deploy and its monitor
    will listen on are free (or held by quantflow's own server and exporter)."""
    from quantflow.monitoring.exporter_process import _answers, exporter_url
    from quantflow.serving.process import is_loopback, port_free
    from quantflow.serving.registry import DeploymentRegistry

    d = config.deploy
    if not is_loopback(d.host) and not os.environ.get(d.api_key_env) and not d.allow_unauthenticated:
        raise InputError("deploy.api_key_env", f"deploy.host {d.host} is reachable beyond this machine "
                         f"and ${d.api_key_env} is empty, so anyone could use the model",
                         f"export {d.api_key_env}=<secret>, or bind deploy.host to 127.0.0.1, or set "
                         "deploy.allow_unauthenticated: true")
    registry = DeploymentRegistry()
    ours = {r.get("port") for n in registry.names() if (r := registry.active(n))}
    # A live deployment of this name holds the port itself: the rollout takes turns with it.
    if registry.active(config.name) is None and d.port not in ours and not port_free(d.host, d.port):
        raise InputError("deploy.port", f"port {d.port} on {d.host} is in use by another program",
                         "stop that program, or set deploy.port to a free port (a rollout also "
                         "uses the one above it)")
    m = config.monitor
    if m.enabled and not port_free(m.metrics_host, m.metrics_port) \
            and not _answers(exporter_url(m.metrics_host, m.metrics_port)):
        raise InputError("monitor.metrics_port", f"port {m.metrics_port} on {m.metrics_host} is in use "
                         "by a program that is not quantflow's metrics exporter",
                         "stop that program, or set monitor.metrics_port to a free port")
