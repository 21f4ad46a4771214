"""The text-tower anchor: the fused model's loss plus the text-only model's loss on the text towers' own vectors,
from one forward pass."""

import copy

import pytest
import torch
from tiny_towers import make_batch, make_config

from modeling_mmretrieval import MultimodalRetrievalModel
from modeling_mmretrieval.modeling_mmretrieval import image_branch_layers
from modeling_mmretrieval.training.checkpoints import CheckpointMismatchError, check_run_signature
from modeling_mmretrieval.training.text_tower_anchor import TextTowerAnchorLoss, text_tower_anchor_weight
from modeling_mmretrieval.training.trainer import model_loss


def with_trained_fusion(model: MultimodalRetrievalModel, seed: int = 0) -> MultimodalRetrievalModel:
    """The model with its residual fusions' zero-initialised last layers set to random values, as after training."""
    generator = torch.Generator().manual_seed(seed)
    layers = image_branch_layers(model)
    assert layers, "a residual-fusion model"
    with torch.no_grad():
        for last in layers:
            last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=generator))
    return model


def without_fusion(model: MultimodalRetrievalModel) -> MultimodalRetrievalModel:
    """A copy whose residual branches are zero again: it ranks by its text towers alone."""
    text_only = copy.deepcopy(model)
    text_only.silence_image_branch()
    return text_only


@pytest.mark.parametrize("case", ["3tower-residual", "4tower-residual"])
def test_the_anchor_adds_the_text_towers_own_loss(case):
    config = make_config(case)
    model = with_trained_fusion(MultimodalRetrievalModel(config).eval())
    batch = make_batch(config, num_negatives=1)
    batch["false_negative_mask"] = torch.zeros(4, 8, dtype=torch.bool)
    batch["false_negative_mask"][0, 2] = True
    with torch.no_grad():
        fused = model(**batch).loss
        text_alone = without_fusion(model)(**batch).loss
        anchored = TextTowerAnchorLoss(weight=0.5)(model, batch)
    assert not torch.isclose(fused, text_alone)  # the trained fusion changes the ranking
    torch.testing.assert_close(anchored, fused + 0.5 * text_alone)


def test_the_text_vectors_come_from_the_same_pass_and_are_normalised():
    config = make_config("4tower-residual")
    model = with_trained_fusion(MultimodalRetrievalModel(config).eval())
    batch = make_batch(config)
    with torch.no_grad():
        output = model(**batch, output_text_embeds=True)
        plain = model(**batch)
        text_model = without_fusion(model)
        expected_queries = text_model.get_query_embeddings(
            batch["query_input_ids"], batch["query_attention_mask"], dual_input_ids=batch["query_dual_input_ids"],
            dual_attention_mask=batch["query_dual_attention_mask"])
    torch.testing.assert_close(output.query_embeds, plain.query_embeds)  # asking for them changes nothing else
    assert plain.query_text_embeds is None and plain.product_text_embeds is None
    torch.testing.assert_close(output.query_text_embeds, expected_queries)
    torch.testing.assert_close(output.product_text_embeds.norm(dim=-1), torch.ones(4))


def test_the_anchor_trains_the_text_tower_and_not_an_unused_parameter():
    config = make_config("3tower-residual")
    model = with_trained_fusion(MultimodalRetrievalModel(config).train())
    model.lock_image_tower()
    batch = make_batch(config)

    def gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss_fn(model, batch).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    base, anchored = gradients(model_loss), gradients(TextTowerAnchorLoss(weight=1.0))
    assert sorted(base) == sorted(anchored)
    changed = {name for name in base if not torch.allclose(base[name], anchored[name], atol=1e-7)}
    assert any(name.startswith("text_model.") for name in changed)
    assert not any(name.startswith("product_fusion") for name in changed)  # the text term never reads the fusion


def test_silencing_the_image_branch_leaves_the_text_towers_alone():
    config = make_config("4tower-residual")
    model = with_trained_fusion(MultimodalRetrievalModel(config).eval())
    batch = make_batch(config)
    with torch.no_grad():
        trained = model(**batch, output_text_embeds=True)
        model.silence_image_branch()
        silenced = model(**batch)
    assert not torch.allclose(trained.product_embeds, trained.product_text_embeds)
    torch.testing.assert_close(silenced.product_embeds, trained.product_text_embeds)
    torch.testing.assert_close(silenced.query_embeds, trained.query_text_embeds)
    with pytest.raises(ValueError, match="only the residual fusion"):
        MultimodalRetrievalModel(make_config("4tower-concat")).silence_image_branch()


def test_a_weighted_image_branch_adds_that_share_of_what_it_added(tmp_path):
    config = make_config("3tower-residual")
    model = with_trained_fusion(MultimodalRetrievalModel(config).eval())
    batch = make_batch(config)
    with torch.no_grad():
        text = model.get_product_text_features(batch["product_input_ids"], batch["product_attention_mask"])
        image = model.get_image_features(batch["pixel_values"])
        full = model.fuse_product_features(text, image, normalize=False)
        model.set_image_branch_weight(0.25)
        quarter = model.fuse_product_features(text, image, normalize=False)
    unit_text = torch.nn.functional.normalize(text, dim=-1)  # the fusion adds its branch to the unit text vector
    torch.testing.assert_close(quarter - unit_text, 0.25 * (full - unit_text))
    assert not torch.allclose(full, unit_text, atol=1e-3)
    # A saved model keeps its weight, and searches with it once loaded.
    model.save_pretrained(tmp_path / "weighted")
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path / "weighted")
    assert loaded.config.image_branch_weight == 0.25
    with torch.no_grad():
        torch.testing.assert_close(loaded.fuse_product_features(text, image, normalize=False), quarter)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            model.set_image_branch_weight(bad)
    with pytest.raises(ValueError, match="only the residual fusion"):
        MultimodalRetrievalModel(make_config("4tower-concat")).set_image_branch_weight(0.5)


def test_the_weight_defaults_on_for_fused_models_and_refuses_text_only():
    assert text_tower_anchor_weight(None, make_config("4tower-residual")) == 1.0
    assert text_tower_anchor_weight(None, make_config("text_only")) == 0.0
    assert text_tower_anchor_weight(None, make_config("4tower-mlp")) == 0.0  # the paper's fusions, as the paper
    assert text_tower_anchor_weight(2.0, make_config("4tower-concat")) == 2.0
    assert text_tower_anchor_weight(0, make_config("3tower-residual")) == 0.0
    with pytest.raises(ValueError, match="text_only model has no fusion"):
        text_tower_anchor_weight(1.0, make_config("text_only"))
    with pytest.raises(ValueError, match="must be positive"):
        TextTowerAnchorLoss(weight=0)


def test_the_image_branch_weight_is_chosen_for_the_residual_fusion_only():
    from modeling_mmretrieval.training.image_branch_weight import (
        choose_image_branch_weight, image_branch_weight, parse_image_branch_weight,
    )

    assert image_branch_weight(None, make_config("4tower-residual")) == "auto"
    assert image_branch_weight(None, make_config("4tower-mlp")) == image_branch_weight(None, make_config("text_only")) == 1.0
    assert image_branch_weight(0, make_config("3tower-residual")) == 0.0
    assert image_branch_weight(1, make_config("4tower-concat")) == 1.0  # "as trained" is every fusion's
    for refused in (0.5, "auto"):
        with pytest.raises(ValueError, match="only a residual fusion has an image branch to weigh, not text_only"):
            image_branch_weight(refused, make_config("text_only"))
    with pytest.raises(ValueError, match="must be 0 or more"):
        image_branch_weight(-0.5, make_config("4tower-residual"))
    assert parse_image_branch_weight(" Auto ") == "auto" and parse_image_branch_weight("0.75") == 0.75
    for bad in ("-1", "half", "nan", "inf"):
        with pytest.raises(ValueError, match="must be 'auto' or a number of 0 or more"):
            parse_image_branch_weight(bad)
    tried = []
    chosen, scores = choose_image_branch_weight(lambda weight: tried.append(weight) or {0.5: 0.9}.get(weight, 0.8))
    assert chosen == 0.5 and tried == [0.25, 0.5, 0.75, 1.0] and scores[1.0] == 0.8
    assert choose_image_branch_weight(lambda weight: 0.7)[0] == 0.25  # a tie goes to the first candidate


def test_a_resumed_run_keeps_its_anchor_weight():
    check_run_signature({"seed": 42, "text_tower_anchor": 1.0}, {"seed": 42, "text_tower_anchor": 1.0}, "checkpoint-4")
    # A checkpoint written before the anchor existed trained without it: it resumes with the anchor off ...
    check_run_signature({"seed": 42}, {"seed": 42, "text_tower_anchor": 0.0}, "checkpoint-4")
    # ... and is refused with it on, as a run that changes its weight is.
    with pytest.raises(CheckpointMismatchError, match="text_tower_anchor: checkpoint 0.0 vs now 1.0"):
        check_run_signature({"seed": 42}, {"seed": 42, "text_tower_anchor": 1.0}, "checkpoint-4")
    with pytest.raises(CheckpointMismatchError, match="text_tower_anchor: checkpoint 1.0 vs now 0.0"):
        check_run_signature({"seed": 42, "text_tower_anchor": 1.0}, {"seed": 42, "text_tower_anchor": 0.0}, "c-4")
