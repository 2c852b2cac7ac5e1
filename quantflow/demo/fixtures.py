"""Small models of other families, trained briefly on the demo corpus with the demo tokenizer.

Test fixtures, not pipeline stages: the mixture-of-experts families people quantize now
(Qwen3-MoE, Mixtral) and a chat model (a tokenizer with a chat template). They are small
enough to train in well under a minute on 2 cores, and trained enough that a destroyed
expert or a broken loader moves perplexity far beyond quantization error. Built once per
recipe into `.cache/fixtures/<name>` (a stamp records the recipe, as for the demo model).

Widths are multiples of 128 so every group size quantflow offers divides them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantflow.demo.corpus import paragraphs, split_corpus
from quantflow.demo.train import train_loop
from quantflow.storage.hashing import digest_of

DEFAULT_ROOT = Path(".cache/fixtures")
FIXTURE_VERSION = 2  # bump when the builder changes what it writes

# A ChatML template: what Qwen-style instruct models ship in tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class FixtureRecipe:
    family: str  # qwen3_moe | mixtral | chat
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0
    arch: dict = field(default_factory=dict)  # config overrides


FAMILIES = {
    "qwen3_moe": FixtureRecipe("qwen3_moe", arch=dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)),
    "mixtral": FixtureRecipe("mixtral", arch=dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    # Dense Qwen3 with a chat template: the instruct/chat path on a non-Llama architecture.
    "chat": FixtureRecipe("chat", arch=dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=384)),
}


def _config(recipe: FixtureRecipe, tok):
    from transformers import MixtralConfig, Qwen3Config, Qwen3MoeConfig

    cls = {"qwen3_moe": Qwen3MoeConfig, "mixtral": MixtralConfig, "chat": Qwen3Config}[recipe.family]
    return cls(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, **recipe.arch)


def _tokenizer(demo_model: Path, chat: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHAT_TEMPLATE
    return tok


def conversations(text: str, n: int, seed: int = 0) -> list[dict]:
    """Role/content turns cut from the corpus: a question made of a paragraph's opening,
    answered by the rest of it (what a chat calibration set looks like, offline)."""
    import random

    rng = random.Random(seed)
    paras = [p for p in paragraphs(text, 300) if len(p.split()) >= 40]
    rows = []
    for p in rng.sample(paras, min(n, len(paras))):
        words = p.split()
        rows.append({"messages": [
            {"role": "system", "content": "You explain the Python language reference."},
            {"role": "user", "content": "Continue: " + " ".join(words[:12])},
            {"role": "assistant", "content": " ".join(words[12:60])}]})
    return rows


def _training_ids(tok, text: str, chat: bool) -> torch.Tensor:
    if not chat:
        return torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    # Half plain text, half rendered conversations: the model learns the template's markers.
    rendered = [tok.apply_chat_template(r["messages"], tokenize=False)
                for r in conversations(text, 400, seed=1)]
    return torch.tensor(tok(text[: len(text) // 2] + "\n".join(rendered))["input_ids"], dtype=torch.long)


def train_fixture(recipe: FixtureRecipe, demo_model: Path, out_dir: Path, log=print) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    chat = recipe.family == "chat"
    tok = _tokenizer(demo_model, chat)
    ids = _training_ids(tok, split_corpus()["train"], chat)
    model = AutoModelForCausalLM.from_config(_config(recipe, tok))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.monotonic()

    def lr_at(step: int) -> float:  # warm-up, then cosine
        return recipe.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))

    train_loop(model, opt, ids, recipe.steps, recipe.batch_size, recipe.seq_len, lr_at, recipe.seed,
               lambda step, loss: log(f"  {recipe.family} fixture: step {step + 1}/{recipe.steps} "
                                      f"loss {loss:.3f} ({time.monotonic() - start:.0f}s)"), every=40)
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"{recipe.family} fixture built by quantflow.demo.fixtures (a test model, not pretrained).\n")
    return {"train_seconds": round(time.monotonic() - start, 1),
            "params": sum(p.numel() for p in model.parameters())}


def build_fixture(family: str, demo_model: Path, root: Path = DEFAULT_ROOT, log=print) -> Path:
    """The fixture's model folder, trained unless one from the same recipe is there."""
    if family not in FAMILIES:
        raise ValueError(f"unknown fixture family {family!r}; known: {', '.join(FAMILIES)}")
    recipe = FAMILIES[family]
    key = digest_of({"recipe": asdict(recipe), "version": FIXTURE_VERSION,
                     "tokenizer": (demo_model / "tokenizer.json").read_text()})
    folder = Path(root) / family
    stamp = folder / "stamp.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return folder / "model"
    log(f"fixtures: training the {family} fixture in {folder} (once)")
    build = folder / "model.building"
    shutil.rmtree(build, ignore_errors=True)
    info = train_fixture(recipe, demo_model, build, log=log)
    shutil.rmtree(folder / "model", ignore_errors=True)
    build.rename(folder / "model")
    if family == "chat":
        rows = conversations(split_corpus()["calibration"], 64, seed=2)
        (folder / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp.write_text(json.dumps({"key": key, "recipe": asdict(recipe), **info}, indent=2))
    return folder / "model"


if __name__ == "__main__":
    import sys

    from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets

    demo = build_demo_assets(DEFAULT_DIR) / "model"
    for name in sys.argv[1:] or list(FAMILIES):
        print(build_fixture(name, demo))
