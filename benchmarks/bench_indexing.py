"""Case 2: catalogue indexing (products/s), its FLOP rate against the measured matmul rate, and memory.

Two parts:

* Tower efficiency: `build_product_index` on real catalogue rows (images decoded, product texts
  tokenised) with the selected towers, fast paths on (dynamic padding, length-sorted batches, sdpa, the
  batched image path, bf16 where the hardware has it) and off. The towers' useful FLOPs (unpadded tokens)
  divided by the wall time gives the achieved rate.
* Scale: 10k and 100k products (the real texts, repeated under new ids beyond the real catalogue) with a
  tiny text tower projected to 384 dimensions, so that the index holds full-size embeddings while 100k
  products fit the time budget. Each build runs in a fresh process. Its peak memory growth is compared
  with the embeddings plus one batch, where "one batch" is the measured growth of indexing a single read
  window of rows (reading, tokenising, collating and embedding them): all that may stay in memory beyond
  the embeddings.
"""

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
from common import CaseResult, Check, Context, Row, Target
from measure import Samples, keeping_results, measure_interleaved, native_bf16
from towers import MAX_PRODUCT_LENGTH, product_tower_flops, without_fast_paths
from transformers import AutoTokenizer, BertConfig

from modeling_mmretrieval import MultimodalRetrievalConfig, MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.data.collator import RetrievalCollator
from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.retrieval.search import LENGTH_SORT_WINDOW_BATCHES, build_product_index

BATCH_SIZE = 64
FLOP_RATE_TARGET = 0.5
MEMORY_TARGET = 1.0
EMBEDDING_DIM = 384
# Rows of the tower-efficiency sample: enough batches for a steady rate, few enough for the time budget.
SAMPLE_ROWS = {
    ("offline", "text_only"): 128, ("offline", "3tower"): 32, ("tiny", "text_only"): 256, ("tiny", "3tower"): 128,
}
SCALE_ROWS, SCALE_ROWS_QUICK = (10_000, 100_000), (2_000,)
# 100k products take minutes to tokenise: that size is built once; the smaller ones give the rate's spread.
SINGLE_BUILD_ABOVE_ROWS = 50_000
# With its defaults glibc keeps freed heap pages mapped (they pile up with every batch tokenised: +160 MiB
# RSS for 44 MiB of embeddings at 30k products), so RSS would overstate what a build holds. Trimming the
# heap whenever memory is freed makes RSS follow live memory.
LIVE_MEMORY_ENVIRONMENT = {"MALLOC_TRIM_THRESHOLD_": "0"}


def _build(model, processor, rows, **options):
    return build_product_index(
        model, processor, rows, batch_size=BATCH_SIZE, show_progress=False, metadata_columns=(), **options
    )


def _embedding_agreement(name: str, reference, other, min_cosine: float) -> Check:
    # The index exposes read-only views; copies keep torch from warning about them.
    cosine = (torch.tensor(reference.embeddings) * torch.tensor(other.embeddings)).sum(-1)
    return Check(
        f"indexing/{name}", reference.ids == other.ids and cosine.min().item() >= min_cosine,
        f"min cosine per product {cosine.min().item():.6f} >= {min_cosine} (same ids, same order)",
    )


def _useful_flops(model, processor, rows, image_size: int) -> float:
    """Forward FLOPs of the product towers on the sample's unpadded texts and its decodable images."""
    rows = list(rows)
    collator = RetrievalCollator(processor, with_queries=False, uses_images=False)
    lengths = collator(rows)["product_attention_mask"].sum(-1).tolist()
    num_images = 0
    if model.config.uses_images:
        num_images = sum(load_product_image(row["image"]).has_image for row in rows)
    return product_tower_flops(model, lengths, num_images, image_size)


def _with_eager_attention(model, run):
    def run_eager():
        model.set_attn_implementation("eager")
        try:
            return run()
        finally:
            model.set_attn_implementation("sdpa")
            speedups.apply_to_model(model)  # sdpa resets the towers' attention to the plain implementation

    return run_eager


def _tower_efficiency_case(ctx: Context, architecture: str) -> CaseResult:
    towers, device = ctx.towers, ctx.device
    sample = ctx.catalogue["test"]
    rows = sample.select(range(min(SAMPLE_ROWS[towers.kind, architecture] // (2 if ctx.quick else 1), len(sample))))
    model = towers.retrieval_model(architecture).to(device).eval()
    fast = towers.processor(architecture)
    plain = without_fast_paths(fast)
    name = f"{architecture} ({towers.kind} towers)"

    variants = {
        "fast paths": lambda: _build(model, fast, rows),
        "no fast paths": _with_eager_attention(model, lambda: _build(model, plain, rows, sort_by_length=False)),
    }
    result = CaseResult()
    compute_dtype = ctx.dtype if ctx.dtype != torch.float32 else torch.bfloat16
    if native_bf16(device) or ctx.dtype != torch.float32:
        variants[f"fast paths + {compute_dtype}"] = lambda: _build(model, fast, rows, dtype=compute_dtype)
    else:
        result.notes.append(f"indexing {name}: bf16 variant skipped, {device} has no native bf16 matrix products")

    timed_variants, built = keeping_results(variants)
    samples = measure_interleaved(timed_variants, ctx.repeats, device)
    result.checks.append(_embedding_agreement(
        f"{name}: fast paths give the embeddings of the plain path", built["no fast paths"], built["fast paths"], 0.999
    ))
    for variant in variants:
        if variant.startswith("fast paths +"):
            result.checks.append(_embedding_agreement(
                f"{name}: {variant} close to float32", built["fast paths"], built[variant], 0.99
            ))

    flops = _useful_flops(model, fast, rows, towers.image_size)
    for variant, variant_samples in samples.items():
        achieved = flops / variant_samples.median_s / 1e9
        result.rows.append(Row.from_samples(
            "indexing", f"{name}/{variant}", variant_samples, len(rows), "products/s",
            tower_gflop_per_product=flops / len(rows) / 1e9, achieved_gflops=achieved,
            fraction_of_matmul_rate=achieved / ctx.matmul_gflops,
        ))
    fast_rate = flops / samples["fast paths"].median_s / 1e9
    result.targets.append(Target(
        f"indexing {name}: tower FLOP rate / matmul rate", fast_rate / ctx.matmul_gflops, FLOP_RATE_TARGET,
        f"{fast_rate:.1f} GFLOP/s achieved end to end (decode, tokenise, towers) vs {ctx.matmul_gflops:.1f} GFLOP/s "
        f"fp32 matmul; {flops / len(rows) / 1e9:.2f} GFLOP/product over {len(rows)} products",
    ))
    return result


def scale_towers_model(tokenizer) -> MultimodalRetrievalModel:
    """A text-only model with a one-layer 32-wide text tower projected to `EMBEDDING_DIM`."""
    torch.manual_seed(0)
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)
    return MultimodalRetrievalModel(MultimodalRetrievalConfig(text_config=text, projection_dim=EMBEDDING_DIM)).eval()


def scale_catalogue(texts: dict[str, list], count: int):
    """`count` products with the real titles and descriptions, cycled under new ids past the real catalogue."""
    import datasets

    size = len(texts["product_id"])
    return datasets.Dataset.from_dict({
        "product_id": [f"{texts['product_id'][i % size]}-{i // size}" for i in range(count)],
        "title": [texts["title"][i % size] for i in range(count)],
        "description": [texts["description"][i % size] for i in range(count)],
    })


@dataclass
class ScaleJob:
    """One scale measurement, run in a fresh process so that its memory growth is this build's alone."""

    count: int
    repeats: int
    threads: int
    device: str
    texts: dict[str, list]
    environment: dict[str, str] = field(default_factory=dict)


def id_table_mib(index) -> float:
    """MiB held by an index's product ids and its id -> position lookup (its `ProductIdTable`, not the matrix)."""
    return index._id_table.nbytes / (1 << 20)


def measure_scale_job(job: ScaleJob) -> tuple[Samples, float, float]:
    """`(samples of building a `job.count`-product index, model MiB, id table MiB)`, measured in this (fresh)
    process."""
    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    model = scale_towers_model(tokenizer).to(device)
    processor = MultimodalRetrievalProcessor(tokenizer, max_product_length=MAX_PRODUCT_LENGTH)
    catalogue = scale_catalogue(job.texts, job.count)
    with torch.no_grad():
        _build(model, processor, scale_catalogue(job.texts, BATCH_SIZE))  # loads the tokenizer's lazy state
        gc.collect()
        timed, built = keeping_results({"build": lambda: _build(model, processor, catalogue)})
        samples = measure_interleaved(timed, job.repeats, device)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / (1 << 20)
    return samples["build"], model_mib, id_table_mib(built["build"])


def _in_fresh_process(job: ScaleJob) -> tuple[Samples, float, float]:
    # glibc reads its MALLOC_* settings at start-up, so they are set for the child's whole life.
    saved = {name: os.environ.get(name) for name in job.environment}
    os.environ.update(job.environment)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as executor:
            return executor.submit(measure_scale_job, job).result()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _scale_cases(ctx: Context) -> CaseResult:
    texts = ctx.catalogue["train"].select_columns(["product_id", "title", "description"]).to_dict()

    def job(count: int, repeats: int) -> ScaleJob:
        return ScaleJob(count, repeats, ctx.threads, str(ctx.device), texts, LIVE_MEMORY_ENVIRONMENT)

    result = CaseResult()
    window_rows = BATCH_SIZE * LENGTH_SORT_WINDOW_BATCHES
    one_window, _, _ = _in_fresh_process(job(window_rows, 1))
    one_batch_mib = one_window.rss_growth_mib
    for count in SCALE_ROWS_QUICK if ctx.quick else SCALE_ROWS:
        samples, model_mib, ids_mib = _in_fresh_process(job(count, 1 if count > SINGLE_BUILD_ABOVE_ROWS else ctx.repeats))
        embeddings_mib = count * EMBEDDING_DIM * 4 / (1 << 20)
        result.rows.append(Row.from_samples(
            "indexing", f"scale {count // 1000}k products (tiny towers, dim {EMBEDDING_DIM})", samples, count,
            "products/s",
            embeddings_mib=embeddings_mib, id_table_mib=ids_mib, one_batch_mib=one_batch_mib, model_mib=model_mib,
            allocator=" ".join(f"{name}={value}" for name, value in LIVE_MEMORY_ENVIRONMENT.items()),
        ))
        budget_mib = embeddings_mib + one_batch_mib
        # Beyond the matrix, an index holds its product ids and their id -> position lookup (a compact table);
        # the detail says how much of any excess over the budget they explain.
        result.targets.append(Target(
            f"indexing {count // 1000}k: (embeddings + one batch) / peak memory growth",
            budget_mib / max(samples.rss_growth_mib, 1e-9), MEMORY_TARGET,
            f"grew {samples.rss_growth_mib:.0f} MiB vs {embeddings_mib:.0f} MiB embeddings + {one_batch_mib:.0f} MiB "
            f"for one read window of {window_rows} rows (model {model_mib:.0f} MiB, resident before); the index's "
            f"product ids and id table hold {ids_mib:.1f} MiB, and with them the ratio is "
            f"{(budget_mib + ids_mib) / max(samples.rss_growth_mib, 1e-9):.2f}; glibc set to return freed memory",
        ))
    return result


def run(ctx: Context) -> CaseResult:
    result = CaseResult()
    for architecture in ("text_only", "3tower"):
        result.extend(_tower_efficiency_case(ctx, architecture))
    result.extend(_scale_cases(ctx))
    return result
