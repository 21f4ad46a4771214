# Copyright 2025 The modeling_mmretrieval Authors.
# Licensed under the Apache License, Version 2.0.
"""OpenAI CLIP's BPE tokenizer, built from the vocabulary file that `open-clip-torch` ships.

`open-clip-torch` carries OpenAI's `bpe_simple_vocab_16e6.txt.gz`; [`build_clip_tokenizer`] turns it into a
`CLIPTokenizer` folder with OpenAI's token ids, so a 4tMM/3tMM dual encoder can be tokenised without the Hub.

Example:

```python
>>> from transformers import AutoTokenizer
>>> from modeling_mmretrieval.towers import build_clip_tokenizer
>>> AutoTokenizer.from_pretrained(build_clip_tokenizer())("a diagram")["input_ids"]
[49406, 320, 22697, 49407]
```
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .packages import OPEN_CLIP, _cache_root, _cached_folder, _packaged_file

__all__ = ["CLIP_TOKENIZER_FILES", "CLIP_TOKENIZER_FOLDER_NAME", "build_clip_tokenizer"]

CLIP_TOKENIZER_FOLDER_NAME = "clip-bpe-tokenizer"
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")

# OpenAI's vocabulary: 256 byte symbols, the same 256 with the end-of-word marker, one token per merge, then the
# two special tokens. The shipped merges file holds far more merges than CLIP uses; this size decides the cut.
CLIP_VOCAB_SIZE = 49408
CLIP_END_OF_WORD = "</w>"
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
CLIP_CONTEXT_LENGTH = 77


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte alphabet: printable bytes stand for themselves, the others are moved to code points
    256 and up so that no BPE symbol is whitespace or a control character. Order = byte-token id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    code_points = {byte: byte if byte in printable else next(shifted) for byte in range(256)}
    ordered = printable + [byte for byte in range(256) if byte not in printable]
    return [chr(code_points[byte]) for byte in ordered]


def _read_clip_merges(bpe_path: Path) -> list[tuple[str, str]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    num_merges = CLIP_VOCAB_SIZE - 2 * 256 - len(CLIP_SPECIAL_TOKENS)
    # Line 0 is the "#version" header.
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    if len(merges) != num_merges or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{bpe_path} does not hold {num_merges} BPE merges; is it CLIP's bpe_simple_vocab?")
    return merges


def _clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + CLIP_END_OF_WORD for symbol in symbols)]
    tokens += ["".join(merge) for merge in merges] + list(CLIP_SPECIAL_TOKENS)
    return {token: token_id for token_id, token in enumerate(tokens)}


def _save_clip_tokenizer(bpe_path: Path, folder: Path) -> None:
    from transformers import CLIPTokenizer

    merges = _read_clip_merges(bpe_path)
    vocab = _clip_vocab(merges)
    # vocab.json + merges.txt keep the folder readable by slow/fast tokenizers of any transformers version.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n", encoding="utf-8"
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer.save_pretrained(folder)


def build_clip_tokenizer(output_dir: str | os.PathLike | None = None) -> Path:
    """Builds (once) a `CLIPTokenizer` folder with OpenAI CLIP's 49,408-token vocabulary and ids.

    The merges come from `bpe_simple_vocab_16e6.txt.gz` inside the `open-clip-torch` package; the folder is
    written atomically to `output_dir` (default: `$MMRETRIEVAL_CACHE/clip-bpe-tokenizer`, falling back to
    `~/.cache/modeling_mmretrieval/`) and reused when already complete.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(build_clip_tokenizer())
    >>> tokenizer("a photo of a cat")["input_ids"]
    [49406, 320, 1125, 539, 320, 2368, 49407]
    ```
    """
    target = Path(output_dir) if output_dir is not None else _cache_root(None) / CLIP_TOKENIZER_FOLDER_NAME
    return _cached_folder(
        target, CLIP_TOKENIZER_FILES, lambda folder: _save_clip_tokenizer(_packaged_file(OPEN_CLIP), folder)
    )

