"""`evaluate` metric for ranked product retrieval: recall, precision, nDCG, MRR, MAP and hit rate at k.

The computation lives in :mod:`modeling_mmretrieval.metrics`; this module only adapts `evaluate`'s
``predictions`` / ``references`` columns to a run and qrels. `evaluate` copies this file into its module cache
before importing it, so the package is imported by its absolute name (it must be installed, e.g. with
``pip install -e .``), never relatively.
"""

import datasets
import evaluate

from modeling_mmretrieval.metrics import DEFAULT_K_VALUES, compute_retrieval_metrics


_CITATION = """\
@article{liu2025multimodal,
  title={Multimodal Semantic Retrieval for Product Search},
  author={Liu, Dong and Lopez Ramos, Esther},
  journal={arXiv preprint arXiv:2501.07365},
  year={2025}
}
"""

_DESCRIPTION = """\
Recall@k, Precision@k, nDCG@k, MRR@k, MAP and hit rate@k for ranked query -> product search. Each example is one
query: its prediction is the list of retrieved product ids, best first, and its reference is either the list of
relevant product ids (binary relevance) or a {"product_id": [...], "relevance": [...]} mapping of graded
judgements. Every metric is computed per query at each cutoff k and averaged over the queries that have at least
one relevant product.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): retrieved product ids of each query, best first, no duplicates.
    references (`list` of `list` of `str`, or `list` of `dict`): relevant product ids of each query, or
        `{"product_id": list of str, "relevance": list of non-negative numbers}` for graded relevance.
    k_values (`list` of `int`, defaults to `[10, 100]`): rank cutoffs.
    metrics (`list` of `str`, *optional*): subset of "recall", "precision", "ndcg", "mrr", "map", "hit_rate".
    gain (`str`, defaults to `"linear"`): nDCG gain, `"linear"` (grade) or `"exponential"` (2**grade - 1).
Returns:
    `dict` mapping names such as "recall@10", "ndcg@10", "mrr@10", "map@10" and "map" to their mean over queries.
Examples:
    >>> metric = evaluate.load("modeling_mmretrieval/retrieval_metric")
    >>> results = metric.compute(predictions=[["p2", "p1", "p3"]], references=[["p1", "p3"]], k_values=[2])
    >>> results["recall@2"], results["mrr@2"]
    (0.5, 0.5)
"""

_PRODUCT_IDS = datasets.Sequence(datasets.Value("string"))

_BINARY_RELEVANCE_FEATURES = datasets.Features({"predictions": _PRODUCT_IDS, "references": _PRODUCT_IDS})

_GRADED_RELEVANCE_FEATURES = datasets.Features(
    {
        "predictions": _PRODUCT_IDS,
        "references": {"product_id": _PRODUCT_IDS, "relevance": datasets.Sequence(datasets.Value("float64"))},
    }
)


def _judgements_from_reference(reference, query_index):
    if not isinstance(reference, dict):
        return set(reference)
    if len(reference["product_id"]) != len(reference["relevance"]):
        raise ValueError(
            f"Reference {query_index} has {len(reference['product_id'])} product ids but "
            f"{len(reference['relevance'])} relevance grades."
        )
    return dict(zip(reference["product_id"], reference["relevance"], strict=True))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetric(evaluate.Metric):
    """Recall, precision, nDCG, MRR, MAP and hit rate at k for ranked product retrieval."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate keeps the first option that encodes the example, and a dict would encode as a list of its
            # keys, so the graded (dict) format has to be tried first
            features=[_GRADED_RELEVANCE_FEATURES, _BINARY_RELEVANCE_FEATURES],
            reference_urls=["https://arxiv.org/abs/2501.07365"],
        )

    def _compute(self, predictions, references, k_values=DEFAULT_K_VALUES, metrics=None, gain="linear"):
        # queries are anonymous in evaluate's columns: the example index serves as query id
        run = dict(enumerate(predictions))
        qrels = {index: _judgements_from_reference(reference, index) for index, reference in enumerate(references)}
        return compute_retrieval_metrics(run, qrels, k_values=k_values, metrics=metrics, gain=gain)
