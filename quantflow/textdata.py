"""Read text documents from local files or a hub data set (calibration, held-out text)."""

from __future__ import annotations

import json
from pathlib import Path

from quantflow.storage.checkpoints import looks_like_path
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


ROLES = ("system", "user", "assistant", "tool")


def conversation_problem(row: object, field: str) -> str | None:
    """Why one row is not a conversation (None when it is): a list of turns, each with a
    known role and non-empty string content."""
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        return f"has no {field!r} field (it has: {keys})"
    turns = row[field]
    if not isinstance(turns, list) or not turns:
        return f"{field!r} is not a non-empty list of turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"{field}[{i}] is not an object with role and content"
        if "role" not in turn:
            return f"{field}[{i}] has no 'role' (one of {', '.join(ROLES)})"
        if turn["role"] not in ROLES:
            return f"{field}[{i}].role is {turn['role']!r}, not one of {', '.join(ROLES)}"
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"{field}[{i}].content is empty"
    return None


def load_conversations(source: TextSource, stage: str, field: str) -> list[list[dict]]:
    """Conversations from local JSON/JSONL rows (source.messages_field) or a hub data set."""
    path = Path(source.dataset).expanduser()
    rows: list[tuple[str, object]] = []
    if path.exists():
        for f in _local_files(path):
            if f.suffix == ".txt":
                raise StageError(stage, f"{field}.format is chat but {f} is plain text",
                                 "give JSONL rows with a messages list, or set format: text")
            data = ([json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                    if f.suffix == ".jsonl" else json.loads(f.read_text()))
            rows += [(f"row {i} of {f}", r) for i, r in enumerate([data] if isinstance(data, dict) else data)]
    else:
        import datasets

        ds = datasets.load_dataset(source.dataset, source.subset, split=source.split,
                                   data_files=source.data_files)
        rows = [(f"row {i} of {source.dataset}", r) for i, r in enumerate(ds)]
    convs = []
    for where, row in rows:
        problem = conversation_problem(row, source.messages_field)
        if problem:
            raise StageError(stage, f"{field}.messages_field: {where} {problem}",
                             "each row needs a list of {role, content} turns with non-empty content")
        convs.append([{"role": t["role"], "content": t["content"]} for t in row[source.messages_field]])
    if not convs:
        raise StageError(stage, f"{field}.dataset: {source.dataset} contains no conversations",
                         "check the file or the messages_field")
    return convs
