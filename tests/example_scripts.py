"""Loads a script of `examples/` as a module, so that tests can call its functions."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str):
    """The module of `examples/<filename>`, freshly executed (its `main` is not run).

    Example: `load_example("images_that_pay.py").with_catalogue_colour`.
    """
    spec = importlib.util.spec_from_file_location(Path(filename).stem, EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
