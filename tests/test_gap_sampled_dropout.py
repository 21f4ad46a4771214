"""Gap-sampled dropout: masks of the Bernoulli distribution from fewer random numbers, wired into the towers."""

import math

import pytest
import torch
from tiny_towers import make_config
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from modeling_mmretrieval import MultimodalRetrievalModel, speedups
from modeling_mmretrieval.speedups import gap_sampled_dropout as gsd


def _within_binomial(successes: float, trials: int, probability: float, deviations: float = 5.0) -> bool:
    return abs(successes - trials * probability) <= deviations * math.sqrt(trials * probability * (1 - probability))


@pytest.mark.parametrize("drop_probability", [0.02, 0.1, 0.5, 0.8])
def test_masks_drop_each_position_independently_with_the_given_probability(drop_probability):
    torch.manual_seed(0)
    masks = torch.stack([gsd.bernoulli_keep_mask((64,), drop_probability) for _ in range(3000)])
    dropped = ~masks
    trials = dropped.shape[0]
    # Every position, the first and last included, is dropped at the same rate.
    for position in range(64):
        assert _within_binomial(dropped[:, position].sum().item(), trials, drop_probability)
    # Neighbours are independent: both dropped at rate p^2, as are positions far apart.
    for first, second in [(0, 1), (31, 32), (62, 63), (0, 63)]:
        both = (dropped[:, first] & dropped[:, second]).sum().item()
        assert _within_binomial(both, trials, drop_probability**2)
    # Whole-mask counts follow the binomial law, not a fixed number.
    counts = dropped.sum(dim=1).double()
    assert counts.std().item() == pytest.approx(math.sqrt(64 * drop_probability * (1 - drop_probability)), rel=0.1)


def test_masks_are_reproducible_and_take_their_generator():
    torch.manual_seed(7)
    first = gsd.bernoulli_keep_mask((32, 12, 16, 16), 0.1)
    torch.manual_seed(7)
    assert torch.equal(first, gsd.bernoulli_keep_mask((32, 12, 16, 16), 0.1))
    generator = torch.Generator().manual_seed(7)
    state = torch.get_rng_state()
    from_generator = gsd.bernoulli_keep_mask((1000,), 0.3, generator=generator)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(from_generator, gsd.bernoulli_keep_mask((1000,), 0.3, generator=torch.Generator().manual_seed(7)))


def test_a_shortfall_of_draws_is_topped_up(monkeypatch):
    # With no spare draws, about half the masks need a second round; the law must not change.
    monkeypatch.setattr(gsd, "SPARE_DRAW_DEVIATIONS", -3)
    torch.manual_seed(0)
    masks = torch.stack([gsd.bernoulli_keep_mask((50,), 0.2) for _ in range(2000)])
    assert masks.shape == (2000, 50)
    assert _within_binomial((~masks[:, -1]).sum().item(), 2000, 0.2)
    assert _within_binomial((~masks).sum().item(), 2000 * 50, 0.2)


def test_edge_probabilities_shapes_and_bad_input():
    assert gsd.bernoulli_keep_mask((3, 4), 0.0).all()
    assert not gsd.bernoulli_keep_mask((3, 4), 1.0).any()
    assert gsd.bernoulli_keep_mask((0, 5), 0.1).shape == (0, 5)
    with pytest.raises(ValueError, match="drop_probability"):
        gsd.bernoulli_keep_mask((3,), 1.5)


def test_dropout_zeroes_or_rescales_and_passes_gradients_through_the_same_mask():
    inputs = torch.randn(8, 128, 64, requires_grad=True)
    torch.manual_seed(3)
    output = gsd.gap_sampled_dropout(inputs, 0.25)
    kept = output != 0
    torch.testing.assert_close(output[kept], inputs[kept] / 0.75)
    assert _within_binomial((~kept).sum().item(), inputs.numel(), 0.25)
    output.sum().backward()
    torch.testing.assert_close(inputs.grad, kept.float() / 0.75)

    assert gsd.gap_sampled_dropout(inputs, 0.25, training=False) is inputs
    assert gsd.gap_sampled_dropout(inputs, 0.0) is inputs
    assert not gsd.gap_sampled_dropout(inputs, 1.0).any()


def test_dropout_module_draws_gap_sampled_masks_on_the_cpu_only(monkeypatch):
    layer = gsd.GapSampledDropout(0.1)
    assert isinstance(layer, torch.nn.Dropout)
    torch.manual_seed(5)
    expected = gsd.gap_sampled_dropout(torch.ones(6, 40), 0.1)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(torch.ones(6, 40)), expected)
    assert torch.equal(layer.eval()(torch.ones(6, 40)), torch.ones(6, 40))

    def refuse(*args, **kwargs):
        raise AssertionError("gap-sampled mask drawn for a non-CPU tensor")

    monkeypatch.setattr(gsd, "bernoulli_keep_mask", refuse)
    assert layer.train()(torch.ones(6, 40, device="meta")).device.type == "meta"


class _Attention(torch.nn.Module):
    is_causal = False


def _attention_inputs(batch=3, heads=2, length=10, head_dim=8):
    query, key, value = (torch.randn(batch, heads, length, head_dim) for _ in range(3))
    lengths = torch.tensor([length, 6, 3])
    allowed = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :].expand(batch, 1, length, length)
    return query, key, value, allowed


def test_attention_without_dropout_is_transformers_sdpa():
    query, key, value, allowed = _attention_inputs()
    module = _Attention().train()
    ours, _ = gsd.gap_sampled_sdpa(module, query, key, value, allowed, dropout=0.0, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query, key, value, allowed, dropout=0.0, scaling=0.3)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_attention_dropout_drops_probabilities_with_the_drawn_mask_and_ignores_padding(mask_kind):
    query, key, value, allowed = _attention_inputs()
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    value_with_loud_padding = value.masked_fill(~allowed[:, 0, 0, :, None].unsqueeze(1), 1e6)
    torch.manual_seed(11)
    ours, _ = gsd.gap_sampled_sdpa(_Attention(), query, key, value_with_loud_padding, mask, dropout=0.2, scaling=0.35)
    torch.manual_seed(11)
    keep = gsd.bernoulli_keep_mask((3, 2, 10, 10), 0.2)
    scores = (query @ key.transpose(-1, -2) * 0.35).masked_fill(~allowed, float("-inf"))
    reference = ((scores.softmax(-1) * keep / 0.8) @ value).transpose(1, 2)
    torch.testing.assert_close(ours, reference)


def test_model_towers_switch_and_switch_back(tmp_path):
    model = MultimodalRetrievalModel(make_config("4tower-mlp"))
    towers = [model.text_model, model.dual_encoder]
    dropouts = lambda: [module for tower in towers for module in tower.modules() if isinstance(module, torch.nn.Dropout)]
    # A model as built or loaded runs plain transformers modules; the speedups are applied explicitly.
    assert dropouts() and not any(type(module) is gsd.GapSampledDropout for module in dropouts())
    assert model.text_model.config._attn_implementation == "sdpa"
    speedups.apply(model)
    assert all(type(module) is gsd.GapSampledDropout for module in dropouts())
    assert model.text_model.config._attn_implementation == gsd.GAP_SAMPLED_SDPA
    # A frozen image tower stays in eval mode, new dropout layers included, through every switch.
    three_tower = MultimodalRetrievalModel(make_config("3tower-dinov2"))
    assert any(isinstance(module, torch.nn.Dropout) for module in three_tower.vision_model.modules())
    for enabled in (True, False, True):
        speedups.apply(three_tower, gap_sampled_dropout=enabled)
        assert three_tower.training and not any(module.training for module in three_tower.vision_model.modules())

    # An explicit implementation is honoured; applying the speedups again gives the gap-sampled one.
    model.set_attn_implementation("eager")
    assert model.text_model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    speedups.apply(model)
    assert model.text_model.config._attn_implementation == gsd.GAP_SAMPLED_SDPA

    # Checkpoints never record the speedups: a loaded model is plain.
    model.save_pretrained(tmp_path)
    assert gsd.GAP_SAMPLED_SDPA not in (tmp_path / "config.json").read_text()
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path)
    assert loaded.text_model.config._attn_implementation == "sdpa"
    assert not any(type(module) is gsd.GapSampledDropout for module in loaded.modules())

    speedups.apply(model, gap_sampled_dropout=False)
    assert model.text_model.config._attn_implementation == "sdpa"
    assert not any(type(module) is gsd.GapSampledDropout for module in model.modules())


def test_training_steps_are_reproducible_and_eval_embeddings_unchanged():
    config = make_config("text_only")
    config.text_config.attention_probs_dropout_prob = config.text_config.hidden_dropout_prob = 0.2
    model = MultimodalRetrievalModel(config)
    input_ids = torch.randint(5, config.text_config.vocab_size, (16, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[8:, 12:] = 0

    def embed():
        return model.get_query_embeddings(input_ids=input_ids, attention_mask=attention_mask)

    model.eval()
    with torch.no_grad():
        plain_eval = embed()
        speedups.apply(model)
        gap_eval = embed()
        torch.testing.assert_close(gap_eval, plain_eval, rtol=0, atol=1e-6)

    model.train()
    torch.manual_seed(1)
    first = embed()
    torch.manual_seed(1)
    assert torch.equal(embed(), first)
    assert not torch.allclose(first, gap_eval, atol=1e-3)  # dropout is active in training
