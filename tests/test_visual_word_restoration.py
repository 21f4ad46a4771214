"""The visual-word restoration loss (a training signal that needs the image and leaves the text towers alone), the
stripped product view it reads, and the adapter-aligned dual encoder of the 4tower rows."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_towers import make_batch, make_config

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, RetrievalCollator, load_catalogue, make_training_pairs
from modeling_mmretrieval.data.visual_words import StrippedTextView
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.training.cached_loss import CachedNTXentLoss
from modeling_mmretrieval.training.checkpoints import CheckpointMismatchError, check_run_signature
from modeling_mmretrieval.training.dual_encoder_alignment import recall_at_k, train_projections
from modeling_mmretrieval.training.trainer import model_loss
from modeling_mmretrieval.training.visual_word_restoration import (
    VisualWordRestorationLoss,
    restoration_weight,
    split_stripped_view,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def with_stripped_view(batch: dict, num_pairs: int = 4, seed: int = 1) -> dict:
    """The batch plus a stripped view of its positives: other token ids, as a text without its colour would have."""
    generator = torch.Generator().manual_seed(seed)
    ids = batch["product_input_ids"][:num_pairs].clone()
    ids[:, 1:3] = torch.randint(3, 50, (num_pairs, 2), generator=generator)
    return {**batch, "stripped_product_input_ids": ids,
            "stripped_product_attention_mask": batch["product_attention_mask"][:num_pairs]}


def gradients(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["3tower-residual", "4tower-residual"])
def test_restoration_trains_only_the_fusion(case):
    config = make_config(case)
    model = MultimodalRetrievalModel(config).train()
    model.lock_image_tower()
    batch = with_stripped_view(make_batch(config))
    model_batch, stripped = split_stripped_view(batch)
    assert sorted(stripped) == ["attention_mask", "input_ids"] and not any(k.startswith("stripped") for k in model_batch)

    torch.manual_seed(0)
    base = gradients(model, model_loss, model_batch)
    torch.manual_seed(0)
    combined = gradients(model, VisualWordRestorationLoss(model_loss, weight=1.0), batch)
    changed = {name for name in base if not torch.allclose(base[name], combined[name], atol=1e-7)}
    assert changed, "the restoration term must reach some parameter"
    assert all(name.startswith(("product_fusion", "missing_image_embedding")) for name in changed), changed
    # The towers' and the logit scale's gradients are the base loss's alone.
    assert torch.equal(base["logit_scale"], combined["logit_scale"])
    assert any(name.startswith("text_model") for name in base)


def test_restoration_adds_to_grad_cache_as_to_the_plain_loss():
    config = make_config("3tower-residual")
    model = MultimodalRetrievalModel(config).eval()  # no dropout: the two paths draw no random masks
    batch = with_stripped_view(make_batch(config))
    plain = gradients(model, VisualWordRestorationLoss(model_loss, 0.5), batch)
    cached = gradients(model, VisualWordRestorationLoss(CachedNTXentLoss(mini_batch_size=2), 0.5), batch)
    assert plain.keys() == cached.keys()
    for name in plain:
        assert torch.allclose(plain[name], cached[name], atol=1e-5), name


def test_a_batch_without_a_stripped_view_gets_the_base_loss():
    config = make_config("3tower-residual")
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    assert torch.equal(VisualWordRestorationLoss(model_loss, 1.0)(model, batch), model_loss(model, batch))


def test_restoration_is_refused_where_no_fusion_trains():
    for case in ("text_only", "4tower-concat", "4tower-alpha_concat"):
        with pytest.raises(ValueError, match="needs a 3tower or 4tower model with fusion 'residual' or 'mlp'"):
            restoration_weight(1.0, make_config(case))
        assert restoration_weight(None, make_config(case)) == 0.0
    assert restoration_weight(None, make_config("3tower-residual")) == 1.0
    assert restoration_weight(0.0, make_config("3tower-residual")) == 0.0
    for flags in (["--architecture", "text_only", "--visual_word_restoration", "1"],
                  ["--visual_word_restoration", "-1"]):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train.py"), *flags],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and "--visual_word_restoration" in result.stderr
        assert "Traceback" not in result.stderr


def test_fusing_text_features_reproduces_the_product_embeddings():
    config = make_config("3tower-residual")
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    with torch.no_grad():
        expected = model.get_product_embeddings(batch["product_input_ids"], batch["product_attention_mask"],
                                                pixel_values=batch["pixel_values"], image_mask=batch["image_mask"])
        text = model.get_product_text_features(batch["product_input_ids"], batch["product_attention_mask"])
        image = model.get_image_features(batch["pixel_values"], batch["image_mask"])
        fused = model.fuse_product_features(text, image, batch["image_mask"])
    assert torch.allclose(fused, expected, atol=1e-6)


def test_the_collator_adds_a_stripped_view_of_the_positives_only():
    sample = load_catalogue(SAMPLE_DATA_DIR, split="train")
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(get_minilm_path())
    rows = make_training_pairs(sample.select(range(12)), seed=0).to_list()
    batch = RetrievalCollator(processor, uses_images=False, stripped_view=StrippedTextView())(rows)
    assert batch["stripped_product_input_ids"].shape[0] == len(rows)
    plain = processor.tokenizer.batch_decode(batch["product_input_ids"], skip_special_tokens=True)
    stripped = processor.tokenizer.batch_decode(batch["stripped_product_input_ids"], skip_special_tokens=True)
    colours = {row["base_colour"].lower() for row in rows if row["base_colour"]}
    assert any(colour in text.split() for text in plain for colour in colours)
    assert not any(colour in text.split() for text in stripped for colour in colours)
    with pytest.raises(ValueError, match="training view"):
        RetrievalCollator(processor, with_queries=False, stripped_view=StrippedTextView())


def test_the_stripped_view_never_leaves_a_product_without_text():
    view = StrippedTextView()
    assert view({"title": "Navy Blue Striped Polo", "description": "Red print"}) == {
        "title": "Polo", "description": ""}
    assert view({"title": "Red", "description": None}) == {"title": "Red", "description": None}


def test_adapters_align_two_frozen_feature_sets():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(400, 16, generator=generator)
    texts = shared @ torch.randn(16, 24, generator=generator)  # two views of one latent, in other bases
    images = shared @ torch.randn(16, 32, generator=generator) + 0.05 * torch.randn(400, 32, generator=generator)
    before = recall_at_k(texts[:, :16], images[:, :16])
    text_projection, visual_projection, scale = train_projections(
        texts[:300], images[:300], 16, epochs=60, batch_size=100, learning_rate=1e-2, seed=0)
    with torch.no_grad():
        after = recall_at_k(text_projection(texts[300:]), visual_projection(images[300:]))
    assert before < 0.3 and after > 0.9 and scale > 0


def test_a_resumed_run_keeps_its_restoration_weight_where_its_checkpoint_recorded_one():
    now = {"seed": 42, "visual_word_restoration": 1.0}
    check_run_signature({"seed": 42, "visual_word_restoration": 1.0}, now, "checkpoint-4")
    with pytest.raises(CheckpointMismatchError, match="visual_word_restoration: checkpoint 0.5 vs now 1.0"):
        check_run_signature({"seed": 42, "visual_word_restoration": 0.5}, now, "checkpoint-4")
    # Checkpoints written before the weight was recorded cannot say theirs: they resume as they did before ...
    check_run_signature({"seed": 42}, now, "checkpoint-4")
    # ... while the other settings are still checked.
    with pytest.raises(CheckpointMismatchError, match="seed: checkpoint 7 vs now 42"):
        check_run_signature({"seed": 7}, now, "checkpoint-4")
