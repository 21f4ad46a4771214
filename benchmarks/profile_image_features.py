"""Where computing (and caching) image features spends its time, per image: decoding the catalogue's
JPEGs, preprocessing them with the reference image processor and with the fast path, the DINOv2 tower in
float32 and in bf16, and all of it end to end as the training script caches features
(`precompute_image_features` over a 3tMM model). The figures behind the GPU notes in docs/performance.md:

    python benchmarks/profile_image_features.py                   # CPU, 2 threads, about 1 minute
    python benchmarks/profile_image_features.py --device cuda --threads 16 --image_size 112
"""

import argparse
import time
from collections.abc import Callable

import torch
from measure import synchronize
from towers import Towers

from modeling_mmretrieval import MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.data import CatalogueColumns, load_catalogue
from modeling_mmretrieval.data.rows import row_batches
from modeling_mmretrieval.training.image_feature_cache import (
    _images_of,
    precompute_image_features,
    resize_image_processor,
)

BATCH_SIZE = 64


def _per_image_ms(label: str, run: Callable[[], object], images: int, device: torch.device):
    run()  # untimed: lazy initialisation, kernel selection
    synchronize(device)
    started = time.perf_counter()
    result = run()
    synchronize(device)
    print(f"{label:<34} {1e3 * (time.perf_counter() - started) / images:7.3f} ms/image")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--image_size", type=int, help="resize as train.py --image_size (default: the processor's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    towers = Towers.load("offline")
    if args.image_size:
        resize_image_processor(towers.image_processor, args.image_size)
    catalogue = load_catalogue(None)["train"]
    products = catalogue.select(range(min(args.images, len(catalogue))))
    batches = list(row_batches(products, BATCH_SIZE))
    count = sum(len(rows) for rows in batches)
    model = towers.retrieval_model("3tower").to(device).eval()
    vision = model.vision_model
    columns = CatalogueColumns()
    print(f"{count} catalogue images of {towers.image_size} px, batches of {BATCH_SIZE}, {device}, {args.threads} "
          f"threads; reference processor: {type(towers.image_processor).__name__}")

    images = _per_image_ms("decode", lambda: [_images_of(rows, columns, None) for rows in batches], count, device)
    for fast in (False, True):
        processor = MultimodalRetrievalProcessor(towers.tokenizer, towers.image_processor)
        speedups.apply_to_processor(processor, fast)
        encoded = _per_image_ms(f"preprocess ({'fast path' if fast else 'reference'})",
                                lambda p=processor: [p.encode_images(batch) for batch in images], count, device)

    def tower():
        return [vision(pixel_values=batch["pixel_values"].to(device)).pooler_output.float().cpu() for batch in encoded]

    with torch.no_grad():
        _per_image_ms("DINOv2 tower, float32", tower, count, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _per_image_ms("DINOv2 tower, bf16 autocast", tower, count, device)
    for fast in (False, True):
        processor = MultimodalRetrievalProcessor(towers.tokenizer, towers.image_processor)
        speedups.apply_to_processor(processor, fast)
        _per_image_ms(f"end to end ({'fast path' if fast else 'reference'})",
                      lambda p=processor: precompute_image_features(model, p, products, show_progress=False),
                      count, device)


if __name__ == "__main__":
    main()
