#!/usr/bin/env python
"""Do images pay on unseen products? Every row trained with one budget, several seeds, one held-out evaluation.

Each trained row runs `examples/train.py` (same data, steps and schedule; only the row's flags differ) once per
seed, then is evaluated by the same `retrieval.HeldOutEvaluator` on the test split: attribute-derived queries
phrased by the held-out family (never used in training), the text-silent slice and the degraded-text variant.
Every multimodal row is compared with the text-only row by a paired bootstrap over queries (per-query values
averaged over seeds first). BM25 and the zero-shot text tower are untrained reference rows. The markdown report
(the budget, seeds, intervals, exclusive matches) is written to `--markdown`; per-run JSON files make the
command resumable (a finished run is not redone).

```bash
python examples/images_that_pay.py --output_dir outputs/images_that_pay --markdown docs/results.md
```
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.atomic_files import write_json_atomically
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, default_data_dir, load_catalogue
from modeling_mmretrieval.data.catalogue import parse_attributes
from modeling_mmretrieval.data.queries import derive_query
from modeling_mmretrieval.data.visual_words import VisualWords
from modeling_mmretrieval.retrieval.exclusive_matches import exclusive_matches
from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator, model_ranker
from modeling_mmretrieval.retrieval.hybrid import fused_ranker
from modeling_mmretrieval.retrieval.image_feature_store import image_feature_namespace
from modeling_mmretrieval.retrieval.lexical import bm25_ranker
from modeling_mmretrieval.retrieval.paired_bootstrap import mean_over_seeds, paired_bootstrap
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.training.dual_encoder_alignment import (
    align_dual_encoder, extract_dual_encoder, save_initial_dual_encoder,
)
from modeling_mmretrieval.training.image_branch_weight import CANDIDATE_IMAGE_BRANCH_WEIGHTS, choose_image_branch_weight
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
BASELINE = "text-only"
# Bumped whenever the evaluator's definition changes, so cached evaluations are redone.
EVALUATION_VERSION = 2
# What `examples/train.py` trains by default (its final model then searches with the weight of CHOSEN_WEIGHT).
DEFAULT_ROW = "4tMM residual + restoration + visual tags + colour histogram for the tagger + text-tower anchor"
AMONG_NAMED_ROW = DEFAULT_ROW + " + tags among named colours"
# The hybrid row fuses BM25 with the models of this row (the default when the hybrid row was made).
HYBRID_BASE_ROW = "4tMM residual + restoration + visual tags"
# Issue 14's targets for the best multimodal row against text-only: an absolute gain on all queries (with the
# interval above 0), and relative gains on the text-silent slice and the degraded-text variant.
TARGETS = {"all/ndcg@10": ("absolute", 0.02), "text_silent/ndcg@10": ("relative", 0.25),
           "text_silent/recall@100": ("relative", 0.25), "degraded/ndcg@10": ("relative", 0.25),
           "degraded/recall@100": ("relative", 0.25)}
# The 4tower rows' aligned pair: linear adapters on frozen MiniLM and DINOv2 features, trained on the training
# catalogue's (title, image) pairs; compared, as an image-only retriever, with a LiT pair of LIT_STEPS steps.
ALIGNED_PAIR = "ALIGNED_PAIR"
LIT_STEPS = 40
COLOUR_CEILING = "ceiling: text-only told each product's colour"
UNNAMED_COLOUR_CEILING = "ceiling: text-only told each product's colour where its text does not name it"
SILENT_COLOUR_CEILING = "ceiling: text-only told each product's colour where its text names no colour"
SEVERAL_COLOURS_CEILING = "ceiling: text-only told each product's colour where its text names several colours"
# Which products each colour ceiling tells their colour (`with_catalogue_colour`), and its cache files' name.
CEILINGS = {COLOUR_CEILING: "every product", UNNAMED_COLOUR_CEILING: "where the text lacks it",
            SILENT_COLOUR_CEILING: "where the text names no colour",
            SEVERAL_COLOURS_CEILING: "where the text names several colours"}
CEILING_FILES = {COLOUR_CEILING: "colour_ceiling", UNNAMED_COLOUR_CEILING: "unnamed_colour_ceiling",
                 SILENT_COLOUR_CEILING: "silent_colour_ceiling",
                 SEVERAL_COLOURS_CEILING: "several_colours_ceiling"}
# Beyond colour: what a perfect reader of the photo's pattern (the catalogue's `Pattern` attribute, which the evaluation's
# visual queries and slices also ask for), and of its colour and pattern together, could add, told on every product
# that has them. Their cache files' names follow.
PATTERN_CEILING = "ceiling: text-only told each product's pattern"
COLOUR_AND_PATTERN_CEILING = "ceiling: text-only told each product's colour and pattern"
ATTRIBUTE_CEILINGS = {PATTERN_CEILING: ("Pattern",), COLOUR_AND_PATTERN_CEILING: ("base_colour", "Pattern")}
ATTRIBUTE_CEILING_FILES = {PATTERN_CEILING: "pattern_ceiling", COLOUR_AND_PATTERN_CEILING: "colour_and_pattern_ceiling"}
# The colour ceiling with a real reader instead of a perfect one: the text-only models told, on every product, the
# colour the default row's tagger (same seed) reads off its photo, with this share of the tagger's mistakes put right
# (seeded by product); between the tagger's accuracy and the perfect reader's, they say how good a colour reader must
# be for colour to reach a target. Their cache files' names follow.
READER_ROWS = {"reader: text-only told the default tagger's colour on every product": 0.0,
               "reader: the same, half of the tagger's mistakes put right": 0.5}
READER_FILES = {row: f"reader_colour_corrected_{round(share * 100)}" for row, share in READER_ROWS.items()}
# Rows also evaluated with their fusions' image branch off at search time (their text tower and tags alone).
TOWER_ALONE_ROWS = (
    "4tMM residual + restoration + visual tags + colour histogram for the tagger",
    "4tMM residual + restoration + visual tags + colour histogram for the tagger + text-tower anchor",
)
TOWER_ALONE = ", image branch off at search"
# These rows are also evaluated with their image branch weighted at search time (`set_image_branch_weight`), by the
# candidate weight whose all-queries nDCG@10 on the validation split is highest, chosen per seed.
CHOSEN_WEIGHT_ROWS = (DEFAULT_ROW,)
CHOSEN_WEIGHT = ", image branch weight chosen on validation"
# The choice sees validation products phrased as training phrases them, never the held-out family.
CHOICE_PHRASING = "validation queries phrased by derive_query"
HYBRID_ROW = "hybrid: the 4tMM tags row's models + BM25 (RRF)"
# (row name, train.py flags); every row also gets the budget flags of `budget_flags`.
# What each row tries, for the report.
ROW_NOTES = {
    "BM25 (title, brand, description)": "lexical baseline (`retrieval.lexical`, bm25s), untrained, deterministic",
    "MiniLM zero-shot": "the pretrained text tower alone, untrained, deterministic",
    "text-only": "the text tower fine-tuned on the queries: the baseline every interval is taken against",
    "3tMM residual + visual-word dropout 0.5": "residual fusion, and colour/pattern words stripped from half of the "
    "training product texts so that matching them needs the image",
    "3tMM residual, no dropout": "residual fusion: the text vector plus an MLP of [text ; image] that starts at zero",
    "3tMM mlp (paper)": "the paper's MLP fusion of [text ; image], randomly initialised",
    "image alone: adapter pair": "the aligned pair of the 4tMM rows as an untrained image-only retriever (query: "
    "its text side; product: its image side): linear adapters on frozen MiniLM and DINOv2 features, trained on the "
    "training catalogue's (title, image) pairs (`training.dual_encoder_alignment`)",
    f"image alone: LiT pair ({LIT_STEPS} steps)": f"the same, for a pair whose MiniLM text tower and projections are "
    f"trained LiT-style against the frozen DINOv2 for {LIT_STEPS} steps of 32 (title, image) pairs "
    "(`--train_dual_text_tower`)",
    HYBRID_ROW: f"not trained again: the models of `{HYBRID_BASE_ROW}` (dense) and the BM25 row fused by reciprocal rank "
    "fusion of their top-100 lists (`retrieval.hybrid.fused_ranker`, rrf_k 60), as `mmretrieval search --ranker hybrid` "
    "ranks",
    COLOUR_CEILING: "not a model: the text-only models evaluated with the catalogue's colour value appended to "
    "every product title, as a perfect reader of the image's colour would add it; the most colour can give",
    UNNAMED_COLOUR_CEILING: "not a model: the same, with the colour appended only to the products whose title and "
    "description do not name their own colour (they may name others); the gap to the row above is what repeating a "
    "colour the text already names is worth, which marks it as the product's own among the colours the text names",
    SILENT_COLOUR_CEILING: "not a model: the same, with the colour appended only to the products whose title and "
    "description name no colour at all: the rule of the visual-word tagger (`VisualWordTagger`), so this is the most "
    "a perfect tagger could add",
    SEVERAL_COLOURS_CEILING: "not a model: the same, with the colour appended only to the products whose title and "
    "description name more than one colour (\"navy blue and white striped\"): what a reader that picks the product's "
    "own colour among those its text names could add",
    PATTERN_CEILING: "not a model: the text-only models evaluated with the catalogue's pattern (the `Pattern` "
    "attribute: solid, printed, striped, checked, ...) appended to the title of every product that has one, as a "
    "perfect reader of the image's pattern would add it",
    COLOUR_AND_PATTERN_CEILING: "not a model: the same with the colour and the pattern appended: the most that "
    "writing what the photo shows of the evaluation's visual words could give",
    "4tMM concat (paper)": "[MiniLM(q) ; pair-text(q)] against [MiniLM(product) ; pair-image], equal weights",
    "4tMM alpha_concat 0.7 (paper)": "the same, text halves weighted 0.7 and pair halves 0.3",
    "4tMM mlp (paper)": "MLPs of [text ; pair] on both sides, randomly initialised",
    "4tMM residual + visual-word restoration": "residual MLPs on both sides (start as the text model), plus the "
    "visual-word restoration loss",
    "4tMM residual + restoration + visual tags": "the same, plus the visual-word tagger: a linear classifier of the "
    "image features, fitted on the training products' catalogue colours, writes the colour it reads off a product's "
    "image into the product's text when the text names none and the colour is more likely right than wrong "
    "(`training.visual_tagger`, `--visual_tags`)",
    "3tMM residual + restoration + visual tags": "3tMM residual fusion with the restoration loss and the visual-word "
    "tagger on the DINOv2 features",
    "4tMM residual + restoration + visual tags + colour histogram": "the same, with a colour description of each "
    "photo (a 6x6x6 RGB histogram of its non-white pixels, with their mean and spread; `--colour_histogram_levels 6`) "
    "appended to the image features that the tagger and the residual fusion read: DINOv2 is trained to ignore colour",
    "3tMM residual + restoration + visual tags + colour histogram": "the 3tMM tags row with the same colour "
    "description",
    "4tMM residual + restoration + visual tags + colour histogram for the tagger": "the same colour description, read "
    "by the tagger only: the residual fusion keeps the pair's image features alone (`--no_colour_histogram_in_fusion`)",
    "4tMM residual + restoration + visual tags + colour histogram for the tagger + text-tower anchor": "the same, plus "
    "the text-only model's loss on the text towers' own vectors (before the fusion) added to the fused loss, so that "
    "the shared text tower keeps learning what a text-only run learns (`training.text_tower_anchor`, weight 1)",
    "3tMM residual + visual-word restoration": "residual fusion, plus a second loss in which the fusion alone "
    "(text towers untouched) learns to restore from the image the colour/pattern words stripped from every training "
    "product text (`training.visual_word_restoration`, weight 1)",
}
ROW_NOTES.update({
    "reader: text-only told the default tagger's colour on every product": "not a model: the colour ceiling with a "
    f"real reader: the text-only models evaluated with the colour that the tagger of `{DEFAULT_ROW}` (same seed) reads "
    "off each product's photo appended to every product title, right or wrong (`reader_colours`); between it and "
    "the first ceiling lies what a better colour reader would add",
    "reader: the same, half of the tagger's mistakes put right": "not a model: the same, with the catalogue's colour "
    "told instead on a seeded half of the products whose colour the tagger reads wrong: a reader with half its "
    "mistakes",
})
ROW_NOTES.update({
    row + CHOSEN_WEIGHT: f"not trained again: the models of `{row}` with what the residual fusions' image branch adds "
    f"weighted at search time (`set_image_branch_weight`): of {', '.join(map(str, CANDIDATE_IMAGE_BRANCH_WEIGHTS))}, "
    "the weight with the best all-queries nDCG@10 on the validation split's products, queried in the training "
    "phrasing (never the held-out family, never a test product), chosen per seed, as the train command's "
    "`--image_branch_weight auto` chooses on its evaluation split"
    for row in CHOSEN_WEIGHT_ROWS
})
ROW_NOTES[AMONG_NAMED_ROW] = (
    "the same, and the tagger also writes a colour into a text that names several (\"navy blue and white striped\"): "
    "the one of those it names that the image favours, when it is more likely than not among them "
    "(`--tag_among_named_colours`)")
ROW_NOTES.update({
    row + TOWER_ALONE: f"not trained again: the models of `{row}` with the image branch of both residual fusions off "
    "at search time (weight 0, `silence_image_branch`), as at initialisation, so that they rank by their text tower "
    "and the visual tags written into the product texts alone; the gap to that row is what the fusion's image "
    "branch adds"
    for row in TOWER_ALONE_ROWS
})
ROWS = {
    "text-only": ["--architecture", "text_only"],
    "3tMM residual + visual-word dropout 0.5": ["--architecture", "3tower", "--fusion", "residual",
                                                "--visual_word_dropout", "0.5", "--visual_word_restoration", "0"],
    "3tMM residual, no dropout": ["--architecture", "3tower", "--fusion", "residual", "--visual_word_dropout", "0",
                                  "--visual_word_restoration", "0"],
    "3tMM mlp (paper)": ["--architecture", "3tower", "--fusion", "mlp", "--visual_word_dropout", "0",
                         "--visual_word_restoration", "0"],
    "3tMM residual + visual-word restoration": ["--architecture", "3tower", "--fusion", "residual",
                                                "--visual_word_dropout", "0", "--visual_word_restoration", "1"],
    # 4tower rows: the dual encoder is the adapter-aligned pair (`ALIGNED_PAIR` is replaced by its folder).
    "4tMM concat (paper)": ["--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion", "concat"],
    "4tMM alpha_concat 0.7 (paper)": ["--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion",
                                      "alpha_concat", "--fusion_alpha", "0.7"],
    "4tMM mlp (paper)": ["--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion", "mlp",
                         "--visual_word_restoration", "0"],
    "4tMM residual + visual-word restoration": ["--architecture", "4tower", "--clip_model", "ALIGNED_PAIR",
                                                "--fusion", "residual", "--visual_word_restoration", "1"],
    "4tMM residual + restoration + visual tags": ["--architecture", "4tower", "--clip_model", "ALIGNED_PAIR",
                                                  "--fusion", "residual", "--visual_word_restoration", "1",
                                                  "--visual_tags"],
    "3tMM residual + restoration + visual tags": ["--architecture", "3tower", "--fusion", "residual",
                                                  "--visual_word_dropout", "0", "--visual_word_restoration", "1",
                                                  "--visual_tags"],
    "4tMM residual + restoration + visual tags + colour histogram": [
        "--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion", "residual",
        "--visual_word_restoration", "1", "--visual_tags", "--colour_histogram_levels", "6",
        "--colour_histogram_in_fusion"],
    "3tMM residual + restoration + visual tags + colour histogram": [
        "--architecture", "3tower", "--fusion", "residual", "--visual_word_dropout", "0",
        "--visual_word_restoration", "1", "--visual_tags", "--colour_histogram_levels", "6",
        "--colour_histogram_in_fusion"],
    "4tMM residual + restoration + visual tags + colour histogram for the tagger": [
        "--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion", "residual",
        "--visual_word_restoration", "1", "--visual_tags", "--colour_histogram_levels", "6"],
    "4tMM residual + restoration + visual tags + colour histogram for the tagger + text-tower anchor": [
        "--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion", "residual",
        "--visual_word_restoration", "1", "--visual_tags", "--colour_histogram_levels", "6",
        "--text_tower_anchor", "1"],
    AMONG_NAMED_ROW: [
        "--architecture", "4tower", "--clip_model", "ALIGNED_PAIR", "--fusion", "residual",
        "--visual_word_restoration", "1", "--visual_tags", "--colour_histogram_levels", "6",
        "--text_tower_anchor", "1", "--tag_among_named_colours"],
}
# The rows above that do not ask for the visual-word tagger (or the colour description) were trained before it
# existed: they run without it.
WITHOUT_VISUAL_TAGS = "--no_visual_tags"
WITHOUT_COLOUR_HISTOGRAM = ["--colour_histogram_levels", "0"]
WITHOUT_TEXT_TOWER_ANCHOR = ["--text_tower_anchor", "0"]
# The rows are the models as trained; the search-time weight has rows of its own.
AS_TRAINED_IMAGE_BRANCH = ["--image_branch_weight", "1"]
REPORTED = (("all", "ndcg@10"), ("all", "recall@100"), ("text_silent", "ndcg@10"), ("text_silent", "recall@100"),
            ("degraded", "ndcg@10"), ("degraded", "recall@100"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/images_that_pay")
    parser.add_argument("--markdown", help="Write the report here (e.g. docs/results.md).")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dataset", default=None, help="Training catalogue (default: the committed sample).")
    parser.add_argument("--test_dataset", default=None, help="Evaluation catalogue folder (default: ../shared if "
                        "present, else the sample); its `test` split is used.")
    parser.add_argument("--num_queries", type=int, default=1000)
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument("--max_train_products", type=int)
    parser.add_argument("--max_train_steps", type=int)
    parser.add_argument("--report_only", action="store_true",
                        help="Train and evaluate nothing new: report the runs already evaluated (a row then shows how "
                             "many seeds it has).")
    return parser.parse_args(argv)


def budget_flags(args) -> list[str]:
    flags = ["--eval_split", "none"]
    if args.dataset:
        flags += ["--dataset", args.dataset]
    if args.max_train_products:
        flags += ["--max_train_products", str(args.max_train_products)]
    if args.max_train_steps:
        flags += ["--max_train_steps", str(args.max_train_steps)]
    return flags


def training_dataset(args) -> str:
    """The catalogue every trained row learns from: `--dataset`, else the committed sample, as `examples/train.py`
    defaults (never `load_catalogue`'s own default, which is the shared catalogue where it is present)."""
    return args.dataset or str(SAMPLE_DATA_DIR)


def build_pairs(args, output: Path) -> dict[str, Path]:
    """The two aligned text-image pairs (built once, then reused): the adapter pair the 4tMM rows use, and a LiT
    pair to compare it with."""
    adapter_dir, lit_dir = output / "pairs" / "adapter", output / "pairs" / f"lit_{LIT_STEPS}_steps"
    if not (adapter_dir / "alignment.json").is_file():
        report = align_dual_encoder("minilm", "dinov2-small", load_catalogue(training_dataset(args), split="train"),
                                    adapter_dir, seed=0)
        (adapter_dir / "alignment.json").write_text(json.dumps(report.to_dict(), indent=2))
    if not (lit_dir / "config.json").is_file():
        initial = save_initial_dual_encoder("minilm", "dinov2-small", output / "pairs" / "lit_initial")
        final = train_row(args, ["--architecture", "4tower", "--clip_model", str(initial), "--fusion", "alpha_concat",
                                 "--fusion_alpha", "0.0", "--train_dual_text_tower", "--query_column", "title",
                                 "--max_train_steps", str(LIT_STEPS)], seed=0, run_dir=output / "pairs" / "lit_training")
        extract_dual_encoder(final, lit_dir)
    return {"image alone: adapter pair": adapter_dir, f"image alone: LiT pair ({LIT_STEPS} steps)": lit_dir}


def image_alone_checkpoint(pair_dir: Path, folder: Path) -> Path:
    """An untrained 4tower retriever that ranks by the pair alone (`alpha_concat` with alpha 0), saved once."""
    if not (folder / "config.json").is_file():
        model = MultimodalRetrievalModel.from_towers_pretrained(
            str(get_minilm_path()), str(pair_dir), architecture="4tower", fusion="alpha_concat", fusion_alpha=0.0,
            max_query_length=24, max_product_length=64)
        processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(get_minilm_path()), str(pair_dir),
                                                                        config=model.config)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def row_dir(output: Path, row: str) -> Path:
    """The folder of a trained row's runs (one `seed<N>` folder per seed)."""
    return output / row.replace(" ", "_").replace(",", "").replace("+", "plus")


def train_row(args, flags: list[str], seed: int, run_dir: Path) -> Path:
    """Trains one row and seed with `examples/train.py` (skipped when its final model exists)."""
    final = run_dir / "final"
    command_file = run_dir / "train_flags.json"
    wanted = json.dumps([seed, *budget_flags(args), *flags])
    if not (final / "config.json").is_file() or not command_file.is_file() or command_file.read_text() != wanted:
        image_row = "--architecture" in flags and "text_only" not in flags
        implicit = [WITHOUT_VISUAL_TAGS] if image_row and "--visual_tags" not in flags else []
        if image_row and "--colour_histogram_levels" not in flags:
            implicit += WITHOUT_COLOUR_HISTOGRAM
        if image_row and "--text_tower_anchor" not in flags:
            implicit += WITHOUT_TEXT_TOWER_ANCHOR
        if image_row and "--image_branch_weight" not in flags:
            implicit += AS_TRAINED_IMAGE_BRANCH
        command = [sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(run_dir), "--seed", str(seed),
                   *budget_flags(args), *flags, *implicit]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        command_file.write_text(wanted)
    return final


def with_catalogue_colour(rank, column: str = "base_colour", told: str = "every product",
                          colour_of: Mapping[str, str] | None = None, id_column: str = "product_id"):
    """The ranker, fed products whose title ends with the catalogue's colour value: what a perfect colour reader of
    the image would tell the text tower. Evaluated with the text-only models, it is the colour ceiling of the
    text-silent slice and the degraded variant. `told`: which products get their colour, `"every product"`, those
    whose title and description do not name it (`"where the text lacks it"`), or those whose text names no colour
    at all (`"where the text names no colour"`, the visual-word tagger's rule), or those whose text names more than
    one colour (`"where the text names several colours"`). `colour_of` (product id -> colour)
    tells a real reader's colours instead of the catalogue's (products it lacks are told nothing)."""
    if told not in CEILINGS.values():
        raise ValueError(f"told must be one of {list(CEILINGS.values())}, got {told!r}")

    def colour_told(product):
        return product.get(column) if colour_of is None else colour_of.get(str(product[id_column]))

    def is_told(product, colour_words: VisualWords) -> bool:
        colour = colour_told(product)
        text = f"{product.get('title') or ''} {product.get('description') or ''}"
        if not colour or told == "every product":
            return bool(colour)
        if told == "where the text lacks it":
            return not colour_words.mentions(text, str(colour))
        if told == "where the text names several colours":
            return len(colour_words.named(text)) > 1
        return colour_words.pattern.search(text) is None

    def ranked(products, texts, k):
        colour_words = VisualWords.colours(str(product[column]) for product in products if product.get(column))
        return rank([{**product, "title": f"{product.get('title') or ''} {colour_told(product)}".strip()}
                     if is_told(product, colour_words) else product for product in products], texts, k)
    return ranked


def catalogue_visual_values(products, keys: Sequence[str], id_column: str = "product_id") -> dict[str, str]:
    """Product id -> the catalogue's values of `keys` (a column, else a key of the `attributes` column), joined by a
    space, for the products that have any: what a perfect reader of those attributes off the photo would tell
    (`with_catalogue_colour`'s `colour_of`)."""
    told = {}
    for product in products:
        attributes = parse_attributes(product.get("attributes"))
        values = [str(product.get(key) or attributes.get(key) or "").strip() for key in keys]
        if any(values):
            told[str(product[id_column])] = " ".join(value for value in values if value)
    return told


def tagger_probabilities(folder: Path, products: list, feature_cache: dict,
                         id_column: str = "product_id") -> tuple[list[str], dict[str, torch.Tensor]]:
    """The tags of the visual-word tagger of the checkpoint in `folder`, and its probabilities over them for each
    product's photo, by product id (products without an image are left out)."""
    model = MultimodalRetrievalModel.from_pretrained(folder).eval()
    processor = MultimodalRetrievalProcessor.from_pretrained(folder)
    speedups.apply(processor=processor)
    if not model.config.visual_tags or not model.image_features_are_frozen:
        raise ValueError(f"{folder}: not a checkpoint with a visual-word tagger on frozen image features")
    key = image_feature_namespace(model, processor)
    if key not in feature_cache:
        feature_cache[key] = precompute_image_features(model, processor, products, show_progress=False)
    read = {str(product[id_column]): feature_cache[key].get(str(product[id_column])) for product in products}
    read = {product_id: feature for product_id, feature in read.items() if feature is not None}
    with torch.no_grad():
        probabilities = model.visual_tagger(torch.stack([torch.as_tensor(f).float().flatten() for f in read.values()]))
    return list(model.config.visual_tags), dict(zip(read, probabilities))


def reader_colours(folder: Path, products: list, feature_cache: dict, corrected_share: float = 0.0,
                   seed: int = 0, column: str = "base_colour", id_column: str = "product_id") -> dict[str, str]:
    """The colour the visual-word tagger of the checkpoint in `folder` reads off each product's photo (most probable
    tag, whatever its probability), by product id; products without an image are left out. `corrected_share` of the
    products it reads wrong (chosen by a seeded hash of their id) get the catalogue's colour instead, a better
    reader than the tagger with the same kind of mistakes."""
    tags, probabilities = tagger_probabilities(folder, products, feature_cache, id_column)
    colours = {product_id: tags[int(values.argmax())] for product_id, values in probabilities.items()}
    for product in products:
        product_id, truth = str(product[id_column]), product.get(column)
        wrong = product_id in colours and truth and colours[product_id] != str(truth).lower()
        if wrong and zlib.crc32(f"{seed}:{product_id}".encode()) % 1000 < corrected_share * 1000:
            colours[product_id] = str(truth).lower()
    return colours


def named_colour_choice(folder: Path, products: list, feature_cache: dict, column: str = "base_colour",
                        id_column: str = "product_id") -> dict:
    """How well the tagger of the checkpoint in `folder` picks a product's colour among those its text names (what
    `--tag_among_named_colours` writes): over the products with a photo and a catalogue colour whose title and
    description name several of the tagger's colours, the share where the image's pick (the most probable of those
    named) is the catalogue's colour, beside the share where the colour the text names first is."""
    tags, probabilities = tagger_probabilities(folder, products, feature_cache, id_column)
    words = VisualWords.colours(tags)
    judged = image_right = first_right = 0
    for product in products:
        values, truth = probabilities.get(str(product[id_column])), product.get(column)
        named = [colour for colour in words.named(f"{product.get('title') or ''} {product.get('description') or ''}")
                 if colour in tags]
        if values is None or not truth or len(named) < 2:
            continue
        pick = max(named, key=lambda colour: float(values[tags.index(colour)]))
        judged, image_right = judged + 1, image_right + (pick == str(truth).lower())
        first_right += named[0] == str(truth).lower()
    return {"products": judged, "image": image_right / judged if judged else float("nan"),
            "first_named": first_right / judged if judged else float("nan")}


def reader_accuracy(colours: Mapping[str, str], products: list, column: str = "base_colour",
                    id_column: str = "product_id") -> float:
    """The share of the products with a read colour and a catalogue colour whose read colour is the catalogue's."""
    judged = [(colours[str(product[id_column])], str(product[column]).lower()) for product in products
              if str(product[id_column]) in colours and product.get(column)]
    return sum(read == truth for read, truth in judged) / len(judged) if judged else float("nan")


def evaluate_checkpoint(evaluator: HeldOutEvaluator, folder: Path, feature_cache: dict,
                        colour_oracle: str | None = None, with_bm25: bool = False,
                        image_branch_weight: float | None = None, colour_of: Mapping[str, str] | None = None) -> dict:
    """The evaluation of the checkpoint in `folder`; `colour_oracle` (a value of `CEILINGS`) tells the ranked
    products their catalogue colour, or their colour in `colour_of` (`with_catalogue_colour`);
    `image_branch_weight` sets the weight on what the residual fusions' image branch adds
    (`set_image_branch_weight`; 0: off; `None`: as saved)."""
    model = MultimodalRetrievalModel.from_pretrained(folder).eval()
    if image_branch_weight is not None:
        model.set_image_branch_weight(image_branch_weight)
    processor = MultimodalRetrievalProcessor.from_pretrained(folder)
    speedups.apply(processor=processor)
    image_features = None
    if model.config.uses_images and model.image_features_are_frozen:
        # Rows whose image features are the same (tower, weights, pixels, colour description) share them.
        key = image_feature_namespace(model, processor)
        if key not in feature_cache:
            feature_cache[key] = precompute_image_features(model, processor, evaluator.products, show_progress=False)
        image_features = feature_cache[key]
    with torch.no_grad():
        rank = model_ranker(model, processor, image_features=image_features)
        if with_bm25:
            rank = fused_ranker([rank, bm25_ranker()])
        if colour_oracle:
            rank = with_catalogue_colour(rank, told=colour_oracle, colour_of=colour_of)
        result = evaluator.evaluate(rank)
    return {"per_query": result.per_query, "runs": result.runs}


def told_by_reader(evaluator: HeldOutEvaluator, folder: Path, tagger: Path, feature_cache: dict,
                   corrected_share: float, seed: int) -> dict:
    """The evaluation of the text-only checkpoint in `folder` with every product told the colour that `tagger`'s
    visual-word tagger reads off its photo (`reader_colours`), and how often that colour is right."""
    colours = reader_colours(tagger, evaluator.products, feature_cache, corrected_share=corrected_share, seed=seed)
    result = evaluate_checkpoint(evaluator, folder, feature_cache, colour_oracle="every product", colour_of=colours)
    return {**result, "reader_accuracy": reader_accuracy(colours, evaluator.products)}


def with_chosen_branch_weight(args, output: Path, row: str, evaluation: str, evaluator: HeldOutEvaluator,
                              feature_cache: dict) -> list[dict]:
    """The row's seeds evaluated on the test split with the image branch weight (`CANDIDATE_IMAGE_BRANCH_WEIGHTS`)
    whose all-queries nDCG@10 is best on the validation split of `--test_dataset`, queried in the training phrasing
    (`CHOICE_PHRASING`); each choice is cached in `<row folder>/seed<N>/branch_weight.json` (with every candidate's
    validation figure) and kept in the result; a cached choice with figures for more weights than today's candidates
    chooses among the candidates."""
    choosing = evaluation + CHOICE_PHRASING  # what the choice depends on besides the trained run
    validation = None
    runs = []
    for seed in args.seeds:
        run_dir = row_dir(output, row) / f"seed{seed}"
        flags_file, choice_file = run_dir / "train_flags.json", run_dir / "branch_weight.json"
        cached = json.loads(choice_file.read_text()) if is_cached(choice_file, choosing, flags_file) else {}
        weight = chosen_among_candidates(cached)
        if not flags_file.is_file() or (args.report_only and weight is None):
            continue
        if weight is None:  # never chosen, or chosen among other candidates: chosen again
            choice_file.unlink(missing_ok=True)
            if validation is None:
                validation = HeldOutEvaluator(load_catalogue(args.test_dataset, split="validation"),
                                              num_queries=args.num_queries, seed=args.eval_seed, phrase=derive_query)
            weight = chosen_among_candidates(cached_result(
                choice_file, lambda: choose_branch_weight(validation, run_dir / "final"), choosing + flags_file.read_text()))
        result = cached_result(run_dir / "held_out_chosen_branch_weight.json",
                               lambda: evaluate_checkpoint(evaluator, run_dir / "final", feature_cache,
                                                           image_branch_weight=weight),
                               evaluation + flags_file.read_text() + f"weight {weight}")
        runs.append({**result, "branch_weight": weight})
    return runs


def chosen_among_candidates(choice: dict) -> float | None:
    """The weight `choose_image_branch_weight` picks among `CANDIDATE_IMAGE_BRANCH_WEIGHTS` from a choice's validation
    figures (`choose_branch_weight`), or `None` when they lack a candidate."""
    scores = choice.get("validation", {})
    if not all(str(float(weight)) in scores for weight in CANDIDATE_IMAGE_BRANCH_WEIGHTS):
        return None
    return choose_image_branch_weight(lambda weight: scores[str(weight)])[0]


def choose_branch_weight(validation: HeldOutEvaluator, folder: Path) -> dict:
    """`{"validation": {weight: all-queries nDCG@10}, "chosen": best weight}` for the checkpoint in `folder`, chosen
    as the train command's `--image_branch_weight auto` chooses (`choose_image_branch_weight`)."""
    features: dict = {}  # the validation products' image features, shared by the candidates

    def score(weight: float) -> float:
        values = evaluate_checkpoint(validation, folder, features, image_branch_weight=weight)["per_query"]["all"]
        return sum(values["ndcg@10"].values()) / len(values["ndcg@10"])

    chosen, scores = choose_image_branch_weight(score)
    return {"validation": {str(weight): value for weight, value in scores.items()}, "chosen": chosen}


def is_cached(path: Path, evaluation: str, flags_file: Path) -> bool:
    """Whether `path` holds an evaluation of this run under this evaluation (what `--report_only` reports)."""
    if not path.is_file() or not flags_file.is_file():
        return False
    return json.loads(path.read_text()).get("fingerprint") == evaluation + flags_file.read_text()


def cached_result(path: Path, compute, fingerprint: str) -> dict:
    """`compute()`'s result, stored at `path` and reused while `fingerprint` (what produced it) is unchanged."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored
    started = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - started
    result["fingerprint"] = fingerprint
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, result)  # a killed run never leaves half a file behind
    return result


def evaluated_again(args, output: Path, row: str, name: str, evaluation: str, evaluate) -> list[dict]:
    """The trained `row`'s seeds evaluated once more another way (`evaluate(final folder)`), each cached in
    `references/<name>_seed<N>.json` and redone when the run or the evaluation changes; with `--report_only`,
    only the cached ones."""
    runs = []
    for seed in args.seeds:
        run_dir = row_dir(output, row) / f"seed{seed}"
        path, flags_file = output / "references" / f"{name}_seed{seed}.json", run_dir / "train_flags.json"
        if args.report_only and not is_cached(path, evaluation, flags_file):
            continue
        runs.append(cached_result(path, lambda: evaluate(run_dir / "final"), evaluation + flags_file.read_text()))
    return runs


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per row: means of the seed-averaged per-query values, and paired intervals against the baseline."""
    averaged = {
        row: {(slice_name, metric): mean_over_seeds([run["per_query"].get(slice_name, {}).get(metric, {})
                                                     for run in runs])
              for slice_name, metric in REPORTED}
        for row, runs in results.items()
    }
    summary = {}
    for row, values in averaged.items():
        summary[row] = {}
        for key, per_query in values.items():
            mean = sum(per_query.values()) / len(per_query) if per_query else float("nan")
            entry = {"mean": mean, "queries": len(per_query), "seeds": len(results[row])}
            if row != BASELINE and BASELINE in averaged and per_query and averaged[BASELINE][key]:
                interval = paired_bootstrap(per_query, averaged[BASELINE][key], seed=0)
                base = sum(averaged[BASELINE][key].values()) / len(averaged[BASELINE][key])
                entry.update(difference=str(interval), relative=interval.relative_to(base),
                             excludes_zero=interval.excludes_zero)
            summary[row][f"{key[0]}/{key[1]}"] = entry
    return summary


def markdown(args, summary: dict, exclusive: dict, evaluator: HeldOutEvaluator, seconds: float) -> str:
    """The report: how it was produced, the table with intervals, the targets and the exclusive matches."""
    # The command that trains and evaluates it all: `--report_only` only re-reads what that command cached.
    command = "python examples/images_that_pay.py " + shlex.join(arg for arg in sys.argv[1:] if arg != "--report_only")
    header = ["model", "seeds"] + [f"{s} {m}" for s, m in REPORTED]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, entries in summary.items():
        cells = [row, str(entries["all/ndcg@10"]["seeds"])]
        for slice_name, metric in REPORTED:
            entry = entries[f"{slice_name}/{metric}"]
            cell = f"{entry['mean']:.3f}"
            if "difference" in entry:
                cell += f" ({entry['difference']}; {entry['relative']:+.0%})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    target_lines = []
    for row, entries in summary.items():
        if "difference" not in entries["all/ndcg@10"] or not row.startswith(("3tMM", "4tMM")):
            continue
        checks = []
        for key, (kind, required) in TARGETS.items():
            entry = entries[key]
            gain = entry["relative"] if kind == "relative" else entry["mean"] - summary[BASELINE][key]["mean"]
            met = gain >= required and (kind == "relative" or entry["excludes_zero"])
            checks.append(f"{key} {gain:+.3f}{' (relative)' if kind == 'relative' else ''} "
                          f"{'met' if met else 'not met'} (needs {required:+.2f})")
        target_lines.append(f"- {row}: " + "; ".join(checks))
    exclusive_lines = [
        f"- {row}: {report['multimodal_relevant']} relevant products in its top-100 that the text-only top-100 "
        f"lacks, against {report['text_relevant']} the other way (seed {args.seeds[0]}, {report['queries']} queries)"
        for row, report in exclusive.items()
    ]
    return "\n".join([
        "# Do images pay? Multimodal vs text-only on unseen products and phrasings", "",
        f"Produced by one command (2 CPU cores, no GPU; {seconds / 60:.0f} min of training and evaluation, "
        "summed over the runs, which are cached and resumed):", "", "```bash", command, "```", "",
        "## What produced each number", "",
        f"- **Evaluation** (the same for every row): `{evaluator!r}` on the test split of "
        f"`{os.path.relpath(args.test_dataset or default_data_dir())}`; {args.num_queries} attribute-derived queries "
        "phrased by the "
        "held-out family (`data.held_out_phrasing`, never used in training); text-silent slice: visual queries "
        "judged on the relevant products whose title and description never name the colour or pattern; degraded: "
        "visual queries over the catalogue with visual words stripped from a seeded half of the products.",
        f"- **Budget** (every trained row): `examples/train.py` defaults (one epoch of batch 32, MiniLM text tower, "
        f"frozen DINOv2-small at 112 px) on {training_catalogue(args)}; flags `{' '.join(budget_flags(args))}`; "
        f"seeds {args.seeds}.",
        f"- **The 4tMM rows' dual encoder** (built once, shared by their seeds): {pair_budget(args)}",
        "- **Intervals**: mean difference to the text-only row, paired bootstrap over queries (2,000 resamples, "
        "95%), per-query values averaged over the seeds first; the percentage is relative to text-only.", "",
        "## Rows", "", *[f"- **{row}**: {ROW_NOTES[row]}{measured_note(summary[row])}." for row in summary
                          if row in ROW_NOTES], "",
        "## Results", "",
        f"Mean over queries of the seed-averaged values; in brackets, the difference to text-only with its 95% paired "
        f"bootstrap interval, then the relative change. `{DEFAULT_ROW}` is what `examples/train.py` trains by default; "
        f"`{DEFAULT_ROW + CHOSEN_WEIGHT}` is how its final model then searches (`--image_branch_weight auto`).",
        "", *lines, "",
        "How to read it: the residual fusions start as the text model and can only add, so they keep the text-only "
        "rows' all-queries quality while the image adds recall where the text is silent or degraded; the paper's "
        "`mlp` and `concat` fusions trade all-queries quality for that recall. The colour ceiling is not a model: it "
        "tells the text-only models each product's true colour, the most a perfect reader of the image's colour could "
        "add; where a target lies above it, no image model of this budget can reach it by colour alone. The visual "
        "tags move the text-silent slice most: they put the colour read off the photo where the text tower reads "
        "words. On the degraded variant they help less, since half of all products are then tagged and a wrong tag "
        f"misleads other colour queries.{tagger_accuracy(args)}{reader_paragraph(summary, evaluator.products)}",
        "", "## Best row per reported number", "", *best_rows(summary), "",
        "## Targets (issue 14) against text-only", "", *target_lines, "",
        "## Exclusive matches (top-100, against text-only)", "", *exclusive_lines, "",
    ])


def title_colour_agreement(products: list, column: str = "base_colour", title: str = "title") -> tuple[int, int]:
    """`(agreeing, judged)`: of the products whose title names exactly one colour (catalogue values and the
    vocabulary's colour words), how many name the catalogue's colour: how consistent the catalogue is with itself,
    the agreement a photo reader is measured against."""
    words = VisualWords.colours(str(product[column]) for product in products if product.get(column))
    agreeing = judged = 0
    for product in products:
        named = {match.group(0).lower().replace("-", " ") for match in words.pattern.finditer(product.get(title) or "")}
        if product.get(column) and len(named) == 1:
            judged += 1
            agreeing += named.pop() == str(product[column]).lower()
    return agreeing, judged


def reader_paragraph(summary: dict, products: list) -> str:
    """What the reader rows say: how the all-queries gain grows with the told colours' accuracy, beside how often the
    catalogue's own titles agree with its colour column ("" without reader rows)."""
    rows = [row for row in READER_ROWS if "reader_accuracy" in summary.get(row, {})]
    if not rows or COLOUR_CEILING not in summary:
        return ""
    points = [(summary[row]["reader_accuracy"], summary[row]["all/ndcg@10"]) for row in rows]
    points.append((1.0, summary[COLOUR_CEILING]["all/ndcg@10"]))
    agreeing, judged = title_colour_agreement(products)
    told = "; ".join(f"right on {accuracy:.2f}: {entry['difference']}" for accuracy, entry in points)
    consistency = f" on {agreeing / judged:.2f} of the {judged} test products whose title names one colour" if judged else ""
    return (" The reader rows and the first ceiling tell every product a colour that is right more and more often; "
            f"the all-queries nDCG@10 difference to text-only grows with it ({told}). A colour told everywhere pays "
            "only from a reader that agrees with the catalogue almost as often as the catalogue's own titles do: they "
            f"name its colour column's value{consistency}.")


def measured_note(entries: dict) -> str:
    """What a row measured beside its metrics: for a reader row, how often the colours it told were right (mean
    over its seeds); for the weighted row, the weight each seed chose; "" for the others."""
    if "reader_accuracy" in entries:
        return (f"; the colours told are the catalogue's on {entries['reader_accuracy']:.2f} of the test products "
                "with a photo and a catalogue colour (mean over the seeds)")
    if "named_colour_choice" in entries:
        choice = entries["named_colour_choice"]
        return (f"; on the {choice['products']} test products whose text names several of the tagger's colours, the "
                f"image picks the catalogue's colour among them on {choice['image']:.2f}, the colour named first is "
                f"it on {choice['first_named']:.2f} (first seed's tagger)")
    if "branch_weights" in entries:
        return f"; the weights chosen, seed by seed: {', '.join(f'{weight:g}' for weight in entries['branch_weights'])}"
    return ""


def training_catalogue(args) -> str:
    """Where the trained rows' products and queries came from, how many pairs there were and how many steps the
    text-only runs of this report trained."""
    runs = [row_dir(Path(args.output_dir), BASELINE) / f"seed{seed}" / "results.json" for seed in args.seeds]
    training = next((json.loads(path.read_text())["training"] for path in runs if path.is_file()), None)
    source = f"the training split of `{args.dataset}`" if args.dataset else "the committed sample's training split"
    if training is None:
        return source
    return (f"{source}: {training['train_pairs']:,} (query, product) training pairs, trained for "
            f"{training['completed_steps']} steps of 32 pairs")


def tagger_accuracy(args) -> str:
    """A sentence on the default row's visual-word tagger: its accuracy on held-out training products, over this
    report's seeds ("" where this report has no such run)."""
    runs = [row_dir(Path(args.output_dir), DEFAULT_ROW) / f"seed{seed}" / "results.json" for seed in args.seeds]
    values = [json.loads(path.read_text()).get("visual_tagger", {}).get("held_out_accuracy")
              for path in runs if DEFAULT_ROW in args.rows and path.is_file()]
    values = sorted(f"{value:.2f}" for value in values if value is not None)
    if not values:
        return ""
    accuracy = values[0] if values[0] == values[-1] else f"{values[0]} to {values[-1]}"
    return (f" The default row's tagger reads {accuracy} of its held-out training products' colours right (each "
            "run's `results.json`, under `visual_tagger`), and writes only where it is surer.")


def pair_budget(args) -> str:
    """What the adapter pair was trained on and how well it aligns, from its `alignment.json`."""
    report_file = Path(args.output_dir) / "pairs" / "adapter" / "alignment.json"
    if not report_file.is_file():
        return "not built in this report."
    report = json.loads(report_file.read_text())
    return (f"linear adapters on the frozen MiniLM (pooled output) and DINOv2-small (112 px) features of the training "
            f"split's (title, image) pairs: {report['training_pairs']} pairs, {report['epochs']} epochs, "
            f"{report['training_seconds']:.0f} s of training after {report['feature_seconds']:.0f} s computing the "
            f"features (`training.dual_encoder_alignment`, seed 0); on {report['held_out_pairs']} held-out products, "
            f"image -> title recall@10 {report['held_out_image_to_title_recall_at_10']:.2f} and title -> image "
            f"{report['held_out_title_to_image_recall_at_10']:.2f}. The LiT pair it is compared with trains the "
            f"MiniLM text tower and both projections for {LIT_STEPS} steps of 32 (title, image) pairs "
            "(`--train_dual_text_tower`).")


def best_rows(summary: dict) -> list[str]:
    """For each reported number, the trained multimodal row with the highest mean, against text-only, and the colour
    ceiling where it was measured: the measured ceiling of what was tried."""
    lines = []
    trained = [row for row in summary if row.startswith(("3tMM", "4tMM"))]
    for slice_name, metric in REPORTED:
        key = f"{slice_name}/{metric}"
        if not trained or BASELINE not in summary:
            break
        best = max(trained, key=lambda row: summary[row][key]["mean"])
        entry, base = summary[best][key], summary[BASELINE][key]["mean"]
        line = (f"- {key}: **{best}** {entry['mean']:.3f} against text-only {base:.3f} ({entry['difference']}; "
                f"{entry['relative']:+.0%})")
        if COLOUR_CEILING in summary:
            line += f"; colour ceiling {summary[COLOUR_CEILING][key]['mean']:.3f}"
        lines.append(line)
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    test = load_catalogue(args.test_dataset, split="test")
    evaluator = HeldOutEvaluator(test, num_queries=args.num_queries, seed=args.eval_seed)
    print(evaluator, flush=True)
    # What every cached evaluation depends on besides the trained model: a change re-evaluates.
    evaluation = json.dumps([EVALUATION_VERSION, repr(evaluator), args.num_queries, args.eval_seed,
                             os.path.relpath(args.test_dataset or default_data_dir())])
    feature_cache: dict = {}
    results: dict[str, list[dict]] = {}
    references = {
        "BM25 (title, brand, description)": lambda: bm25_ranker(),
        "MiniLM zero-shot": zero_shot_ranker,
    }
    for name, make_ranker in references.items():
        path = output / "references" / f"{name.split()[0].lower()}.json"
        results[name] = [cached_result(path, lambda m=make_ranker: _as_dict(evaluator.evaluate(m())), evaluation)]
    pairs = build_pairs(args, output) if any(ALIGNED_PAIR in ROWS[row] for row in args.rows) else {}
    for name, pair_dir in pairs.items():
        folder = image_alone_checkpoint(pair_dir, output / "references" / pair_dir.name)
        results[name] = [cached_result(output / "references" / f"{pair_dir.name}.json",
                                       lambda f=folder: evaluate_checkpoint(evaluator, f, feature_cache), evaluation)]
    for row in args.rows:
        results[row] = []
        flags = [str(pairs["image alone: adapter pair"]) if flag == ALIGNED_PAIR else flag for flag in ROWS[row]]
        for seed in args.seeds:
            run_dir = row_dir(output, row) / f"seed{seed}"
            if args.report_only and not is_cached(run_dir / "held_out.json", evaluation, run_dir / "train_flags.json"):
                continue
            final = train_row(args, flags, seed, run_dir)
            result = cached_result(run_dir / "held_out.json",
                                   lambda f=final: evaluate_checkpoint(evaluator, f, feature_cache),
                                   evaluation + (run_dir / "train_flags.json").read_text())
            training = json.loads((run_dir / "results.json").read_text())["training"]
            result["train_seconds"] = training["wall_seconds_this_run"]
            results[row].append(result)
    if HYBRID_BASE_ROW in args.rows:  # the hybrid row: that row's models fused with BM25
        results[HYBRID_ROW] = evaluated_again(args, output, HYBRID_BASE_ROW, "hybrid", evaluation, lambda final: (
            evaluate_checkpoint(evaluator, final, feature_cache, with_bm25=True)))
    for row in (row for row in args.rows if row in TOWER_ALONE_ROWS):  # the same models, image branch off
        name = "tower_alone_" + row_dir(output, row).name
        results[row + TOWER_ALONE] = evaluated_again(args, output, row, name, evaluation, lambda final: (
            evaluate_checkpoint(evaluator, final, feature_cache, image_branch_weight=0.0)))
    if BASELINE in args.rows:  # the colour ceilings: the text-only models told (some) products' true colour
        for row, told in CEILINGS.items():
            results[row] = evaluated_again(
                args, output, BASELINE, CEILING_FILES[row], evaluation,
                lambda final, told=told: evaluate_checkpoint(evaluator, final, feature_cache, colour_oracle=told))
    if BASELINE in args.rows:  # the same models told the pattern, and the colour and pattern, of every product
        for row, keys in ATTRIBUTE_CEILINGS.items():
            told = catalogue_visual_values(evaluator.products, keys)
            results[row] = evaluated_again(
                args, output, BASELINE, ATTRIBUTE_CEILING_FILES[row], evaluation,
                lambda final, told=told: evaluate_checkpoint(evaluator, final, feature_cache,
                                                             colour_oracle="every product", colour_of=told))
    for row in (row for row in args.rows if row in CHOSEN_WEIGHT_ROWS):  # image branch weight chosen on validation
        results[row + CHOSEN_WEIGHT] = with_chosen_branch_weight(args, output, row, evaluation, evaluator,
                                                                 feature_cache)
    if BASELINE in args.rows and DEFAULT_ROW in args.rows:  # the ceiling with the default row's real tagger
        for row, share in READER_ROWS.items():
            results[row] = []
            for seed in args.seeds:
                tagger_run = row_dir(output, DEFAULT_ROW) / f"seed{seed}"
                if not (tagger_run / "train_flags.json").is_file():
                    continue
                results[row] += evaluated_again(
                    argparse.Namespace(**{**vars(args), "seeds": [seed]}), output, BASELINE, READER_FILES[row],
                    evaluation + (tagger_run / "train_flags.json").read_text(),
                    lambda final, tagger=tagger_run / "final", share=share, seed=seed: told_by_reader(
                        evaluator, final, tagger, feature_cache, share, seed))
    # The report lists the rows in ROWS order, whatever order they were run in.
    order = [*references, *pairs, *ROWS, *(row + TOWER_ALONE for row in TOWER_ALONE_ROWS),
             *(row + CHOSEN_WEIGHT for row in CHOSEN_WEIGHT_ROWS), HYBRID_ROW, *CEILINGS, *ATTRIBUTE_CEILINGS, *READER_ROWS]
    results = {row: results[row] for row in order if results.get(row)}
    summary = summarise(results)
    for row in READER_ROWS:  # the reader rows also say how often their told colour was right
        accuracies = [run["reader_accuracy"] for run in results.get(row, []) if "reader_accuracy" in run]
        if accuracies:
            summary[row]["reader_accuracy"] = sum(accuracies) / len(accuracies)
    for row in (row + CHOSEN_WEIGHT for row in CHOSEN_WEIGHT_ROWS if results.get(row + CHOSEN_WEIGHT)):
        summary[row]["branch_weights"] = [run["branch_weight"] for run in results[row]]  # which weight each seed chose
    if results.get(AMONG_NAMED_ROW):  # how well its tagger picks a colour among those a text names (first seed)
        tagger = row_dir(output, AMONG_NAMED_ROW) / f"seed{args.seeds[0]}" / "final"
        summary[AMONG_NAMED_ROW]["named_colour_choice"] = named_colour_choice(tagger, evaluator.products, feature_cache)
    qrels = evaluator.qrels
    exclusive = {}
    for row in args.rows:
        if row == BASELINE or BASELINE not in results or row not in results:
            continue
        report = exclusive_matches(results[row][0]["runs"]["all"], results[BASELINE][0]["runs"]["all"], qrels, k=100)
        exclusive[row] = {"multimodal_relevant": report.multimodal_exclusive.num_relevant,
                          "text_relevant": report.text_exclusive.num_relevant, "queries": report.num_queries}
    (output / "summary.json").write_text(json.dumps({"summary": summary, "exclusive": exclusive}, indent=2))
    if args.markdown:
        seconds = sum(run.get("seconds", 0) + run.get("train_seconds", 0) for runs in results.values() for run in runs)
        Path(args.markdown).write_text(markdown(args, summary, exclusive, evaluator, seconds))
    return summary


def zero_shot_ranker():
    """The pretrained MiniLM as a text-only retriever, with the trained rows' text lengths."""
    model = MultimodalRetrievalModel.from_towers_pretrained(get_minilm_path(), max_query_length=24,
                                                            max_product_length=64).eval()
    return model_ranker(model, MultimodalRetrievalProcessor.from_towers_pretrained(get_minilm_path(), config=model.config))


def _as_dict(result) -> dict:
    return {"per_query": result.per_query, "runs": result.runs}


if __name__ == "__main__":
    main()
