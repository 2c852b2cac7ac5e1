"""Build (once) everything the demo and the tests need: model, text files, lm-eval tasks.

Idempotent: a stamp file records the recipe that built the folder; a folder built by the
same recipe is reused as is.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from quantflow.demo.corpus import paragraphs, split_corpus
from quantflow.demo.train import DemoModelRecipe, train_demo_model
from quantflow.storage.hashing import digest_of

DEFAULT_DIR = Path(".cache/demo")
DATA_VERSION = 2  # bump when the data or task files written here change


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def multiple_choice_rows(text: str, n: int, seed: int) -> list[dict]:
    """Context = a paragraph's first 12 words; choices = its next 6 words and the 6 words
    after the openings of 3 other paragraphs (openings are where the model is surest)."""
    rng = random.Random(seed)
    paras = [p.split() for p in paragraphs(text, 300)]
    paras = [p for p in paras if len(p) >= 18]
    picks = rng.sample(range(len(paras)), min(n, len(paras)))
    rows = []
    for i in picks:
        gold = " ".join(paras[i][12:18])
        distractors: list[str] = []
        while len(distractors) < 3:
            j = rng.randrange(len(paras))
            cand = " ".join(paras[j][12:18])
            if j != i and cand != gold and cand not in distractors:
                distractors.append(cand)
        label = rng.randrange(4)
        choices = distractors[:label] + [gold] + distractors[label:]
        rows.append({"context": " ".join(paras[i][:12]), "choices": choices, "label": label})
    return rows


def phrase_rows(text: str, n: int) -> list[dict]:
    """The n most frequent 4-word phrases: prompt = first 3 words, target = the 4th."""
    words = re.findall(r"[A-Za-z_]+", text)
    counts = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    return [{"prompt": " ".join(p[:3]), "target": p[3]} for p, _ in counts.most_common(n)]


def write_tasks(data: Path, tasks: Path) -> None:
    tasks.mkdir(parents=True, exist_ok=True)
    common = "dataset_path: json\ntest_split: test\nnum_fewshot: 0\nmetadata:\n  version: 1.0\n"
    (tasks / "demo_ppl.yaml").write_text(
        "task: demo_ppl\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {(data / 'heldout.jsonl').resolve()}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n")
    (tasks / "demo_mc.yaml").write_text(
        "task: demo_mc\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {(data / 'mc.jsonl').resolve()}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\ntarget_delimiter: \" \"\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    (tasks / "demo_gen.yaml").write_text(
        "task: demo_gen\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {(data / 'gen.jsonl').resolve()}\n"
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "target_delimiter: \" \"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "filter_list:\n  - name: first_word\n    filter:\n"
        "      - {function: regex, regex_pattern: \"^\\\\s*([A-Za-z_]+)\", group_select: 0}\n"
        "      - {function: take_first}\n"
        "metric_list:\n"
        "  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}\n")


def write_data(root: Path, seed: int) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    split = split_corpus()
    _write_jsonl(data / "calibration.jsonl", [{"text": p} for p in paragraphs(split["calibration"], 500)])
    _write_jsonl(data / "heldout.jsonl", [{"text": p} for p in paragraphs(split["heldout"], 4000)])
    _write_jsonl(data / "mc.jsonl", multiple_choice_rows(split["train"], 100, seed=seed))
    _write_jsonl(data / "gen.jsonl", phrase_rows(split["train"], 100))
    write_tasks(data, root / "tasks")


def default_recipe() -> DemoModelRecipe:
    """$QUANTFLOW_DEMO_SEED trains another demo model (a different seed gives different
    weights and answers; configs/demo.yaml must work with any of them)."""
    return DemoModelRecipe(seed=int(os.environ.get("QUANTFLOW_DEMO_SEED", "0")))


def build_demo_assets(root: Path = DEFAULT_DIR, recipe: DemoModelRecipe | None = None,
                      log=print) -> Path:
    """Train the model unless a model from the same recipe is there; (re)write the data
    files and task YAMLs when their version changed (cheap)."""
    recipe = recipe or default_recipe()
    root = Path(root)
    stamp_file = root / "stamp.json"
    stamp = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    model_key = digest_of(asdict(recipe))
    if stamp.get("model_key") != model_key or not (root / "model" / "config.json").exists():
        log(f"demo assets: training the demo model in {root / 'model'} ({recipe.num_layers}-layer "
            f"Llama, {recipe.steps} steps: a few minutes on 2 cores, done once)")
        build = root / "model.building"
        shutil.rmtree(build, ignore_errors=True)
        info = train_demo_model(split_corpus()["train"], build, recipe, log=log)
        (build / "README.md").write_text(
            "Demo model built by quantflow.demo (a test fixture, not a pretrained model).\n")
        shutil.rmtree(root / "model", ignore_errors=True)
        build.rename(root / "model")
        stamp = {"model_key": model_key, "recipe": asdict(recipe), **info}
        stamp_file.write_text(json.dumps(stamp, indent=2))
    else:
        log(f"demo assets: reusing the demo model in {root / 'model'}")
    if stamp.get("data_version") != DATA_VERSION or not (root / "tasks").exists():
        write_data(root, recipe.seed)
        stamp["data_version"] = DATA_VERSION
        stamp_file.write_text(json.dumps(stamp, indent=2))
    return root
