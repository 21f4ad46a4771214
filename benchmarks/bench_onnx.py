"""Case "onnx": batch-1 query encoding with onnxruntime (float32 and int8) against torch eager float32, and the
retrieval cost of the int8 query encoder.

A text_only model of `ctx.towers` (the offline MiniLM in the full run) is exported with `export_onnx` (whose parity
check must pass). The timed work is the query encoder's forward on one pre-tokenised query (the same tokens for
every variant; tokenising costs the same whatever runs the encoder), over the held-out evaluation queries of the
test split, interleaved. The retrieval cost is nDCG@10 of `HeldOutEvaluator` (held-out phrasings, metrics of
`retrieval.metrics`) with the float32 and the int8 query embeddings against one product index embedded by the
float32 product graph.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import CaseResult, Check, Context, Row, Target
from measure import measure_interleaved, paired_ratio

from modeling_mmretrieval import speedups
from modeling_mmretrieval.onnx import OnnxRetrievalEncoder, export_onnx, read_manifest
from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator
from modeling_mmretrieval.retrieval.index import ProductIndex

CASE = "onnx"
SPEED_TARGET = 3.0
NDCG_TOLERANCE = 0.005
FULL = dict(num_queries=1000, timed_queries=64, max_products=None)
QUICK = dict(num_queries=40, timed_queries=8, max_products=200)


def _ranker(product_encoder: OnnxRetrievalEncoder, query_encoder: OnnxRetrievalEncoder, cache: dict):
    """A `HeldOutEvaluator` ranker: products embedded once by the float32 product graph (shared by both query
    encoders through `cache`), queries by `query_encoder`, exact cosine top-k."""

    def rank(products, texts, k):
        ids = [str(product["product_id"]) for product in products]
        keys = [(pid, product.get("title"), product.get("description")) for pid, product in zip(ids, products)]
        stale = [position for position, key in enumerate(keys) if key not in cache]
        if stale:
            rows = [{"title": products[p].get("title"), "description": products[p].get("description")} for p in stale]
            for position, vector in zip(stale, product_encoder.encode_products(rows, batch_size=64)):
                cache[keys[position]] = vector
        index = ProductIndex.from_embeddings(np.stack([cache[key] for key in keys]), ids)
        _, ranked = index.search(torch.from_numpy(query_encoder.encode_queries(list(texts), batch_size=64)), k=k)
        return [[str(pid) for pid in row] for row in ranked]

    return rank


def exported_text_model(ctx: Context, folder: Path):
    """`(model, processor, export_dir)`: a text_only model of `ctx.towers` and its ONNX export in `folder`."""
    model = ctx.towers.retrieval_model("text_only").eval()
    # The export traces the plain model (the speedups change the towers' attention code); eval outputs are the same.
    speedups.apply_to_model(model, gap_sampled_dropout=False, length_groups=False)
    processor = ctx.towers.processor("text_only")
    return model, processor, export_onnx(model, processor, Path(folder) / "onnx")


def run(ctx: Context) -> CaseResult:
    sizes = QUICK if ctx.quick else FULL
    result = CaseResult()
    test = ctx.catalogue["test"]
    if sizes["max_products"] is not None:
        test = test.select(range(min(sizes["max_products"], len(test))))
    evaluator = HeldOutEvaluator(test, num_queries=sizes["num_queries"], seed=0)

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
        model, processor, export_dir = exported_text_model(ctx, Path(folder))
        manifest = read_manifest(export_dir)
        float32 = OnnxRetrievalEncoder.from_pretrained(export_dir, intra_op_threads=ctx.threads)
        int8 = OnnxRetrievalEncoder.from_pretrained(export_dir, quantized=True, intra_op_threads=ctx.threads)
        sizes_mib = {role: (export_dir / graph["file"]).stat().st_size / 2**20 for role, graph in manifest["graphs"].items()}

        texts = [query.text for query in evaluator.queries][: sizes["timed_queries"]]
        tokenized = [processor.encode_queries([text]) for text in texts]
        feeds = [{key: value.numpy() for key, value in inputs.items()} for inputs in tokenized]

        def torch_eager():
            with torch.inference_mode():
                return [model.get_query_embeddings(**inputs).numpy() for inputs in tokenized]

        def onnx_run(encoder):
            session = encoder.query_session
            names = [node.name for node in session.get_inputs()]
            return lambda: [session.run(["embeddings"], {name: feed[name] for name in names})[0] for feed in feeds]

        variants = {"torch eager float32": torch_eager, "onnxruntime float32": onnx_run(float32),
                    "onnxruntime int8": onnx_run(int8)}
        for run_once in variants.values():
            run_once()  # warm-up: first-call allocations and kernel selection
        samples = measure_interleaved(variants, ctx.repeats, torch.device("cpu"))
        for name, sample in samples.items():
            result.rows.append(Row.from_samples(CASE, f"query encoder batch 1, {name}", sample, len(texts), "queries/s",
                                                threads=ctx.threads))
        speedup = paired_ratio(samples["torch eager float32"], samples["onnxruntime int8"])
        result.targets.append(Target(
            "onnx: int8 query encoder batch-1 queries/s / torch eager float32", speedup, SPEED_TARGET,
            f"ONNX Runtime int8 query encoder, batch 1: >= {SPEED_TARGET}x the torch eager float32 queries/s "
            f"({len(texts)} held-out test queries, {ctx.threads} threads, pre-tokenised; float32 ORT "
            f"{paired_ratio(samples['torch eager float32'], samples['onnxruntime float32']):.2f}x)",
        ))

        cache: dict = {}
        ndcg = {name: evaluator.evaluate(_ranker(float32, encoder, cache)).means()["all/ndcg@10"]
                for name, encoder in (("float32", float32), ("int8", int8))}
        drop = ndcg["float32"] - ndcg["int8"]
        result.targets.append(Target(
            "onnx: int8 nDCG@10 tolerance / (float32 - int8 nDCG@10 drop)",
            min(NDCG_TOLERANCE / max(drop, NDCG_TOLERANCE / 100), 100.0), 1.0,
            f"nDCG@10 within {NDCG_TOLERANCE} of float32 (test split, {len(evaluator.queries)} held-out queries, "
            f"{len(evaluator.products)} products): float32 {ndcg['float32']:.4f}, int8 {ndcg['int8']:.4f}, "
            f"drop {drop:+.4f}; ratio capped at 100",
        ))
        result.rows.append(Row(CASE, "nDCG@10 float32 query encoder", ndcg["float32"], "nDCG@10", 0.0))
        result.rows.append(Row(CASE, "nDCG@10 int8 query encoder", ndcg["int8"], "nDCG@10", 0.0))

        parity = manifest["parity"]
        result.checks.append(Check(
            "onnx: float32 export parity with torch (queries, products; cosine >= 0.99999)",
            min(parity["queries"], parity["products"]) >= 0.99999,
            ", ".join(f"{part} {cosine:.7f}" for part, cosine in parity.items()),
        ))
        reference = np.concatenate(torch_eager())
        timed = np.concatenate(onnx_run(float32)())
        cosine = float(((reference * timed).sum(1)).min())
        result.checks.append(Check(
            "onnx: timed float32 query embeddings = torch's (cosine >= 0.99999)", cosine >= 0.99999,
            f"min cosine {cosine:.7f} over {len(texts)} queries",
        ))
        int8_cosine = float((reference * np.concatenate(onnx_run(int8)())).sum(1).min())
        result.notes.append(
            f"onnx: exporter {manifest['exporter']}, opset {manifest['opset']}; graph sizes "
            + ", ".join(f"{role} {size:.1f} MiB" for role, size in sizes_mib.items())
            + f"; int8 min cosine to torch {int8_cosine:.4f}"
        )
    return result
