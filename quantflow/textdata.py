"""Read text documents from local files or a hub data set (calibration, held-out text)."""

from __future__ import annotations

import json
from pathlib import Path

from quantflow.checkpoints import looks_like_path
from quantflow.config import TextSource
from quantflow.errors import StageError, TransientError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        return files
    return [path]


def _read_local(path: Path, source: TextSource, stage: str, field: str) -> list[str]:
    files = _local_files(path)
    if not files:
        raise StageError(stage, f"{field}.dataset: {path} holds no .txt/.jsonl/.json files",
                         "point it at a text file, a JSONL file or a folder of them")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            docs.append(f.read_text())
            continue
        rows = ([json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                if f.suffix == ".jsonl" else json.loads(f.read_text()))
        if isinstance(rows, dict):
            rows = [rows]
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or source.text_field not in row:
                raise StageError(stage, f"{field}.text_field: row {i} of {f} has no "
                                 f"{source.text_field!r} field",
                                 f"set {field}.text_field to the column holding the text")
            docs.append(str(row[source.text_field]))
    return docs


def _read_hub(source: TextSource, stage: str, field: str) -> list[str]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(source.dataset, source.subset, split=source.split,
                                   data_files=source.data_files)
    except DatasetNotFoundError:
        raise StageError(stage, f"{field}.dataset: {source.dataset!r} is neither a local file "
                         "nor a data set on the Hugging Face hub (or the hub is offline)",
                         "pass a local .txt/.jsonl file or a hub data set name") from None
    except (ConnectionError, TimeoutError) as err:
        raise TransientError(stage, f"could not download {source.dataset}: {err}") from None
    except ValueError as err:  # unknown split / config name
        raise StageError(stage, f"{field}: {err}", "check subset and split names") from None
    if source.text_field not in ds.column_names:
        raise StageError(stage, f"{field}.text_field: {source.dataset} has no column "
                         f"{source.text_field!r} (columns: {', '.join(ds.column_names)})",
                         f"set {field}.text_field to one of those")
    return [t for t in ds[source.text_field] if t and t.strip()]


def load_documents(source: TextSource, stage: str, field: str) -> list[str]:
    path = Path(source.dataset).expanduser()
    if path.exists():
        docs = _read_local(path, source, stage, field)
    elif looks_like_path(source.dataset) or path.suffix in LOCAL_SUFFIXES:
        raise StageError(stage, f"{field}.dataset: {source.dataset} does not exist",
                         "pass an existing local file or folder, or a hub data set name")
    else:
        docs = _read_hub(source, stage, field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise StageError(stage, f"{field}.dataset: {source.dataset} contains no text",
                         "check the file or the text_field")
    return docs


def joined_text(docs: list[str]) -> str:
    """One document for perplexity: rows joined by blank lines (how WikiText is usually
    scored), so line-per-row data sets are not scored as thousands of tiny documents."""
    return "\n\n".join(d.strip("\n") for d in docs)
