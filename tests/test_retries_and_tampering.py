"""Transient faults are retried and counted; integrity faults are not (issue 12, items 1
and 3). An S3 fault is injected by a forwarding proxy (tests/fault_proxy.py) in front of a
real S3-API server (moto); tampering is done on local disk and on S3 after each stage."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from conftest import make_config
from fault_proxy import FaultProxy
from helpers import vllm_serving
from quantflow.errors import StageError, StorageRefusedError
from quantflow.storage.hashing import digest_of
from services import moto_server, s3_denying_writes

pytestmark = [pytest.mark.slow]
BUCKET = "quantflow-faults"
STAGES = ("checkpoint", "calibration", "quantize", "validate")


def test_storage_faults_are_transient_and_client_errors_are_not():
    """is_transient, on the errors s3fs raises: 5xx, 429 and broken connections are retried;
    4xx (bad credentials, missing bucket) and quantflow's own integrity errors are not."""
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    from quantflow.tasks.policy import is_transient

    def s3_error(status: int, code: str) -> BaseException:
        boto = ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        try:  # raised as s3fs raises it: the OSError it translates to, caused by botocore's error
            raise translate_boto_error(boto) from boto
        except Exception as err:  # noqa: BLE001
            return err

    assert [is_transient(s3_error(s, c)) for s, c in
            [(503, "ServiceUnavailable"), (500, "InternalError"), (429, "TooManyRequests")]] == [True] * 3
    assert [is_transient(s3_error(s, c)) for s, c in
            [(403, "AccessDenied"), (404, "NoSuchBucket"), (400, "InvalidRequest")]] == [False] * 3
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(StageError("quantize", "quantized checkpoint differs"))


def test_negative_retry_delay_is_refused_naming_the_field(tmp_path):
    from quantflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"placement.retry_delays_s: \[5.0, -1.0\] has a negative delay"):
        make_config(tmp_path / "never", "bad-delay", placement={"retry_delays_s": [5, -1]})
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def moto_url():
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(moto_url, monkeypatch):
    """The pipeline's S3 traffic goes through a FaultProxy in front of moto. Botocore's own
    retries are turned off (AWS_MAX_ATTEMPTS=1) so that one injected 503 fails one stage
    attempt and the retry seen is the stage's (Prefect's); with botocore's defaults the
    same holds once the proxy fails more requests than botocore retries."""
    import s3fs

    proxy = FaultProxy(moto_url)
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url,
                       "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    yield proxy, fs
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def _flip_byte(read, write, at: float = 0.5) -> bytes:
    """Change one byte of a file in place (same size); return the original bytes."""
    original = read()
    data = bytearray(original)
    data[int(len(data) * at)] ^= 0xFF
    write(bytes(data))
    return original


def _attempts(summary: dict) -> dict[str, int]:
    return {stage: rec["attempts"] for stage, rec in summary["stages"].items()}


def _revalidate(cfg):
    """The same run with a changed report-only validation setting (performance is off and not
    part of the baseline): validate runs again and reads the quantized checkpoint; the
    stages before it stay cached."""
    performance = cfg.validation.performance.model_copy(update={"num_prompts": 17})
    return cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"performance": performance})})


def test_s3_503_is_retried_then_tampered_objects_are_recomputed_or_refused(prefect_server, demo_dir, s3):
    """Through the proxy: the first PUT of calibration_data.pt is answered 503. The
    calibration stage fails once with a transient storage fault, is retried, and the run
    completes with attempts {calibration: 2, others: 1} in pipeline_summary.json and every
    stage's manifest in place. Then, on S3: calibration_data.pt changed -> the rerun computes
    calibration again (its cached result names other bytes) and nothing after it; the
    quantized shard changed while this worker holds a verified copy of it -> validate
    downloads it again, refuses naming model.safetensors, and is attempted once."""
    import torch

    from quantflow.flows.pipeline import quantize_pipeline
    from quantflow.storage.hashing import cache_root

    proxy, fs = s3
    root = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    cfg = make_config(f"s3://{root}", f"s3-faults-{uuid.uuid4().hex[:4]}", placement={"retry_delays_s": [0, 0]},
                      validation={"lm_eval": {"enabled": False}}, deploy={"enabled": False})
    proxy.fail("PUT", "/calibration_data.pt", times=1)
    state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    assert proxy.answered("PUT", "/calibration_data.pt") == [503, 200]
    summary = json.loads(fs.cat_file(f"{root}/pipeline_summary.json"))
    assert summary["outcome"] == "validated"
    assert _attempts(summary) == {"checkpoint": 1, "calibration": 2, "quantize": 1, "validate": 1}
    # Intact: every stage's marker, and the retried file holds what its manifest says
    # (validate passing has re-hashed the quantized checkpoint against its manifest).
    assert all(fs.exists(f"{root}/_manifests/{stage}.json") for stage in STAGES)
    calib_manifest = json.loads(fs.cat_file(f"{root}/calibration_manifest.json"))
    ids = torch.load(io.BytesIO(fs.cat_file(f"{root}/calibration_data.pt")))["input_ids"]
    assert digest_of(ids.tolist()) == calib_manifest["sha256"]

    cal = f"{root}/calibration_data.pt"
    tampered = bytes(reversed(fs.cat_file(cal)))
    fs.pipe_file(cal, tampered)
    state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    summary = json.loads(fs.cat_file(f"{root}/pipeline_summary.json"))
    assert summary["cache_hits"] == ["checkpoint", "quantize", "validate"]
    assert _attempts(summary) == dict.fromkeys(STAGES, 1)
    ids = torch.load(io.BytesIO(fs.cat_file(cal)))["input_ids"]
    assert digest_of(ids.tolist()) == calib_manifest["sha256"]

    fetched = cache_root() / "fetched"
    held = [p for p in fetched.glob("*.source.json") if "model.safetensors" in p.read_text()]
    assert held, "validate's verified copy of the quantized checkpoint should be held"
    shard = f"{root}/quantized_model/model.safetensors"
    _flip_byte(lambda: fs.cat_file(shard), lambda data: fs.pipe_file(shard, data))
    state = quantize_pipeline(config=_revalidate(cfg), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageError, match=r"\[validate\] quantized checkpoint s3://.*/quantized_model "
                                         r"differs from what the quantize stage wrote \(model\.safetensors\)"):
        state.result()
    summary = json.loads(fs.cat_file(f"{root}/pipeline_summary.json"))
    assert summary["outcome"] == "failed" and summary["failed_stage"] == "validate"
    assert summary["stages"]["validate"]["state"] == "Failed"
    assert _attempts(summary) == {"checkpoint": 1, "calibration": 1, "quantize": 1, "validate": 1}
    assert not fs.exists(f"{root}/_manifests/validate.json")  # no verdict stands for the changed shard


def test_s3_access_denied_fails_its_stage_once_and_is_not_retried(prefect_server, demo_dir, monkeypatch):
    """S3's own 403: moto checks this user's IAM policy, which denies writing
    calibration_data.pt. The calibration stage fails on its first attempt and is not retried
    though retry_delays_s allows two more; pipeline_summary.json (which the policy lets the
    run write) says so, and the message names the object and carries S3's reason."""
    import s3fs

    from quantflow.flows.pipeline import quantize_pipeline

    bucket = "quantflow-denied"
    with s3_denying_writes(bucket, "*/calibration_data.pt") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        root = f"{bucket}/{uuid.uuid4().hex[:8]}"
        cfg = make_config(f"s3://{root}", f"s3-denied-{uuid.uuid4().hex[:4]}",
                          placement={"retry_delays_s": [0, 0]},
                          validation={"lm_eval": {"enabled": False}}, deploy={"enabled": False})
        try:
            state = quantize_pipeline(config=cfg, return_state=True)
            assert state.is_failed(), state.message
            with pytest.raises(StorageRefusedError) as err:
                state.result()
            # The object, S3's own report line (through botocore) and the fix.
            message = str(err.value)
            assert f"the object store refused writing s3://{root}/calibration_data.pt: " in message, message
            assert "(AccessDenied) when calling the PutObject operation: Access Denied" in message, message
            assert "fix: give the credentials" in message
            fs = s3fs.S3FileSystem()
            summary = json.loads(fs.cat_file(f"{root}/pipeline_summary.json"))
            assert summary["outcome"] == "failed" and summary["failed_stage"] == "calibration", summary
            assert _attempts(summary) == {"checkpoint": 1, "calibration": 1}
            assert summary["error"] == message
            assert not fs.exists(f"{root}/calibration_data.pt")
            assert not fs.exists(f"{root}/_manifests/calibration.json")
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def test_local_tampering_recomputes_calibration_and_refuses_a_changed_shard(prefect_server, demo_dir, served_quant,
                                                                          tmp_path, caplog):
    """On local disk: calibration_data.pt edited after its stage -> the rerun computes
    calibration again (the marker's sha256 no longer matches; an untouched file costs a
    stat) and the rest stays cached; a quantized shard edited after quantize -> validate
    refuses naming model.safetensors, one attempt, and that run, with deploy on and a scheme
    this host serves, deploys nothing."""
    import torch

    from quantflow.flows.pipeline import quantize_pipeline
    from quantflow.serving.registry import DeploymentRegistry

    out = tmp_path / "local"
    cfg = make_config(out, f"local-tamper-{uuid.uuid4().hex[:4]}", placement={"retry_delays_s": [0, 0]},
                      quant=served_quant["quant"], validation={"lm_eval": {"enabled": False}},
                      deploy={"enabled": False})
    state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert _attempts(summary) == dict.fromkeys(STAGES, 1)

    cal = out / "calibration_data.pt"
    expected = json.loads((out / "calibration_manifest.json").read_text())["sha256"]
    ids = torch.load(cal)["input_ids"]
    ids[0, 0] = (ids[0, 0] + 1) % 100
    torch.save({"input_ids": ids}, cal)
    with caplog.at_level(logging.WARNING, logger="quantflow.pipeline"):
        state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    assert f"{cal} changed since the calibration stage wrote it" in caplog.text
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["cache_hits"] == ["checkpoint", "quantize", "validate"]
    assert _attempts(summary) == dict.fromkeys(STAGES, 1)
    assert digest_of(torch.load(cal)["input_ids"].tolist()) == expected

    shard = out / "quantized_model" / "model.safetensors"
    _flip_byte(shard.read_bytes, shard.write_bytes)
    # Deploy on (it is not an input of stages 1-4, so they stay cached): were the changed
    # shard not refused, this run would deploy it.
    release = _revalidate(cfg)
    release = release.model_copy(update={"deploy": release.deploy.model_copy(update={"enabled": True})})
    state = quantize_pipeline(config=release, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageError, match=r"\[validate\] quantized checkpoint .*quantized_model differs from "
                                         r"what the quantize stage wrote \(model\.safetensors\)"):
        state.result()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["failed_stage"] == "validate"
    assert summary["stages"]["validate"]["state"] == "Failed"
    assert summary["stages"]["validate"]["attempts"] == 1
    assert not (out / "_manifests" / "validate.json").exists()
    assert "deploy" not in summary["stages"] and not (out / "deployment.json").exists()
    assert DeploymentRegistry().active(cfg.name) is None and vllm_serving(cfg.name) == []
