"""`mmretrieval export-onnx`: export a checkpoint's query encoder (float32 and int8), product path and image tower to
ONNX, with the processor and a manifest, after a parity check on real inputs (`modeling_mmretrieval.onnx`).

```bash
mmretrieval export-onnx --model outputs/main_job/final --output_dir exports/main_job
```
"""

import argparse
from pathlib import Path

from .common import CliError, run_cli


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The command's flags. Example: `parse_args(["--model", "ckpt", "--output_dir", "onnx"]).opset` is 18."""
    from ..onnx.export import DEFAULT_OPSET

    parser = argparse.ArgumentParser(prog=prog, description="Export a retriever to ONNX for onnxruntime serving.")
    parser.add_argument("--model", required=True, help="checkpoint folder (model and processor)")
    parser.add_argument("--output_dir", required=True, help="folder to write (published whole, or not at all)")
    parser.add_argument("--no_int8", action="store_true", help="skip the int8 dynamic-quantised query encoder")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> None:
    """Loads the checkpoint named by `--model` and exports it; every failure is one `CliError` line.

    Example: `export(parse_args(["--model", "outputs/run/final", "--output_dir", "exports/run"]))`.
    """
    from .. import MultimodalRetrievalModel, MultimodalRetrievalProcessor
    from ..onnx import OnnxExportError, export_onnx, read_manifest

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise CliError(f"--model {args.model}: not a checkpoint folder (no config.json)")
    if Path(args.output_dir).is_file():
        raise CliError(f"--output_dir {args.output_dir} is a file")
    try:
        # Plain `from_pretrained`, not `load_retriever`: the speedups change the towers' attention code, and the
        # graphs should trace what a checkpoint loaded anywhere runs.
        model = MultimodalRetrievalModel.from_pretrained(model_dir.resolve()).eval()
        processor = MultimodalRetrievalProcessor.from_pretrained(model_dir.resolve())
    except (OSError, ValueError) as error:
        raise CliError(f"--model {args.model}: cannot load a retriever ({error})") from error
    try:
        output_dir = export_onnx(model, processor, args.output_dir, quantize_int8=not args.no_int8, opset=args.opset,
                                 overwrite=args.overwrite)
    except OnnxExportError as error:
        raise CliError(str(error)) from error
    manifest = read_manifest(output_dir)
    parity = ", ".join(f"{part} {cosine:.7f}" for part, cosine in manifest["parity"].items())
    print(f"ONNX export: {output_dir} ({', '.join(graph['file'] for graph in manifest['graphs'].values())})")
    print(f"parity (min cosine to torch): {parity}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line entry. Example: `main(["--model", "outputs/run/final", "--output_dir", "exports/run"])` -> 0."""
    return run_cli(export, parse_args(argv, prog), prog)
