"""Train the demo model: a byte-level BPE tokenizer and a small Llama on the demo corpus.

This is a test fixture, not a pipeline stage. The recipe (FIELD-NOTES.md) is chosen so
quantization error is visible: vocabulary 512, tied embeddings, warm-up + cosine schedule.
Training is step-counted, not timed, so every machine builds the same model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DemoModelRecipe:
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_positions: int = 512
    steps: int = 617  # ~240 s on 2 cores
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.1
    seed: int = 0


def train_tokenizer(text: str, vocab_size: int, out_dir: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=512)
    tok.save_pretrained(out_dir)
    return tok


def train_loop(model, opt, ids: torch.Tensor, steps: int, batch_size: int, seq_len: int, lr_at,
               seed: int, report, every: int) -> None:
    """Next-token training on random windows of `ids` (seeded), clipped at norm 1.0;
    `report(step, loss)` every `every` steps and at the last. Shared by the demo model and
    the fixtures of other families (fixtures.py)."""
    gen = torch.Generator().manual_seed(seed)
    span = seq_len + 1
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - span, (batch_size,), generator=gen)
        batch = torch.stack([ids[s:s + span] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == steps - 1:
            report(step, loss.item())
    model.eval()


def train_demo_model(train_text: str, out_dir: Path, recipe: DemoModelRecipe = DemoModelRecipe(),
                     log=print) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_text, recipe.vocab_size, out_dir)
    ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95),
                            weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return recipe.lr * (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))

    start = time.monotonic()
    train_loop(model, opt, ids, recipe.steps, recipe.batch_size, recipe.seq_len, lr_at, recipe.seed,
               lambda step, loss: log(f"  demo model: step {step + 1}/{recipe.steps} loss {loss:.3f} "
                                      f"({time.monotonic() - start:.0f}s)"), every=50)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"recipe": asdict(recipe), "train_seconds": round(time.monotonic() - start, 1),
            "params": sum(p.numel() for p in model.parameters())}
