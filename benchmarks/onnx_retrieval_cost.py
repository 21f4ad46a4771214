"""The retrieval cost of a trained checkpoint's ONNX query encoders: nDCG@10 and recall@100 of the held-out evaluation
(`retrieval.held_out_evaluation.HeldOutEvaluator`: held-out phrasings, text-silent slice, degraded variant) with
the query embeddings of torch, of the float32 ONNX graph and of the int8 one, all against the same product index
(embedded by the torch model, so only the query encoder differs).

    python benchmarks/onnx_retrieval_cost.py --model outputs/main_job/final --onnx exports/main_job_onnx \\
        --dataset ../shared/data/fashion-products --output /tmp/onnx_cost.json
"""

import argparse
import json
from pathlib import Path

from modeling_mmretrieval.data import load_catalogue
from modeling_mmretrieval.onnx import OnnxRetrievalEncoder
from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator, model_ranker
from modeling_mmretrieval.retrieval.image_feature_store import ImageFeatureStore
from modeling_mmretrieval.retrieval.search import load_retriever


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the torch checkpoint folder")
    parser.add_argument("--onnx", required=True, help="its `mmretrieval export-onnx` folder")
    parser.add_argument("--dataset", default=None, help="catalogue folder (default: shared data, else the sample)")
    parser.add_argument("--num_queries", type=int, default=1000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    evaluator = HeldOutEvaluator(load_catalogue(args.dataset)["test"], num_queries=args.num_queries, seed=0)
    model, processor = load_retriever(args.model, "cpu")
    store = ImageFeatureStore()
    encoders = {"torch": None, "float32 onnx": OnnxRetrievalEncoder.from_pretrained(args.onnx),
                "int8 onnx": OnnxRetrievalEncoder.from_pretrained(args.onnx, quantized=True)}
    report = {}
    for name, encoder in encoders.items():
        rank = model_ranker(model, processor, image_feature_store=store,
                            query_encoder=None if encoder is None else encoder.encode_queries)
        report[name] = evaluator.evaluate(rank).means()
    keys = [key for key in report["torch"] if key.endswith(("ndcg@10", "recall@100"))]
    for name, means in report.items():
        print(f"{name:14s} " + "  ".join(f"{key} {means[key]:.4f} ({means[key] - report['torch'][key]:+.4f})"
                                         for key in keys))
    if args.output:
        args.output.write_text(json.dumps({"products": len(evaluator.products), "queries": len(evaluator.queries),
                                           "means": report}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
