"""Relevance judgements collected by hand: one JSON object a line, appended as a merchandiser marks results.

The search page (`retrieval.demo`) has "relevant" / "not relevant" buttons on every product card; each click
appends one line to a JSONL file:

```json
{"query": "red tshirt", "product_id": "15970", "relevance": 1, "label": "hybrid", "timestamp": "2025-01-31T12:00:00+00:00"}
```

`relevance` is 1 (relevant) or 0 (not relevant), `label` names what ranked the product (a ranker or a model),
`timestamp` is ISO 8601 in UTC. `load_judgements` reads such a file back as qrels keyed by query text:
`{query: {product_id: relevance}}`, the shape `metrics.compute_retrieval_metrics` takes as graded judgements. A
query and product marked several times keep their latest mark (a merchandiser corrects a mis-click by clicking
again); the ranker that showed the product does not matter to the judgement.

Example:
```python
>>> append_judgement("marks.jsonl", "red tshirt", "15970", 1, label="dense")
Judgement(query='red tshirt', product_id='15970', relevance=1, label='dense', timestamp='...')
>>> load_judgements("marks.jsonl")
{'red tshirt': {'15970': 1}}
```
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

RELEVANCE_VALUES = (0, 1)
JUDGEMENT_FIELDS = ("query", "product_id", "relevance", "label", "timestamp")
# Longest accepted query or product id: a judgement is a line a person could read, not a payload.
MAX_JUDGEMENT_TEXT_CHARS = 1024

# Appends from the demo's request threads are serialised, so two clicks never interleave their bytes.
_APPEND_LOCK = threading.Lock()


class JudgementError(ValueError):
    """A judgement that cannot be written or read; the message is one line naming the field (and the line)."""


@dataclass(frozen=True)
class Judgement:
    """One mark: `query` text, `product_id`, `relevance` (0 or 1), the `label` of what ranked it, a UTC `timestamp`."""

    query: str
    product_id: str
    relevance: int
    label: str
    timestamp: str

    def to_json(self) -> str:
        """The JSONL line of this judgement (without the newline)."""
        return json.dumps(asdict(self), ensure_ascii=False)


def _checked_text(value, name: str, *, required: bool = True) -> str:
    if not isinstance(value, str):
        raise JudgementError(f"{name} must be a string, got {type(value).__name__}")
    text = value.strip()
    if required and not text:
        raise JudgementError(f"{name} is empty")
    if len(text) > MAX_JUDGEMENT_TEXT_CHARS:
        raise JudgementError(f"{name} is {len(text)} characters long; at most {MAX_JUDGEMENT_TEXT_CHARS} are accepted")
    return text


def _checked_relevance(value) -> int:
    # JSON has no int/bool distinction worth trusting here: true/false and 1.0 are refused, not coerced.
    if isinstance(value, bool) or not isinstance(value, int) or value not in RELEVANCE_VALUES:
        raise JudgementError(f"relevance must be 0 or 1, got {value!r}")
    return value


def make_judgement(query, product_id, relevance, label: str = "", *, timestamp: str | None = None) -> Judgement:
    """A checked `Judgement` (`JudgementError` names the bad field); `timestamp` defaults to now, in UTC.

    Example:
    ```python
    >>> make_judgement(" red tshirt ", "15970", 0, timestamp="2025-01-31T12:00:00+00:00").query
    'red tshirt'
    ```
    """
    if timestamp is None:
        timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Judgement(
        query=_checked_text(query, "query"),
        product_id=_checked_text(product_id, "product_id"),
        relevance=_checked_relevance(relevance),
        label=_checked_text(label, "label", required=False),
        timestamp=_checked_text(timestamp, "timestamp"),
    )


def append_judgement(
    path: str | os.PathLike, query: str, product_id: str, relevance: int, label: str = "", *,
    timestamp: str | None = None,
) -> Judgement:
    """Appends one judgement as a JSONL line to `path` (created with its folder if missing) and returns it.

    The line is written with one `write` to a file opened for appending and flushed to disk, so a crash leaves
    whole lines, and concurrent appends from this process never interleave.

    Example:
    ```python
    >>> append_judgement("marks/judgements.jsonl", "black watch", "1164", 0, label="lexical").relevance
    0
    ```
    """
    judgement = make_judgement(query, product_id, relevance, label, timestamp=timestamp)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (judgement.to_json() + "\n").encode("utf-8")
    with _APPEND_LOCK:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return judgement


def _parse_line(text: str, where: str) -> Judgement:
    try:
        record = json.loads(text, parse_constant=lambda constant: math.nan)
    except json.JSONDecodeError as error:
        raise JudgementError(f"{where} is not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise JudgementError(f"{where} is a JSON {kind}, not an object with {list(JUDGEMENT_FIELDS[:3])}")
    missing = [name for name in ("query", "product_id", "relevance") if name not in record]
    if missing:
        raise JudgementError(f"{where} has no {missing[0]!r} field")
    product_id = record["product_id"]
    if isinstance(product_id, int) and not isinstance(product_id, bool):
        product_id = str(product_id)  # a hand-written file may give numeric ids
    try:
        return make_judgement(
            record["query"], product_id, record["relevance"], record.get("label") or "",
            timestamp=record.get("timestamp") or "unknown",
        )
    except JudgementError as error:
        raise JudgementError(f"{where}: {error}") from None


def read_judgements(path: str | os.PathLike) -> list[Judgement]:
    """Every judgement of a JSONL file, in file order (blank lines are skipped); `JudgementError` names the
    line number of a malformed line, `FileNotFoundError` a missing file.

    Example:
    ```python
    >>> [judgement.label for judgement in read_judgements("marks/judgements.jsonl")]
    ['dense', 'hybrid']
    ```
    """
    path = Path(path)
    judgements = []
    with path.open("rb") as handle:  # bytes, so a line that is not UTF-8 is named by its number
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise JudgementError(f"{path} line {number} is not UTF-8 text") from None
            if text.strip():
                judgements.append(_parse_line(text, f"{path} line {number}"))
    return judgements


def load_judgements(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """The judgements of a JSONL file as qrels keyed by query text: `{query: {product_id: relevance}}`.

    A query and product judged more than once keep their latest mark. The shape is what
    `metrics.compute_retrieval_metrics(run, qrels)` takes as graded judgements (a query whose marks are all 0 is
    skipped by the metrics). `JudgementError` names the line number of a malformed line.

    Example:
    ```python
    >>> load_judgements("marks/judgements.jsonl")
    {'black watch': {'1164': 0, '5310': 1}}
    ```
    """
    qrels: dict[str, dict[str, int]] = {}
    for judgement in read_judgements(path):
        qrels.setdefault(judgement.query, {})[judgement.product_id] = judgement.relevance
    return qrels


__all__ = [
    "JUDGEMENT_FIELDS",
    "Judgement",
    "JudgementError",
    "append_judgement",
    "load_judgements",
    "make_judgement",
    "read_judgements",
]
