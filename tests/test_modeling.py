import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_towers import ARCHITECTURE_CASES, make_batch, make_config, product_inputs, query_inputs
from transformers import AutoConfig, AutoModel

from modeling_mmretrieval import MultimodalRetrievalConfig, MultimodalRetrievalModel, speedups
from modeling_mmretrieval.speedups.gap_sampled_dropout import GAP_SAMPLED_SDPA

CASES = list(ARCHITECTURE_CASES)


def embeddings(model, batch):
    with torch.no_grad():
        return model.get_query_embeddings(**query_inputs(batch)), model.get_product_embeddings(**product_inputs(batch))


@pytest.mark.parametrize("case", ["4tower-residual", "3tower-residual"])
def test_residual_fusion_starts_as_the_text_only_model(case, tmp_path):
    config = make_config(case)
    torch.manual_seed(0)
    model = MultimodalRetrievalModel(config).eval()
    text_only = MultimodalRetrievalModel(make_config("text_only")).eval()
    text_only.text_model.load_state_dict(model.text_model.state_dict())
    batch = make_batch(config, num_pairs=5, seed=2)
    batch["image_mask"][1] = False  # an image-less product starts on the text path too
    for residual, text in zip(embeddings(model, batch), embeddings(text_only, batch)):
        torch.testing.assert_close(residual, text, atol=1e-6, rtol=0)
    # ... and the image branch is trainable from the first step: its last layer gets a gradient.
    model.train()
    model(**batch).loss.backward()
    assert model.product_fusion.layers[-1].weight.grad.abs().sum() > 0
    # A trained (non-zero) image branch changes the products, and a saved checkpoint keeps it: loading does not
    # re-run the zero initialisation.
    with torch.no_grad():
        model.product_fusion.layers[-1].weight.add_(0.5)
    trained = embeddings(model.eval(), batch)
    assert not torch.allclose(trained[1], embeddings(text_only, batch)[1], atol=1e-3)
    model.save_pretrained(tmp_path)
    for loaded, saved in zip(embeddings(MultimodalRetrievalModel.from_pretrained(tmp_path), batch), trained):
        torch.testing.assert_close(loaded, saved, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_output_shapes_and_normalisation(case):
    config = make_config(case)
    model = MultimodalRetrievalModel(config)
    batch = make_batch(config, num_pairs=4, num_negatives=1)
    output = model(**batch)
    dim = model.embedding_dim
    assert output.query_embeds.shape == (4, dim)
    assert output.product_embeds.shape == (8, dim)
    assert output.logits_per_query.shape == (4, 8)
    assert torch.allclose(output.query_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(output.product_embeds.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    expected_logits = output.logit_scale * output.query_embeds @ output.product_embeds.t()
    assert torch.allclose(output.logits_per_query, expected_logits, atol=1e-5)


def test_embedding_sizes_follow_the_paper_layouts():
    assert MultimodalRetrievalModel(make_config("text_only")).embedding_dim == 32
    assert MultimodalRetrievalModel(make_config("4tower-concat")).embedding_dim == 32 + 24  # BERT ⊕ CLIP
    assert MultimodalRetrievalModel(make_config("4tower-mlp", fusion_output_dim=20)).embedding_dim == 20
    # 3tMM maps the product into the query space.
    assert MultimodalRetrievalModel(make_config("3tower-clip-vision")).embedding_dim == 16


@pytest.mark.parametrize("case", CASES)
def test_loss_decreases_on_a_fixed_batch(case):
    config = make_config(case)
    model = MultimodalRetrievalModel(config).train()
    batch = make_batch(config, num_pairs=6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("freeze", [True, False])
def test_gradients_reach_exactly_the_unfrozen_parameters(case, freeze):
    config = make_config(case, freeze_image_towers=freeze)
    model = MultimodalRetrievalModel(config).train()
    batch = make_batch(config)
    model(**batch).loss.backward()
    image_prefixes = ("dual_encoder.", "vision_model.")
    for name, parameter in model.named_parameters():
        in_frozen_tower = freeze and name.startswith(image_prefixes)
        unused_text_pooler = name.startswith(("text_model.pooler.", "product_text_model.pooler."))
        assert parameter.requires_grad == (not in_frozen_tower and not unused_text_pooler), name
        if in_frozen_tower:
            assert parameter.grad is None, name
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # Every trainable parameter that the batch uses gets a gradient. Unused by construction: CLIP's own
    # logit scale, DINOv2's masked-modelling token, the vision towers' poolers where the CLS state is read.
    unused = ("dual_encoder.logit_scale", "embeddings.mask_token", "missing_image_embedding", "vision_model.pooler")
    without_grad = [n for n, p in trainable.items() if p.grad is None and not any(u in n for u in unused)]
    assert without_grad == []
    if config.fusion == "mlp" and config.uses_images:
        # The batch has an image-less product, so the learned stand-in is trained.
        assert model.missing_image_embedding.grad is not None
        assert model.missing_image_embedding.grad.abs().sum() > 0


def test_frozen_tower_stays_in_eval_mode_while_training():
    model = MultimodalRetrievalModel(make_config("3tower-dinov2")).train()
    assert model.training and model.text_model.training
    assert not model.vision_model.training


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_give_identical_embeddings(case, tmp_path):
    config = make_config(case)
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    expected = embeddings(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MultimodalRetrievalModel) and not loaded.training
    for before, after in zip(expected, embeddings(loaded, batch)):
        assert torch.equal(before, after)


def test_fresh_process_loads_with_trust_remote_code_without_the_package(tmp_path):
    config = make_config("4tower-mlp")
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save(batch, tmp_path / "batch.pt")
    query, product = embeddings(model, batch)
    torch.save({"query": query, "product": product}, tmp_path / "expected.pt")
    auto_map = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_mmretrieval.MultimodalRetrievalConfig",
        "AutoModel": "modeling_mmretrieval.MultimodalRetrievalModel",
    }
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class BlockPackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "modeling_mmretrieval" or name.startswith("modeling_mmretrieval."):
                    raise ImportError("package deliberately hidden: " + name)

        sys.meta_path.insert(0, BlockPackage())
        try:
            import modeling_mmretrieval
            raise SystemExit("package still importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(r"{tmp_path / 'checkpoint'}", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load(r"{tmp_path / 'batch.pt'}")
        expected = torch.load(r"{tmp_path / 'expected.pt'}")
        with torch.no_grad():
            query = model.get_query_embeddings(batch["query_input_ids"], batch["query_attention_mask"],
                dual_input_ids=batch["query_dual_input_ids"], dual_attention_mask=batch["query_dual_attention_mask"])
            product = model.get_product_embeddings(batch["product_input_ids"], batch["product_attention_mask"],
                pixel_values=batch["pixel_values"], image_mask=batch["image_mask"])
        assert torch.equal(query, expected["query"]) and torch.equal(product, expected["product"])
        print("REMOTE-CODE-OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert "REMOTE-CODE-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("case", ["text_only", "4tower-mlp"])
def test_missing_parameters_are_reinitialised_sanely(case, tmp_path):
    config = make_config(case, logit_scale_init_value=14.0)
    model = MultimodalRetrievalModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(0.1)
        if model.missing_image_embedding is not None:
            model.missing_image_embedding.fill_(3.0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("logit_scale")
    weights.pop("missing_image_embedding", None)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path)
    assert loaded.logit_scale.item() == pytest.approx(math.log(14.0))
    assert loaded.logit_scale.exp().item() == pytest.approx(14.0)
    if loaded.missing_image_embedding is not None:
        # Re-initialised to a small random direction (its norm is about 1), not left at the saved 3.0s.
        assert 0.5 < loaded.missing_image_embedding.norm().item() < 2.0
    # Everything that was saved is still loaded as saved.
    for name, tensor in loaded.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name]), name


def test_shared_text_towers_are_saved_once_and_tied_on_load(tmp_path):
    config = make_config("text_only")
    model = MultimodalRetrievalModel(config)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert not any(key.startswith("product_text_model") for key in keys)
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path)
    batch = make_batch(config)
    # One set of weights serves both sides: editing it moves queries and products alike.
    query_before, product_before = embeddings(loaded, batch)
    with torch.no_grad():
        loaded.text_model.embeddings.word_embeddings.weight.mul_(1.5)
    query_after, product_after = embeddings(loaded, batch)
    assert not torch.allclose(query_before, query_after) and not torch.allclose(product_before, product_after)
    # Identical token ids embed identically on the query and the product side.
    ids = batch["query_input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded.get_query_embeddings(ids), loaded.get_product_embeddings(ids), atol=1e-6)


def test_separate_text_towers_train_independently(tmp_path):
    config = make_config("text_only", share_text_towers=False)
    model = MultimodalRetrievalModel(config).train()
    batch = make_batch(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    query_weight = model.text_model.embeddings.word_embeddings.weight
    product_weight = model.product_text_model.embeddings.word_embeddings.weight
    assert query_weight.data_ptr() != product_weight.data_ptr()
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert any(key.startswith("product_text_model.") for key in keys)
    loaded = MultimodalRetrievalModel.from_pretrained(tmp_path)
    for before, after in zip(embeddings(model.eval(), batch), embeddings(loaded, batch)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("case", ["4tower-concat", "4tower-mlp", "3tower-dinov2"])
def test_image_less_products_take_the_text_only_path(case):
    config = make_config(case)
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    inputs = product_inputs(batch)
    reference = model.get_product_embeddings(**inputs)
    # The placeholder pixels of an image-less product are never read.
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"][1] = 1e4
    assert torch.equal(model.get_product_embeddings(**inputs), reference)
    # Without any pixels every product is image-less and equals the masked result for product 1.
    text_only = model.get_product_embeddings(inputs["input_ids"], inputs["attention_mask"])
    assert torch.allclose(text_only[1], reference[1], atol=1e-6)
    assert not torch.allclose(text_only[0], reference[0], atol=1e-4)
    if config.fusion == "concat":
        # Concat fusion: the image half is exactly zero, so the score comes from the text half alone.
        assert torch.count_nonzero(reference[1, model.text_embedding_dim :]) == 0


def test_image_mask_without_pixels_is_refused():
    config = make_config("3tower-dinov2")
    model = MultimodalRetrievalModel(config)
    batch = make_batch(config)
    with pytest.raises(ValueError, match="image_mask"):
        model.get_product_embeddings(batch["product_input_ids"], image_mask=torch.ones(4, dtype=torch.bool))


def test_precomputed_image_features_give_the_same_embeddings():
    config = make_config("3tower-dinov2")
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    features = model.get_image_features(batch["pixel_values"], batch["image_mask"])
    direct = model.get_product_embeddings(**product_inputs(batch))
    cached = model.get_product_embeddings(
        batch["product_input_ids"], batch["product_attention_mask"], image_features=features, image_mask=batch["image_mask"]
    )
    assert torch.equal(direct, cached)


def test_image_queries_rank_products_by_image_similarity():
    config = make_config("4tower-alpha_concat")
    model = MultimodalRetrievalModel(config).eval()
    batch = make_batch(config)
    pixel_values = batch["pixel_values"]
    with torch.no_grad():
        image_queries = model.get_image_query_embeddings(pixel_values=pixel_values)
        products = model.get_product_embeddings(
            batch["product_input_ids"], batch["product_attention_mask"], pixel_values=pixel_values
        )
        image_features = F.normalize(model.get_image_features(pixel_values), dim=-1)
    scores = image_queries @ products.t()
    # Up to a positive per-product factor (the text half's share of the norm), scores are image-image cosines.
    image_cosine = image_features @ image_features.t()
    assert torch.equal(scores.argmax(dim=1), image_cosine.argmax(dim=1))
    assert torch.allclose(scores.diagonal(), scores.max(dim=1).values)
    with pytest.raises(ValueError, match="Image queries need a 4tower"):
        MultimodalRetrievalModel(make_config("3tower-dinov2")).get_image_query_embeddings(pixel_values=pixel_values)


def test_hard_negatives_extend_the_candidate_list():
    config = make_config("text_only")
    model = MultimodalRetrievalModel(config)
    batch = make_batch(config, num_pairs=3, num_negatives=2)
    output = model(**batch)
    assert output.logits_per_query.shape == (3, 9)
    scale = output.logit_scale
    query_direction = F.cross_entropy(scale * output.query_embeds @ output.product_embeds.t(), torch.arange(3))
    product_direction = F.cross_entropy(scale * output.product_embeds[:3] @ output.query_embeds.t(), torch.arange(3))
    assert output.loss.item() == pytest.approx(((query_direction + product_direction) / 2).item(), rel=1e-5)


def test_fixed_temperature_is_not_trained():
    config = make_config("text_only", learn_logit_scale=False, logit_scale_init_value=10.0)
    model = MultimodalRetrievalModel(config)
    model(**make_batch(config)).loss.backward()
    assert model.logit_scale.grad is None
    assert model.logit_scale.exp().item() == pytest.approx(10.0)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = make_config("3tower-dinov2", freeze_image_towers=False)
    batch = make_batch(config)
    reference = MultimodalRetrievalModel(config).train()
    checkpointed = MultimodalRetrievalModel(config).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.text_model.encoder.layer[0].gradient_checkpointing
    assert checkpointed.vision_model.encoder.layer[0].gradient_checkpointing
    for model in (reference, checkpointed):
        torch.manual_seed(1)
        model(**batch).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_sdpa_attention_matches_eager(tmp_path):
    config = make_config("4tower-concat")
    MultimodalRetrievalModel(config).save_pretrained(tmp_path)
    batch = make_batch(config)
    sdpa = MultimodalRetrievalModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    eager = MultimodalRetrievalModel.from_pretrained(tmp_path, attn_implementation="eager")
    # sdpa reaches every tower; a loaded model runs plain transformers attention.
    assert sdpa.text_model.config._attn_implementation == "sdpa"
    assert sdpa.dual_encoder.config.text_config._attn_implementation == "sdpa"
    assert eager.text_model.config._attn_implementation == "eager"
    for a, b in zip(embeddings(sdpa, batch), embeddings(eager, batch)):
        assert torch.allclose(a, b, atol=1e-5)
    # The gap-sampled-dropout variant the speedups install is the same function outside CPU training.
    speedups.apply(sdpa)
    assert sdpa.text_model.config._attn_implementation == GAP_SAMPLED_SDPA
    assert sdpa.dual_encoder.config.text_config._attn_implementation == GAP_SAMPLED_SDPA
    for a, b in zip(embeddings(sdpa, batch), embeddings(eager, batch)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(architecture="two_tower"), "architecture='two_tower'"),
        (dict(fusion="sum"), "fusion='sum'"),
        (dict(pooling="max"), "pooling='max'"),
        (dict(architecture="4tower"), "needs `dual_encoder_config`"),
        (dict(architecture="3tower"), "needs `vision_config`"),
        (dict(architecture="4tower", dual_encoder_config={"model_type": "dinov2"}), "aligned text-image dual encoder"),
        (dict(architecture="3tower", vision_config={"model_type": "dinov2"}, fusion="concat"), "fusion` must be one of ['mlp', 'residual']"),
        (dict(architecture="text_only", vision_config={"model_type": "dinov2"}), "takes no image tower"),
        (dict(fusion_alpha=1.5), "fusion_alpha"),
        (dict(logit_scale_init_value=0.0), "logit_scale_init_value"),
        (dict(max_query_length=0), "max_query_length"),
        (dict(product_text_fields=[]), "product_text_fields"),
        (dict(share_text_towers=True, product_text_config={"model_type": "bert"}), "share_text_towers=False"),
        (dict(share_text_towers=False, product_text_config={"model_type": "bert", "hidden_size": 64,
                                                            "num_attention_heads": 2}), "need `projection_dim`"),
    ],
)
def test_bad_configs_give_clear_errors(kwargs, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace("[", r"\[")):
        MultimodalRetrievalConfig(text_config={"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2}, **kwargs)


def test_config_round_trips_through_auto_config(tmp_path):
    config = make_config("4tower-alpha_concat", product_text_fields=["title", "brand"], max_query_length=24)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MultimodalRetrievalConfig)
    assert loaded.fusion_alpha == 0.7 and loaded.product_text_fields == ["title", "brand"]
    assert loaded.dual_encoder_config.projection_dim == 24
    assert loaded.max_query_length == 24


def test_lit_style_training_keeps_only_the_dual_encoder_vision_tower_locked():
    config = make_config("4tower-alpha_concat", fusion_alpha=0.0, train_dual_text_tower=True)
    model = MultimodalRetrievalModel(config).train()
    assert not model.image_features_are_frozen
    assert not model.dual_encoder.vision_model.training and model.dual_encoder.text_model.training
    model(**make_batch(config)).loss.backward()
    for name, parameter in model.dual_encoder.named_parameters():
        if name.startswith("vision_model."):
            assert not parameter.requires_grad and parameter.grad is None, name
    assert model.dual_encoder.text_projection.weight.grad.abs().sum() > 0
    assert model.dual_encoder.visual_projection.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="train_dual_text_tower=True` needs"):
        make_config("3tower-dinov2", train_dual_text_tower=True)


def test_false_negatives_leave_the_softmax():
    config = make_config("text_only")
    model = MultimodalRetrievalModel(config).eval()  # no dropout: two forward passes see the same embeddings
    batch = make_batch(config, num_pairs=4, num_negatives=1)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, 1] = mask[2, 6] = True
    mask[1, 1] = True  # a query's own positive is never dropped, even if marked
    output = model(**batch, false_negative_mask=mask)
    scale, q, p = output.logit_scale, output.query_embeds, output.product_embeds
    query_logits = (scale * q @ p.t()).masked_fill(mask & ~torch.eye(4, 8, dtype=torch.bool), float("-inf"))
    product_logits = (scale * p[:4] @ q.t()).masked_fill(mask[:, :4].t() & ~torch.eye(4, dtype=torch.bool), float("-inf"))
    expected = (F.cross_entropy(query_logits, torch.arange(4)) + F.cross_entropy(product_logits, torch.arange(4))) / 2
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert output.loss.item() < model(**batch).loss.item() + 1e-6


def test_lock_image_tower_switches_gradients_mode_and_config():
    model = MultimodalRetrievalModel(make_config("3tower-dinov2")).train()
    assert not model.vision_model.training and not any(p.requires_grad for p in model.vision_model.parameters())
    model.lock_image_tower(False)
    assert model.vision_model.training and all(p.requires_grad for p in model.vision_model.parameters())
    assert model.config.freeze_image_towers is False and not model.image_features_are_frozen
    model.lock_image_tower()
    assert not model.vision_model.training and model.image_features_are_frozen
