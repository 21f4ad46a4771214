"""Held-out evaluation: do images pay on products and query phrasings that training never saw?

One evaluator, the same for every row of a comparison (trained models, zero-shot towers, BM25), measuring:

- **all**: every query, phrased by the held-out family (`data.held_out_phrasing`), over the whole catalogue;
- **text_silent**: queries naming a colour or pattern, judged on the relevant products whose title and
  description never say it — products only the image can match (the others are left out of the ranking, so
  they count neither for nor against);
- **degraded**: the same visual queries over the catalogue with the visual words stripped from the text of a
  seeded share of the products, as on a marketplace with poor titles.

Per-query values are kept, so two rows can be compared with `paired_bootstrap`.

Example:
```python
>>> evaluator = HeldOutEvaluator(load_catalogue(split="test"), num_queries=1000, seed=0)
>>> result = evaluator.evaluate(model_ranker(model, processor))
>>> result.means()["text_silent/ndcg@10"]
```
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.catalogue import CatalogueColumns
from ..data.held_out_phrasing import derive_held_out_query
from ..data.images import ImageReport
from ..data.queries import EvaluationQuery, make_evaluation_queries
from ..data.visual_words import VisualWords, degrade_product_texts, degraded_product_ids, text_is_silent_about
from .image_feature_store import ImageFeatureStore
from .index import ProductIndex
from .metrics import evaluate_run
from .search import build_product_index, embed_queries

# A ranker: (products, query texts, k) -> the top-k product ids of each query.
Ranker = Callable[[Sequence[Mapping], Sequence[str], int], list[list[str]]]
DEFAULT_VISUAL_ATTRIBUTE_KEYS = ("Pattern",)


@dataclass
class HeldOutResult:
    """Per-query metric values of one ranker: `per_query[slice][metric][query_id]`, and its top-k runs."""

    per_query: dict[str, dict[str, dict[str, float]]]
    runs: dict[str, dict[str, list[str]]]

    def means(self) -> dict[str, float]:
        """`{"<slice>/<metric>": mean}` plus `"<slice>/num_queries"`."""
        means = {}
        for slice_name, metrics in self.per_query.items():
            for metric, values in metrics.items():
                means[f"{slice_name}/{metric}"] = float(np.mean(list(values.values()))) if values else float("nan")
            means[f"{slice_name}/num_queries"] = float(len(next(iter(metrics.values()), {})))
        return means


class HeldOutEvaluator:
    r"""
    nDCG@10 and Recall@100 (and the other metrics of `evaluate_run`) on held-out phrasings, over a whole
    catalogue, a text-silent slice and a degraded-text variant (see the module docstring).

    Args:
        catalogue (`datasets.Dataset` or rows): the products (images kept encoded), e.g. the test split.
        num_queries (`int`): held-out queries to derive (distinct texts, seeded).
        seed (`int`): seeds the queries and the degraded share.
        degraded_share (`float`): share of products whose visual words the degraded variant strips.
        columns ([`CatalogueColumns`]): catalogue column names.
        visual_attribute_keys (`tuple[str]`): attribute keys that a photo shows (beside the colour column).
        k_values (`tuple[int]`): metric cut-offs; runs keep the top `max(k_values)`.
        processor, name, batch_size, image_features: for calling the evaluator with a model during training
            (`evaluator(model)` returns `{"<name>/<metric>": ..., "<name>/text_silent/<metric>": ...}`);
            `image_features` are the frozen image tower's features by product id, when cached.
        fetch_images (`bool`): download `http(s)://` product images when the evaluator is called with a model
            (refused by default: the product is then embedded from its text and counted as `refused`).
        image_report ([`ImageReport`], *optional*): counts how each product's image loaded when the evaluator is
            called with a model, once per product; a new one when not given (`evaluator.image_report`).
        image_feature_store ([`ImageFeatureStore`], *optional*): the persistent image-feature store, read (and
            filled) when the evaluator is called with a model and `image_features` are not given.
        phrase (`Callable`, *optional*): words each query (`make_evaluation_queries`'s `phrase`); the held-out
            family by default. `data.queries.derive_query`, the training phrasing, gives an evaluator for choosing
            settings on validation products without ever seeing the held-out family.
    """

    def __init__(
        self,
        catalogue,
        *,
        num_queries: int = 1000,
        seed: int = 0,
        degraded_share: float = 0.5,
        columns: CatalogueColumns | None = None,
        visual_attribute_keys: Sequence[str] = DEFAULT_VISUAL_ATTRIBUTE_KEYS,
        k_values: Sequence[int] = (10, 100),
        processor=None,
        name: str = "heldout",
        batch_size: int = 64,
        image_features: Mapping | None = None,
        fetch_images: bool = False,
        image_report: ImageReport | None = None,
        image_feature_store: ImageFeatureStore | None = None,
        phrase: Callable | None = None,
    ):
        self.processor, self.name, self.batch_size, self.image_features = processor, name, batch_size, image_features
        self.fetch_images = fetch_images
        self.image_report = image_report if image_report is not None else ImageReport()
        self.image_feature_store = image_feature_store
        self.columns = columns or CatalogueColumns()
        self.products = list(catalogue)
        self.k_values = tuple(k_values)
        self.visual_keys = tuple(key for key in (self.columns.base_colour, *visual_attribute_keys) if key)
        self.queries: list[EvaluationQuery] = make_evaluation_queries(
            catalogue, seed=seed, num_queries=num_queries, columns=self.columns, phrase=phrase or derive_held_out_query
        )
        self.phrase_name = None if phrase is None else getattr(phrase, "__name__", repr(phrase))
        # Whole rows (`product_records` keeps only the attribute columns): silence is judged on title and description.
        records = {str(product[self.columns.product_id]): product for product in self.products}
        values = {str(query.attributes[key]) for query in self.queries for key in self.visual_keys
                  if key in query.attributes}
        self.words = VisualWords.from_values(values)
        self.qrels = {query.query_id: set(query.relevant_ids) for query in self.queries}
        self.visual_queries = [query for query in self.queries if self._visual_phrases(query)]
        self.silent_qrels = {}
        for query in self.visual_queries:
            phrases = self._visual_phrases(query)
            silent = {pid for pid in query.relevant_ids
                      if text_is_silent_about(records[pid], phrases, self.words, self._text_fields)}
            if silent:
                self.silent_qrels[query.query_id] = silent
        self.degraded_ids = degraded_product_ids(records, degraded_share, seed)
        self.degraded_products = degrade_product_texts(
            self.products, self.degraded_ids, self.words, self.columns.product_id, self._text_fields
        )

    @property
    def _text_fields(self) -> tuple[str, ...]:
        return tuple(name for name in (self.columns.title, self.columns.description) if name)

    def _visual_phrases(self, query: EvaluationQuery) -> list[str]:
        return [str(query.attributes[key]) for key in self.visual_keys if key in query.attributes]

    def evaluate(self, rank: Ranker) -> HeldOutResult:
        """Runs `rank` on the clean and the degraded catalogue and scores every slice per query."""
        k = max(self.k_values)
        texts = [query.text for query in self.queries]
        # The text-silent run drops a query's other relevant products, so it ranks deeper first: the silent
        # products just below them must get the places they leave.
        depth = min(len(self.products), k + max(
            (len(self.qrels[qid] - silent) for qid, silent in self.silent_qrels.items()), default=0))
        deep = dict(zip((q.query_id for q in self.queries), rank(self.products, texts, depth)))
        clean = {qid: ranked[:k] for qid, ranked in deep.items()}
        visual_texts = [query.text for query in self.visual_queries]
        degraded = {}
        if visual_texts:
            degraded = dict(zip((q.query_id for q in self.visual_queries), rank(self.degraded_products, visual_texts, k)))
        silent_run = {
            qid: [pid for pid in deep[qid] if pid in silent or pid not in self.qrels[qid]][:k]
            for qid, silent in self.silent_qrels.items()
        }
        visual_qrels = {query.query_id: self.qrels[query.query_id] for query in self.visual_queries}
        per_query = {
            "all": self._scored(clean, self.qrels),
            "text_silent": self._scored(silent_run, self.silent_qrels),
            "degraded": self._scored(degraded, visual_qrels),
        }
        return HeldOutResult(per_query=per_query, runs={"all": clean, "degraded": degraded})

    def _scored(self, run: Mapping, qrels: Mapping) -> dict[str, dict[str, float]]:
        """Per-query metrics; none for a slice without queries (a small catalogue may have no silent product)."""
        return evaluate_run(run, qrels, k_values=self.k_values).per_query if qrels else {}

    def __call__(self, model) -> dict[str, float]:
        """Flat metrics of `model` (the training loops' evaluator interface): all queries under `name/`, the
        slices under `name/<slice>/`."""
        if self.processor is None:
            raise ValueError("pass `processor=` to the evaluator to call it with a model")
        was_training = model.training
        try:
            ranker = model_ranker(model, self.processor, columns=self.columns, batch_size=self.batch_size,
                                  image_features=self.image_features, fetch_images=self.fetch_images,
                                  image_report=self.image_report, image_feature_store=self.image_feature_store)
            means = self.evaluate(ranker).means()
        finally:
            model.train(was_training)
        return {f"{self.name}/{key.removeprefix('all/')}": value for key, value in means.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(products={len(self.products)}, queries={len(self.queries)}, "
            f"visual_queries={len(self.visual_queries)}, text_silent_queries={len(self.silent_qrels)}, "
            f"degraded_products={len(self.degraded_ids)}"
            + ("" if self.phrase_name is None else f", phrase={self.phrase_name}") + ")"
        )


def model_ranker(model, processor, *, columns: CatalogueColumns | None = None, batch_size: int = 64,
                 image_features: Mapping | None = None, fetch_images: bool = False,
                 image_report: ImageReport | None = None,
                 image_feature_store: ImageFeatureStore | None = None,
                 query_encoder: Callable[[list[str]], np.ndarray | torch.Tensor] | None = None) -> Ranker:
    """A `Ranker` that indexes the products with `model` (exact cosine search) and embeds the queries.

    Products whose text is the same in a second call (the untouched part of a degraded catalogue) are not
    embedded again, so a ranker belongs to the model's current weights: make a new one after training it.
    `image_features` are the frozen image tower's features by product id, when cached; `fetch_images` downloads
    `http(s)://` images; `image_report` counts how each product's image loaded (as `build_product_index` does);
    `image_feature_store` keeps the image tower's features on disk between runs (`retrieval.image_feature_store`);
    `query_encoder` (texts -> L2-normalised embeddings) replaces the model's query side, e.g. an ONNX export's
    `encode_queries`, so that only the query encoder differs between two rankers.

    Example:
    ```python
    >>> report = ImageReport()
    >>> rank = model_ranker(model, processor, image_report=report)
    >>> rank(products, ["red mug"], 10)[0][:3], report.summary()
    (['sku-3', 'sku-0', 'sku-8'], 'images: 37 ok, 2 missing (...), 1 undecodable (...), 0 refused')
    ```
    """
    columns = columns or CatalogueColumns()
    embedded: dict[str, tuple[str, np.ndarray]] = {}  # product id -> (text key, embedding)

    def text_key(product: Mapping) -> str:
        return "\x1f".join(str(product.get(name)) for name in (columns.title, columns.description) if name)

    def rank(products: Sequence[Mapping], texts: Sequence[str], k: int) -> list[list[str]]:
        stale = [p for p in products if embedded.get(str(p[columns.product_id]), (None,))[0] != text_key(p)]
        if stale:
            index = build_product_index(model, processor, stale, columns=columns, batch_size=batch_size,
                                        show_progress=False, metadata_columns=(), image_features=image_features,
                                        fetch_images=fetch_images, image_report=image_report,
                                        image_feature_store=image_feature_store)
            for product, vector in zip(stale, index.embeddings):
                embedded[str(product[columns.product_id])] = (text_key(product), np.array(vector))
        ids = [str(product[columns.product_id]) for product in products]
        index = ProductIndex.from_embeddings(np.stack([embedded[pid][1] for pid in ids]), ids)
        queries = embed_queries(model, processor, list(texts)) if query_encoder is None else query_encoder(list(texts))
        _, ranked = index.search(torch.as_tensor(queries), k=k)
        return [[str(pid) for pid in row] for row in ranked]

    return rank


__all__ = ["HeldOutEvaluator", "HeldOutResult", "Ranker", "model_ranker"]
