#!/usr/bin/env python
"""Paper-style comparison on the real fashion catalogue: text-only vs image tower alone vs 4tMM vs 3tMM.

Reproduces the comparison of "Multimodal Semantic Retrieval for Product Search" (arXiv:2501.07365) with the
towers available offline:

1. An aligned text-image pair is built LiT-style, since no pretrained CLIP exists offline: a
   `VisionTextDualEncoderModel` of the frozen converted DINOv2-small image tower and an all-MiniLM-L6-v2 text
   tower, whose text tower and both projections are trained on the training split (title <-> image) with
   `examples/train.py` (`--train_dual_text_tower`).
2. Every row is trained with `examples/train.py` on the same attribute-derived (query, product) pairs of the
   training split with the same budget: text-only bi-encoder; image tower alone (the LiT pair, its text side
   fine-tuned on queries); 4tMM `concat`, `alpha_concat`, `mlp`; 3tMM `mlp` (MiniLM + DINOv2).
3. Every row is evaluated on the test split with the same attribute-derived queries: Recall@10/@100, nDCG@10,
   MRR@10, the slice of queries whose colour word is in no relevant title, and the exclusive matches of each
   row's top-100 against the text-only row's.

```bash
python examples/paper_comparison.py --output_dir outputs/paper_comparison
```
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import default_data_dir, load_catalogue, make_evaluation_queries
from modeling_mmretrieval.retrieval.evaluator import RetrievalEvaluator
from modeling_mmretrieval.retrieval.exclusive_matches import exclusive_matches
from modeling_mmretrieval.towers import get_dinov2_small_path, get_minilm_path

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"

# (row name, train.py flags). Every row shares the budget flags added in `train_row`.
ROWS = {
    "text-only bi-encoder": ["--architecture", "text_only"],
    "image tower alone (LiT pair)": [
        "--architecture", "4tower", "--fusion", "alpha_concat", "--fusion_alpha", "0.0", "--train_dual_text_tower",
    ],
    "4tMM concat": ["--architecture", "4tower", "--fusion", "concat"],
    "4tMM alpha_concat (alpha=0.7)": ["--architecture", "4tower", "--fusion", "alpha_concat", "--fusion_alpha", "0.7"],
    "4tMM mlp": ["--architecture", "4tower", "--fusion", "mlp"],
    "3tMM mlp": ["--architecture", "3tower", "--fusion", "mlp", "--vision_model", "dinov2-small"],
}
TEXT_ROW = "text-only bi-encoder"
REPORTED = ("recall@10", "recall@100", "ndcg@10", "mrr@10")


def uses_dual_encoder(flags: list[str]) -> bool:
    return flags[flags.index("--architecture") + 1] == "4tower"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="Catalogue folder (default: ../shared data, else the sample).")
    parser.add_argument("--output_dir", default="outputs/paper_comparison")
    parser.add_argument("--max_train_products", type=int, default=6000, help="Training products per row.")
    parser.add_argument("--max_train_steps", type=int, default=180, help="Optimizer steps per row (same budget).")
    parser.add_argument("--lit_max_train_steps", type=int, default=180, help="Steps of the LiT alignment.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--num_queries", type=int, default=1000, help="Attribute-derived test queries.")
    parser.add_argument("--max_test_products", type=int, help="Evaluate on a seeded subset of the test split.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="Only these rows (text-only is always run).")
    return parser.parse_args(argv)


def run_train(flags: list[str], output_dir: Path) -> dict:
    if (output_dir / "results.json").is_file():
        return json.loads((output_dir / "results.json").read_text())  # a finished row is not retrained
    command = [sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(output_dir), *flags]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((output_dir / "results.json").read_text())


def budget_flags(args, dataset: str) -> list[str]:
    return [
        "--dataset", dataset, "--train_split", "train", "--eval_split", "none", "--seed", str(args.seed),
        "--max_train_products", str(args.max_train_products), "--max_train_steps", str(args.max_train_steps),
        "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--image_size", str(args.image_size),
        "--visual_word_dropout", "0",  # the paper's training data, as this comparison was first run
    ]


def build_lit_pair(args, dataset: str, work_dir: Path) -> Path:
    """Trains the LiT-style aligned pair and returns the folder of its `VisionTextDualEncoderModel`."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

    lit_dir = work_dir / "lit_dual_encoder"
    if (lit_dir / "config.json").is_file():
        return lit_dir
    initial = work_dir / "lit_initial"
    if not (initial / "config.json").is_file():
        dinov2, minilm = get_dinov2_small_path(), get_minilm_path()
        pair = VisionTextDualEncoderModel.from_vision_text_pretrained(str(dinov2), str(minilm), projection_dim=384)
        pair.save_pretrained(initial)
        AutoTokenizer.from_pretrained(minilm).save_pretrained(initial)
        AutoImageProcessor.from_pretrained(dinov2).save_pretrained(initial)
    flags = budget_flags(args, dataset) + [
        "--architecture", "4tower", "--clip_model", str(initial), "--fusion", "alpha_concat", "--fusion_alpha", "0.0",
        "--train_dual_text_tower", "--query_column", "title", "--max_train_steps", str(args.lit_max_train_steps),
    ]
    result = run_train(flags, work_dir / "lit_training")
    trained = MultimodalRetrievalModel.from_pretrained(result["model_dir"])
    trained.dual_encoder.save_pretrained(lit_dir)
    processor = MultimodalRetrievalProcessor.from_pretrained(result["model_dir"])
    processor.dual_tokenizer.save_pretrained(lit_dir)
    processor.image_processor.save_pretrained(lit_dir)
    return lit_dir


def format_table(rows: dict[str, dict]) -> str:
    header = (
        "| model | Recall@10 | Recall@100 | nDCG@10 | MRR@10 | colour-not-in-title R@100 (n) "
        "| exclusive in top-100 vs text-only (per query) | share relevant |"
    )
    lines = [header, "|" + "---|" * 8]
    for name, row in rows.items():
        metrics = row["metrics"]
        colour = row["metrics"].get("test/colour_not_in_title/recall@100")
        colour_n = int(row["metrics"].get("test/colour_not_in_title/num_queries", 0))
        exclusive = row.get("exclusive")
        cells = [f"{metrics[f'test/{m}']:.3f}" for m in REPORTED]
        cells.append(f"{colour:.3f} ({colour_n})" if colour is not None else "n/a")
        if exclusive is None:
            cells += ["–", "–"]
        else:
            share = exclusive["multimodal_exclusive/relevant_share"]
            cells += [f"{exclusive['multimodal_exclusive/mean_per_query']:.1f}",
                      "n/a" if share != share else f"{share:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or str(default_data_dir())
    names = [TEXT_ROW] + [name for name in (args.rows or ROWS) if name != TEXT_ROW]

    lit_dir = None
    if any(uses_dual_encoder(ROWS[name]) for name in names):
        lit_dir = build_lit_pair(args, dataset, output_dir)
    trained = {}
    for name in names:
        flags = budget_flags(args, dataset) + ROWS[name]
        if uses_dual_encoder(ROWS[name]):
            flags += ["--clip_model", str(lit_dir)]
        slug = name.split(" (")[0].replace(" ", "_").replace("-", "_")
        trained[name] = run_train(flags, output_dir / slug)["model_dir"]

    test = load_catalogue(dataset, split="test")
    if args.max_test_products and args.max_test_products < len(test):
        test = test.shuffle(seed=args.seed).select(range(args.max_test_products))
    queries = make_evaluation_queries(test, seed=args.seed, num_queries=args.num_queries)
    qrels = {q.query_id: set(q.relevant_ids) for q in queries}
    rows, runs = {}, {}
    for name, model_dir in trained.items():
        model = MultimodalRetrievalModel.from_pretrained(model_dir)
        processor = MultimodalRetrievalProcessor.from_pretrained(model_dir)
        evaluator = RetrievalEvaluator.with_colour_slice(test, queries, processor, name="test", show_progress=True)
        runs[name] = evaluator.rankings(model, k=100)
        rows[name] = {"model_dir": model_dir, "metrics": evaluator.compute(runs[name])}
        print(name, {m: round(rows[name]["metrics"][f"test/{m}"], 4) for m in REPORTED}, flush=True)
    for name in rows:
        if name != TEXT_ROW:
            rows[name]["exclusive"] = exclusive_matches(runs[name], runs[TEXT_ROW], qrels, k=100).summary()

    report = {
        "dataset": dataset,
        "test_products": len(test),
        "num_queries": len(queries),
        "budget": {k: getattr(args, k) for k in ("max_train_products", "max_train_steps", "lit_max_train_steps",
                                                  "per_device_train_batch_size", "image_size", "seed")},
        "rows": rows,
        "wall_time_seconds": round(time.time() - started, 1),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    (output_dir / "comparison.json").write_text(json.dumps(report, indent=2, default=float))
    table = format_table(rows)
    (output_dir / "comparison.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
