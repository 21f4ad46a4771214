"""An aligned text-image pair for 4tower models without CLIP weights: linear adapters trained on frozen features.

The 4tower architecture needs a dual encoder whose text and image vectors share a space (CLIP in the paper).
None exists offline, so one is built from two frozen towers:

1. the image tower's features (DINOv2's pooled output) and the text tower's pooled vectors of the product titles
   are computed once, without gradients;
2. the pair's two linear projections (`visual_projection`, `text_projection`) and its logit scale are trained
   on those cached vectors with the symmetric contrastive (CLIP) loss, title against image, over the whole
   catalogue: seconds of training per epoch, instead of running the text tower as LiT does;
3. the result is saved as a `VisionTextDualEncoderModel` folder (with its tokenizer and image processor), which
   `--clip_model` accepts.

A seeded share of the products is held out and the report gives the held-out title <-> image recall@10, so two
pairs (e.g. this one and a LiT pair) can be compared.

Example:
```python
>>> report = align_dual_encoder("minilm", "dinov2-small", load_catalogue(split="train"), "outputs/aligned_pair")
>>> report.held_out_image_to_title_recall_at_10
0.21
```
"""

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic_files import write_json_atomically
from ..data.catalogue import CatalogueColumns
from ..data.rows import row_batches
from ..losses import contrastive_cross_entropy
from ..modeling_mmretrieval import MultimodalRetrievalModel, pooled_features
from ..processing_mmretrieval import MultimodalRetrievalProcessor
from ..retrieval.image_feature_store import ImageFeatureStore, image_feature_store_from_args
from .image_feature_cache import precompute_image_features, resize_image_processor
from .model_builder import DEFAULT_DINOV2_IMAGE_SIZE, resolve_tower

# `--clip_model` value that asks the train command to align a pair on its own training products first.
ALIGN_ON_TRAINING_PRODUCTS = "aligned"
ALIGNED_PAIR_FOLDER = "aligned_pair"
ALIGNMENT_REPORT = "alignment.json"
# CLIP's initial temperature (0.07).
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


class AlignmentError(ValueError):
    """The catalogue cannot align a pair (too few products with both a title and a usable image)."""


@dataclass
class AlignmentReport:
    """What `align_dual_encoder` trained, and how well its held-out titles and images find each other."""

    output_dir: str
    training_pairs: int
    held_out_pairs: int
    products_without_image: int
    epochs: int
    feature_seconds: float
    training_seconds: float
    held_out_image_to_title_recall_at_10: float
    held_out_title_to_image_recall_at_10: float

    def to_dict(self) -> dict:
        return asdict(self)


def recall_at_k(query_vectors: torch.Tensor, target_vectors: torch.Tensor, k: int = 10) -> float:
    """Share of rows i whose own target (row i of `target_vectors`) is among the top `k` by cosine.

    Example:
    ```python
    >>> recall_at_k(torch.eye(3), torch.eye(3), k=1)
    1.0
    ```
    """
    scores = F.normalize(query_vectors, dim=-1) @ F.normalize(target_vectors, dim=-1).t()
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == torch.arange(len(scores)).unsqueeze(1)).any(dim=1).float().mean().item()


def pooled_title_vectors(text_model, tokenizer, titles: list[str], batch_size: int = 256, max_length: int = 32,
                         show_progress: bool = False) -> torch.Tensor:
    """The text tower's pooled output (what a dual encoder projects) for each title, without gradients.

    Example:
    ```python
    >>> pooled_title_vectors(pair.text_model, tokenizer, ["Nike Men Red Shoes"]).shape
    torch.Size([1, 384])
    ```
    """
    vectors = []
    with torch.no_grad():
        for start in tqdm(range(0, len(titles), batch_size), desc="Embedding titles", disable=not show_progress):
            tokens = tokenizer(titles[start : start + batch_size], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
            vectors.append(pooled_features(text_model(**tokens)))
    return torch.cat(vectors) if vectors else torch.zeros((0, text_model.config.hidden_size))


def train_projections(text_vectors: torch.Tensor, image_vectors: torch.Tensor, projection_dim: int, *, epochs: int,
                      batch_size: int, learning_rate: float, seed: int) -> tuple[torch.nn.Linear, torch.nn.Linear, float]:
    """`(text_projection, visual_projection, logit_scale)` trained with the symmetric contrastive loss, title
    against image, on cached vectors (row i of each is one product).

    Example:
    ```python
    >>> text_projection, visual_projection, scale = train_projections(titles, images, 384, epochs=30,
    ...                                                                batch_size=512, learning_rate=1e-3, seed=0)
    ```
    """
    generator = torch.Generator().manual_seed(seed)
    text_projection = torch.nn.Linear(text_vectors.shape[1], projection_dim, bias=False)
    visual_projection = torch.nn.Linear(image_vectors.shape[1], projection_dim, bias=False)
    for layer in (text_projection, visual_projection):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=generator)
    logit_scale = torch.nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
    parameters = [*text_projection.parameters(), *visual_projection.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    for _ in range(epochs):
        order = torch.randperm(len(text_vectors), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:
                continue
            texts = F.normalize(text_projection(text_vectors[rows]), dim=-1)
            images = F.normalize(visual_projection(image_vectors[rows]), dim=-1)
            scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            loss = (contrastive_cross_entropy(texts, images, scale)[0]
                    + contrastive_cross_entropy(images, texts, scale)[0]) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return text_projection, visual_projection, float(logit_scale.detach())


def align_dual_encoder(
    text_tower: str,
    vision_tower: str,
    catalogue,
    output_dir: str | Path,
    *,
    columns: CatalogueColumns | None = None,
    image_size: int = DEFAULT_DINOV2_IMAGE_SIZE,
    epochs: int = 30,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    held_out_share: float = 0.1,
    seed: int = 0,
    show_progress: bool = True,
    image_feature_store: ImageFeatureStore | None = None,
) -> AlignmentReport:
    """Builds and saves an aligned `VisionTextDualEncoderModel` of two frozen towers (module docstring).

    `text_tower` and `vision_tower` are Hub ids, folders, or the offline names ("minilm", "dinov2-small");
    `catalogue` gives the (title, image) pairs; products without a decodable image are left out. The image
    tower's features are read from (and added to) `image_feature_store` when one is given.

    Example:
    ```python
    >>> align_dual_encoder("minilm", "dinov2-small", catalogue, "outputs/aligned_pair").training_pairs
    2520
    ```
    """
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    if not 0.0 <= held_out_share < 1.0:
        raise ValueError(f"held_out_share must lie in [0, 1), got {held_out_share}")
    columns = columns or CatalogueColumns()
    text_path, _ = resolve_tower(text_tower)
    vision_path, _ = resolve_tower(vision_tower)
    started = time.perf_counter()
    # A 3tower model of the same towers yields the image tower's pooled output, through the package's cache.
    feature_model = MultimodalRetrievalModel.from_towers_pretrained(text_path, vision_path, architecture="3tower").eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(text_path, vision_path, config=feature_model.config)
    resize_image_processor(processor.image_processor, image_size)
    image_cache = precompute_image_features(feature_model, processor, catalogue, columns=columns,
                                            show_progress=show_progress, store=image_feature_store)
    pair = VisionTextDualEncoderModel.from_vision_text_pretrained(vision_path, text_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    rows = [row for batch in row_batches(catalogue, 1024) for row in batch]
    kept = [row for row in rows if image_cache.get(str(row[columns.product_id])) is not None
            and str(row.get(columns.title) or "").strip()]
    titles = [str(row[columns.title]) for row in kept]
    image_vectors = torch.stack([image_cache[str(row[columns.product_id])] for row in kept]).float()
    text_vectors = pooled_title_vectors(pair.text_model, tokenizer, titles, show_progress=show_progress)
    feature_seconds = time.perf_counter() - started
    if len(kept) < 4:
        raise AlignmentError(f"aligning a text-image pair needs at least 4 products with a title and a usable image; "
                             f"{len(kept)} of {len(rows)} have both")

    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    num_held_out = max(2, round(held_out_share * len(kept))) if held_out_share else 0
    held_out, training = order[:num_held_out], order[num_held_out:]
    started = time.perf_counter()
    text_projection, visual_projection, logit_scale = train_projections(
        text_vectors[training], image_vectors[training], pair.config.projection_dim, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    training_seconds = time.perf_counter() - started
    with torch.no_grad():
        pair.text_projection.weight.copy_(text_projection.weight)
        pair.visual_projection.weight.copy_(visual_projection.weight)
        pair.logit_scale.fill_(logit_scale)
        held_texts = text_projection(text_vectors[held_out]) if held_out else None
        held_images = visual_projection(image_vectors[held_out]) if held_out else None
    output_dir = Path(output_dir)
    pair.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    report = AlignmentReport(
        output_dir=str(output_dir), training_pairs=len(training), held_out_pairs=len(held_out),
        products_without_image=len(rows) - len(kept), epochs=epochs, feature_seconds=feature_seconds,
        training_seconds=training_seconds,
        held_out_image_to_title_recall_at_10=recall_at_k(held_images, held_texts) if held_out else float("nan"),
        held_out_title_to_image_recall_at_10=recall_at_k(held_texts, held_images) if held_out else float("nan"),
    )
    return report


def prepare_aligned_pair(args, products, columns: CatalogueColumns) -> str:
    """For `--clip_model aligned`: the folder of a pair aligned on the run's training `products` (built into
    `<output_dir>/aligned_pair`, or reused when a previous attempt of the run finished it); other values of
    `args.clip_model` are returned as they are.

    Example:
    ```python
    >>> args.clip_model = prepare_aligned_pair(args, data.products, columns)
    >>> args.clip_model
    'outputs/main_job/aligned_pair'
    ```
    """
    if args.clip_model != ALIGN_ON_TRAINING_PRODUCTS:
        return args.clip_model
    folder = Path(args.output_dir) / ALIGNED_PAIR_FOLDER
    if not (folder / ALIGNMENT_REPORT).is_file():
        report = align_dual_encoder(args.text_model, args.vision_model, products, folder, columns=columns,
                                    image_size=args.image_size or DEFAULT_DINOV2_IMAGE_SIZE, seed=args.seed,
                                    image_feature_store=image_feature_store_from_args(args))
        # Written last: its presence marks a finished pair.
        write_json_atomically(folder / ALIGNMENT_REPORT, report.to_dict())
    return str(folder)


def save_initial_dual_encoder(text_tower: str, vision_tower: str, output_dir: str | Path,
                              image_size: int = DEFAULT_DINOV2_IMAGE_SIZE) -> Path:
    """Saves an unaligned `VisionTextDualEncoderModel` of two towers (random projections), with its tokenizer and
    image processor: the starting point of a LiT alignment (`examples/train.py --architecture 4tower
    --clip_model <folder> --train_dual_text_tower`).

    Example:
    ```python
    >>> save_initial_dual_encoder("minilm", "dinov2-small", "outputs/lit_initial")
    PosixPath('outputs/lit_initial')
    ```
    """
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

    text_path, _ = resolve_tower(text_tower)
    vision_path, _ = resolve_tower(vision_tower)
    output_dir = Path(output_dir)
    VisionTextDualEncoderModel.from_vision_text_pretrained(vision_path, text_path).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(text_path).save_pretrained(output_dir)
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    resize_image_processor(image_processor, image_size)
    image_processor.save_pretrained(output_dir)
    return output_dir


def extract_dual_encoder(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Saves the dual encoder of a trained 4tower retriever (e.g. after a LiT alignment) as a standalone
    `VisionTextDualEncoderModel` folder, with its tokenizer and image processor, for `--clip_model`.

    Example:
    ```python
    >>> extract_dual_encoder("outputs/lit_training/final", "outputs/lit_pair")
    PosixPath('outputs/lit_pair')
    ```
    """
    model = MultimodalRetrievalModel.from_pretrained(checkpoint)
    if model.dual_encoder is None:
        raise ValueError(f"{checkpoint} is a {model.config.architecture} model: only 4tower models hold a dual encoder")
    processor = MultimodalRetrievalProcessor.from_pretrained(checkpoint)
    output_dir = Path(output_dir)
    model.dual_encoder.save_pretrained(output_dir)
    processor.dual_tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    return output_dir


__all__ = ["ALIGN_ON_TRAINING_PRODUCTS", "AlignmentError", "AlignmentReport", "align_dual_encoder", "extract_dual_encoder",
           "prepare_aligned_pair", "save_initial_dual_encoder", "pooled_title_vectors", "recall_at_k", "train_projections"]
