"""The README's "Use" section runs as written: its first two code blocks, against a checkpoint saved where they look
for it (`outputs/main_job/final`) and a small `catalogue` of sample products."""

import re
from pathlib import Path

import pytest
from tiny_towers import save_tiny_pretrained_towers

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue

README = Path(__file__).resolve().parents[1] / "README.md"


def use_section_blocks() -> list[str]:
    section = README.read_text().split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_use_section_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    text, vision = save_tiny_pretrained_towers(tmp_path / "towers")
    model = MultimodalRetrievalModel.from_towers_pretrained(str(text), str(vision), architecture="3tower",
                                                            fusion="residual", max_product_length=32)
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(text), str(vision), config=model.config)
    final = tmp_path / "outputs" / "main_job" / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    monkeypatch.chdir(tmp_path)
    blocks = use_section_blocks()
    assert len(blocks) >= 2 and "outputs/main_job/final" in blocks[0] and "SentenceTransformer" in blocks[1]
    namespace = {"catalogue": load_catalogue(str(SAMPLE_DATA_DIR), split="validation").select(range(12))}
    # The third block composes towers from the Hub, which this offline machine cannot reach.
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert tuple(namespace["scores"].shape) == (1, 10) and len(namespace["ids"][0]) == 10
    exec(compile(blocks[1], str(README), "exec"), namespace)
    assert namespace["queries"].shape == (1, model.embedding_dim)
    assert tuple(namespace["scores"].shape) == (1, 12)  # the query against every catalogue product
    assert tuple(namespace["st_scores"].shape) == (1, 1)
