"""How a training run reports retrieval quality: the metrics it reports (`REPORTED_METRICS`, also the rows of the
model card's evaluation table) and the before/after table it prints (`format_results_table`).

Example:
```python
>>> table = format_results_table(results["before"], results["after"])  # a run's results.json
>>> table.splitlines()[0].split()
['metric', 'before', 'after', 'change']
```
"""

from collections.abc import Mapping

# The evaluator metrics a run reports (results table, model card), in this order.
REPORTED_METRICS = ("recall@10", "recall@100", "ndcg@10", "mrr@10", "map")


def format_results_table(before: Mapping[str, float], after: Mapping[str, float], prefix: str = "eval/") -> str:
    """Plain-text table of the reported metrics before and after training, with the change.

    Example:
    ```python
    >>> print(format_results_table({"eval/recall@10": 0.1}, {"eval/recall@10": 0.3}))
    metric     before  after   change
    recall@10  0.1000  0.3000  +0.2000
    ```
    """
    # The main metrics, then the same metrics of every named slice ("eval/colour_not_in_title/recall@10").
    slices = sorted({key[len(prefix):].rsplit("/", 1)[0] + "/" for key in {**before, **after}
                     if key.startswith(prefix) and "/" in key[len(prefix):]})
    names = [scope + name for scope in ["", *slices] for name in REPORTED_METRICS
             if f"{prefix}{scope}{name}" in after or f"{prefix}{scope}{name}" in before]

    def cell(values: Mapping[str, float], name: str) -> str:
        value = values.get(f"{prefix}{name}")
        return "-" if value is None else f"{value:.4f}"

    rows = [("metric", "before", "after", "change")]
    for name in names:
        old, new = before.get(f"{prefix}{name}"), after.get(f"{prefix}{name}")
        change = "-" if old is None or new is None else f"{new - old:+.4f}"
        rows.append((name, cell(before, name), cell(after, name), change))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


__all__ = ["REPORTED_METRICS", "format_results_table"]
