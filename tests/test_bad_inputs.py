"""Bad inputs, as a user meets them: `quantflow run --config FILE` exits 1 within seconds with
a message naming the setting or file and the fix, and leaves nothing behind: no output
folder, no manifest, no deployment, no vLLM server. docs/bad-inputs.md is the table of these
cases (and of those tested elsewhere).

The CLI runs in this process (`quantflow.cli.main`), which is what the console script calls,
so each case costs its checks rather than ~10 s of imports. Each case prints its elapsed
seconds (the doc's "seconds" column); no test asserts a duration.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, free_port_pair
from quantflow.cli import main
from quantflow.serving.registry import DeploymentRegistry
from services import moto_server

BUCKET = "quantflow-bad-inputs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llama checkpoints saved by transformers (no tokenizer: nothing here gets
    as far as loading one), and small calibration / held-out files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad-inputs")
    models = {"model": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2),
              # 96 and 224 are multiples of 32 but not of 64 or 128
              "odd_widths": dict(hidden_size=96, intermediate_size=224, num_attention_heads=3)}
    paths = {}
    for name, widths in models.items():
        cfg = LlamaConfig(num_hidden_layers=1, vocab_size=64, max_position_embeddings=64, **widths)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        paths[name] = root / name
    # DeepSeek-V3-style multi-head latent attention: every config width divides 128, but the
    # low-rank projections kv_b_proj / q_b_proj read 64 (no config key names that width).
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    mla = DeepseekV3Config(num_hidden_layers=1, vocab_size=64, max_position_embeddings=64,
                           hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64,
                           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                           first_k_dense_replace=0, n_shared_experts=1)
    DeepseekV3ForCausalLM(mla).save_pretrained(root / "mla")
    paths["mla"] = root / "mla"
    (root / "calibration.jsonl").write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n"
                                                    for i in range(20)))
    (root / "heldout.jsonl").write_text(json.dumps({"text": "held out text"}) + "\n")
    return {**paths, "root": root}


def base_config(inputs: dict[str, Path], out: Path) -> dict:
    """A config that passes the pre-flight: each case breaks one thing in it."""
    return {"name": f"bad-{out.name}", "output_dir": str(out), "model": {"id": str(inputs["model"])},
            "calibration": {"source": {"dataset": str(inputs["root"] / "calibration.jsonl")},
                            "num_samples": 4, "seq_len": 16},
            "quant": {"method": "gptq", "bits": 4, "group_size": 32},
            "validation": {"perplexity": {"source": {"dataset": str(inputs["root"] / "heldout.jsonl")}},
                           "lm_eval": {"enabled": False}},
            "deploy": {"port": free_port_pair()}, "monitor": {"metrics_port": free_port()}}


def set_dotted(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


class Refusal:
    def __init__(self, rc: int, stderr: str, seconds: float):
        self.rc, self.stderr, self.seconds = rc, stderr, seconds


def run_cli(config: dict | str, capsys, label: str, where: Path | None = None) -> Refusal:
    """`quantflow run --config FILE` in this process. `config`: a dict, written as
    <label>.yaml in `where` (default: beside its output_dir), or the path of a config file."""
    if isinstance(config, str):
        path = Path(config)
    else:
        path = (where or Path(config["output_dir"]).parent) / f"{label}.yaml"
        path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    start = time.perf_counter()
    rc = main(["run", "--config", str(path)])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():  # the doc's "seconds" column comes from these lines
        print(f"\n[bad input] {label}: exit {rc} in {seconds:.2f}s: {err.strip().splitlines()[:1]}")
    return Refusal(rc, err, seconds)


def assert_refused(r: Refusal, out: Path | None, name: str | None, *needles: str) -> None:
    """Exit 1; the message holds every needle (the field or file, why, and the fix); and
    when `out`/`name` are given, no output folder and nothing deployed under that name."""
    assert r.rc == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in r.stderr, f"{needle!r} not in: {r.stderr[-2000:]}"
    if out is not None:  # nothing half-written: not even the folder
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    if name is not None:  # nothing deployed
        from helpers import vllm_serving

        assert DeploymentRegistry().active(name) is None
        assert vllm_serving(name) == []


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _break_model(inputs: dict, tmp_path: Path, how: str) -> str:
    """A copy of the tiny model, damaged as `how` says; returns its path."""
    import shutil

    if how == "missing":
        return str(tmp_path / "no-such-model")
    model = tmp_path / "model"
    if how == "empty":
        model.mkdir()
        return str(model)
    shutil.copytree(inputs["model"], model)
    shard = model / "model.safetensors"
    if how == "no_weights":
        shard.unlink()
    elif how == "corrupt_config":
        (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif how == "header_prefix_cut":  # shorter than the 8-byte header length
        _truncate(shard, 5)
    elif how == "header_json_cut":  # the length prefix promises more header than is there
        _truncate(shard, 40)
    elif how == "garbled_header":
        data = bytearray(shard.read_bytes())
        data[8:24] = b"\xff" * 16
        shard.write_bytes(bytes(data))
    return str(model)


# (label, how the model is damaged, what the message must contain)
MODEL_CASES = [
    ("model_missing", "missing", ["model.id", "does not exist"]),
    ("model_empty", "empty", ["model.id", "is empty"]),
    ("model_no_weights", "no_weights", ["model.id", "no *.safetensors shards"]),
    ("model_corrupt_config", "corrupt_config", ["model.id", "config.json is not valid JSON"]),
    ("safetensors_header_prefix_cut", "header_prefix_cut", ["model.id", "model.safetensors is truncated", "no header"]),
    ("safetensors_header_json_cut", "header_json_cut", ["model.id", "model.safetensors is corrupt", "does not fit"]),
    ("safetensors_header_garbled", "garbled_header", ["model.id", "model.safetensors is corrupt", "not valid JSON"]),
]


@pytest.mark.parametrize("label, how, needles", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder_is_refused_before_any_stage(label, how, needles, inputs, tmp_path, capsys):
    cfg = base_config(inputs, tmp_path / "out")
    cfg["model"]["id"] = _break_model(inputs, tmp_path, how)
    r = run_cli(cfg, capsys, label)
    assert_refused(r, tmp_path / "out", cfg["name"], *needles, "fix:", "refused before any stage ran")


# (label, dotted setting -> value, what the message must contain)
CONFIG_CASES = [
    ("unknown_key", {"quant.xyzzy": 1}, ["quant.xyzzy: unknown key", "see the configs/ examples"]),
    ("misspelt_key", {"calibration.num_sample": 8}, ["calibration.num_sample", "did you mean 'num_samples'?"]),
    ("misspelt_legacy_key", {"quant.damp_precent": 0.1}, ["quant.damp_precent", "did you mean 'damp_percent'?"]),
    ("wrong_type", {"calibration.num_samples": "many"}, ["calibration.num_samples", "valid integer"]),
    ("bits_not_allowed", {"quant.bits": 5}, ["quant.bits", "Input should be 2, 3, 4 or 8"]),
    ("unknown_scheme", {"quant.method": "int4"}, ["quant.method", "'gptq', 'awq', 'rtn'"]),
    ("group_size_not_allowed", {"quant.group_size": 100}, ["quant.group_size", "Input should be -1, 32, 64 or 128"]),
    ("port_out_of_range", {"deploy.port": 80}, ["deploy.port", "greater than or equal to 1024"]),
]


@pytest.mark.parametrize("label, change, needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_setting_names_the_field(label, change, needles, inputs, tmp_path, capsys):
    cfg = base_config(inputs, tmp_path / "out")
    for dotted, value in change.items():
        set_dotted(cfg, dotted, value)
    r = run_cli(cfg, capsys, label)
    assert_refused(r, tmp_path / "out", cfg["name"], "invalid configuration in", f"{label}.yaml", *needles)


def test_unreadable_config_file_names_the_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {id: x\nquant: [\n")
    r = run_cli(str(broken), capsys, "config_not_yaml")
    assert_refused(r, None, None, str(broken), "not valid YAML")
    r = run_cli(str(tmp_path / "absent.yaml"), capsys, "config_missing")
    assert_refused(r, None, None, str(tmp_path / "absent.yaml"), "file not found")


def _recipe(tmp_path: Path, text: str | None) -> str:
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    return str(path)


# (label, change(inputs, tmp_path) -> {dotted: value}, what the message must contain)
INPUT_CASES = [
    ("group_size_does_not_divide_widths",
     lambda i, t: {"model.id": str(i["odd_widths"]), "quant.group_size": 64},
     ["quant.group_size: 64 does not divide", "reads 96 (96 % 64 = 32)",
      "mlp.down_proj reads 224", "set quant.group_size: 32"]),
    ("group_size_does_not_divide_latent_attention",
     lambda i, t: {"model.id": str(i["mla"]), "quant.group_size": 128},
     ["quant.group_size: 128 does not divide", "kv_b_proj (and 1 more) reads 64 (64 % 128 = 64)",
      "set quant.group_size: 64"]),
    ("group_size_does_not_divide_widths_rtn",
     lambda i, t: {"model.id": str(i["odd_widths"]), "quant.method": "rtn", "quant.group_size": 128},
     ["quant.group_size: 128 does not divide", "set quant.group_size: 32"]),
    ("calibration_missing", lambda i, t: {"calibration.source.dataset": str(t / "nope.jsonl")},
     ["calibration.source.dataset", "nope.jsonl does not exist"]),
    ("calibration_empty", lambda i, t: {"calibration.source.dataset": _touch(t / "empty.jsonl")},
     ["calibration.source.dataset", "empty.jsonl is empty"]),
    ("calibration_wrong_field", lambda i, t: {"calibration.source.text_field": "content"},
     ["calibration.source.text_field", "no 'content' field", "the first row has: text"]),
    ("calibration_not_json", lambda i, t: {"calibration.source.dataset": _write(t / "c.jsonl", "text: hi\n")},
     ["calibration.source.dataset", "the first row is not JSON"]),
    ("chat_turn_without_role",
     lambda i, t: {"calibration.source.format": "chat", "calibration.source.dataset": _write(
         t / "chat.jsonl", _CHAT_OK + '{"messages": [{"content": "hello"}]}\n')},
     ["calibration.source.messages_field", "row 1 of", "messages[0] has no 'role'"]),
    ("chat_turn_with_empty_content",
     lambda i, t: {"calibration.source.format": "chat", "calibration.source.dataset": _write(
         t / "chat.jsonl", '{"messages": [{"role": "user", "content": "  "}]}\n')},
     ["calibration.source.messages_field", "row 0 of", "messages[0].content is empty"]),
    ("chat_without_template",
     lambda i, t: {"calibration.source.format": "chat", "calibration.source.dataset": _write(t / "chat.jsonl", _CHAT_OK)},
     ["calibration.source.format", "has none (no chat_template in tokenizer_config.json",
      "set calibration.source.format: text"]),
    ("heldout_missing", lambda i, t: {"validation.perplexity.source.dataset": str(t / "gone" / "heldout.jsonl")},
     ["validation.perplexity.source.dataset", "heldout.jsonl does not exist"]),
    ("lm_eval_tasks_folder_missing",
     lambda i, t: {"validation.lm_eval.enabled": True, "validation.lm_eval.include_path": str(t / "tasks"),
                   "validation.lm_eval.tasks": [{"name": "demo_mc", "metric": "acc"}]},
     ["validation.lm_eval.include_path", "is not a folder"]),
    ("recipe_missing", lambda i, t: {"quant": {"method": "recipe", "recipe": _recipe(t, None)}},
     ["quant.recipe", "recipe.yaml does not exist"]),
    ("recipe_not_yaml", lambda i, t: {"quant": {"method": "recipe", "recipe": _recipe(t, "stage: [\n  x: {")}},
     ["quant.recipe", "is not valid YAML"]),
    ("recipe_unknown_modifier",
     lambda i, t: {"quant": {"method": "recipe", "recipe": _recipe(
         t, "quant_stage:\n  quant_modifiers:\n    GPTQModifer: {targets: [Linear], scheme: W4A16}\n")}},
     ["quant.recipe", "GPTQModifer"]),
]


_CHAT_OK = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def _touch(path: Path) -> str:
    path.write_text("")
    return str(path)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("label, change, needles", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_bad_input_file_or_scheme_is_refused_before_any_stage(label, change, needles, inputs, tmp_path, capsys):
    cfg = base_config(inputs, tmp_path / "out")
    for dotted, value in change(inputs, tmp_path).items():
        set_dotted(cfg, dotted, value)
    r = run_cli(cfg, capsys, label)
    assert_refused(r, tmp_path / "out", cfg["name"], *needles, "fix:", "refused before any stage ran")


def test_cuda_requested_without_a_gpu_is_refused_before_any_stage(inputs, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: quant.device cuda is valid here")
    cfg = base_config(inputs, tmp_path / "out")
    cfg["quant"]["device"] = "cuda"
    r = run_cli(cfg, capsys, "quant_device_cuda_without_gpu")
    assert_refused(r, tmp_path / "out", cfg["name"], "quant.device", "no usable GPU")


# --- serving: ports and the API key --------------------------------------------------------

def test_deploy_port_in_use_is_refused_before_any_stage(inputs, tmp_path, capsys):
    cfg = base_config(inputs, tmp_path / "out")
    with socket.socket() as holder:  # another program holds deploy.port
        holder.bind(("127.0.0.1", cfg["deploy"]["port"]))
        holder.listen()
        r = run_cli(cfg, capsys, "deploy_port_in_use")
    assert_refused(r, tmp_path / "out", cfg["name"], "deploy.port",
                   f"port {cfg['deploy']['port']} on 127.0.0.1 is in use")


def test_metrics_port_in_use_is_refused_before_any_stage(inputs, tmp_path, capsys):
    cfg = base_config(inputs, tmp_path / "out")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", cfg["monitor"]["metrics_port"]))
        holder.listen()
        r = run_cli(cfg, capsys, "metrics_port_in_use")
    assert_refused(r, tmp_path / "out", cfg["name"], "monitor.metrics_port",
                   "not quantflow's metrics exporter")


def test_public_server_without_api_key_is_refused_before_any_stage(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUANTFLOW_BAD_INPUT_KEY", raising=False)
    cfg = base_config(inputs, tmp_path / "out")
    cfg["deploy"].update(host="0.0.0.0", api_key_env="QUANTFLOW_BAD_INPUT_KEY")
    r = run_cli(cfg, capsys, "api_key_missing")
    assert_refused(r, tmp_path / "out", cfg["name"], "deploy.api_key_env",
                   "$QUANTFLOW_BAD_INPUT_KEY is empty", "export QUANTFLOW_BAD_INPUT_KEY=")


# --- S3: malformed URIs, a missing bucket, bad credentials -----------------------------------

@pytest.fixture(scope="module")
def s3_servers():
    """Two local S3-API servers (moto): one that takes any credentials and has a bucket, and
    one that checks them (INITIAL_NO_AUTH_ACTION_COUNT=0: unknown keys are refused)."""
    with moto_server() as open_url, moto_server(checks_credentials=True) as checked_url:
        urls = {"open": open_url, "checked": checked_url}
        httpx.put(f"{urls['open']}/{BUCKET}", timeout=10).raise_for_status()
        yield urls


S3_CASES = [
    ("s3_uri_without_bucket", "s3://", "open", ["output_dir", "names no bucket", "s3://<bucket>/<prefix>"]),
    ("s3_uri_empty_bucket", "s3:///runs/x", "open", ["output_dir", "names no bucket"]),
    ("s3_bucket_invalid_characters", "s3://Bad_Bucket!/runs", "open",
     ["output_dir", "'Bad_Bucket!'", "is not a valid S3 bucket name"]),
    ("s3_bucket_missing", "s3://no-such-bucket-qf/runs", "open",
     ["output_dir", "bucket 'no-such-bucket-qf' does not exist", "create the bucket"]),
    ("s3_credentials_wrong", f"s3://{BUCKET}/runs", "checked",
     ["output_dir", "refused these credentials", "AWS_ACCESS_KEY_ID"]),
    ("s3_credentials_missing", f"s3://{BUCKET}/runs", "none",
     ["output_dir", "no AWS credentials are set", "AWS_ACCESS_KEY_ID"]),
]


@pytest.mark.parametrize("label, uri, server, needles", S3_CASES, ids=[c[0] for c in S3_CASES])
def test_bad_s3_output_is_refused_before_any_stage(label, uri, server, needles, s3_servers, inputs, tmp_path,
                                                   capsys, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_servers["open" if server == "none" else server])
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    if server == "none":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    cfg = base_config(inputs, tmp_path / "unused")
    cfg["output_dir"] = uri
    r = run_cli(cfg, capsys, label, where=tmp_path)
    assert_refused(r, None, cfg["name"], *needles)
    if server == "open":  # nothing written to the store: not even the probe object
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        assert fs.find(BUCKET) == []


def test_good_s3_output_passes_the_check(s3_servers, monkeypatch):
    """The check is not a refusal of everything: a writable bucket passes, and its probe
    object is gone afterwards."""
    import fsspec

    from quantflow.preflight import check_s3

    for key, value in {"AWS_ENDPOINT_URL": s3_servers["open"], "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    check_s3(f"s3://{BUCKET}/runs/ok")
    assert fsspec.filesystem("s3", skip_instance_cache=True).find(BUCKET) == []


# --- a full disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 16 KiB (we run as root in CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_output_disk_smaller_than_the_checkpoint_is_refused_before_any_stage(inputs, small_disk, capsys):
    out = small_disk / "run"
    cfg = base_config(inputs, out)
    r = run_cli(cfg, capsys, "output_disk_full", where=small_disk.parent)
    assert_refused(r, out, cfg["name"], "output_dir", f"the disk holding {small_disk} has 16 KiB free",
                   "KiB there (the size of the checkpoint's weights)", "set output_dir to a folder on a disk with room")
    assert list(small_disk.iterdir()) == []


def test_disk_filling_up_during_a_write_leaves_no_partial_file(small_disk, tmp_path):
    """The store's writes (temp file + rename, and a folder copied across disks) say the disk
    is full, name the file, and leave neither a temp file nor a partial folder."""
    from quantflow.errors import DiskFullError
    from quantflow.storage.store import ArtifactStore

    store = ArtifactStore(str(small_disk / "run"))
    store.write_json("small.json", {"ok": True})
    with pytest.raises(DiskFullError) as err:
        store.write_bytes("big.bin", os.urandom(64 * 1024))
    assert str(small_disk / "run" / "big.bin") in str(err.value)
    assert "no space left" in str(err.value) and "output_dir" in str(err.value)
    folder = tmp_path / "built"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(DiskFullError, match="quantized_model"):
        store.put_dir(folder, "quantized_model")
    # Only the complete earlier file: no temp files, no staging folder, no partial output.
    assert sorted(p.name for p in (small_disk / "run").iterdir()) == ["small.json"]


def test_disk_full_during_stage_one_names_the_file_and_writes_no_marker(prefect_server, demo_dir, small_disk,
                                                                       capsys):
    """Stage 1 on the demo model with output_dir on the 16 KiB disk: its baseline file fits,
    the tokenizer does not. The stage fails once (not retried) saying the disk is full and
    naming the file; no manifest marker is written, so no later run takes the folder as a
    result, and no temp file is left."""
    from quantflow.config import ModelSpec, ValidationConfig
    from quantflow.errors import StageError
    from quantflow.flows.stages import run_cached_stage

    out = small_disk / "run"
    validation = ValidationConfig.model_validate({
        "perplexity": {"source": {"dataset": str(demo_dir / "data" / "heldout.jsonl")},
                       "window": 128, "max_tokens": 256},
        "consistency": {"enabled": False}})
    start = time.perf_counter()
    with pytest.raises(StageError) as err:
        run_cached_stage("checkpoint", output_uri=str(out), model=ModelSpec(id=str(demo_dir / "model")),
                         validation=validation, serving=None, golden_prompts=[])
    with capsys.disabled():
        print(f"\n[bad input] disk_full_in_stage_one: {time.perf_counter() - start:.2f}s")
    message = str(err.value)
    assert err.value.stage == "checkpoint"
    assert f"the disk holding output_dir {out} is full" in message
    assert "tokenizer/" in message and "set output_dir to a folder on a disk with room" in message
    assert not (out / "_manifests" / "checkpoint.json").exists()
    leftovers = [p.name for p in out.rglob(".*")]
    assert leftovers == [], leftovers


def test_quantize_stage_repeats_the_group_size_check_before_loading(inputs):
    """A hub checkpoint (or a run submitted to a work pool) is first seen by the stages: the
    quantize stage's own pre-flight refuses the same group size, before loading the model."""
    from quantflow.config import QuantConfig
    from quantflow.errors import StageError
    from quantflow.tasks.quantize import preflight

    with pytest.raises(StageError) as err:
        preflight(QuantConfig(method="rtn", bits=4, group_size=64), None, inputs["odd_widths"])
    assert err.value.stage == "quantize"
    assert "quant.group_size: 64 does not divide" in str(err.value) and "quant.group_size: 32" in str(err.value)
    # the same scheme with a group size that divides every width passes
    assert preflight(QuantConfig(method="rtn", bits=4, group_size=32), None, inputs["odd_widths"]) == "cpu"
