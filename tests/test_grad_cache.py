"""GradCache (`CachedNTXentLoss`) must reproduce the gradients of the plain full-batch NT-Xent backward, chunk size
aside, and hold the caller's autocast in every tower pass, the replay during backward included."""

import pytest
import torch
from tiny_towers import make_batch, make_config, product_inputs, query_inputs

from modeling_mmretrieval import MultimodalRetrievalModel
from modeling_mmretrieval.processing_mmretrieval import split_model_inputs
from modeling_mmretrieval.training.cached_loss import AutocastState, CachedNTXentLoss, RandomStateSnapshot, chunk_rows

# (case, config overrides, pairs, hard negatives per query, mini-batch size); 5 pairs so most chunk
# sizes leave a ragged last chunk, and every batch has an image-less product (tiny_towers.make_batch).
STEP_CASES = [
    ("text_only", {}, 4, 2, 3),
    ("4tower-concat", {}, 5, 0, 1),
    ("4tower-alpha_concat", {}, 5, 2, 4),
    ("4tower-mlp", {"fusion_dropout": 0.2}, 5, 1, 3),
    # LiT: the vision tower is locked but the dual encoder's projections train, so image features change.
    ("4tower-concat", {"train_dual_text_tower": True}, 5, 0, 2),
    ("3tower-dinov2", {}, 5, 1, 2),
    ("3tower-dinov2", {"freeze_image_towers": False}, 4, 1, 3),
    ("3tower-clip-vision", {}, 5, 0, 4),
]
CASE_IDS = [
    "-".join([case, *(f"{key}={value}" for key, value in overrides.items()), f"neg{negatives}", f"chunk{size}"])
    for case, overrides, _, negatives, size in STEP_CASES
]


def parameter_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(actual: dict, expected: dict):
    """float32 agreement: 1e-5 relative to each gradient's largest entry.

    The scale-relative bound keeps the check meaningful for parameters whose gradients are large.
    """
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=name)


def build(case: str, overrides: dict, seed: int = 0) -> MultimodalRetrievalModel:
    torch.manual_seed(seed)
    return MultimodalRetrievalModel(make_config(case, **overrides))


def cached_contrastive_step(model, batch: dict, mini_batch_size: int) -> torch.Tensor:
    """One GradCache step as the trainer runs it: the cached loss, then its backward; returns the detached loss."""
    loss = CachedNTXentLoss(mini_batch_size)(model, batch)
    loss.backward()
    return loss.detach()


def chunked_autograd_loss(model, batch: dict, mini_batch_size: int) -> torch.Tensor:
    """The reference for dropout: the loss of the very chunk-by-chunk forward GradCache runs, all with autograd."""
    embeddings = [
        torch.cat([embed(**chunk) for chunk in chunk_rows(inputs, mini_batch_size)])
        for embed, inputs in (
            (model.get_query_embeddings, query_inputs(batch)),
            (model.get_product_embeddings, product_inputs(batch)),
        )
    ]
    return model.score(*embeddings).loss


@pytest.mark.parametrize("case, overrides, num_pairs, num_negatives, mini_batch_size", STEP_CASES, ids=CASE_IDS)
def test_matches_plain_backward_without_dropout(case, overrides, num_pairs, num_negatives, mini_batch_size):
    model = build(case, overrides).eval()
    batch = make_batch(model.config, num_pairs, num_negatives)
    plain_loss = model(**batch).loss
    plain_loss.backward()
    expected = parameter_grads(model)

    loss = cached_contrastive_step(model, batch, mini_batch_size)

    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain_loss.detach(), rtol=1e-6, atol=1e-6)
    actual = parameter_grads(model)
    assert "logit_scale" in actual and "text_model.embeddings.word_embeddings.weight" in actual
    assert_same_grads(actual, expected)


def test_false_negative_mask_reaches_the_loss():
    model = build("3tower-dinov2", {}).eval()
    batch = make_batch(model.config, 4, 1)
    batch["false_negative_mask"] = torch.zeros(4, 8, dtype=torch.bool)
    batch["false_negative_mask"][0, 2] = batch["false_negative_mask"][3, 5] = True
    plain_loss = model(**batch).loss
    plain_loss.backward()
    expected = parameter_grads(model)
    unmasked_loss = model(**{k: v for k, v in batch.items() if k != "false_negative_mask"}).loss.detach()
    model.zero_grad(set_to_none=True)

    loss = cached_contrastive_step(model, batch, 3)

    torch.testing.assert_close(loss, plain_loss.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.isclose(loss, unmasked_loss)
    assert_same_grads(parameter_grads(model), expected)


@pytest.mark.parametrize("case, overrides, num_pairs, num_negatives, mini_batch_size", STEP_CASES, ids=CASE_IDS)
def test_replays_dropout_masks_in_train_mode(case, overrides, num_pairs, num_negatives, mini_batch_size):
    model = build(case, overrides).train()
    batch = make_batch(model.config, num_pairs, num_negatives)
    torch.manual_seed(1)
    reference_loss = chunked_autograd_loss(model, batch, mini_batch_size)
    reference_loss.backward()
    expected = parameter_grads(model)

    torch.manual_seed(1)
    loss = cached_contrastive_step(model, batch, mini_batch_size)

    torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-6, atol=1e-6)
    assert_same_grads(parameter_grads(model), expected)


def test_one_chunk_in_train_mode_matches_the_plain_forward_exactly():
    model = build("4tower-mlp", {"fusion_dropout": 0.2}).train()
    batch = make_batch(model.config, num_pairs=4, num_negatives=1)
    torch.manual_seed(3)
    plain_loss = model(**batch).loss
    torch.manual_seed(4)
    other_masks_loss = model(**batch).loss
    assert not torch.allclose(plain_loss, other_masks_loss)  # dropout is active, so the replay is tested
    torch.manual_seed(3)
    plain_loss.backward()
    expected = parameter_grads(model)

    torch.manual_seed(3)
    loss = cached_contrastive_step(model, batch, mini_batch_size=64)

    torch.testing.assert_close(loss, plain_loss.detach(), rtol=1e-6, atol=1e-6)
    assert_same_grads(parameter_grads(model), expected)


def test_precomputed_image_features_take_the_same_path():
    model = build("3tower-clip-vision", {}).eval()
    batch = make_batch(model.config, num_pairs=5, num_negatives=1)
    with torch.no_grad():
        features = model.get_image_features(batch.pop("pixel_values"), batch["image_mask"])
    batch["image_features"] = features
    model(**batch).loss.backward()
    expected = parameter_grads(model)

    cached_contrastive_step(model, batch, mini_batch_size=3)

    assert_same_grads(parameter_grads(model), expected)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([grad.reshape(-1) for _, grad in sorted(parameter_grads(model).items())])


def test_autocast_at_call_time_wraps_every_forward():
    model = build("4tower-concat", {}).eval()
    batch = make_batch(model.config, num_pairs=5, num_negatives=1)

    def bfloat16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with bfloat16():
        model(**batch).loss.backward()
    plain_bf16 = flat_grads(model)
    model(**batch).loss.backward()
    plain_fp32 = flat_grads(model)
    with bfloat16():
        loss = CachedNTXentLoss(mini_batch_size=2)(model, batch)
    loss.backward()  # outside the autocast block: the replay must re-enter it
    cached_bf16 = flat_grads(model)

    def distance(a, b):
        return ((a - b).norm() / b.norm()).item()

    # bfloat16 rounding moves the gradients by ~1e-2; chunking under the same autocast by far less.
    assert distance(plain_fp32, plain_bf16) > 3e-3
    assert distance(cached_bf16, plain_bf16) < distance(plain_fp32, plain_bf16) / 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replays_cuda_dropout_masks():
    model = build("4tower-mlp", {"fusion_dropout": 0.2}).train().cuda()
    batch = {key: value.cuda() for key, value in make_batch(model.config, num_pairs=5, num_negatives=1).items()}
    torch.manual_seed(2)
    chunked_autograd_loss(model, batch, 2).backward()
    expected = parameter_grads(model)

    torch.manual_seed(2)
    cached_contrastive_step(model, batch, mini_batch_size=2)

    assert_same_grads(parameter_grads(model), expected)


def test_backward_scales_the_replayed_gradients_by_the_incoming_gradient():
    """fp16 loss scaling and gradient-accumulation division (both `accelerator.backward`) multiply the loss
    before its backward: every gradient, the towers' and the logit scale's, must be scaled exactly once."""
    model = build("text_only", {}).eval()
    batch = make_batch(model.config, num_pairs=5, num_negatives=1)
    cached_contrastive_step(model, batch, mini_batch_size=2)
    unscaled = parameter_grads(model)

    loss = CachedNTXentLoss(mini_batch_size=2)(model, batch)
    (loss * 8.0 / 2).backward()

    assert "logit_scale" in unscaled
    assert_same_grads(parameter_grads(model), {name: 4.0 * grad for name, grad in unscaled.items()})


def test_loss_object_accumulates_like_repeated_backward_calls():
    model = build("4tower-concat", {}).eval()
    batch = make_batch(model.config, num_pairs=4, num_negatives=0)
    model(**batch).loss.backward()
    single = parameter_grads(model)
    loss_fn = CachedNTXentLoss(mini_batch_size=3)

    loss_fn(model, batch).backward()
    loss_fn(model, batch).backward()

    assert repr(loss_fn) == "CachedNTXentLoss(mini_batch_size=3)"
    assert_same_grads(parameter_grads(model), {name: 2 * grad for name, grad in single.items()})


@pytest.mark.parametrize("case", ["text_only", "3tower-dinov2", "4tower-mlp"])
def test_bf16_autocast_holds_in_the_first_pass_and_in_the_replay(case):
    """The issue's bug: GradCache ran the towers without the caller's autocast. With bf16 autocast on the CPU,
    a tower Linear must compute in bf16 in the no-grad first pass and in the replay during backward, which runs
    here outside the autocast block (as on CUDA, where backward runs in another thread)."""
    model = build(case, {"freeze_image_towers": False}).train()
    batch = make_batch(model.config, num_pairs=4, num_negatives=1)
    seen = {"first pass": set(), "replay": set()}

    def record(module, inputs, output):
        seen["replay" if torch.is_grad_enabled() else "first pass"].add(output.dtype)

    text_query = model.text_model.encoder.layer[0].attention.self.query
    hooks = [text_query.register_forward_hook(record)]
    if model.vision_model is not None:  # a trainable image tower is replayed too
        hooks.append(model.vision_model.encoder.layer[0].mlp.fc1.register_forward_hook(record))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CachedNTXentLoss(mini_batch_size=3)(model, batch)
    assert seen == {"first pass": {torch.bfloat16}, "replay": set()}
    loss.backward()
    for hook in hooks:
        hook.remove()

    assert seen == {"first pass": {torch.bfloat16}, "replay": {torch.bfloat16}}
    assert text_query.weight.grad is not None and torch.isfinite(text_query.weight.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_autocast_holds_in_the_cuda_backward_thread():
    """On CUDA the backward (and so the replay) runs in the autograd engine's device thread, where the caller's
    thread-local autocast is not active; a loss scale as GradScaler's must reach the towers once."""
    model = build("4tower-mlp", {}).train().cuda()
    batch = {key: value.cuda() for key, value in make_batch(model.config, num_pairs=4, num_negatives=1).items()}
    dtypes = {"first pass": set(), "replay": set()}
    model.text_model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, inputs, output: dtypes["replay" if torch.is_grad_enabled() else "first pass"].add(output.dtype)
    )
    loss_fn = CachedNTXentLoss(mini_batch_size=3)
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(model, batch)
    loss.backward()
    unscaled = parameter_grads(model)
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(model, batch)
    (loss * 1024.0).backward()

    assert dtypes == {"first pass": {torch.float16}, "replay": {torch.float16}}
    scaled = parameter_grads(model)
    assert scaled.keys() == unscaled.keys()
    for name, grad in unscaled.items():  # fp16 rounds the scaled and unscaled backward differently
        scale = max(grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(scaled[name] / 1024.0, grad, rtol=1e-2, atol=1e-2 * scale, msg=name)


def test_without_autocast_the_replay_stays_float32_even_inside_one():
    """The state recorded at call time wins: a backward run inside an autocast block does not change it."""
    model = build("text_only", {}).eval()
    batch = make_batch(model.config, num_pairs=4)
    dtypes = []
    model.text_model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype)
    )
    loss = CachedNTXentLoss(mini_batch_size=2)(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss.backward()
    assert set(dtypes) == {torch.float32} and len(dtypes) == 8  # 2 query and 2 product chunks, embedded twice
    assert not AutocastState.capture("cpu").enabled


def test_random_state_snapshot_replays_without_disturbing_the_outer_stream():
    torch.manual_seed(5)
    snapshot = RandomStateSnapshot([torch.zeros(1)])
    first = torch.rand(3)
    following = torch.rand(3)
    torch.manual_seed(5)
    torch.rand(3)
    with snapshot.replay():
        replayed = torch.rand(3)
    assert torch.equal(replayed, first)
    assert torch.equal(torch.rand(3), following)


def test_random_state_snapshot_works_with_torch_releases_that_reject_a_none_device_type(monkeypatch):
    # torch 2.11 (seen on a CUDA machine) raises on fork_rng(device_type=None); 2.13 accepts it.
    fork_rng = torch.random.fork_rng

    def strict_fork_rng(*args, device_type="cuda", **kwargs):
        torch.device(device_type)  # what torch 2.11 does first: TypeError for None
        return fork_rng(*args, device_type=device_type, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", strict_fork_rng)
    torch.manual_seed(5)
    snapshot = RandomStateSnapshot([torch.zeros(1)])
    first = torch.rand(3)
    with snapshot.replay():
        assert torch.equal(torch.rand(3), first)


def test_split_and_chunk_inputs():
    config = make_config("4tower-mlp")
    batch = make_batch(config, num_pairs=5, num_negatives=1)
    queries, products = split_model_inputs(batch)
    assert set(queries) == {"input_ids", "attention_mask", "dual_input_ids", "dual_attention_mask"}
    assert set(products) == {"input_ids", "attention_mask", "pixel_values", "image_mask"}
    chunks = chunk_rows(products, 4)
    assert [len(chunk["input_ids"]) for chunk in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([chunk["pixel_values"] for chunk in chunks]), batch["pixel_values"])


def test_bad_inputs_raise_clear_errors():
    model = build("text_only", {})
    batch = make_batch(model.config, num_pairs=4)
    for size in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="mini_batch_size"):
            CachedNTXentLoss(size)
    loss_fn = CachedNTXentLoss(2)
    with pytest.raises(ValueError, match="Unexpected batch keys \\['labels'\\]"):
        loss_fn(model, {**batch, "labels": torch.arange(4)})
    with pytest.raises(ValueError, match="product_input_ids"):
        loss_fn(model, {k: v for k, v in batch.items() if not k.startswith("product_")})
    with pytest.raises(ValueError, match="rows like `input_ids`"):
        loss_fn(model, {**batch, "query_attention_mask": batch["query_attention_mask"][:3]})
    with pytest.raises(TypeError, match="DataParallel"):
        loss_fn(torch.nn.DataParallel(model), batch)
