"""Checkpoints with real architectures at real shapes and random weights, saved the way the
hub ships them: bfloat16 safetensors shards of at most 5 GB with a weight-map index.

There is no hub here, so cost at size is measured on these. Perplexity on random weights
means nothing; time, memory and bytes do. The tokenizer is the demo's (token ids stay far
below the real vocabulary size, which only the embedding and lm_head shapes need).

Each checkpoint is built once into .cache/bench/<name> and reused while its spec is the
same (built.json records it). Tensors are generated one shard at a time, so building the
16 GB 8B-shaped checkpoint holds at most one shard in memory.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

BENCH_DIR = Path(".cache/bench")
SHARD_BYTES = 5 * 10**9  # the hub's default max_shard_size

LLAMA_3 = {"vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
SPECS: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B: 1.24B parameters, tied embeddings.
    "llama-3.2-1b": {**LLAMA_3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "tie_word_embeddings": True},
    # The same shapes with 2 decoder layers: GPTQ on CPU in minutes, not hours.
    "llama-3.2-1b-2layers": {**LLAMA_3, "hidden_size": 2048, "intermediate_size": 8192,
                             "num_hidden_layers": 2, "tie_word_embeddings": True},
    # meta-llama/Llama-3.1-8B: 8.03B parameters, separate lm_head.
    "llama-3.1-8b": {**LLAMA_3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "head_dim": 128, "tie_word_embeddings": False},
}


def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes exactly as transformers' LlamaForCausalLM saves them (built on the
    meta device: no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**spec))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()
            if not (spec["tie_word_embeddings"] and name == "lm_head.weight")]


# Drawing 8B normal samples takes minutes on 2 cores; tiling one pool of them at a random
# offset per tensor takes seconds. An odd pool length keeps rows from repeating in step.
POOL = 2**24 + 43


def _random(shape: tuple[int, ...], name: str, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    n = math.prod(shape)
    start = int(torch.randint(0, len(pool), (1,), generator=gen))
    block = torch.cat([pool[start:], pool[:start]])
    return block.repeat(-(-n // len(pool)))[:n].reshape(shape).clone()


def build(name: str, tokenizer_dir: Path, root: Path = BENCH_DIR, log=print) -> Path:
    """.cache/bench/<name>: built once, reused while SPECS[name] is unchanged."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    spec = SPECS[name]
    out = root / name
    stamp = out / "built.json"
    if stamp.exists() and json.loads(stamp.read_text())["spec"] == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    partial = root / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    shapes = tensor_shapes(spec)
    total = sum(math.prod(s) for _, s in shapes) * 2
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for item in shapes:
        nbytes = math.prod(item[1]) * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    # Scaled like an initialised model, so activations stay finite through every layer.
    pool = torch.randn(POOL, generator=gen).mul_(0.02).to(torch.bfloat16)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        tensors = {n: _random(s, n, pool, gen) for n, s in group}
        save_file(tensors, partial / file, metadata={"format": "pt"})
        del tensors
        weight_map.update({n: file for n, _ in group})
        log(f"  {name}: shard {i}/{len(groups)} written ({time.perf_counter() - start:.0f}s)")
    if len(groups) > 1:
        (partial / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = LlamaConfig(**spec, architectures=["LlamaForCausalLM"])
    config.dtype = torch.bfloat16
    config.save_pretrained(partial)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(partial)
    params = sum(math.prod(s) for _, s in shapes)
    (partial / "built.json").write_text(json.dumps({"spec": spec, "params": params, "bytes": total,
                                                     "build_s": round(time.perf_counter() - start, 1)}))
    partial.rename(out)
    log(f"  {name}: {params / 1e9:.2f}B parameters, {total / 1e9:.2f} GB in {len(groups)} shard(s)")
    return out


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
