"""The demo corpus: the Python language reference that ships with CPython.

No hub is reachable on the machines quantflow is developed on, so the demo model is
trained on text every Python install carries. The corpus is split by position into
disjoint train / calibration / held-out ranges so perplexity is never measured on text
the model or the quantizer saw.
"""

from __future__ import annotations

import pydoc_data.topics

# Fractions of the corpus, in order. Held-out text comes last so it shares no
# paragraph with training or calibration text.
TRAIN_END = 0.90
CALIBRATION_END = 0.95


def corpus_text() -> str:
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def split_corpus(text: str | None = None) -> dict[str, str]:
    text = corpus_text() if text is None else text
    a, b = int(len(text) * TRAIN_END), int(len(text) * CALIBRATION_END)
    return {"train": text[:a], "calibration": text[a:b], "heldout": text[b:]}


def paragraphs(text: str, min_chars: int = 200) -> list[str]:
    """Paragraph-sized chunks (blank-line separated, short ones merged forward)."""
    out: list[str] = []
    buf = ""
    for block in text.split("\n\n"):
        buf = f"{buf}\n\n{block}" if buf else block
        if len(buf) >= min_chars:
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
