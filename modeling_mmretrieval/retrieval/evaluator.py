"""Retrieval evaluator: index a catalogue with a model, run the evaluation queries, report metrics.

Modelled on sentence-transformers' evaluators: an object that holds the evaluation data, describes itself,
and is called with a model to return a flat `{name: value}` dict (training loops log it as is).
"""

from collections.abc import Mapping, Sequence

import torch

from ..data.catalogue import CatalogueColumns
from ..data.images import ImageReport
from ..data.queries import EvaluationQuery
from .image_feature_store import ImageFeatureStore
from .metrics import compute_retrieval_metrics
from .search import build_product_index, embed_queries


class RetrievalEvaluator:
    r"""
    Recall@k, nDCG@k, MRR@k and MAP of a retriever on a catalogue and attribute-derived queries.

    Args:
        catalogue (`datasets.Dataset`): the products to search (images kept encoded).
        queries (`list[EvaluationQuery]`): queries with their relevance sets (see
            `data.make_evaluation_queries`).
        processor ([`MultimodalRetrievalProcessor`]): the model's processor.
        columns ([`CatalogueColumns`]): catalogue column names.
        k_values (`tuple[int]`): cut-offs, e.g. `(10, 100)`.
        name (`str`): prefix of the reported keys, e.g. `"validation"`.
        slices (`Mapping[str, set[str]]`, *optional*): named subsets of query ids reported separately,
            e.g. the queries whose colour word is absent from relevant titles.
        batch_size (`int`): products encoded per batch.
        image_features (`Mapping[str, torch.Tensor]`, *optional*): the frozen image tower's features of the
            catalogue's products, by product id (`training.image_feature_cache.precompute_image_features`), so that
            repeated evaluations during training do not decode and embed the same images again.
        fetch_images (`bool`): download `http(s)://` product images (refused by default: the product is then
            embedded from its text and counted as `refused`).
        image_report ([`ImageReport`], *optional*): counts how each product's image loaded (ok / missing /
            undecodable / refused, with example ids), once per product however often the evaluator runs; a new one
            when not given. Read it as `evaluator.image_report`.
        image_feature_store ([`ImageFeatureStore`], *optional*): the persistent store of image-tower features
            (`retrieval.image_feature_store`): photos this image tower embedded in any earlier run (training,
            indexing, evaluation) are read back instead of embedded again. Unused with `image_features`.

    Example:
    ```python
    >>> queries = make_evaluation_queries(catalogue, seed=0, num_queries=200)
    >>> evaluator = RetrievalEvaluator(catalogue, queries, processor, name="validation")
    >>> evaluator(model)["validation/recall@10"]
    >>> evaluator.image_report.summary()
    'images: 450 ok, 0 missing, 0 undecodable, 0 refused'
    ```
    """

    def __init__(
        self,
        catalogue,
        queries: Sequence[EvaluationQuery],
        processor,
        *,
        columns: CatalogueColumns | None = None,
        k_values: Sequence[int] = (10, 100),
        name: str = "eval",
        slices: Mapping[str, set[str]] | None = None,
        batch_size: int = 64,
        show_progress: bool = False,
        image_features: Mapping[str, torch.Tensor | None] | None = None,
        fetch_images: bool = False,
        image_report: ImageReport | None = None,
        image_feature_store: ImageFeatureStore | None = None,
    ):
        if not queries:
            raise ValueError("RetrievalEvaluator needs at least one evaluation query.")
        self.catalogue = catalogue
        self.queries = list(queries)
        self.processor = processor
        self.columns = columns or CatalogueColumns()
        self.k_values = tuple(k_values)
        self.name = name
        self.slices = dict(slices or {})
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.image_features = image_features
        self.fetch_images = fetch_images
        self.image_report = image_report if image_report is not None else ImageReport()
        self.image_feature_store = image_feature_store
        self.qrels = {query.query_id: set(query.relevant_ids) for query in self.queries}

    @classmethod
    def with_colour_slice(cls, catalogue, queries: Sequence[EvaluationQuery], processor, **kwargs) -> "RetrievalEvaluator":
        """An evaluator that also reports the slice where the image must matter: queries whose colour word
        appears in no relevant product's title."""
        colour_slice = {q.query_id for q in queries if q.colour_absent_from_titles}
        slices = {"colour_not_in_title": colour_slice} if colour_slice else {}
        return cls(catalogue, queries, processor, slices=slices, **kwargs)

    def rankings(self, model, k: int | None = None) -> dict[str, list[str]]:
        """Ranked product ids per query id (top `k`, default the largest cut-off); counts the catalogue's images in
        `image_report`."""
        k = k or max(self.k_values)
        index = build_product_index(
            model, self.processor, self.catalogue, columns=self.columns, batch_size=self.batch_size,
            show_progress=self.show_progress, metadata_columns=(), image_features=self.image_features,
            fetch_images=self.fetch_images, image_report=self.image_report,
            image_feature_store=self.image_feature_store,
        )
        query_embeddings = embed_queries(model, self.processor, [query.text for query in self.queries])
        _, ids = index.search(query_embeddings, k=k)
        return {query.query_id: [str(pid) for pid in ranked] for query, ranked in zip(self.queries, ids)}

    def compute(self, run: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """Metrics of an existing run (ranked ids per query id), overall and per slice."""
        results = {
            f"{self.name}/{metric}": value
            for metric, value in compute_retrieval_metrics(run, self.qrels, k_values=self.k_values).items()
        }
        for slice_name, query_ids in self.slices.items():
            slice_qrels = {qid: self.qrels[qid] for qid in query_ids if qid in self.qrels}
            if not slice_qrels:
                continue
            slice_run = {qid: run[qid] for qid in slice_qrels}
            for metric, value in compute_retrieval_metrics(slice_run, slice_qrels, k_values=self.k_values).items():
                results[f"{self.name}/{slice_name}/{metric}"] = value
            results[f"{self.name}/{slice_name}/num_queries"] = float(len(slice_qrels))
        results[f"{self.name}/num_queries"] = float(len(self.qrels))
        return results

    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        try:
            return self.compute(self.rankings(model))
        finally:
            model.train(was_training)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(name={self.name!r}, products={len(self.catalogue)}, queries={len(self.queries)}, "
            f"k_values={self.k_values}, slices={ {name: len(ids) for name, ids in self.slices.items()} })"
        )


__all__ = ["RetrievalEvaluator"]
