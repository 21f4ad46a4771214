"""Evaluate a retriever on a product catalogue: Recall, nDCG, MRR and MAP at k, overall and on the queries
whose colour no relevant title mentions, printed as a table and written as a JSON report.

Queries are attribute-derived from the catalogue (`--num_queries`, `--seed`), read from the catalogue's query column
(rows of query and product), read from `--queries_file`: a JSON list of queries, or a JSONL or CSV file of
either a query and its relevant ids per line, or (query, product id) pairs, or are the queries marked on the search
page (`--judgements`: the JSONL file `search --serve --judgements` appends to). The catalogue and the queries are
checked before any model is loaded; the run prints how the catalogue's images fared and records it in the report.
`--compare_to` evaluates a second (text-only) checkpoint on the same queries and adds the exclusive-match
analysis: which products each model retrieves in its top k that the other misses, and how many are relevant.
`--ranker dense lexical hybrid` evaluates the model, BM25 and their fusion (`--fusion rrf` or `score`) side by side
on the same queries, from one product index. `--filter COLUMN=VALUE`, `--min_price` and `--max_price` evaluate the
filtered search: every ranker ranks only the matching products, and a query's relevant products are its matching
ones (a query left with none is skipped and counted). See docs/search.md for the report fields and the queries file
format.

Examples:
```bash
mmretrieval evaluate --model_name_or_path outputs/4tower/final --split test --num_queries 500 \
    --output_file reports/4tower-test.json
python examples/evaluate.py --model_name_or_path outputs/4tower/final --compare_to outputs/text/final \
    --save_run runs/4tower-test.json --output_file reports/4tower-vs-text.json
mmretrieval evaluate --model_name_or_path outputs/4tower/final --ranker dense lexical hybrid --fusion rrf
mmretrieval evaluate --model_name_or_path outputs/4tower/final --split validation --judgements marks/judgements.jsonl
mmretrieval evaluate --model_name_or_path outputs/4tower/final --ranker dense hybrid --filter gender=Women \
    --max_price 2000
```
"""

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers

import modeling_mmretrieval
from modeling_mmretrieval.data import CatalogueColumns, EvaluationQuery, default_data_dir, make_evaluation_queries
from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.data.query_column import evaluation_queries_from_column, unique_products
from modeling_mmretrieval.retrieval.evaluator import RetrievalEvaluator
from modeling_mmretrieval.retrieval.exclusive_matches import exclusive_matches
from modeling_mmretrieval.retrieval.filters import FilterError, ProductFilter, ProductTable
from modeling_mmretrieval.retrieval.hybrid import Fusion, ProductRanker
from modeling_mmretrieval.retrieval.image_feature_store import image_feature_store_from_args
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.judgements import JudgementError, load_judgements
from modeling_mmretrieval.retrieval.lexical import LexicalIndex
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    config_fingerprint,
    embed_queries,
    model_fingerprint,
    model_identity,
)

from .common import (
    CliError,
    add_image_arguments,
    check_image_arguments,
    check_retriever_settings,
    checked_products,
    load_catalogue_from_args,
    load_retriever,
    report_images,
    retriever_parser,
)
from .search import (
    add_filter_arguments,
    add_ranker_arguments,
    catalogue_table,
    fusion_from_args,
    product_filter_from_args,
)

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
NUM_QUERIES_KEY = "num_queries"


# ----------------------------------------------------------------------------------------------------------------
# Queries files: a JSON list of {"query_id", "text", "relevant_ids"[, "colour_absent_from_titles"]}
# ----------------------------------------------------------------------------------------------------------------


def query_record(query: EvaluationQuery) -> dict:
    """An evaluation query in the queries-file format (what `--save_queries` writes).

    Example: `query_record(query)["relevant_ids"]` is the sorted list of the query's relevant product ids.
    """
    return {
        "query_id": query.query_id,
        "text": query.text,
        "relevant_ids": sorted(query.relevant_ids),
        "colour_absent_from_titles": query.colour_absent_from_titles,
        "attributes": query.attributes,
        "source_product_id": query.source_product_id,
        "template": query.template,
    }


def query_from_record(record, position: int) -> EvaluationQuery:
    """Reads one queries-file entry; only `query_id`, `text` and `relevant_ids` are required.

    Example: `query_from_record({"query_id": "q1", "text": "red shoes", "relevant_ids": ["10719"]}, 0).text`.
    """
    where = f"query {position}"
    if not isinstance(record, Mapping):
        raise CliError(f"{where} must be a JSON object, got {type(record).__name__}")
    missing = [key for key in ("query_id", "text", "relevant_ids") if key not in record]
    if missing:
        raise CliError(f"{where} lacks {missing}; every query needs query_id, text and relevant_ids")
    text, relevant_ids = record["text"], record["relevant_ids"]
    if not isinstance(text, str) or not text.strip():
        raise CliError(f"{where} has no text: {text!r}")
    if not isinstance(relevant_ids, list) or not relevant_ids:
        raise CliError(f"{where} ({text!r}) needs a non-empty list of relevant_ids, got {relevant_ids!r}")
    return EvaluationQuery(
        query_id=str(record["query_id"]),
        text=text,
        attributes=dict(record.get("attributes") or {}),
        relevant_ids={str(product_id) for product_id in relevant_ids},
        source_product_id=str(record.get("source_product_id") or ""),
        colour_absent_from_titles=bool(record.get("colour_absent_from_titles", False)),
        template=str(record.get("template") or ""),
    )


# Keys of the line-per-query formats (JSONL, CSV): the query text, and its relevant ids or one relevant product.
QUERY_TEXT_KEYS = ("query", "text")
RELEVANT_IDS_KEY, PRODUCT_ID_KEY = "relevant_ids", "product_id"
# Separator of the relevant ids in a CSV cell (a JSON list in the cell works too).
CSV_ID_SEPARATOR = "|"


def _relevant_ids(value, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise CliError(f"{where}: relevant_ids {text!r} is not a JSON list ({error})") from error
        else:
            value = [part for part in (part.strip() for part in text.split(CSV_ID_SEPARATOR)) if part]
    if not isinstance(value, list) or any(isinstance(item, (list, dict)) or item is None for item in value):
        raise CliError(f"{where}: relevant_ids must be a list of product ids, got {value!r}")
    return [str(item) for item in value]


def queries_from_lines(records: Sequence[Mapping], source: str) -> list[EvaluationQuery]:
    """Queries from line records (JSONL objects or CSV rows): `query` (or `text`) and `relevant_ids` (a list, or
    ids joined by "|"), or `query` and one `product_id` per line (pairs; a query's lines are merged). An optional
    `query_id` names a query; otherwise queries are numbered in order of first appearance.

    Example:
    ```python
    >>> queries = queries_from_lines([{"query": "red shoes", "product_id": "7"},
    ...                               {"query": "red shoes", "product_id": "9"}], "pairs.csv")
    >>> sorted(queries[0].relevant_ids)
    ['7', '9']
    ```
    """
    relevant: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    for line, record in enumerate(records, start=1):
        where = f"{source} line {line}"
        if not isinstance(record, Mapping):
            raise CliError(f"{where} must be a JSON object, got {type(record).__name__}")
        text = next((record[key] for key in QUERY_TEXT_KEYS if key in record), None)
        if not isinstance(text, str) or not text.strip():
            raise CliError(f"{where} has no query text (a 'query' column or key): {text!r}")
        if record.get(RELEVANT_IDS_KEY) not in (None, ""):
            ids = _relevant_ids(record[RELEVANT_IDS_KEY], where)
        elif record.get(PRODUCT_ID_KEY) not in (None, ""):
            ids = [str(record[PRODUCT_ID_KEY]).strip()]
        else:
            raise CliError(f"{where} ({text.strip()!r}) has neither 'relevant_ids' nor 'product_id'")
        if not ids:
            raise CliError(f"{where} ({text.strip()!r}) lists no relevant product id")
        key = " ".join(text.split()).casefold()
        texts.setdefault(key, text.strip())
        relevant.setdefault(key, set()).update(ids)
        if record.get("query_id") not in (None, ""):
            query_ids.setdefault(key, str(record["query_id"]))
    return [
        EvaluationQuery(
            query_id=query_ids.get(key, f"q{position:05d}"), text=texts[key], attributes={}, relevant_ids=ids,
            source_product_id="", colour_absent_from_titles=False, template="queries file",
        )
        for position, (key, ids) in enumerate(relevant.items())
    ]


def _read_query_records(path: Path):
    """The parsed queries file: a JSON list (`.json`), or line records (`.jsonl`, `.csv`)."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not set(QUERY_TEXT_KEYS) & set(reader.fieldnames):
            raise CliError(f"{path} needs a header with a 'query' column, then 'relevant_ids' or 'product_id'")
        return "lines", list(reader)
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        records = []
        for line, content in enumerate(text.splitlines(), start=1):
            if content.strip():
                try:
                    records.append(json.loads(content))
                except json.JSONDecodeError as error:
                    raise CliError(f"{path} line {line} is not JSON: {error}") from error
        return "lines", records
    return "list", json.loads(text)


def read_queries_file(path: Path, catalogue_ids: set[str]) -> list[EvaluationQuery]:
    """The queries of a `--queries_file`, checked; warns about relevant ids not in the catalogue. The file is a
    JSON list of `{query_id, text, relevant_ids}` (what `--save_queries` writes), or a JSONL or CSV file of a query
    and its relevant ids per line, or of (query, product id) pairs (see `queries_from_lines`).

    Example: `read_queries_file(Path("queries.csv"), set(catalogue["product_id"]))`.
    """
    try:
        kind, records = _read_query_records(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise CliError(f"cannot read the queries file {path}: {error}") from error
    if not isinstance(records, list) or not records:
        raise CliError(f"{path} must hold a non-empty list of queries")
    if kind == "lines":
        queries = queries_from_lines(records, str(path))
    else:
        queries = [query_from_record(record, position) for position, record in enumerate(records)]
    query_ids = [query.query_id for query in queries]
    if len(set(query_ids)) < len(query_ids):
        raise CliError(f"{path} repeats query ids; each query_id must be unique")
    unknown = sum(len(query.relevant_ids - catalogue_ids) for query in queries)
    if unknown == sum(len(query.relevant_ids) for query in queries):
        raise CliError(f"none of the relevant ids of {path} is a product of the evaluated catalogue (--split)")
    if unknown:
        # Recall cannot reach 1 for such queries; usually a sign of a queries file made for another split.
        logger.warning(f"{unknown} relevant ids of {path} are not in the evaluated catalogue")
    return queries


# ----------------------------------------------------------------------------------------------------------------
# Judgements: the relevance marks of the search page, `{query text: {product_id: 0 or 1}}`
# ----------------------------------------------------------------------------------------------------------------


def read_judgements_file(path: Path) -> dict[str, dict[str, int]]:
    """The marks of a `--judgements` file (`retrieval.judgements.load_judgements`: the latest mark of a query and
    product wins); `CliError` in one line ending "(--judgements)" for a missing, unreadable, malformed or empty file.
    Cheap: it runs before the catalogue and the model are loaded.

    Example: `read_judgements_file(Path("marks/judgements.jsonl"))` gives `{"black watch": {"1164": 0, "5310": 1}}`.
    """
    try:
        qrels = load_judgements(path)
    except JudgementError as error:
        raise CliError(f"{error} (--judgements)") from error
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error} (--judgements)") from error
    if not qrels:
        raise CliError(f"{path} holds no judgement (--judgements)")
    return qrels


def queries_from_judgements(
    qrels: Mapping[str, Mapping[str, int]], catalogue_ids: set[str], path: Path
) -> tuple[list[EvaluationQuery], dict]:
    """The evaluation queries of the search page's marks and the report's description of them: one query per judged
    query text (its id is the text), whose relevant ids are the products marked relevant. A query whose marks are all
    "not relevant" has nothing to find and is skipped (counted in `num_skipped`), as the metrics would skip it.

    `CliError` (one line naming the product and `--judgements`) when a judged product is not in the evaluated
    catalogue: its marks belong to another catalogue or split, and every metric would silently drop it.

    Example:
    ```python
    >>> queries, source = queries_from_judgements({"red mug": {"7": 1, "9": 0}, "lamp": {"3": 0}}, {"3", "7", "9"},
    ...                                           Path("marks.jsonl"))
    >>> [(query.query_id, sorted(query.relevant_ids)) for query in queries], source["num_skipped"]
    ([('red mug', ['7'])], 1)
    ```
    """
    for text, marks in qrels.items():
        for product_id in marks:
            if product_id not in catalogue_ids:
                raise CliError(
                    f"product {product_id!r}, marked for the query {text!r}, is not in the evaluated catalogue "
                    f"({len(catalogue_ids)} products): evaluate the catalogue and split the marks were made on "
                    f"(--judgements {path})"
                )
    queries = [
        EvaluationQuery(
            query_id=text, text=text, attributes={},
            relevant_ids={product_id for product_id, relevance in marks.items() if relevance > 0},
            source_product_id="", colour_absent_from_titles=False, template="judgements",
        )
        for text, marks in qrels.items() if any(relevance > 0 for relevance in marks.values())
    ]
    skipped = len(qrels) - len(queries)
    if not queries:
        raise CliError(f"none of the {len(qrels)} judged queries of {path} has a product marked relevant, so there is "
                       "nothing to find (--judgements)")
    source = {
        "source": str(path), "kind": "judgements", "num_judged": len(qrels), "num_skipped": skipped,
        "num_judgements": sum(len(marks) for marks in qrels.values()),
    }
    return queries, source


# ----------------------------------------------------------------------------------------------------------------
# Filters: the filtered search, `--filter`, `--min_price`, `--max_price`
# ----------------------------------------------------------------------------------------------------------------


def filtered_queries(
    queries: Sequence[EvaluationQuery], catalogue, columns: CatalogueColumns, product_filter: ProductFilter
) -> tuple[list[EvaluationQuery], set[str], dict]:
    """`(queries, allowed ids, the report's filter section)` of a filtered evaluation: the products `product_filter`
    lets through (its columns resolved against the catalogue), and each query with only those of its relevant
    products (a filtered search cannot return the others, so they are no right answer to it). A query left with
    none is skipped and counted (`num_queries_skipped`). Cheap: it runs before the model is loaded.

    `CliError` (one line naming the flag) for a column the catalogue lacks, a filter no product matches, or one that
    leaves no query anything to find.

    Example:
    ```python
    >>> queries, allowed, section = filtered_queries(queries, catalogue, columns, ProductFilter({"gender": ("Men",)}))
    >>> section["filter"], section["num_products"]
    ('gender=Men', 310)
    ```
    """
    try:
        product_filter = product_filter.resolved(columns, catalogue.column_names)
    except FilterError as error:
        raise CliError(str(error)) from error
    ids = [str(product_id) for product_id in catalogue[columns.product_id]]
    table = ProductTable.from_catalogue(catalogue, ids, names=product_filter.columns, id_column=columns.product_id)
    allowed = {ids[row] for row in np.flatnonzero(table.allowed(product_filter))}
    if not allowed:
        raise CliError(f"no product of the {len(ids)} evaluated matches the filter {product_filter.describe()} "
                       "(--filter, --min_price, --max_price)")
    kept = [replace(query, relevant_ids=set(query.relevant_ids) & allowed) for query in queries]
    kept = [query for query in kept if query.relevant_ids]
    if not kept:
        raise CliError(f"the filter {product_filter.describe()} lets through {len(allowed)} products, none of them "
                       f"relevant to any of the {len(queries)} queries: nothing to find (--filter, --min_price, "
                       "--max_price)")
    section = {
        "filter": product_filter.describe(),
        "values": {column: list(values) for column, values in product_filter.values.items()},
        "ranges": {column: list(bounds) for column, bounds in product_filter.ranges.items()},
        "num_products": len(allowed),
        "num_queries_skipped": len(queries) - len(kept),
    }
    return kept, allowed, section


# ----------------------------------------------------------------------------------------------------------------
# Metrics and report formatting
# ----------------------------------------------------------------------------------------------------------------


def split_metrics(results: Mapping[str, float], name: str) -> tuple[dict, dict]:
    """`RetrievalEvaluator` output (`"<name>/recall@10"`, `"<name>/<slice>/recall@10"`) as
    `({metric: value}, {slice: {metric: value}})`, query counts as ints.

    Example: `split_metrics({"test/mrr@10": 0.5, "test/colour_not_in_title/mrr@10": 0.4}, "test")` gives
    `({"mrr@10": 0.5}, {"colour_not_in_title": {"mrr@10": 0.4}})`.
    """
    overall, slices = {}, {}
    for key, value in results.items():
        *slice_name, metric = key.removeprefix(f"{name}/").split("/")
        value = int(value) if metric == NUM_QUERIES_KEY else value
        (slices.setdefault(slice_name[0], {}) if slice_name else overall)[metric] = value
    return overall, slices


def format_metrics_table(overall: Mapping[str, float], slices: Mapping[str, Mapping[str, float]]) -> str:
    """Metrics as rows, "all" and each slice as columns.

    Example: `print(format_metrics_table(*split_metrics(evaluator.compute(run), "test")))`.
    """
    columns = {"all": overall, **slices}
    header = ["metric", *columns]
    rows = [header]
    for metric in overall:
        rows.append([metric, *(_format_value(values.get(metric)) for values in columns.values())])
    widths = [max(len(row[position]) for row in rows) for position in range(len(header))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _format_value(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def json_safe(value):
    """`value` with NaN and infinities replaced by None, so the report is strict JSON.

    Example: `json_safe({"share": float("nan"), "k": [10]})` gives `{"share": None, "k": [10]}`.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: Path, payload) -> None:
    """Writes `payload` as indented strict JSON (see `json_safe`), creating the parent folders.

    Example: `write_json(Path("reports/run.json"), {"q1": ["10719", "12005"]})`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")


def model_description(model) -> dict:
    """The report fields that identify a model: id (where it was loaded from), architecture, fusion, config
    fingerprint, model fingerprint (config and weights: the same one its indexes record) and config.

    Example: `model_description(model)["architecture"]` is e.g. "4tower".
    """
    return {
        "model_id": model_identity(model),
        "architecture": model.config.architecture,
        "fusion": model.config.fusion if model.config.uses_images else None,
        "config_hash": config_fingerprint(model.config),
        "model_fingerprint": model_fingerprint(model),
        "config": model.config.to_diff_dict(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def ranker_runs(
    model, processor, evaluator: RetrievalEvaluator, rankers: Sequence[str], fusion: Fusion, k: int,
    allowed_ids: set[str] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """`{ranker: run}` of each of `rankers` ("dense", "lexical", "hybrid") on the evaluator's queries, top `k`;
    with `allowed_ids` (a filter's products, see `filtered_queries`) every ranker ranks only those, inside its
    search, so k of them come back.

    The unfiltered dense run alone is `evaluator.rankings`; otherwise one product index (built as
    `evaluator.rankings` builds it, so the dense run is the same) and, for lexical and hybrid, one BM25 index serve
    every ranker.

    Example: `runs = ranker_runs(model, processor, evaluator, ["dense", "hybrid"], Fusion("rrf"), 100)`.
    """
    if list(rankers) == ["dense"] and allowed_ids is None:
        return {"dense": evaluator.rankings(model, k=k)}
    texts = [query.text for query in evaluator.queries]
    columns, catalogue = evaluator.columns, evaluator.catalogue
    embeddings = None
    if any(ranker != "lexical" for ranker in rankers):
        index = build_product_index(
            model, processor, catalogue, columns=columns, batch_size=evaluator.batch_size,
            show_progress=evaluator.show_progress, metadata_columns=(), image_features=evaluator.image_features,
            fetch_images=evaluator.fetch_images, image_report=evaluator.image_report,
            image_feature_store=evaluator.image_feature_store,
        )
        embeddings = embed_queries(model, processor, texts)
    else:
        # BM25 alone embeds nothing: an index of the ids (every row the same vector) gives the rankers their ids.
        product_ids = list(catalogue[columns.product_id])
        index = ProductIndex.from_embeddings(torch.ones((len(product_ids), 1)), product_ids)
    lexical = None
    if any(ranker != "dense" for ranker in rankers):
        table, fields = catalogue_table(catalogue, index, columns, ProductFilter(), "lexical")
        lexical = LexicalIndex.from_products(table.records(fields), fields)
    allowed = None
    if allowed_ids is not None:
        allowed = np.fromiter((str(product_id) in allowed_ids for product_id in index.ids), dtype=bool,
                              count=len(index))
    runs = {}
    for name in rankers:
        ranker = ProductRanker(index, lexical, ranker=name, fusion=fusion)
        _, ids = ranker.search(texts, k=k, query_embeddings=embeddings, allowed=allowed)
        runs[name] = {
            query.query_id: [str(product_id) for product_id in ranked if product_id is not None]
            for query, ranked in zip(evaluator.queries, ids, strict=True)
        }
    return runs


def evaluate_checkpoint(
    name_or_path: str,
    catalogue,
    queries: Sequence[EvaluationQuery],
    args: argparse.Namespace,
    columns: CatalogueColumns,
    rankers: Sequence[str] = ("dense",),
    allowed_ids: set[str] | None = None,
) -> tuple[dict, dict[str, dict[str, list[str]]], dict[str, dict], ImageReport | None]:
    """`(model description, {ranker: run}, {ranker: evaluator results}, image report)` of one checkpoint on the
    queries, for each of `rankers` (see `ranker_runs`, which ranks only `allowed_ids` when given); runs rank deep
    enough for every metric cut-off and for the exclusive-match analysis. The report counts how the catalogue's
    images loaded for this model; `None` for a text-only model, or BM25 alone, which read no image.

    Example: `description, runs, results, images = evaluate_checkpoint("outputs/run/final", catalogue, queries, args,
    columns)`; `runs["dense"]` is the model's run.
    """
    model, processor = load_retriever(name_or_path, args.device)
    evaluator = RetrievalEvaluator.with_colour_slice(
        catalogue, queries, processor, columns=columns, k_values=args.k_values, name=args.split,
        batch_size=args.batch_size, show_progress=args.progress, fetch_images=args.fetch_images,
        image_feature_store=image_feature_store_from_args(args) if model.config.uses_images else None,
    )
    logger.info(f"Evaluating {model_identity(model)} ({', '.join(rankers)}): {evaluator}")
    k = max(*args.k_values, args.exclusive_k or 0)
    runs = ranker_runs(model, processor, evaluator, rankers, fusion_from_args(args), k, allowed_ids)
    if evaluator.image_feature_store is not None and evaluator.image_feature_store.hits + evaluator.image_feature_store.computed:
        logger.info(evaluator.image_feature_store.summary())
    reads_images = model.config.uses_images and any(ranker != "lexical" for ranker in rankers)
    image_report = evaluator.image_report if reads_images else None
    results = {ranker: evaluator.compute(run) for ranker, run in runs.items()}
    return model_description(model), runs, results, image_report


def select_queries(args: argparse.Namespace, catalogue, columns: CatalogueColumns) -> tuple[list, dict]:
    """The evaluation queries and a description of where they come from: `--queries_file`, else the catalogue's
    query column, else attribute-derived from its article type and other attributes.

    Example: `queries, source = select_queries(args, catalogue, columns)`; `source["source"]` is
    "attribute-derived", "query column" or the queries file.
    """
    if args.queries_file is not None:
        catalogue_ids = set(catalogue[columns.product_id])
        queries = read_queries_file(args.queries_file, catalogue_ids)
        return queries, {"source": str(args.queries_file)}
    if columns.query is not None:
        queries = evaluation_queries_from_column(
            catalogue, columns=columns, num_queries=args.num_queries, seed=args.seed
        )
        if not queries:
            raise CliError(f"the query column {columns.query!r} (--query_column) holds no query text")
        return queries, {"source": f"query column {columns.query!r}", "seed": args.seed}
    if columns.article_type is None:
        raise CliError(
            f"split {args.split!r} has no article type column to derive queries from (--article_type_column) and no "
            "query column (--query_column); pass --queries_file (JSONL or CSV: a query and its relevant_ids per line, "
            "or query and product_id pairs)"
        )
    queries = make_evaluation_queries(catalogue, seed=args.seed, num_queries=args.num_queries, columns=columns)
    if not queries:
        raise CliError("no evaluation query could be derived from this catalogue; pass --queries_file")
    return queries, {"source": "attribute-derived", "seed": args.seed, "num_requested": args.num_queries}


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The evaluate command's arguments; `prog` names the program in usage and error lines.

    Example: `parse_args(["--model_name_or_path", "outputs/run/final"]).k_values == [10, 100]`.
    """
    parser = retriever_parser(__doc__.split("\n\n")[0], prog)
    parser.add_argument("--num_queries", type=int, default=1000, help="attribute-derived queries to evaluate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attribute-derived queries")
    parser.add_argument(
        "--queries_file", type=Path, default=None,
        help="queries with their relevant products: a JSON list of {query_id, text, relevant_ids}, or a JSONL or CSV "
             "file of query and relevant_ids (ids joined by '|') or of query and product_id pairs",
    )
    parser.add_argument(
        "--judgements", type=Path, default=None, metavar="FILE",
        help="evaluate on the search page's relevance marks (the JSONL file of search --serve --judgements): each "
             "judged query, with the products marked relevant; queries with no relevant mark are skipped",
    )
    parser.add_argument("--k_values", type=int, nargs="+", default=[10, 100], help="metric cut-offs")
    parser.add_argument("--compare_to", default=None, help="text-only checkpoint for the exclusive-match analysis")
    parser.add_argument("--exclusive_k", type=int, default=None, help="top k of that analysis (default: max k)")
    parser.add_argument("--output_file", type=Path, default=None, help="where to write the JSON report")
    parser.add_argument("--save_run", type=Path, default=None, help="write the rankings as JSON {query_id: [ids]}")
    parser.add_argument("--save_queries", type=Path, default=None, help="write the queries in --queries_file format")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while indexing")
    add_ranker_arguments(parser, several=True)
    add_filter_arguments(
        parser, applies_to="every ranker ranks only the matching products; a query's relevant products are its "
                           "matching ones, and a query left with none is skipped",
    )
    add_image_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.k_values) < 1 or args.num_queries < 1 or (args.exclusive_k is not None and args.exclusive_k < 1):
        parser.error("--k_values, --num_queries and --exclusive_k must be positive")
    if args.judgements is not None and args.queries_file is not None:
        parser.error("give either --queries_file or --judgements: both name the queries to evaluate")
    return args


def print_metrics(title: str, overall: Mapping[str, float], slices: Mapping[str, Mapping[str, float]]) -> None:
    """Prints `title` and the metrics table (see `format_metrics_table`).

    Example: `print_metrics("model on test", *split_metrics(results, "test"))`.
    """
    print(title)
    print(format_metrics_table(overall, slices))


def comparison_section(run: dict, compared: tuple, queries: Sequence[EvaluationQuery], args) -> dict:
    """The report's `comparison`: the compared model's metrics and the exclusive matches of both top-k lists.

    Example: `comparison_section(run, evaluate_checkpoint(args.compare_to, ...), queries, args)["exclusive_matches"]`.
    """
    description, text_runs, text_results, image_report = compared
    text_run, results = text_runs["dense"], text_results["dense"]
    if description["architecture"] != "text_only":
        logger.warning(f"--compare_to is meant for a text-only model; {description['model_id']} is not")
    overall, slices = split_metrics(results, args.split)
    print_metrics(f"\ncompared to {description['model_id']}", overall, slices)
    qrels = {query.query_id: query.relevant_ids for query in queries}
    matches = exclusive_matches(run, text_run, qrels, k=args.exclusive_k or max(args.k_values))
    print(matches)
    return {
        **description, "metrics": overall, "slices": slices, "exclusive_matches": matches.summary(),
        "images": None if image_report is None else image_report.to_dict(),
    }


def report_model_images(description: Mapping, image_report: ImageReport | None, args, columns) -> None:
    """Prints (and checks, see `report_images`) how the catalogue's images loaded for one evaluated model; a
    text-only model reads none, which is said instead.

    Example: `report_model_images(model_description(model), evaluator.image_report, args, columns)`.
    """
    if image_report is None:
        reason = "is a text-only model" if description["architecture"] == "text_only" else "ranked by BM25 alone"
        print(f"images: not read ({description['model_id']} {reason})", file=sys.stderr, flush=True)
        return
    if args.compare_to is not None:  # two models, two lines: say whose images these are
        print(f"{description['model_id']}:", file=sys.stderr, end=" ", flush=True)
    report_images(image_report, args, columns)


def main(argv=None, prog: str | None = None) -> int:
    """Runs the evaluate command; 0 on success, 2 (one line on stderr) on a user error.

    Example: `main(["--model_name_or_path", "outputs/run/final", "--num_queries", "500"])`.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prog = prog or os.path.basename(sys.argv[0])
    args = parse_args(argv, prog)
    started = time.perf_counter()
    try:
        # Everything that can be checked without a model is, before one is loaded.
        check_retriever_settings(args)
        check_image_arguments(args)
        judgements = None if args.judgements is None else read_judgements_file(args.judgements)
        catalogue, columns = load_catalogue_from_args(args, needs_queries=False)
        query_rows = catalogue
        if columns.query is not None:
            # Rows of (query, product): the products are the distinct ids; the rows give the relevance sets.
            catalogue = unique_products(catalogue, columns)
        if judgements is None:
            queries, query_source = select_queries(args, query_rows, columns)
        catalogue = checked_products(catalogue, columns, args)
        if judgements is not None:
            catalogue_ids = {str(product_id) for product_id in catalogue[columns.product_id]}
            queries, query_source = queries_from_judgements(judgements, catalogue_ids, args.judgements)
        rankers = list(dict.fromkeys(args.ranker))
        fusion = fusion_from_args(args)  # checked before the model loads
        product_filter, allowed_ids, filter_section = product_filter_from_args(args), None, None
        if product_filter:
            queries, allowed_ids, filter_section = filtered_queries(queries, catalogue, columns, product_filter)
        description, runs, results_by_ranker, image_report = evaluate_checkpoint(
            args.model_name_or_path, catalogue, queries, args, columns, rankers, allowed_ids
        )
        run = runs[rankers[0]]
        report_model_images(description, image_report, args, columns)
        compared = None
        if args.compare_to is not None:
            compared = evaluate_checkpoint(args.compare_to, catalogue, queries, args, columns,
                                           allowed_ids=allowed_ids)
            report_model_images(compared[0], compared[3], args, columns)
    except CliError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

    title = f"{description['model_id']} on {args.split}: {len(catalogue)} products, {len(queries)} queries"
    if judgements is not None:
        title += f" judged in {args.judgements} ({query_source['num_skipped']} skipped: no product marked relevant)"
    if filter_section is not None:
        title += (f", filtered by {filter_section['filter']} ({filter_section['num_products']} products; "
                  f"{filter_section['num_queries_skipped']} queries skipped: no matching relevant product)")
    ranker_sections = {}
    for ranker, ranker_results in results_by_ranker.items():
        ranker_overall, ranker_slices = split_metrics(ranker_results, args.split)
        ranker_sections[ranker] = {"metrics": ranker_overall, "slices": ranker_slices}
        label = "" if rankers == ["dense"] else f" [{ranker}]"
        if ranker == "hybrid":
            label = f" [hybrid: {fusion.describe()}]"
        print_metrics(("" if ranker == rankers[0] else "\n") + title + label, ranker_overall, ranker_slices)
    overall, slices = ranker_sections[rankers[0]]["metrics"], ranker_sections[rankers[0]]["slices"]
    comparison = None if compared is None else comparison_section(run, compared, queries, args)
    if args.save_run is not None:
        write_json(args.save_run, run)
    if args.save_queries is not None:
        write_json(args.save_queries, [query_record(query) for query in queries])
    report = {
        "report_version": REPORT_VERSION,
        **description,
        "dataset": {
            "source": str(args.dataset or default_data_dir()),
            "split": args.split,
            "num_products": len(catalogue),
        },
        "queries": query_source,
        "num_queries": len(queries),
        "filter": filter_section,
        "images": None if image_report is None else image_report.to_dict(),
        "k_values": list(args.k_values),
        "ranker": rankers[0],
        "metrics": overall,
        "slices": slices,
        "rankers": ranker_sections,
        "hybrid_fusion": fusion.to_dict() if "hybrid" in rankers else None,
        "comparison": comparison,
        "run_file": None if args.save_run is None else str(args.save_run),
        "wall_time_seconds": time.perf_counter() - started,
        "versions": {
            "modeling_mmretrieval": modeling_mmretrieval.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    if args.output_file is not None:
        write_json(args.output_file, report)
        logger.info(f"Report written to {args.output_file}")
    return 0

