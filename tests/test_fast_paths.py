"""Each fast path measured by benchmarks/run.py gives the numbers of the plain path it replaces."""

import gc
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoTokenizer, BitImageProcessorPil, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.data.collator import RetrievalCollator
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue, make_training_pairs
from modeling_mmretrieval.speedups.fast_image_processing import (
    HUGE_PAGE_MIN_BYTES,
    FastImageProcessor,
    UnsupportedImageProcessorError,
    pixel_value_tolerance,
    resized_height_width,
)
from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.speedups.length_groups import length_groups
from modeling_mmretrieval.towers import IMAGENET_MEAN, IMAGENET_STD, get_minilm_path
from modeling_mmretrieval.retrieval.search import LENGTH_SORT_WINDOW_BATCHES, build_product_index


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue(SAMPLE_DATA_DIR, split="validation")


@pytest.fixture(scope="module")
def photos(catalogue):
    return [load_product_image(encoded, on_error="raise").image for encoded in catalogue.select(range(24))["image"]]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_minilm_path())


def reference_processors():
    """The processors of this project's image towers: CLIP's, and DINOv2's (BiT class, ImageNet statistics)."""
    return {
        "clip": CLIPImageProcessorPil(),
        "dinov2": BitImageProcessorPil(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        ),
    }


def assert_within_stated_tolerance(reference: torch.Tensor, fast: torch.Tensor, processor: FastImageProcessor):
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    difference = (reference - fast).abs()
    assert difference.max().item() <= pixel_value_tolerance(processor)
    # Only rounding in Pillow's intermediate row pass differs: almost every value is identical.
    assert (difference > 1e-5).float().mean().item() < 0.02


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_fast_image_path_matches_the_reference_processor_on_catalogue_photos(photos, name):
    reference = reference_processors()[name]
    fast = FastImageProcessor.from_image_processor(reference)
    # 60x80 catalogue photos (upscaled), one photo blown up (downscaled, antialiased), one odd-shaped crop.
    images = photos + [photos[0].resize((600, 800), Image.BICUBIC), photos[1].crop((0, 0, 60, 37))]
    expected = reference(images=images, return_tensors="pt")["pixel_values"]
    assert_within_stated_tolerance(expected, fast(images=images)["pixel_values"], fast)


def test_large_batches_come_back_as_ordinary_tensors(photos, tmp_path):
    fast = FastImageProcessor.from_image_processor(CLIPImageProcessorPil())
    pixels = fast(images=photos)["pixel_values"]
    # 24 photos at 224x224 are 14 MiB, so this output is backed by the processor's own huge-page mapping.
    assert pixels.numel() * pixels.element_size() >= HUGE_PAGE_MIN_BYTES
    expected = CLIPImageProcessorPil()(images=photos, return_tensors="pt")["pixel_values"]
    gc.collect()  # the mapping lives as long as the tensor, not as long as the call
    assert_within_stated_tolerance(expected, pixels, fast)
    torch.save(pixels, tmp_path / "pixels.pt")
    assert torch.equal(torch.load(tmp_path / "pixels.pt"), pixels)
    copy = pixels.clone()
    assert torch.equal(pixels.share_memory_(), copy)  # what DataLoader workers do with a collated batch
    pixels.mul_(2)  # writable, like any tensor
    assert torch.equal(pixels, copy * 2)


def test_fast_image_path_converts_modes_like_the_reference(photos):
    reference = CLIPImageProcessorPil()
    translucent = np.array(photos[2].convert("RGBA"))
    translucent[..., 3] = 100
    images = [Image.fromarray(translucent), photos[3].convert("L"), photos[4].convert("P")]
    fast = FastImageProcessor.from_image_processor(reference)
    expected = reference(images=images, return_tensors="pt")["pixel_values"]
    assert_within_stated_tolerance(expected, fast(images=images)["pixel_values"], fast)


def test_unsupported_settings_and_inputs_are_refused(photos):
    with pytest.raises(UnsupportedImageProcessorError, match="resample=NEAREST"):
        FastImageProcessor.from_image_processor(CLIPImageProcessorPil(resample=Image.NEAREST))
    with pytest.raises(UnsupportedImageProcessorError, match="longest_edge"):
        resized_height_width(80, 60, {"shortest_edge": 224, "longest_edge": 300})
    fast = FastImageProcessor.from_image_processor(CLIPImageProcessorPil())
    with pytest.raises(TypeError, match="PIL images or"):
        fast(images=[torch.zeros(3, 8, 8)])
    no_crop = FastImageProcessor.from_image_processor(CLIPImageProcessorPil(do_center_crop=False))
    with pytest.raises(ValueError, match="different shapes"):
        no_crop(images=[photos[0], photos[0].resize((80, 60))])


def test_processor_fast_flag_round_trips_and_masks_missing_images(tokenizer, photos, tmp_path):
    processor = MultimodalRetrievalProcessor(tokenizer, CLIPImageProcessorPil())
    assert speedups.apply_to_processor(processor) and processor.fast_image_processing is True
    processor.save_pretrained(tmp_path)
    loaded = MultimodalRetrievalProcessor.from_pretrained(tmp_path)
    # The preference is saved; the batched path itself is installed only by the speedups.
    assert loaded.fast_image_processing is True and loaded.batched_image_processor is None
    images = [photos[0], None, photos[1]]
    plain = loaded.encode_images(images)
    speedups.apply(processor=loaded)
    fast = loaded.encode_images(images)
    assert fast["image_mask"].tolist() == [True, False, True]
    assert torch.count_nonzero(fast["pixel_values"][1]) == 0
    assert_within_stated_tolerance(
        plain["pixel_values"], fast["pixel_values"], FastImageProcessor.from_image_processor(CLIPImageProcessorPil())
    )


class PaddingRecorder(MultimodalRetrievalProcessor):
    """Records how many token slots (real + padding) each tokenised batch of product texts takes."""

    token_slots: list[int]

    def _tokenize(self, tokenizer, texts, max_length):
        tokens = super()._tokenize(tokenizer, texts, max_length)
        self.token_slots.append(tokens["input_ids"].numel())
        return tokens


def tiny_text_model(tokenizer) -> MultimodalRetrievalModel:
    config = make_config("text_only")
    config.text_config.vocab_size = tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    return MultimodalRetrievalModel(config).eval()


def test_length_sorted_indexing_pads_less_and_keeps_each_products_embedding(tokenizer, catalogue):
    model = tiny_text_model(tokenizer)
    processor = PaddingRecorder(tokenizer, max_product_length=128)
    rows = catalogue.select(range(4 * LENGTH_SORT_WINDOW_BATCHES + 5)).to_list()
    for row in rows[::2]:
        row["description"] = None  # title-only products among long descriptions: lengths to sort
    indexes, slots = {}, {}
    for sort_by_length in (False, True):
        processor.token_slots = []
        indexes[sort_by_length] = build_product_index(
            model, processor, rows, batch_size=4, show_progress=False, sort_by_length=sort_by_length
        )
        slots[sort_by_length] = sum(processor.token_slots)
    assert slots[True] < 0.8 * slots[False]
    assert indexes[True].ids == indexes[False].ids == tuple(row["product_id"] for row in rows)
    assert np.allclose(indexes[True].embeddings, indexes[False].embeddings, atol=1e-5)


def training_batch(processor, rows, image_features=None) -> dict:
    return RetrievalCollator(processor, image_features=image_features)(rows)


def tower_examples(towers: dict, run) -> dict[str, int]:
    """How many examples (batch rows) each named tower's forward passes see while `run()` runs, and in how
    many calls: `{name: (examples, calls)}`."""
    counts = {name: [0, 0] for name in towers}

    def count(name, kwargs):
        inputs = next(kwargs[key] for key in ("input_ids", "inputs_embeds", "pixel_values") if kwargs.get(key) is not None)
        counts[name][0] += inputs.shape[0]
        counts[name][1] += 1

    hooks = [
        tower.register_forward_pre_hook(lambda _, args, kwargs, name=name: count(name, kwargs), with_kwargs=True)
        for name, tower in towers.items()
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: tuple(value) for name, value in counts.items()}


def counted_tower_examples(model, batch) -> dict[str, int]:
    towers = {"text": model.text_model, "image": model.vision_model}
    counts = tower_examples(towers, lambda: model(**batch).loss.backward())
    return {name: examples for name, (examples, _) in counts.items()}


def test_cached_image_features_give_the_recomputed_step(tokenizer, catalogue):
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    model = MultimodalRetrievalModel(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_product_length=48)
    speedups.apply(processor=processor, fast_image_processing=True)
    rows = make_training_pairs(catalogue.select(range(6)), seed=0).to_list()
    rows[2]["image"] = None  # an image-less product stays image-less in the cache

    live = training_batch(processor, rows)
    with torch.no_grad():
        features = model.get_image_features(live["pixel_values"], live["image_mask"])
    cache = {row["product_id"]: feature if row["image"] else None for row, feature in zip(rows, features)}
    cached = training_batch(processor, rows, image_features=cache)

    model.eval()  # no dropout, so both steps see the same network
    gradients = {}
    for name, batch in (("live", live), ("cached", cached)):
        model.zero_grad()
        gradients[name] = (counted_tower_examples(model, batch),
                           {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (live_calls, live_grads), (cached_calls, cached_grads) = gradients["live"], gradients["cached"]
    # One text tower serves queries and products (each row once); the frozen tower sees the 5 products
    # with an image live, and nothing with cached features.
    assert live_calls == {"text": 12, "image": 5} and cached_calls == {"text": 12, "image": 0}
    assert live_grads.keys() == cached_grads.keys() and not any("vision_model" in name for name in live_grads)
    for name in live_grads:
        assert torch.allclose(live_grads[name], cached_grads[name], atol=1e-6), name


def test_sdpa_and_dynamic_padding_give_the_eager_max_length_loss(tokenizer, catalogue):
    model = tiny_text_model(tokenizer)
    rows = make_training_pairs(catalogue.select(range(8)), seed=0).to_list()
    dynamic = MultimodalRetrievalProcessor(tokenizer, max_product_length=64)

    class MaxLengthProcessor(MultimodalRetrievalProcessor):
        def _tokenize(self, tokenizer, texts, max_length):
            return dict(tokenizer(
                texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            ))

    padded_batch = RetrievalCollator(MaxLengthProcessor(tokenizer, max_product_length=64), uses_images=False)(rows)
    dynamic_batch = RetrievalCollator(dynamic, uses_images=False)(rows)
    assert dynamic_batch["product_input_ids"].shape[1] <= padded_batch["product_input_ids"].shape[1] == 64
    with torch.no_grad():
        fast_loss = model(**dynamic_batch).loss
        model.set_attn_implementation("eager")
        reference_loss = model(**padded_batch).loss
    assert torch.allclose(fast_loss, reference_loss, atol=1e-5)


def exhaustive_best_cost(sorted_lengths: list[int], call_cost: int) -> int:
    """The cheapest split of rows sorted longest first into consecutive groups, by trying every split."""
    best = None
    for cuts in itertools.product((False, True), repeat=len(sorted_lengths) - 1):
        cost, start = 0, 0
        for end in [position + 1 for position, cut in enumerate(cuts) if cut] + [len(sorted_lengths)]:
            cost += (end - start) * sorted_lengths[start] + call_cost
            start = end
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_are_the_cheapest_split(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 129, size=int(rng.integers(1, 10))).tolist()
    call_cost = int(rng.choice([0, 16, 64, 512]))
    groups = length_groups(lengths, call_cost)
    assert sorted(row for rows in groups for row in rows) == list(range(len(lengths)))
    assert all(lengths[rows[0]] == max(lengths[row] for row in rows) for rows in groups)
    cost = sum(len(rows) * lengths[rows[0]] + call_cost for rows in groups)
    # Sorting first loses nothing: some cheapest split groups consecutive rows of the sorted order.
    assert cost == exhaustive_best_cost(sorted(lengths, reverse=True), call_cost)


def test_grouped_text_batches_give_the_embeddings_and_gradients_of_whole_batches(tokenizer, catalogue):
    model = tiny_text_model(tokenizer)
    model.text_model.config.hidden_dropout_prob = model.text_model.config.attention_probs_dropout_prob = 0.0
    model.text_model = type(model.text_model)(model.text_model.config)  # no dropout: both runs see one network
    model.train()  # length groups are a training fast path
    processor = MultimodalRetrievalProcessor(tokenizer, max_product_length=96)
    rows = make_training_pairs(catalogue.select(range(12)), seed=0).to_list()
    for row in rows[::3]:
        row["description"] = None  # title-only products next to long descriptions
    batch = RetrievalCollator(processor, uses_images=False)(rows)

    results = {}
    for grouped in (False, True):
        speedups.apply(model, length_groups=grouped)
        model.zero_grad()
        outputs = {}

        def step():
            output = model(**batch)
            output.loss.backward()
            outputs.update(loss=output.loss.detach(), products=output.product_embeds.detach())

        calls = tower_examples({"text": model.text_model}, step)["text"]
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[grouped] = calls, outputs, gradients
    (whole_calls, whole, whole_grads), (grouped_calls, grouped, grouped_grads) = results[False], results[True]
    assert whole_calls == (24, 2) and grouped_calls[0] == 24 and grouped_calls[1] > 2  # really split
    torch.testing.assert_close(grouped["products"], whole["products"], atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped["loss"], whole["loss"], atol=1e-5, rtol=0)
    assert grouped_grads.keys() == whole_grads.keys()
    for name in whole_grads:
        torch.testing.assert_close(grouped_grads[name], whole_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_text_batches_run_whole_when_left_padded_or_not_training(tokenizer):
    model = tiny_text_model(tokenizer).train()
    speedups.apply(model)
    long_text = "red cotton kurta for women with mirror work on the yoke, side slits and three-quarter sleeves. " * 4
    texts = [long_text, "black shoes", "watch"]

    def tower_calls(inputs):
        return tower_examples({"text": model.text_model}, lambda: model.get_query_embeddings(**inputs))["text"]

    right_padded = tokenizer(texts, padding=True, return_tensors="pt")
    assert tower_calls(right_padded) == (3, 2)  # the long text alone, the two short ones together
    left_padded = AutoTokenizer.from_pretrained(get_minilm_path(), padding_side="left")(
        texts, padding=True, return_tensors="pt"
    )
    assert tower_calls(left_padded) == (3, 1)
    model.eval()
    assert tower_calls(right_padded) == (3, 1)


def cpu_bf16_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


@pytest.mark.skipif(not cpu_bf16_works(), reason="this CPU build has no bf16 autocast")
def test_bf16_indexing_is_close_to_float32(catalogue):
    path = get_minilm_path()
    model = MultimodalRetrievalModel.from_towers_pretrained(path, max_product_length=32).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(path, config=model.config)
    rows = catalogue.select(range(12))
    full = build_product_index(model, processor, rows, show_progress=False)
    half = build_product_index(model, processor, rows, show_progress=False, dtype=torch.bfloat16)
    cosine = (torch.tensor(full.embeddings) * torch.tensor(half.embeddings)).sum(-1)
    assert half.ids == full.ids and cosine.min().item() > 0.99
    assert not torch.equal(torch.tensor(full.embeddings), torch.tensor(half.embeddings))  # bf16 really ran
